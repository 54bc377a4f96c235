"""IP-Adapter checkpoints: the weight files people download and their CLIP image encoder.

The weight file (h94/IP-Adapter ``ip-adapter_sd15.safetensors``, ``ip-adapter-plus_sd15.safetensors``,
``ip-adapter_sdxl.safetensors``, ``ip-adapter-plus_sdxl_vit-h.safetensors`` ...) holds
``image_proj.*`` (the image projection) and ``ip_adapter.<n>.to_k_ip/to_v_ip.weight`` (one pair per
cross-attention layer of the UNet, n = 1, 3, 5 ...). Which projection it is is read off the keys:
``image_proj.proj`` + ``norm`` is the plain IP-Adapter, ``image_proj.latents`` + ``proj_in`` the
Plus resampler. Variants batchgen does not build (FaceID and FaceID Plus, full-face's MLP
projection, FaceID LoRA weights) are refused naming what they are; so is a file whose layers do not
fit the UNet (another family: another cross-attention width or layer count), naming the key. A
pickle ``.bin`` (the same dicts nested) is read only with ``allow_pickle``.

The image encoder is transformers' ``CLIPVisionModelWithProjection`` from a folder (config.json +
model.safetensors). When none is given it is looked for as diffusers' ``load_ip_adapter`` finds
it in the h94 layout: ``image_encoder/`` beside the weight file, else in the folder above it
(``image_encoder/`` or ``models/image_encoder/``, where h94 keeps the ViT-H encoder the
``*_vit-h`` SDXL files need); the first whose width fits the adapter is taken. Images are
preprocessed by transformers' CLIP image processor: the folder's preprocessor_config.json when it
has one, else CLIP's standard one at the encoder's image size, which is what diffusers sets up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import CheckpointError
from .folder import file_digest, find_weight_files, fingerprint, load_weights_into, read_json_file, read_state_dict

KINDS = ("plain", "plus")
_LAYER_KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
ENCODER_DIRS = ("image_encoder", "../image_encoder", "../models/image_encoder")


@dataclass
class IPAdapterFile:
    """One IP-Adapter weight file: where it is, its tensors' shapes and what kind it is."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    kind: str
    pickle: bool = False
    _state: dict | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        return file_digest(self.path)

    def state(self) -> dict[str, torch.Tensor]:
        if self._state is not None:
            return self._state
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointError(f"{self.path}: cannot read weights ({exc})") from None

    @property
    def encoder_width(self) -> int:
        """The image-encoder width the projection reads: the projected embedding (plain) or the
        hidden states (Plus)."""
        key = "image_proj.proj.weight" if self.kind == "plain" else "image_proj.proj_in.weight"
        return int(self.shapes[key][1])


def _flatten_pickle(data, where: str) -> dict[str, torch.Tensor]:
    """A ``.bin`` IP-Adapter ({"image_proj": {...}, "ip_adapter": {...}}) -> flat safetensors keys."""
    if not isinstance(data, Mapping) or not {"image_proj", "ip_adapter"} <= set(data):
        raise CheckpointError(f"{where}: not an IP-Adapter file (a pickle IP-Adapter is a dict with 'image_proj' "
                              f"and 'ip_adapter')")
    out = {}
    for part in ("image_proj", "ip_adapter"):
        for key, value in data[part].items():
            out[f"{part}.{key}"] = value
    extra = sorted(set(data) - {"image_proj", "ip_adapter"})
    if extra:
        raise CheckpointError(f"{where}: unexpected entries {extra} beside 'image_proj' and 'ip_adapter'")
    return out


def _weight_file(path: Path) -> Path:
    """A weight file, or a folder holding exactly one (how builtin IP-Adapters are laid out)."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise CheckpointError(f"{path}: a folder given as an IP-Adapter must hold exactly one weight file "
                                  f"(.safetensors), found: {names}; pass the file itself")
        return found[0]
    return path


def open_ip_adapter(path: str | Path, allow_pickle: bool = False) -> IPAdapterFile:
    """Read an IP-Adapter file's header (or a pickle's dicts) and say which kind it is."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: IP-Adapter file does not exist")
    path = _weight_file(path)
    state = None
    if path.suffix.lower() == ".safetensors":
        from .single_file import read_header

        shapes = {k: tuple(v[1]) for k, v in read_header(path).items()}
    elif path.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt"):
        if not allow_pickle:
            raise CheckpointError(f"{path}: pickle weights are refused (they can run code when loaded); use the "
                                  f".safetensors file, or pass allow_pickle=True if you trust the file")
        try:
            state = _flatten_pickle(torch.load(path, map_location="cpu", weights_only=True), str(path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot read weights ({exc})") from None
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    else:
        raise CheckpointError(f"{path}: an IP-Adapter file is .safetensors (or a pickle .bin with allow_pickle)")
    return IPAdapterFile(path, shapes, classify(shapes, str(path)), pickle=state is not None, _state=state)


def classify(shapes: Mapping[str, tuple], where: str) -> str:
    """"plain" or "plus" from an IP-Adapter file's keys; the variants not built are refused by name."""
    keys = set(shapes)
    proj = {k[len("image_proj."):] for k in keys if k.startswith("image_proj.")}
    layers = {k for k in keys if k.startswith("ip_adapter.")}
    if not proj or not layers:
        missing = "image_proj.*" if not proj else "ip_adapter.<n>.to_k_ip.weight"
        raise CheckpointError(f"{where}: not an IP-Adapter file (no '{missing}' keys); is it a base model, a "
                              f"LoRA or an image encoder?")
    if any("lora" in k for k in layers):
        raise CheckpointError(f"{where}: an IP-Adapter FaceID file (it carries LoRA weights for the UNet, "
                              f"'ip_adapter.<n>.to_*_lora.*'); batchgen builds the plain and Plus IP-Adapters only")
    if "perceiver_resampler.proj_in.weight" in proj:
        raise CheckpointError(f"{where}: an IP-Adapter FaceID Plus file (image_proj.perceiver_resampler.*, fed "
                              f"face-recognition embeddings); batchgen builds the plain and Plus IP-Adapters only")
    if "proj.3.weight" in proj:
        raise CheckpointError(f"{where}: an IP-Adapter full-face file (an MLP projection, image_proj.proj.0-3); "
                              f"batchgen builds the plain and Plus IP-Adapters only")
    if "proj.0.weight" in proj and "norm.weight" in proj:
        raise CheckpointError(f"{where}: an IP-Adapter FaceID file (image_proj.proj.0/proj.2 + norm, fed "
                              f"face-recognition embeddings); batchgen builds the plain and Plus IP-Adapters only")
    if proj == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        return "plain"
    if "latents" in proj and "proj_in.weight" in proj:
        return "plus"
    raise CheckpointError(f"{where}: an IP-Adapter image projection batchgen does not know (keys image_proj."
                          f"{', image_proj.'.join(sorted(proj)[:6])}); batchgen builds the plain (image_proj.proj + "
                          f"norm) and Plus (image_proj.latents + resampler) IP-Adapters")


def _resampler_layout(shapes: Mapping[str, tuple], where: str) -> dict:
    """The Plus resampler's sizes, read off its shapes (every key then checked by the strict load)."""
    from ..models.ip_adapter import HEAD_DIM

    depth = 0
    while f"image_proj.layers.{depth}.0.to_q.weight" in shapes:
        depth += 1
    if depth == 0:
        raise CheckpointError(f"{where}: missing key 'image_proj.layers.0.0.to_q.weight' (the Plus resampler's "
                              f"first block)")
    inner = shapes["image_proj.layers.0.0.to_q.weight"][0]
    if inner % HEAD_DIM:
        raise CheckpointError(f"{where}: key 'image_proj.layers.0.0.to_q.weight' has {inner} rows, not a multiple "
                              f"of the resampler's {HEAD_DIM}-wide heads")
    latents = shapes["image_proj.latents"]
    if len(latents) != 3 or latents[0] != 1:
        raise CheckpointError(f"{where}: key 'image_proj.latents' has shape {latents}, expected (1, queries, width)")
    return {"embed_dim": shapes["image_proj.proj_in.weight"][1], "hidden": latents[2], "inner": inner,
            "queries": latents[1], "depth": depth}


def build_ip_adapter(source: IPAdapterFile, unet) -> "torch.nn.Module":
    """An :class:`~batchgen.models.ip_adapter.IPAdapterModel` (meta device) for ``source``'s shapes
    and ``unet``'s cross-attention layers; a file that does not fit the UNet is refused naming the key."""
    from ..models.ip_adapter import ImageProjection, IPAdapterModel, Resampler

    where, shapes = str(source.path), source.shapes
    layers = unet.cross_attentions()
    widths = [tuple(attn.to_k.weight.shape) for _name, attn in layers]  # (inner, cross dim) per layer
    ids = sorted({int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))})
    others = sorted(k for k in shapes if k.startswith("ip_adapter.") and not _LAYER_KEY.match(k))
    if others:
        raise CheckpointError(f"{where}: unexpected weight key(s) {others[:5]} (an IP-Adapter file holds "
                              f"ip_adapter.<n>.to_k_ip.weight / to_v_ip.weight only)")
    want = [2 * j + 1 for j in range(len(layers))]
    if ids != want:
        hint = (f"this file has {len(ids)} cross-attention layers, the model's UNet {len(layers)}: it is an "
                f"IP-Adapter for another model" if len(ids) != len(layers) else "its layer numbers are not 1, 3, 5 ...")
        missing = [n for n in want if n not in ids]
        extra = [n for n in ids if n not in want]
        name = (f"missing key 'ip_adapter.{missing[0]}.to_k_ip.weight'" if missing
                else f"unexpected key 'ip_adapter.{extra[0]}.to_k_ip.weight'")
        raise CheckpointError(f"{where}: {name}; {hint}")
    cross = widths[0][1] if widths else 0
    for j, (name, _attn) in enumerate(layers):
        inner, dim = widths[j]
        for proj in ("to_k_ip", "to_v_ip"):
            key = f"ip_adapter.{2 * j + 1}.{proj}.weight"
            if key not in shapes:
                raise CheckpointError(f"{where}: missing weight key '{key}'")
            if tuple(shapes[key]) != (inner, dim):
                raise CheckpointError(
                    f"{where}: weight '{key}' has shape {tuple(shapes[key])} but the model's cross-attention layer "
                    f"{name} takes {dim}-wide image tokens into {inner} channels, so ({inner}, {dim}); this "
                    f"IP-Adapter was trained for another base model ({_describe(shapes[key][1])}, the model is "
                    f"{_describe(dim)})")
    if source.kind == "plain":
        rows = shapes["image_proj.proj.weight"][0]
        width = shapes["image_proj.norm.weight"][0]
        if width != cross or rows % width:
            raise CheckpointError(f"{where}: weight 'image_proj.norm.weight' has {width} channels but the model's "
                                  f"cross-attention is {cross} wide ({_describe(width)} vs {_describe(cross)})")
        make = lambda: ImageProjection(shapes["image_proj.proj.weight"][1], rows // width, width)  # noqa: E731
    else:
        layout = _resampler_layout(shapes, where)
        out = shapes.get("image_proj.proj_out.weight", (0,))[0]
        if out != cross:
            raise CheckpointError(f"{where}: weight 'image_proj.proj_out.weight' makes {out}-wide tokens but the "
                                  f"model's cross-attention is {cross} wide ({_describe(out)} vs {_describe(cross)})")
        make = lambda: Resampler(cross_dim=cross, **layout)  # noqa: E731
    with torch.device("meta"):
        return IPAdapterModel(source.kind, make(), cross, [w[0] for w in widths])


def _describe(cross_dim: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(int(cross_dim), f"{cross_dim}-wide cross-attention")


def load_ip_adapter(source: IPAdapterFile, unet, dtype: torch.dtype | None = None):
    """Build and strictly load the IP-Adapter at ``source`` for ``unet``."""
    module = build_ip_adapter(source, unet)
    module = (module if dtype is None else module.to(dtype)).to_empty(device="cpu")
    load_weights_into(module, source.state(), str(source.path))
    return module.eval().requires_grad_(False)


# ---- the image encoder ---------------------------------------------------------------------------


@dataclass
class ImageEncoderFolder:
    """A CLIP vision encoder folder: config.json, weights, an optional preprocessor_config.json."""

    path: Path
    config: dict
    files: list[Path]

    @property
    def sha256(self) -> str:
        return fingerprint(self.path, self.files)

    def width(self, kind: str) -> int:
        return int(self.config.get("projection_dim" if kind == "plain" else "hidden_size") or 0)


def open_image_encoder(path: str | Path, allow_pickle: bool = False) -> ImageEncoderFolder:
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise CheckpointError(f"{path}: not an image encoder folder (a CLIPVisionModelWithProjection folder holds "
                              f"config.json and model.safetensors)")
    config = read_json_file(config_path)
    if not isinstance(config, dict) or config.get("model_type") != "clip_vision_model":
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{config_path}: model_type is {got!r}; an IP-Adapter image encoder is a "
                              f"CLIPVisionModelWithProjection (model_type 'clip_vision_model')")
    weights = find_weight_files(path, "model", None, allow_pickle)
    files = [config_path] + ([weights.index] if weights.index else []) + weights.files
    if (path / "preprocessor_config.json").is_file():
        files.append(path / "preprocessor_config.json")
    return ImageEncoderFolder(path, config, files)


def find_image_encoder(adapter_uri: str, adapter: IPAdapterFile, resolve: Callable[[str], Path],
                       allow_pickle: bool = False) -> tuple[str, ImageEncoderFolder]:
    """The image encoder beside an IP-Adapter file (see the module doc): (where it is, the folder).

    Local files (and builtins) are looked up beside the resolved file; remote ones (``s3://``) at
    the same places under the file's URI, each fetched through ``resolve``.
    """
    text = str(adapter_uri).rstrip("/")
    remote = "://" in text and not text.startswith("file://")
    if remote:
        if not text.endswith(adapter.path.name):  # a folder holding the file was given
            text = f"{text}/{adapter.path.name}"
        parent = text.rsplit("/", 1)[0]
        candidates = [_join(parent, rel) for rel in ENCODER_DIRS]
    else:
        candidates = [str((adapter.path.parent / rel).resolve()) for rel in ENCODER_DIRS]
    looked, wrong = [], []
    for uri in dict.fromkeys(candidates):
        looked.append(uri)
        try:
            path = Path(resolve(uri)) if remote else Path(uri)
        except Exception:  # noqa: BLE001 - no such remote folder: look at the next place
            continue
        if not path.is_dir():
            continue
        folder = open_image_encoder(path, allow_pickle)
        if folder.width(adapter.kind) == adapter.encoder_width:
            return uri, folder
        wrong.append(f"{uri} ({_width_name(adapter.kind)} {folder.width(adapter.kind)})")
    found = f"; found but not fitting: {', '.join(wrong)}" if wrong else ""
    raise CheckpointError(f"{adapter.path}: no image encoder for this IP-Adapter (it needs a CLIP vision encoder "
                          f"whose {_width_name(adapter.kind)} is {adapter.encoder_width}); looked in "
                          f"{', '.join(looked)}{found}; pass ip_adapter_image_encoder=FOLDER (h94/IP-Adapter: "
                          f"models/image_encoder for the SD 1.5 and *_vit-h SDXL files, sdxl_models/image_encoder "
                          f"for ip-adapter_sdxl)")


def _width_name(kind: str) -> str:
    return "projection_dim" if kind == "plain" else "hidden_size"


def check_encoder_fits(adapter: IPAdapterFile, folder: ImageEncoderFolder) -> None:
    """A given image encoder must produce what the adapter's projection reads."""
    if folder.width(adapter.kind) != adapter.encoder_width:
        what = "image embeddings (projection_dim)" if adapter.kind == "plain" else "hidden states (hidden_size)"
        raise CheckpointError(f"{folder.path}: this image encoder's {what} are {folder.width(adapter.kind)} wide but "
                              f"the IP-Adapter {adapter.path.name} reads {adapter.encoder_width}; use the encoder it "
                              f"was trained with")


def _join(parent: str, rel: str) -> str:
    parts = parent.rstrip("/").split("/")
    for piece in rel.split("/"):
        if piece == ".." and len(parts) > 3:  # never above scheme://bucket
            parts.pop()
        elif piece != "..":
            parts.append(piece)
    return "/".join(parts)


def load_image_encoder(folder: ImageEncoderFolder, dtype: torch.dtype | None = None):
    """(CLIPVisionModelWithProjection with the folder's weights, its CLIP image processor)."""
    import transformers

    config_cls = transformers.CLIPVisionConfig
    allowed = set(config_cls().to_dict())
    cfg = config_cls(**{k: v for k, v in folder.config.items() if k in allowed and k != "transformers_version"})
    where = str(folder.path / "config.json")
    try:
        module = transformers.CLIPVisionModelWithProjection(cfg)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: cannot build the image encoder from its config ({exc})") from None
    if dtype is not None:
        module = module.to(dtype)
    weights = find_weight_files(folder.path, "model", None, True)
    state = _convert_vision(read_state_dict(weights), module)
    source = ", ".join(str(p) for p in ([weights.index] if weights.index else weights.files))
    load_weights_into(module, state, source, ignore=("vision_model.embeddings.position_ids",))
    return module.eval().requires_grad_(False), image_processor(folder)


def _convert_vision(state: dict, module) -> dict:
    """Encoder weights with or without the ``vision_model.`` level -> the installed class's names."""
    nested = any(k.startswith("vision_model.") for k in module.state_dict())
    if nested or not any(k.startswith("vision_model.") for k in state):
        return state
    return {k.removeprefix("vision_model."): v for k, v in state.items()}


def image_processor(folder: ImageEncoderFolder):
    """transformers' CLIP image processor (the PIL backend: the same pixels with or without
    torchvision): the folder's preprocessor_config.json, else CLIP's standard preprocessing at
    the encoder's image size (diffusers' ``CLIPImageProcessor(size=, crop_size=)``)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    config_path = folder.path / "preprocessor_config.json"
    if config_path.is_file():
        try:
            return cls.from_pretrained(str(folder.path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a broken file
            raise CheckpointError(f"{config_path}: cannot read the image processor config ({exc})") from None
    size = int(folder.config.get("image_size") or 224)
    return cls(size=size, crop_size=size)


__all__ = ["IPAdapterFile", "ImageEncoderFolder", "open_ip_adapter", "classify", "build_ip_adapter", "load_ip_adapter",
           "open_image_encoder", "find_image_encoder", "check_encoder_fits", "load_image_encoder", "image_processor",
           "KINDS"]
