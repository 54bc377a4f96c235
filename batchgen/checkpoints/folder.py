"""The diffusers folder layout: weight files, strict key checks, fingerprints.

A diffusers folder holds ``model_index.json`` and one sub-folder per component. Which components
a model has, and their classes, is ``model_index.json``'s business (``"unet": ["diffusers",
"UNet2DConditionModel"]``); which of them a model family needs is the family's
(:mod:`batchgen.families`). Weights are safetensors: a single
file (``diffusion_pytorch_model.safetensors``, ``model.safetensors``), its ``fp16`` variant
(``diffusion_pytorch_model.fp16.safetensors``) or shards listed by an index
(``diffusion_pytorch_model.safetensors.index.json``, variant ``...safetensors.index.fp16.json``).
Pickle weights (``.bin``/``.ckpt``) are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

# Weight file stem per library of a component: diffusers models vs transformers models.
WEIGHT_BASENAMES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
PICKLE_NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model.bin", "model": "pytorch_model.bin"}
BUILTIN_PREFIX = "builtin:"


@dataclass
class WeightFiles:
    """The files one component's weights come from (one file, or the shards of an index)."""

    component: str
    files: list[Path]
    index: Path | None = None
    variant: str | None = None
    pickle: bool = False


@dataclass
class CheckpointFolder:
    """A resolved diffusers-layout folder and the files each component is loaded from."""

    root: Path
    model_index: dict
    loaded_files: list[Path] = field(default_factory=list)

    @property
    def pipeline_class(self) -> str:
        """``model_index.json``'s ``_class_name`` (e.g. ``StableDiffusionXLPipeline``)."""
        return str(self.model_index.get("_class_name") or "")

    def components(self) -> dict[str, tuple[str, str]]:
        """The components ``model_index.json`` lists: name -> (library, class). Entries that are
        null (``[null, null]``, e.g. no safety checker, no T5) are left out."""
        out = {}
        for name, value in self.model_index.items():
            if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
                continue
            library, cls = value
            if library and cls:
                out[name] = (str(library), str(cls))
        return out

    def component_dir(self, name: str) -> Path:
        path = self.root / name
        if not path.is_dir():
            raise CheckpointError(f"{self.root}: component folder '{name}/' is missing (model_index.json lists it)")
        return path

    # -------------------------------------------------- the model-source interface (sources.py)
    @property
    def where(self) -> str:
        """What error messages about the component list name."""
        return f"{self.root}/model_index.json"

    def missing_hint(self, name: str) -> str:
        return "it is missing or null"

    def component_config(self, name: str) -> dict | None:
        """``<name>/config.json``, or None where the folder has no such component."""
        if name not in self.components() or not (self.root / name / "config.json").is_file():
            return None
        return self.read_json(f"{name}/config.json")

    def stored_dtypes(self, name: str, variant: str | None = None) -> dict[str, int]:
        """Stored dtype -> element count of component ``name``'s weights (safetensors headers only)."""
        from .single_file import read_header

        library = self.components()[name][0]
        weights = find_weight_files(self.component_dir(name), WEIGHT_BASENAMES.get(library, "model"), variant, True)
        return header_dtypes(read_header(f) for f in weights.files if not weights.pickle)

    def fingerprint(self) -> str:
        return fingerprint(self.root, self.loaded_files)

    def describe(self) -> dict:
        """Extra model_info entries (none: a diffusers folder is the default format)."""
        return {}

    def read_json(self, relpath: str) -> dict:
        path = self.root / relpath
        if not path.is_file():
            raise CheckpointError(f"{path}: missing component file '{relpath}'")
        data = read_json_file(path)
        self.loaded_files.append(path)
        return data


def read_json_file(path: Path, where: str | None = None):
    """The parsed JSON of ``path``; a CheckpointError naming it (or ``where``) when it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where or path}: not valid JSON ({exc})") from None


def find_weight_files(component_dir: Path, basename: str, variant: str | None, allow_pickle: bool = False) -> WeightFiles:
    """Pick the weight files of a component: the requested variant first, else the plain files,
    else (with a log line) the only variant present."""
    component = component_dir.name

    def candidates(var: str | None) -> WeightFiles | None:
        suffix = f".{var}" if var else ""
        single = component_dir / f"{basename}{suffix}.safetensors"
        index = component_dir / f"{basename}.safetensors.index{suffix}.json"
        if single.is_file():
            return WeightFiles(component, [single], variant=var)
        if index.is_file():
            return WeightFiles(component, shard_files(index), index=index, variant=var)
        return None

    order = [variant, None] if variant else [None, "fp16"]
    for var in order:
        found = candidates(var)
        if found is not None:
            if variant and var != variant:
                log.info("%s: no '%s' variant weights, using the plain files", component_dir, variant)
            return found
    pickle_path = component_dir / PICKLE_NAMES[basename]
    if pickle_path.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{pickle_path}: pickle weights are refused (they can run code when loaded); "
                "convert them to safetensors, or pass allow_pickle=True if you trust the file"
            )
        return WeightFiles(component, [pickle_path], pickle=True)
    wanted = f"{basename}.safetensors" + (f" (or variant '{variant}')" if variant else "")
    raise CheckpointError(f"{component_dir}: missing component file '{wanted}' (no single file and no shard index)")


def shard_files(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a safetensors shard index ({exc})") from None
    files = sorted({index_path.parent / name for name in weight_map.values()})
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index_path}: missing shard file '{f.name}' listed in the index")
    return files


def read_state_dict(weights: WeightFiles) -> dict[str, torch.Tensor]:
    """Read all tensors of a component (every shard) onto the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in weights.files:
        try:
            if weights.pickle:
                part = torch.load(path, map_location="cpu", weights_only=True)
            else:
                part = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
        for key, value in part.items():
            if key in state:
                raise CheckpointError(f"{path}: key '{key}' appears in more than one shard")
            state[key] = value
    return state


def tied_aliases(module: torch.nn.Module) -> set[str]:
    """State-dict keys that are aliases of another parameter (tied weights, e.g. T5's
    ``encoder.embed_tokens.weight`` = ``shared.weight``): checkpoints store only one of them."""
    tied = getattr(module, "_tied_weights_keys", None) or {}
    return set(tied if isinstance(tied, dict) else [])


def load_weights_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, ignore: Iterable[str] = ()) -> None:
    """Copy ``state`` into ``module`` strictly: every key present, none extra, shapes equal.

    ``source`` names the file(s) in error messages. ``ignore`` lists checkpoint keys that may be
    present without a parameter (e.g. legacy buffers). Tied aliases may be absent (their source
    key carries the weights).
    """
    expected = module.state_dict()
    aliases = tied_aliases(module)
    for alias in aliases:
        if alias in expected and alias not in state:
            expected.pop(alias)
    ignore = set(ignore) | aliases
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in ignore)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing weight key(s) {missing[:5]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{source}: unexpected weight key(s) {unexpected[:5]}{more} for this model config")
    for key, param in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: weight '{key}' has shape {tuple(got.shape)} in the checkpoint but the model "
                f"config expects {tuple(param.shape)}"
            )
    result = module.load_state_dict({k: state[k] for k in expected}, strict=False)
    left = sorted(set(result.missing_keys) - aliases)
    if left or result.unexpected_keys:  # pragma: no cover - checked above
        raise CheckpointError(f"{source}: weights did not load: missing {left[:5]}, unexpected {result.unexpected_keys[:5]}")


def load_component(folder: CheckpointFolder, name: str, module: torch.nn.Module, variant: str | None,
                   allow_pickle: bool = False, convert=None, ignore: Iterable[str] = (),
                   library: str = "diffusers") -> WeightFiles:
    """Load component ``name`` (a sub-folder of ``folder``) into ``module``; ``library`` picks the
    weight file stem (diffusers: ``diffusion_pytorch_model``, transformers: ``model``)."""
    if library not in WEIGHT_BASENAMES:
        raise CheckpointError(f"{folder.root}/model_index.json: component '{name}' comes from library "
                              f"{library!r}; batchgen loads {', '.join(sorted(WEIGHT_BASENAMES))} components")
    weights = find_weight_files(folder.component_dir(name), WEIGHT_BASENAMES[library], variant, allow_pickle)
    state = read_state_dict(weights)
    if convert is not None:
        state = convert(state)
    source = ", ".join(str(p) for p in ([weights.index] if weights.index else weights.files))
    load_weights_into(module, state, source, ignore=ignore)
    folder.loaded_files.extend(([weights.index] if weights.index else []) + weights.files)
    return weights


def header_dtypes(headers: Iterable[dict]) -> dict[str, int]:
    """Stored dtype (``F16``, ``BF16``, ``F8_E4M3`` ...) -> element count over safetensors headers."""
    out: dict[str, int] = {}
    for header in headers:
        for dtype, shape in header.values():
            count = 1
            for d in shape:
                count *= d
            out[dtype] = out.get(dtype, 0) + count
    return out


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_entries(entries: Iterable[tuple[str, Path]], extra: Iterable[str] = ()) -> str:
    """sha256 over sorted (label, sha256 of content) lines (:func:`fingerprint` with free labels)
    and ``extra`` lines (settings that change what the files mean)."""
    lines = sorted({f"{label}\t{file_digest(Path(path))}\n" for label, path in entries} | set(extra))
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def fingerprint(root: Path, files: Iterable[Path]) -> str:
    """sha256 over (relative path, sha256 of content) of every file a model was loaded from."""
    lines = []
    for path in sorted({Path(f) for f in files}):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        lines.append(f"{path.relative_to(root).as_posix()}\t{digest.hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def local_model_path(uri: str | Path, storage_config=None) -> Path:
    """Turn a model URI into a local path: a local path, file://, or s3:// (cached). ``builtin:``
    models are built by :mod:`batchgen.builtin` (which depends on this package, never the reverse):
    callers above checkpoints resolve them with :func:`batchgen.builtin.resolve_model_uri`."""
    text = str(uri)
    if text.startswith(BUILTIN_PREFIX):
        raise CheckpointError(f"{text}: a built-in model; resolve it with batchgen.builtin.resolve_model_uri")
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        from ..storage import Location

        return Path(Location.parse(text, storage_config).local_cache_copy())
    return Path(text)
