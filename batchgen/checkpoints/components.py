"""Component classes of a diffusers folder -> how batchgen builds and loads them.

``model_index.json`` names each component's class (``"unet": ["diffusers",
"UNet2DConditionModel"]``). This table maps those class names to our native modules (or, for text
encoders and tokenizers, to ``transformers``), so loading a component is the same code for every
family: read its config, build the module on the meta device, load its weights strictly. A class
missing here is refused with an error naming the class, the component and what we know.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from .folder import WEIGHT_BASENAMES, CheckpointFolder, find_weight_files, load_component, load_weights_into

log = logging.getLogger(__name__)


def _lazy(module: str, cls_name: str) -> Callable[[dict], torch.nn.Module]:
    def build(config: dict) -> torch.nn.Module:
        import importlib

        return getattr(importlib.import_module(module, __package__), cls_name)(config)

    return build


def _text_encoder(cls_name: str) -> Callable[[dict], torch.nn.Module]:
    def build(config: dict) -> torch.nn.Module:
        from ..models.text import build_text_encoder

        return build_text_encoder(cls_name, config)

    return build


def _convert_clip(state: dict) -> dict:
    """CLIPTextModel weights with or without the ``text_model.`` level (every diffusers folder on
    the hub has it; transformers >= 5.6 flattened the class) -> the installed class's names."""
    from .single_file import clip_text_model_prefix

    if clip_text_model_prefix():
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _convert_vae(state: dict) -> dict:
    from ..models.vae import convert_legacy_vae_keys

    return convert_legacy_vae_keys(state)


def _convert_qwen3(state: dict) -> dict:
    """Qwen3 weights saved from ``Qwen3ForCausalLM`` (keys under ``model.``, plus the ``lm_head``
    a text encoder never uses) -> ``Qwen3Model``'s names; a ``Qwen3Model`` file passes unchanged."""
    if not any(k.startswith("model.") for k in state):
        return state
    return {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head.")}


@dataclass(frozen=True)
class ModelClass:
    """A weight-bearing component class: how to build it from its config.json."""

    build: Callable[[dict], torch.nn.Module]
    convert: Callable[[dict], dict] | None = None

    def checked_build(self, config: dict, where: str, meta: bool = True) -> torch.nn.Module:
        """``build(config)``, on the meta device unless ``meta`` is False. A config comes from the
        checkpoint (config.json, or metadata embedded in a single file): one the class cannot be
        built from (sizes whose storage overflows, wrong types) is a CheckpointError naming
        ``where``, not a traceback."""
        try:
            if not meta:
                return self.build(config)
            with torch.device("meta"):
                return self.build(config)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError,
                ZeroDivisionError) as exc:
            raise CheckpointError(f"{where}: cannot build the model from its config "
                                  f"({type(exc).__name__}: {str(exc)[:300]})") from None


# class name (model_index.json) -> builder.
MODEL_CLASSES: dict[str, ModelClass] = {
    "UNet2DConditionModel": ModelClass(_lazy("..models.unet", "UNet2DConditionModel")),
    "AutoencoderKL": ModelClass(_lazy("..models.vae", "AutoencoderKL"), _convert_vae),
    "SD3Transformer2DModel": ModelClass(_lazy("..models.mmdit", "SD3Transformer2DModel")),
    "FluxTransformer2DModel": ModelClass(_lazy("..models.flux", "FluxTransformer2DModel")),
    "DiTTransformer2DModel": ModelClass(_lazy("..models.dit", "DiTTransformer2DModel")),
    "ZImageTransformer2DModel": ModelClass(_lazy("..models.zimage", "ZImageTransformer2DModel")),
    # DiT folders on the hub name the older generic class; the config says it is a DiT.
    "Transformer2DModel": ModelClass(_lazy("..models.dit", "DiTTransformer2DModel")),
    "CLIPTextModel": ModelClass(_text_encoder("CLIPTextModel"), _convert_clip),
    "CLIPTextModelWithProjection": ModelClass(_text_encoder("CLIPTextModelWithProjection")),
    "T5EncoderModel": ModelClass(_text_encoder("T5EncoderModel")),
    "Qwen3Model": ModelClass(_text_encoder("Qwen3Model"), _convert_qwen3),
}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "Qwen2Tokenizer",
                     "Qwen2TokenizerFast")


def register_model_class(name: str, build: Callable[[dict], torch.nn.Module],
                         convert: Callable[[dict], dict] | None = None) -> None:
    """Teach the loader a component class (a family file calls this for its denoiser)."""
    MODEL_CLASSES[name] = ModelClass(build, convert)


def component_class(folder: CheckpointFolder, name: str) -> tuple[str, str]:
    """(library, class) of component ``name``; a clear error when model_index.json lacks it."""
    comps = folder.components()
    if name not in comps:
        listed = ", ".join(sorted(comps)) or "none"
        raise CheckpointError(f"{folder.root}/model_index.json: no component '{name}' "
                              f"(it lists: {listed})")
    return comps[name]


def _meta_model(folder: CheckpointFolder, name: str):
    """``(library, model spec, config, module on the meta device)`` of component ``name``; a class
    batchgen cannot build is an error naming it and the known ones."""
    library, cls = component_class(folder, name)
    spec = MODEL_CLASSES.get(cls)
    if spec is None:
        raise CheckpointError(
            f"{folder.root}/model_index.json: component '{name}' has class {cls!r}, which batchgen "
            f"cannot build (known: {', '.join(sorted(MODEL_CLASSES))})")
    config = folder.read_json(f"{name}/config.json")
    module = spec.checked_build(config, f"{folder.root}/{name}/config.json")
    return library, spec, config, module


def load_model(folder: CheckpointFolder, name: str, variant: str | None = None,
               allow_pickle: bool = False, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build component ``name`` from ``<name>/config.json`` and load its weights strictly.

    ``dtype``: allocate the weights in this dtype (the checkpoint's tensors are cast while they
    are copied in), so a 12B bf16 checkpoint needs 24 GB of host memory, not 48; None: float32.
    """
    library, spec, config, module = _meta_model(folder, name)
    if next(module.buffers(), None) is not None:
        module = spec.checked_build(config, f"{folder.root}/{name}/config.json", meta=False)  # buffers: for real
        if dtype is not None:
            module = module.to(dtype)
    else:
        module = (module if dtype is None else module.to(dtype)).to_empty(device="cpu")
    load_component(folder, name, module, variant, allow_pickle, convert=spec.convert, library=library)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.eval().requires_grad_(False)


def build_model(folder: CheckpointFolder, name: str, variant: str | None = None,
                allow_pickle: bool = False) -> torch.nn.Module:
    """Component ``name`` built on the meta device from its config, weights not read (``batchgen
    inspect``): the weight files' keys and shapes (safetensors headers) are checked strictly
    against it, and its config and weight files are recorded as loaded, as :func:`load_model` does."""
    library, spec, config, module = _meta_model(folder, name)
    weights = find_weight_files(folder.component_dir(name), WEIGHT_BASENAMES.get(library, "model"), variant,
                                allow_pickle)
    if not weights.pickle:
        from .single_file import meta_state, read_header

        header = {}
        for path in weights.files:
            header.update(read_header(path))
        state = meta_state(header)
        source = ", ".join(str(p) for p in ([weights.index] if weights.index else weights.files))
        load_weights_into(module, spec.convert(state) if spec.convert else state, source)
    folder.loaded_files.extend(([weights.index] if weights.index else []) + weights.files)
    return module.eval().requires_grad_(False)


def load_tokenizer(folder: CheckpointFolder, name: str):
    """The tokenizer of component ``name`` (CLIP or T5), from local files only."""
    from ..models.text import load_tokenizer as _load

    _library, cls = component_class(folder, name)
    if cls not in TOKENIZER_CLASSES:
        raise CheckpointError(f"{folder.root}/model_index.json: tokenizer '{name}' has class {cls!r}; "
                              f"batchgen reads {', '.join(TOKENIZER_CLASSES)}")
    path = folder.component_dir(name)
    tokenizer = _load(path, cls)
    folder.loaded_files.extend(p for p in sorted(path.iterdir()) if p.is_file())
    return tokenizer


def load_scheduler_config(folder: CheckpointFolder, name: str = "scheduler") -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` (with its ``_class_name``), for the sampler registry."""
    component_class(folder, name)
    config = folder.read_json(f"{name}/scheduler_config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder.root}/{name}/scheduler_config.json: expected a JSON object")
    return config


class FolderSource(CheckpointFolder):
    """A diffusers folder as a model source (the interface of sources.py): components are built from
    the classes model_index.json names. Kept apart from :class:`CheckpointFolder` (the layout alone)
    so that folder.py never imports this module."""

    def load_model(self, name: str, variant: str | None = None, allow_pickle: bool = False, **options):
        return load_model(self, name, variant, allow_pickle, **options)

    def build_model(self, name: str, variant: str | None = None, allow_pickle: bool = False):
        """Component ``name`` on the meta device (no weights read); its files count as loaded."""
        return build_model(self, name, variant, allow_pickle)

    def load_tokenizer(self, name: str):
        return load_tokenizer(self, name)

    def load_scheduler_config(self, name: str = "scheduler") -> dict:
        return load_scheduler_config(self, name)


def open_folder(path: str | Path) -> "FolderSource":
    """Open a local diffusers-layout folder; errors name the missing file or folder."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"model path {root} does not exist")
    if root.is_file():
        kind = "pickle" if root.suffix in {".ckpt", ".bin", ".pt", ".pth"} else "single-file"
        raise CheckpointError(
            f"{root}: is a {kind} checkpoint file; batchgen loads diffusers-layout folders "
            "(model_index.json + one sub-folder per component)"
        )
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{root}: missing component file 'model_index.json' (not a diffusers-layout folder)")
    folder = FolderSource(root=root, model_index={})
    folder.model_index = folder.read_json("model_index.json")
    if not isinstance(folder.model_index, dict):
        raise CheckpointError(f"{index_path}: expected a JSON object")
    for name in folder.components():
        folder.component_dir(name)
    return folder
