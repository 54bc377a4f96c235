"""Model sources: where a family's components come from, by name.

:meth:`Family.load <batchgen.families.base.Family.load>` asks a *source* for each component it
needs (a model module, a tokenizer, the scheduler config) and never looks at files itself, so the
same family code renders every checkpoint format. A source has:

- ``root``, ``model_index`` (the full component list, with null entries), ``pipeline_class``,
  ``components()`` (name -> (library, class) of what it can provide), ``where`` and
  ``missing_hint(name)`` for error messages;
- ``load_model(name, variant, allow_pickle)``, ``load_tokenizer(name)``,
  ``load_scheduler_config(name)``; ``build_model(name)`` (the module on the meta device, no weights:
  ``batchgen inspect``); ``component_config(name)``; ``stored_dtypes(name)`` (from safetensors headers);
- ``fingerprint()`` (sha256 over the content of everything the model is made of) and ``describe()``
  (extra ``model_info`` entries).

Three implementations:

- :class:`~batchgen.checkpoints.folder.CheckpointFolder`: a diffusers folder;
- :class:`SingleFileSource`: an A1111 / ComfyUI / civitai single file. :mod:`.single_file` detects
  the family and variant and converts the keys; the configs are batchgen's standard configs of the
  variant, or the configs embedded in the file's metadata (``batchgen.configs``: only files batchgen
  writes carry them, e.g. the tiny test models; no real checkpoint does). CLIP tokenizers come from
  the file's metadata (``batchgen.tokenizers``) or are built offline from open_clip's BPE file
  (:mod:`.clip_vocab`); a T5 tokenizer must be given as an override.
- :class:`OverrideSource`: any source with some components replaced (``vae=``, ``text_encoders=``,
  ``tokenizers=``: a single ``.safetensors`` file in the original or diffusers/transformers layout,
  a diffusers component folder with ``config.json``, or a whole diffusers folder whose sub-folder of
  that name is taken) and an optional ``prediction_type``.

Weights keep strict loading everywhere: every converted key must exist in the module and every
module key must be given. Stored fp16 / bf16 / float8 tensors are upcast to float32 (the run dtype
conversion happens in :meth:`Family.to`).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from . import single_file as sf
from .clip_vocab import EOT, PAD_TOKENS, require_bpe_path, tokenizer_from_files
from .components import MODEL_CLASSES, TOKENIZER_CLASSES, open_folder
from .folder import (
    WEIGHT_BASENAMES,
    CheckpointFolder,
    find_weight_files,
    fingerprint_entries,
    header_dtypes,
    load_weights_into,
    local_model_path,
    read_json_file,
)

log = logging.getLogger(__name__)

__all__ = [
    "CONFIGS_KEY",
    "TOKENIZERS_KEY",
    "OverrideSource",
    "SingleFileSource",
    "open_source",
    "write_single_file",
]

CONFIGS_KEY = "batchgen.configs"  # safetensors metadata: JSON {model_index, scheduler, <component>: config}
TOKENIZERS_KEY = "batchgen.tokenizers"  # safetensors metadata: JSON {tokenizer name: {file name: text}}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
MODEL_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def tokenizer_for(encoder: str) -> str:
    """``text_encoder_2`` -> ``tokenizer_2``."""
    return encoder.replace("text_encoder", "tokenizer")


def _encoder_for(tokenizer: str) -> str:
    return tokenizer.replace("tokenizer", "text_encoder")


def _override_hint(name: str) -> str:
    if name == "vae":
        return "give it as an override: load_pipeline(..., vae=FILE_OR_FOLDER) (job spec: model.vae)"
    if name in TEXT_ENCODERS:
        return (f"give it as an override: load_pipeline(..., text_encoders={{'{name}': FILE_OR_FOLDER}}) "
                f"(job spec: model.text_encoders.{name})")
    if name.startswith("tokenizer"):
        return (f"give it as an override: load_pipeline(..., tokenizers={{'{name}': FOLDER}}), a folder with the "
                f"tokenizer files or a diffusers folder that has {name}/ (job spec: model.tokenizers.{name})")
    return "a single file must carry its denoiser (UNet or transformer)"


# ------------------------------------------------------------------------------------------------
# Weight files (safetensors, or pickle when allowed)
# ------------------------------------------------------------------------------------------------


class _WeightFile:
    """A ``.safetensors`` file read lazily (header first, tensors on request), or a pickle
    checkpoint (``.ckpt``) read whole with ``torch.load(weights_only=True)`` when allowed."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = path
        self.metadata: dict[str, str] = {}
        self._state: dict[str, torch.Tensor] | None = None
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise CheckpointError(f"{path}: pickle checkpoints are refused (loading them can run code); convert "
                                      "the file to .safetensors, or pass allow_pickle=True if you trust it")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign pickles
                raise CheckpointError(f"{path}: cannot read the pickle checkpoint ({exc})") from None
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: the pickle checkpoint holds no state dict")
            self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            self.header = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in self._state.items()}
        else:
            self.header = sf.read_header(path)
            self.metadata = sf.read_metadata(path)

    def tensors(self, keys) -> dict[str, torch.Tensor]:
        if self._state is not None:
            return {k: self._state[k] for k in keys}
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: cannot read weights ({exc})") from None


def _build_module(cls: str, config: dict, where: str, meta: bool = False) -> torch.nn.Module:
    spec = MODEL_CLASSES.get(cls)
    if spec is None:
        raise CheckpointError(f"{where}: component class {cls!r} cannot be built "
                              f"(known: {', '.join(sorted(MODEL_CLASSES))})")
    module = spec.checked_build(copy.deepcopy(config), where)
    if not meta:
        if next(module.buffers(), None) is not None:  # buffers computed in __init__: build them for real
            module = spec.checked_build(copy.deepcopy(config), where, meta=False)
        else:
            module = module.to_empty(device="cpu")
    return module


def _check_meta(cls: str, config: dict, state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """``cls`` on the meta device with ``state`` (meta tensors) checked strictly against it."""
    module = _build_module(cls, config, where, meta=True)
    convert = MODEL_CLASSES[cls].convert
    load_weights_into(module, convert(state) if convert is not None else state, where)
    return module.eval().requires_grad_(False)


def _load_module(cls: str, config: dict, state: dict[str, torch.Tensor], where: str,
                 dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build ``cls`` from ``config``, load ``state`` strictly (upcast to ``dtype``, default float32)."""
    module = _build_module(cls, config, where)
    dtype = dtype or torch.float32
    if dtype != torch.float32:
        module = module.to(dtype)
    convert = MODEL_CLASSES[cls].convert
    if convert is not None:
        state = convert(state)
    load_weights_into(module, sf.upcast(state, dtype), where)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Single files
# ------------------------------------------------------------------------------------------------


class SingleFileSource:
    """A single-file checkpoint: detection, key conversion, standard (or embedded) configs."""

    def __init__(self, path: str | Path, prediction_type: str | None = None, allow_pickle: bool = False):
        self.root = Path(path)
        self.loaded_files: list[Path] = [self.root]
        self._file = _WeightFile(self.root, allow_pickle)
        self.detected = sf.detect(self._file.header, self.root)
        self._extra: list[tuple[str, Path]] = []  # (fingerprint label, file) besides the checkpoint
        raw = self._file.metadata.get(CONFIGS_KEY)
        self.embedded = raw is not None
        if raw is not None:
            self.configs = self._embedded_configs(raw, prediction_type)
        else:
            self.configs = sf.standard_configs(self.detected, prediction_type)
        self.model_index: dict = self.configs["model_index"]
        self._tokenizer_files = self._embedded_tokenizers()
        log.info("%s: single-file %s checkpoint (%s configs; components: %s)", self.root, self.detected.variant,
                 "embedded" if self.embedded else "standard", ", ".join(self.detected.components))

    def _embedded_configs(self, raw: str, prediction_type: str | None) -> dict:
        try:
            configs = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.root}: metadata '{CONFIGS_KEY}' is not valid JSON ({exc})") from None
        if not isinstance(configs, dict) or not isinstance(configs.get("model_index"), dict) \
                or not isinstance(configs.get("scheduler"), dict):
            raise CheckpointError(f"{self.root}: metadata '{CONFIGS_KEY}' must be an object with 'model_index' and "
                                  "'scheduler' (and one config per component)")
        if prediction_type is not None:
            configs["scheduler"] = scheduler_with_prediction_type(configs["scheduler"], prediction_type, str(self.root))
        return configs

    def _embedded_tokenizers(self) -> dict[str, dict[str, str]]:
        raw = self._file.metadata.get(TOKENIZERS_KEY)
        if raw is None:
            return {}
        try:
            files = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.root}: metadata '{TOKENIZERS_KEY}' is not valid JSON ({exc})") from None
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise CheckpointError(f"{self.root}: metadata '{TOKENIZERS_KEY}' must map tokenizer names to "
                                  "{file name: text}")
        return files

    # ---------------------------------------------------------------------------- describing
    @property
    def pipeline_class(self) -> str:
        return str(self.model_index.get("_class_name") or "")

    @property
    def where(self) -> str:
        return str(self.root)

    def components(self) -> dict[str, tuple[str, str]]:
        """What the file provides: its model components, the tokenizers of its text encoders, the scheduler."""
        out = {}
        for name, value in self.model_index.items():
            if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2 or not all(value):
                continue
            if name in MODEL_COMPONENTS and name not in self.detected.components:
                continue
            if name.startswith("tokenizer") and _encoder_for(name) not in self.detected.components:
                continue
            out[name] = (str(value[0]), str(value[1]))
        return out

    def missing_hint(self, name: str) -> str:
        return f"the single file does not carry it; {_override_hint(name)}"

    def describe(self) -> dict[str, Any]:
        d = self.detected
        return {"format": "single_file",
                "single_file": {"family": d.family, "variant": d.variant, "components": sorted(d.components),
                                "configs": "embedded" if self.embedded else "standard"}}

    def component_config(self, name: str) -> dict | None:
        config = self.configs.get(name)
        return copy.deepcopy(config) if isinstance(config, dict) else None

    def stored_dtypes(self, name: str, variant: str | None = None) -> dict[str, int]:
        keys = self._keys(name)
        return header_dtypes([{k: self._file.header[k] for k in keys}])

    def fingerprint(self) -> str:
        """sha256 over the file's content, the tokenizer files built for it and the effective
        prediction type (the scheduler of a file that does not say depends on it)."""
        prediction = self.configs["scheduler"].get("prediction_type", "flow")
        return fingerprint_entries([("checkpoint", self.root), *self._extra], [f"prediction_type\t{prediction}\n"])

    # ----------------------------------------------------------------------------- components
    def _class(self, name: str) -> str:
        entry = self.model_index.get(name)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            raise CheckpointError(f"{self.root}: a {self.detected.variant} model has no component '{name}'")
        return str(entry[1])

    def _keys(self, name: str) -> list[str]:
        prefix = self.detected.components.get(name)
        if prefix is None:
            raise CheckpointError(f"{self.root}: the single file has no '{name}'; {_override_hint(name)}")
        others = [p for c, p in self.detected.components.items() if c != name and p and p != prefix]
        markers = (sf.MARKER_V_PRED, sf.MARKER_ZTSNR)
        return [k for k in self._file.header if k.startswith(prefix) and not any(k.startswith(o) for o in others)
                and (prefix or k not in markers)]

    def _config(self, name: str) -> dict:
        config = self.component_config(name)
        if config is None:
            raise CheckpointError(f"{self.root}: no config for component '{name}' of a {self.detected.variant} model")
        return config

    def load_model(self, name: str, variant: str | None = None, allow_pickle: bool = False,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Component ``name``: its tensors read, converted to diffusers names, upcast, loaded strictly."""
        cls, config = self._class(name), self._config(name)
        prefix = self.detected.components.get(name)
        keys = self._keys(name)
        where = f"{self.root}: {name} ('{prefix}*')" if prefix else f"{self.root}: {name} (bare keys)"
        state = {k[len(prefix):]: v for k, v in self._file.tensors(keys).items()}
        converted = sf.convert_component(state, sf.COMPONENT_KINDS[self.detected.family][name], where)
        return _load_module(cls, config, converted, where, dtype)

    def build_model(self, name: str, variant: str | None = None, allow_pickle: bool = False) -> torch.nn.Module:
        """Component ``name`` on the meta device, its converted keys and shapes checked strictly
        against it from the header alone (no tensor data read)."""
        cls, config = self._class(name), self._config(name)
        prefix = self.detected.components.get(name)
        where = f"{self.root}: {name} ('{prefix}*')" if prefix else f"{self.root}: {name} (bare keys)"
        state = {k[len(prefix):]: v for k, v in sf.meta_state({k: self._file.header[k] for k in self._keys(name)}).items()}
        converted = sf.convert_component(state, sf.COMPONENT_KINDS[self.detected.family][name], where)
        return _check_meta(cls, config, converted, where)

    def load_tokenizer(self, name: str):
        cls = self._class(name)
        if cls not in TOKENIZER_CLASSES:
            raise CheckpointError(f"{self.root}: tokenizer '{name}' has class {cls!r}; batchgen reads "
                                  f"{', '.join(TOKENIZER_CLASSES)}")
        if name in self._tokenizer_files:
            return tokenizer_from_files(self._tokenizer_files[name], cls)
        if not cls.startswith("CLIP"):
            raise CheckpointError(
                f"{self.root}: the {self.detected.variant} single file has no {cls} tokenizer for '{name}' "
                f"(single files carry none, and batchgen never downloads one); {_override_hint(name)}")
        pad = PAD_TOKENS.get(self.detected.family, {}).get(name, EOT)
        bpe = require_bpe_path(f", or {_override_hint(name)}")
        self._extra.append((f"{name}/{bpe.name} (pad {pad})", bpe))
        return tokenizer_from_files(_clip_files(pad, bpe), cls)

    def load_scheduler_config(self, name: str = "scheduler") -> dict:
        return copy.deepcopy(self.configs["scheduler"])


def _clip_files(pad: str, bpe: Path) -> dict[str, str]:
    from .clip_vocab import clip_tokenizer_files

    return clip_tokenizer_files(pad, bpe)


def scheduler_with_prediction_type(config: dict, prediction_type: str, where: str) -> dict:
    """``config`` with ``prediction_type`` (epsilon / v_prediction); refused for flow-matching schedulers."""
    cls = str(config.get("_class_name", ""))
    if cls.startswith("FlowMatch") or prediction_type in ("flow", "flow_matching"):
        if prediction_type in ("flow", "flow_matching") and cls.startswith("FlowMatch"):
            return dict(config)
        raise CheckpointError(f"{where}: prediction_type {prediction_type!r} does not apply to this model's "
                              f"{cls or 'scheduler'} (flow matching: leave prediction_type unset)")
    if prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"{where}: prediction_type {prediction_type!r} is not supported "
                              f"(choose {' or '.join(PREDICTION_TYPES)})")
    return {**config, "prediction_type": prediction_type}


# ------------------------------------------------------------------------------------------------
# Component overrides
# ------------------------------------------------------------------------------------------------


class _Override:
    """One overridden model component: a weights file, or a diffusers component folder."""

    def __init__(self, name: str, given, path: Path, allow_pickle: bool):
        self.name, self.given, self.path = name, str(given), path
        self.file: _WeightFile | None = None
        self.folder: Path | None = None  # the component folder (config.json + weights)
        self.full: Path | None = None  # the diffusers folder it sits in (model_index.json), if any
        if path.is_file():
            if path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
                raise CheckpointError(f"{path}: override '{name}' must be a .safetensors file or a folder")
            self.file = _WeightFile(path, allow_pickle)
        elif path.is_dir():
            if (path / "model_index.json").is_file():
                self.full, self.folder = path, path / name
                if not (self.folder / "config.json").is_file():
                    raise CheckpointError(f"{path}: override '{name}' is a diffusers folder without "
                                          f"'{name}/config.json'")
            elif (path / "config.json").is_file():
                self.folder = path
                if (path.parent / "model_index.json").is_file():
                    self.full = path.parent
            else:
                raise CheckpointError(f"{path}: override '{name}' is neither a component folder (config.json + "
                                      "weights) nor a diffusers folder (model_index.json)")
        else:
            raise CheckpointError(f"{path}: override '{name}' does not exist")

    def folder_config(self) -> dict:
        config = read_json_file(self.folder / "config.json", f"{self.folder}/config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.folder}/config.json: expected a JSON object")
        return config

    def folder_class(self) -> tuple[str, str]:
        config = self.folder_config()
        if config.get("_class_name"):
            return "diffusers", str(config["_class_name"])
        if config.get("architectures"):
            return "transformers", str(config["architectures"][0])
        raise CheckpointError(f"{self.folder}/config.json: names no class ('_class_name' or 'architectures')")

    def weight_files(self, library: str, variant: str | None, allow_pickle: bool):
        return find_weight_files(self.folder, WEIGHT_BASENAMES.get(library, "model"), variant, allow_pickle)

    def tokenizer_dir(self, tokenizer: str) -> Path | None:
        """A tokenizer that comes with this override: ``<full>/<tokenizer>/``, or tokenizer files
        inside the component folder itself (T5 folders often hold ``spiece.model``)."""
        if self.full is not None and (self.full / tokenizer).is_dir():
            return self.full / tokenizer
        if self.folder is not None and any((self.folder / n).is_file()
                                           for n in ("tokenizer.json", "spiece.model", "vocab.json")):
            return self.folder
        return None


def _strip_common_prefix(state: Mapping[str, Any], prefixes) -> dict[str, Any]:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


_TEXT_PREFIXES = sorted({p for table in sf.TEXT_ENCODER_PREFIXES.values() for p in table.values()}
                        | {"cond_stage_model.", "text_encoder.", "text_encoders.", "te."}, key=len, reverse=True)


def _convert_override_file(state: dict[str, torch.Tensor], cls: str, where: str) -> dict[str, torch.Tensor]:
    """A separate component file in the original layout (LDM VAE, OpenCLIP) or in the
    diffusers / transformers layout -> the module's names."""
    if cls == "AutoencoderKL":
        state = _strip_common_prefix(state, sf.VAE_PREFIXES)
        if any(".down_blocks." in k or ".up_blocks." in k for k in state):
            return state  # diffusers layout (legacy attention names are converted by the VAE class)
        return sf.convert_component(state, "vae", where)
    if cls in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        state = _strip_common_prefix(state, _TEXT_PREFIXES)
        projection = cls == "CLIPTextModelWithProjection"
        if any(k.startswith("transformer.resblocks.") for k in state):
            kind = "openclip_proj" if projection else "openclip"
        else:
            kind = "clip_proj" if projection else "clip"
        return sf.convert_component(state, kind, where)
    if cls == "T5EncoderModel":
        return sf.convert_component(_strip_common_prefix(state, _TEXT_PREFIXES), "t5", where)
    if cls == "Qwen3Model":  # ComfyUI's qwen_3_4b.safetensors: transformers' Qwen3 names under model.
        return MODEL_CLASSES[cls].convert(_strip_common_prefix(state, _TEXT_PREFIXES))
    raise CheckpointError(f"{where}: a weights file cannot stand in for a {cls} (only the VAE and the text "
                          "encoders can be overridden)")


class OverrideSource:
    """``base`` with some components replaced and / or another prediction type."""

    def __init__(self, base, vae=None, text_encoders=None, tokenizers=None, prediction_type: str | None = None,
                 allow_pickle: bool = False, storage_config=None, resolve=None):
        self.base = base
        local = resolve or (lambda value: local_model_path(value, storage_config))
        self.allow_pickle = allow_pickle
        self.prediction_type = prediction_type
        given: dict[str, Any] = {}
        if vae is not None:
            given["vae"] = vae
        given.update(_named(text_encoders, TEXT_ENCODERS, "text_encoders"))
        self.overrides: dict[str, _Override] = {
            name: _Override(name, value, Path(local(value)), allow_pickle) for name, value in given.items()}
        self.tokenizers: dict[str, Path] = {}
        for name, value in _named(tokenizers, ("tokenizer", "tokenizer_2", "tokenizer_3"), "tokenizers").items():
            path = Path(local(value))
            if path.is_dir() and (path / "model_index.json").is_file():
                path = path / name
            if not path.is_dir():
                raise CheckpointError(f"{path}: tokenizer override '{name}' must be a folder with the tokenizer files "
                                      f"(vocab.json + merges.txt, or tokenizer.json / spiece.model) or a diffusers "
                                      f"folder that has {name}/")
            self.tokenizers[name] = path
        index = copy.deepcopy(base.model_index)
        for name, override in self.overrides.items():
            index[name] = list(override.folder_class()) if override.folder is not None else list(self._base_class(name))
        for name in self.tokenizers:
            if not _listed(index.get(name)):
                raise CheckpointError(f"{base.where}: tokenizer override '{name}': this model has no such tokenizer "
                                      f"(it lists: {', '.join(k for k in index if k.startswith('tokenizer'))})")
        self.model_index = index
        self._files: list[tuple[str, Path]] = []
        if prediction_type is not None:
            scheduler_with_prediction_type(base.load_scheduler_config(), prediction_type, base.where)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["base"], name)

    def _base_class(self, name: str) -> tuple[str, str]:
        entry = self.base.model_index.get(name)
        if not _listed(entry):
            raise CheckpointError(f"{self.overrides[name].path}: override '{name}' is a weights file, but this model "
                                  f"has no config for a '{name}'; give a diffusers component folder (with config.json)")
        return str(entry[0]), str(entry[1])

    @property
    def pipeline_class(self) -> str:
        return self.base.pipeline_class

    def components(self) -> dict[str, tuple[str, str]]:
        out = dict(self.base.components())
        for name in self.overrides:
            out[name] = tuple(self.model_index[name])
            tokenizer = tokenizer_for(name)
            if name in TEXT_ENCODERS and _listed(self.model_index.get(tokenizer)):
                out[tokenizer] = tuple(self.model_index[tokenizer])
        for name in self.tokenizers:
            out[name] = tuple(self.model_index[name])
        return out

    def describe(self) -> dict[str, Any]:
        out = dict(self.base.describe())
        out["overrides"] = {**{name: o.given for name, o in self.overrides.items()},
                            **{name: str(p) for name, p in self.tokenizers.items()}}
        if self.prediction_type is not None:
            out["prediction_type_override"] = self.prediction_type
        return out

    # ---------------------------------------------------------------------------- components
    def _override_config(self, override: _Override, cls: str) -> dict:
        if override.folder is not None:
            return override.folder_config()
        config = self.base.component_config(override.name)
        if config is None:
            raise CheckpointError(f"{override.path}: override '{override.name}' is a weights file, but this model has "
                                  f"no config for it; give a diffusers component folder (with config.json)")
        return config

    def load_model(self, name: str, variant: str | None = None, allow_pickle: bool = False, **options):
        override = self.overrides.get(name)
        if override is None:
            return self.base.load_model(name, variant, allow_pickle, **options)
        library, cls = self.model_index[name]
        config = self._override_config(override, cls)
        where = f"{override.path} (override '{name}')"
        if override.file is not None:
            state = override.file.tensors(list(override.file.header))
            state = _convert_override_file(state, cls, where)
        else:
            from .folder import read_state_dict

            weights = override.weight_files(library, variant, allow_pickle or self.allow_pickle)
            self._record(override, weights)
            state = read_state_dict(weights)
        return _load_module(cls, config, state, where, options.get("dtype"))

    def _record(self, override: _Override, weights) -> None:
        """The files a folder override is loaded from, for the fingerprint."""
        chosen = [override.folder / "config.json", *weights.files] + ([weights.index] if weights.index else [])
        self._files += [(f"{override.name}/{p.relative_to(override.folder).as_posix()}", p) for p in chosen]

    def build_model(self, name: str, variant: str | None = None, allow_pickle: bool = False):
        override = self.overrides.get(name)
        if override is None:
            return self.base.build_model(name, variant, allow_pickle)
        library, cls = self.model_index[name]
        config = self._override_config(override, cls)
        where = f"{override.path} (override '{name}')"
        if override.file is not None:
            state = _convert_override_file(sf.meta_state(override.file.header), cls, where)
            return _check_meta(cls, config, state, where)
        weights = override.weight_files(library, variant, allow_pickle or self.allow_pickle)
        self._record(override, weights)
        if weights.pickle:
            return _build_module(cls, config, where, meta=True).eval()
        header = {}
        for path in weights.files:
            header.update(sf.read_header(path))
        return _check_meta(cls, config, sf.meta_state(header), where)

    def load_tokenizer(self, name: str):
        from ..models.text import load_tokenizer

        path = self.tokenizers.get(name)
        encoder = self.overrides.get(_encoder_for(name))
        if path is None and encoder is not None:
            path = encoder.tokenizer_dir(name)
        if path is None:
            return self.base.load_tokenizer(name)
        cls = self.model_index[name][1]
        tokenizer = load_tokenizer(path, cls)
        self._files.extend((f"{name}/{p.name}", p) for p in sorted(path.iterdir()) if p.is_file())
        return tokenizer

    def load_scheduler_config(self, name: str = "scheduler") -> dict:
        config = self.base.load_scheduler_config(name)
        if self.prediction_type is not None:
            config = scheduler_with_prediction_type(config, self.prediction_type, self.base.where)
        return config

    def component_config(self, name: str) -> dict | None:
        override = self.overrides.get(name)
        if override is None:
            return self.base.component_config(name)
        return self._override_config(override, self.model_index[name][1])

    def stored_dtypes(self, name: str, variant: str | None = None) -> dict[str, int]:
        override = self.overrides.get(name)
        if override is None:
            return self.base.stored_dtypes(name, variant)
        if override.file is not None:
            return header_dtypes([override.file.header])
        weights = override.weight_files(self.model_index[name][0], variant, True)
        return {} if weights.pickle else header_dtypes(sf.read_header(f) for f in weights.files)

    def _override_files(self) -> list[tuple[str, Path]]:
        """Override weight files (folder overrides and tokenizers are recorded as they are loaded)."""
        return [(f"{name}/{o.path.name}", o.path) for name, o in self.overrides.items() if o.file is not None]

    def fingerprint(self) -> str:
        """The base's fingerprint alone when nothing changes what it loads; else sha256 over it,
        every override file and a changed prediction type."""
        base = self.base.fingerprint()
        entries = self._override_files() + self._files
        extra = []
        if self.prediction_type is not None:
            own = self.base.load_scheduler_config().get("prediction_type", "epsilon")
            if own != self.prediction_type:
                extra.append(f"prediction_type\t{self.prediction_type}\n")
        if not entries and not extra:
            return base
        return fingerprint_entries(entries, [f"base\t{base}\n", *extra])


def _listed(entry) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and bool(entry[0]) and bool(entry[1])


def _named(value, names: tuple[str, ...], what: str) -> dict[str, Any]:
    """``{component: path}`` of an override argument; a plain path means a diffusers folder to take
    every one of ``names`` from that it has."""
    if value is None:
        return {}
    if isinstance(value, (str, Path)):
        root = Path(str(value))
        if not (root / "model_index.json").is_file():
            raise CheckpointError(f"{what}: {value} is not a diffusers folder (no model_index.json); give "
                                  f"{{component: path}} ({', '.join(names)})")
        return {name: root for name in names if (root / name).is_dir()}
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{what}: expected {{component: path}} ({', '.join(names)}), got {type(value).__name__}")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise CheckpointError(f"{what}: unknown component(s) {unknown}; choose from {', '.join(names)}")
    return {name: path for name, path in value.items() if path is not None}


# ------------------------------------------------------------------------------------------------
# Opening a model
# ------------------------------------------------------------------------------------------------


def open_source(path: str | Path, *, vae=None, text_encoders=None, tokenizers=None, prediction_type: str | None = None,
                allow_pickle: bool = False, storage_config=None, resolve=None):
    """The source of a local model path: a diffusers folder or a single file, wrapped in an
    :class:`OverrideSource` when components are overridden or ``prediction_type`` is given.
    ``resolve`` turns an override's URI into a local path (default: :func:`local_model_path`; callers
    pass :func:`batchgen.builtin.resolve_model_uri` so that overrides may be ``builtin:`` models)."""
    root = Path(path)
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            raise CheckpointError(f"{root}: not a model: expected a diffusers folder (model_index.json) or a "
                                  f"single-file checkpoint ({', '.join(SAFETENSORS_SUFFIXES)})")
        base = SingleFileSource(root, prediction_type=prediction_type, allow_pickle=allow_pickle)
    else:
        base = open_folder(root)
    if vae is None and not text_encoders and not tokenizers and prediction_type is None:
        return base
    return OverrideSource(base, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                          prediction_type=prediction_type, allow_pickle=allow_pickle, storage_config=storage_config,
                          resolve=resolve)


# ------------------------------------------------------------------------------------------------
# Writing single files (tiny test models, re-exports)
# ------------------------------------------------------------------------------------------------


def single_file_family(folder: CheckpointFolder) -> str:
    """The single-file layout (:data:`single_file.FAMILIES`) of a diffusers folder."""
    cls = folder.pipeline_class
    if cls in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"):
        unet = folder.read_json("unet/config.json")
        return "sd2" if unet.get("use_linear_projection") else "sd1"
    if cls in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"):
        return "sdxl_refiner" if folder.model_index.get("requires_aesthetics_score") else "sdxl"
    if cls.startswith("StableDiffusion3"):
        return "sd3"
    if cls.startswith("Flux"):
        return "flux"
    if cls.startswith("ZImage"):
        return "zimage"
    raise CheckpointError(f"{folder.where}: pipeline class {cls!r} has no single-file layout "
                          "(SD 1.x / 2.x, SDXL, SD3, FLUX.1 and Z-Image have one)")


def write_single_file(folder: str | Path, path: str | Path, *, dtype: torch.dtype | None = None,
                      components=None, denoiser_prefix: str = sf.DENOISER_PREFIX, embed: bool = True,
                      embed_tokenizers: bool = True) -> Path:
    """Write the diffusers folder ``folder`` as one ``.safetensors`` file in the original layout.

    ``dtype`` casts the floating-point weights (fp16 / bf16 / float8_e4m3fn storage); ``components``
    keeps only those model components (e.g. ``["transformer"]`` for a transformer-only file);
    ``denoiser_prefix=""`` writes bare transformer keys. With ``embed`` (default) every config of the
    folder (model_index, scheduler, each component's config.json) goes into the metadata key
    ``batchgen.configs`` and (with ``embed_tokenizers``) the tokenizer files into
    ``batchgen.tokenizers``, so the file loads on its own: a model without standard real-size
    configs (batchgen's tiny ones) needs that.
    """
    from safetensors.torch import save_file

    from .folder import read_state_dict

    source = open_folder(folder)
    family = single_file_family(source)
    listed = source.components()
    kinds = sf.COMPONENT_KINDS[family]
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name in kinds:
        if name not in listed or (components is not None and name not in components):
            continue
        library, cls = listed[name]
        weights = find_weight_files(source.component_dir(name), WEIGHT_BASENAMES[library], None)
        state = read_state_dict(weights)
        convert = MODEL_CLASSES[cls].convert if cls in MODEL_CLASSES else None
        states[name] = convert(state) if convert is not None else state
    scheduler = source.load_scheduler_config()
    prediction = scheduler.get("prediction_type")
    single = sf.to_single_file(states, family, prediction_type="v_prediction" if prediction == "v_prediction" else None,
                               denoiser_prefix=denoiser_prefix)
    if dtype is not None:
        single = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in single.items()}
    metadata = {"format": "pt"}
    if embed:
        configs: dict[str, Any] = {"model_index": source.model_index, "scheduler": scheduler}
        tokenizers: dict[str, dict[str, str]] = {}
        for name, (_library, cls) in listed.items():
            if name in MODEL_COMPONENTS:
                configs[name] = source.read_json(f"{name}/config.json")
            elif cls in TOKENIZER_CLASSES:
                tokenizers[name] = {p.name: p.read_text(encoding="utf-8")
                                    for p in sorted(source.component_dir(name).iterdir()) if p.is_file()}
        metadata[CONFIGS_KEY] = json.dumps(configs, sort_keys=True)
        if embed_tokenizers:
            metadata[TOKENIZERS_KEY] = json.dumps(tokenizers, sort_keys=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in single.items()}, str(out), metadata=metadata)
    return out
