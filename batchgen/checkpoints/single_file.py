"""Single-file checkpoints (the A1111 / ComfyUI / civitai ``.safetensors`` layout) <-> diffusers names.

A single file holds a whole pipeline (or only its denoiser) under the names of the original
training code: ``model.diffusion_model.*`` (the LDM UNet, or the SD3 / FLUX transformer),
``first_stage_model.*`` (the VAE), ``cond_stage_model.*`` / ``conditioner.embedders.N.*`` /
``text_encoders.{clip_l,clip_g,t5xxl}.*`` (the text encoders). Our models use diffusers' and
transformers' parameter names, so such a file is read in three steps:

1. :func:`read_header` reads key -> (dtype, shape) from the safetensors header alone (no tensor
   data), so a multi-GB file is recognised in milliseconds;
2. :func:`detect` tells the family and variant from the key names and shapes, and where each
   component sits in the file;
3. :func:`convert` renames (and where the layouts differ, splits / swaps / transposes) the tensors
   into one diffusers-layout state dict per component. :func:`standard_configs` gives the configs
   a loader needs for the real variants, since a single file carries none.

Why one rule table per component instead of string replacements: the same rules run in both
directions. :func:`to_single_file` applies them backwards (diffusers -> single file), which the
tests check against diffusers' own converters (an independent implementation); and every rule is
built from the tensors present (block counts, head dims, the fused-qkv split sizes), never from
the real model sizes, so tiny test checkpoints convert exactly like real ones.

Tensors keep their stored dtype (fp16, bf16, float8_e4m3fn, ...): the conversion is pure
re-indexing. Tensors that are only renamed are the input tensor objects; split parts are views of
the fused input tensor. Call :func:`upcast` to get the run dtype. To save a converted state dict
with ``safetensors.torch.save_file``, clone the values first (it refuses tensors sharing storage).

Prediction type: SD 2.x 512 (epsilon) and 768 (v-prediction) files have identical weight shapes.
ComfyUI guesses from the values of a norm bias; we do not read values at detection time. A file
may carry an (empty) ``v_pred`` marker key (and ``ztsnr`` for zero-terminal-SNR training) as
ComfyUI writes them; with the marker the prediction type is ``v_prediction``, without it an SD 2.x
file reports ``prediction_type=None`` and :func:`standard_configs` falls back to SD 2.1's
v-prediction at 768 px (what diffusers' ``from_single_file`` assumes) unless the caller passes
``prediction_type``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = [
    "Detected",
    "FAMILIES",
    "read_header",
    "read_metadata",
    "meta_state",
    "detect",
    "convert",
    "convert_component",
    "upcast",
    "standard_configs",
    "to_single_file",
]

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux", "zimage")
TRANSFORMER_FAMILIES = ("sd3", "flux", "zimage")  # flow-matching transformers (the rest: UNets)
DENOISER_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
MARKER_V_PRED = "v_pred"
MARKER_ZTSNR = "ztsnr"

# Where each text encoder sits in a single file, per family (component -> key prefix).
TEXT_ENCODER_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
    "sdxl_refiner": {"text_encoder_2": "conditioner.embedders.0.model."},
    "sd3": {
        "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.clip_g.transformer.",
        "text_encoder_3": "text_encoders.t5xxl.transformer.",
    },
    "flux": {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer."},
    "zimage": {},  # ComfyUI ships Z-Image split: the Qwen3 text encoder is its own file (an override)
}

# How each component is stored: the rule set that converts it.
#   unet / vae / sd3 / flux: the original training code's names;
#   clip / clip_proj: transformers' CLIPTextModel(WithProjection) names under the prefix;
#   openclip / openclip_proj: OpenCLIP (``transformer.resblocks.N``, fused ``in_proj``);
#   t5: transformers' T5EncoderModel names; zimage: Z-Image's original names (fused qkv).
COMPONENT_KINDS: dict[str, dict[str, str]] = {
    "sd1": {"unet": "unet", "vae": "vae", "text_encoder": "clip"},
    "sd2": {"unet": "unet", "vae": "vae", "text_encoder": "openclip"},
    "sdxl": {"unet": "unet", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "openclip_proj"},
    "sdxl_refiner": {"unet": "unet", "vae": "vae", "text_encoder_2": "openclip_proj"},
    "sd3": {"transformer": "sd3", "vae": "vae", "text_encoder": "clip_proj", "text_encoder_2": "clip_proj",
            "text_encoder_3": "t5"},
    "flux": {"transformer": "flux", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "t5"},
    "zimage": {"transformer": "zimage", "vae": "vae"},
}


# --------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (safetensors dtype string, e.g. ``"F16"``, ``"BF16"``, ``"F8_E4M3"``; shape) from the
    header of a ``.safetensors`` file, without reading tensor data. Errors name the file.

    The header is untrusted input: every entry must have a dtype of the format, a shape of
    non-negative integers and data offsets that hold exactly that many bytes, and the file must be
    long enough for them (a truncated download or copy is an error here, not a crash later). A
    file that ends right after its header (no data section at all) is a header-only copy: enough
    to read the layout, so accepted."""
    path = Path(path)
    header, length, size = _raw_header_sized(path)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        out[key], stop = _header_entry(path, key, entry)
        end = max(end, stop)
    if size != 8 + length and 8 + length + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: its tensors need {8 + length + end} bytes, "
                              f"the file has {size} (an interrupted download or copy?)")
    return out


_MAX_ELEMENTS = 2**46  # per tensor: far above any model's, far below what overflows torch's size arithmetic
# The safetensors format's dtypes -> bits per element.
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _header_entry(path: Path, key: str, entry) -> tuple[tuple[str, tuple[int, ...]], int]:
    """((dtype, shape), end offset) of one header entry, checked; CheckpointError names the key."""
    where = f"{path}: header entry for key '{key}'"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{where} has no valid dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise CheckpointError(f"{where}: unknown dtype {str(dtype)[:40]!r} (safetensors dtypes: "
                              f"{', '.join(_DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {str(shape)[:80]} is not a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {str(offsets)[:80]} is not [begin, end] with 0 <= begin <= end")
    elements = math.prod(shape)
    if elements >= _MAX_ELEMENTS:
        raise CheckpointError(f"{where}: shape {shape} has {elements} elements, more than any model holds")
    if elements * _DTYPE_BITS[dtype] != (offsets[1] - offsets[0]) * 8:
        raise CheckpointError(f"{where}: shape {shape} of {dtype} does not fit its data_offsets {offsets} "
                              f"({offsets[1] - offsets[0]} bytes)")
    return (dtype, tuple(shape)), offsets[1]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def meta_state(header: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Meta-device tensors with a header's dtypes and shapes: run :func:`convert` and a strict key
    check on a file's layout without reading any tensor data (``batchgen inspect``, pre-flight)."""
    out = {}
    for key, (dtype, shape) in header.items():
        torch_dtype = _SAFETENSORS_DTYPES.get(dtype) or getattr(torch, str(dtype), torch.float32)
        out[key] = torch.empty(shape, dtype=torch_dtype, device="meta")
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` header (``{}`` when there are none)."""
    path = Path(path)
    metadata = _raw_header(path).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: the safetensors __metadata__ is not a JSON object")
    return {str(k): str(v) for k, v in metadata.items()}


def _raw_header(path: Path) -> dict:
    return _raw_header_sized(path)[0]


def _raw_header_sized(path: Path) -> tuple[dict, int, int]:
    """(the parsed header, its length, the file's size)."""
    try:
        with open(path, "rb") as fh:
            size = path.stat().st_size
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {len(head)} bytes; no header length)")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path}: not a safetensors file (header length {length} does not fit the file of {size} bytes)"
                )
            raw = fh.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint file ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    return header, length, size


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detected:
    """What a single file is.

    ``components`` maps each component the file carries (``unet`` or ``transformer``, ``vae``,
    ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``) to its key prefix in the file;
    ``prefix`` is the denoiser's (``"model.diffusion_model."`` or ``""`` for bare transformer
    files). ``prediction_type`` is ``epsilon``, ``v_prediction``, ``flow_matching`` or ``None``
    (unknown from the weights: SD 2.x without a ``v_pred`` marker).
    """

    family: str
    variant: str
    prefix: str
    components: dict[str, str] = field(default_factory=dict)
    prediction_type: str | None = None
    zero_terminal_snr: bool = False
    time_cond_proj_dim: int | None = None  # guidance-distilled UNets (LCM): width of the w-embedding

    @property
    def denoiser(self) -> str:
        return "transformer" if self.family in TRANSFORMER_FAMILIES else "unet"


def _shape_of(value) -> tuple[int, ...]:
    if hasattr(value, "shape"):
        return tuple(int(d) for d in value.shape)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return tuple(int(d) for d in value[1])  # read_header's (dtype, shape)
    return tuple(int(d) for d in value)


def _shapes(state: Mapping) -> dict[str, tuple[int, ...]]:
    return {key: _shape_of(value) for key, value in state.items()}


_LOOKED_FOR = (
    f"'[{DENOISER_PREFIX}]double_blocks.0.img_attn.qkv.weight' (FLUX.1)",
    f"'[{DENOISER_PREFIX}]joint_blocks.0.x_block.attn.qkv.weight' (SD3 / SD3.5)",
    f"'[{DENOISER_PREFIX}]layers.0.adaLN_modulation.0.weight' with 'cap_embedder.0.weight' (Z-Image)",
    f"'[{DENOISER_PREFIX}]input_blocks.0.0.weight' with 'time_embed.0.weight' (SD 1.x / 2.x / SDXL UNet)",
)


def detect(shapes: Mapping, source: str | Path | None = None) -> Detected:
    """Family, variant, components and prediction type of a single file from its key -> shape map.

    Values may be shapes, :func:`read_header`'s ``(dtype, shape)`` pairs, or tensors. An
    unrecognised file raises CheckpointError listing the key patterns looked for and the first keys;
    ``source`` (the file) starts every error message.
    """
    with _errors_from(source):
        return _detect(_shapes(shapes))


@contextlib.contextmanager
def _errors_from(source):
    """Start the message of a CheckpointError raised inside with ``source``: the file it is about."""
    try:
        yield
    except CheckpointError as exc:
        if source is None:
            raise
        raise CheckpointError(f"{source}: {exc}") from None


def _detect(shapes: dict[str, tuple[int, ...]]) -> Detected:
    keys = set(shapes)
    if not keys:
        raise CheckpointError("single-file checkpoint has no tensors")
    for unsupported, what in (("edm_mean", "Playground v2.5 (EDM-trained SDXL)"),
                              ("control_model.time_embed.0.weight", "a ControlNet")):
        if unsupported in keys:
            raise CheckpointError(f"single-file checkpoint is {what} (key '{unsupported}'); only plain text-to-image "
                                  f"SD 1.x / 2.x / SDXL / SD3 / FLUX.1 / Z-Image files are supported")

    def find(probe: str) -> str | None:
        for prefix in (DENOISER_PREFIX, ""):
            if prefix + probe in keys:
                return prefix
        return None

    v_pred = MARKER_V_PRED in keys
    ztsnr = MARKER_ZTSNR in keys
    prefix = find("double_blocks.0.img_attn.qkv.weight")
    if prefix is not None:
        family, variant = "flux", _flux_variant(shapes, prefix)
        prediction = "flow_matching"
    else:
        prefix = find("joint_blocks.0.x_block.attn.qkv.weight")
        zimage = find("layers.0.adaLN_modulation.0.weight")
        if prefix is not None:
            family, variant = "sd3", _sd3_variant(keys, prefix)
            prediction = "flow_matching"
        elif zimage is not None and zimage + "cap_embedder.0.weight" in keys:
            prefix, family, variant, prediction = zimage, "zimage", _zimage_variant(keys, zimage), "flow_matching"
        else:
            prefix = find("input_blocks.0.0.weight")
            if prefix is None or prefix + "time_embed.0.weight" not in keys:
                first = sorted(keys)[:12]
                raise CheckpointError(
                    "cannot tell which model this single-file checkpoint is: looked for "
                    + ", ".join(_LOOKED_FOR) + f"; first keys found: {first}"
                )
            family = _unet_family(shapes, prefix)
            variant = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl-base", "sdxl_refiner": "sdxl-refiner"}[family]
            if _inpainting_unet(shapes, prefix, family):
                variant = {"sd1": "sd1-inpaint", "sd2": "sd2-inpaint", "sdxl": "sdxl-inpaint"}[family]
            if v_pred:
                prediction = "v_prediction"
            elif variant == "sd2":
                prediction = None  # 512-base (epsilon) and 768-v cannot be told apart from the shapes
            else:
                prediction = "epsilon"

    components = {"transformer" if family in TRANSFORMER_FAMILIES else "unet": prefix}
    for vae_prefix in VAE_PREFIXES:
        if vae_prefix + "encoder.conv_in.weight" in keys:
            components["vae"] = vae_prefix
            break
    for name, te_prefix in TEXT_ENCODER_PREFIXES[family].items():
        if any(k.startswith(te_prefix) for k in keys):
            components[name] = te_prefix
    # A guidance-distilled UNet (LCM-Dreamshaper) converted by diffusers' own script keeps its
    # guidance-embedding projection under the diffusers name; its width is the config key.
    cond_proj = shapes.get(prefix + "time_embedding.cond_proj.weight") if "unet" in components else None
    return Detected(family=family, variant=variant, prefix=prefix, components=components,
                    prediction_type=prediction, zero_terminal_snr=ztsnr,
                    time_cond_proj_dim=int(cond_proj[1]) if cond_proj is not None and len(cond_proj) == 2 else None)


def _flux_variant(shapes: dict, prefix: str) -> str:
    in_features = shapes.get(prefix + "img_in.weight", (0, 0))[-1]
    if in_features == 384:
        return "flux-fill"  # latents + masked-image latents + packed 8x8 mask blocks (64 + 64 + 256)
    if in_features == 128:
        raise CheckpointError(f"single-file checkpoint is FLUX.1 Canny/Depth ('{prefix}img_in.weight' takes 128 "
                              "channels, FluxControlPipeline); only FLUX.1 dev / schnell / Fill are supported")
    return "flux-dev" if prefix + "guidance_in.in_layer.weight" in shapes else "flux-schnell"


def _zimage_variant(keys: set, prefix: str) -> str:
    if any(k.startswith((prefix + "siglip_embedder.", prefix + "control_")) for k in keys):
        raise CheckpointError(f"single-file checkpoint is a Z-Image Omni or ControlNet model ('{prefix}siglip_embedder.*' "
                              "or 'control_*' keys); only Z-Image / Z-Image-Turbo text-to-image files are supported")
    return "zimage"


def _sd3_variant(keys: set, prefix: str) -> str:
    if any(k.startswith(prefix + "joint_blocks.") and ".x_block.attn2." in k for k in keys):
        return "sd3.5-medium"  # MMDiT-X: a second self-attention in the first blocks
    if prefix + "joint_blocks.0.x_block.attn.ln_q.weight" in keys:
        return "sd3.5-large"  # qk-norm without attn2 (SD3.5 Large and Large Turbo share the layout)
    return "sd3-medium"


def _inpainting_unet(shapes: dict, prefix: str, family: str) -> bool:
    """Whether the UNet is an inpainting one (9 input channels: latents, mask, masked-image latents,
    as sd-v1-5-inpainting / 512-inpainting-ema / sd_xl_base_1.0_inpainting_0.1) rather than a
    text-to-image one (4); other widths (instruct-pix2pix 8, the x4 upscaler 7) are refused."""
    key = prefix + "input_blocks.0.0.weight"
    channels = shapes[key][1] if len(shapes[key]) == 4 else 4
    if channels == 9 and family != "sdxl_refiner":
        return True
    if channels != 4:
        raise CheckpointError(
            f"single-file UNet takes {channels} input channels ('{key}'): an instruct-pix2pix, upscaler or other "
            "image-conditioned model; supported are text-to-image UNets (4 latent channels) and SD 1.x / 2.x / SDXL "
            "inpainting UNets (9: latents, mask, masked-image latents)"
        )
    return False


def _unet_family(shapes: dict, prefix: str) -> str:
    keys = shapes.keys()

    def has(te_prefix: str) -> bool:
        return any(k.startswith(te_prefix) for k in keys)

    context = next((s[1] for k, s in shapes.items() if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    label = shapes.get(prefix + "label_emb.0.0.weight")
    te = {name: has(p) for name, p in (("sd1", "cond_stage_model.transformer."), ("sd2", "cond_stage_model.model."),
                                       ("xl0", "conditioner.embedders.0.transformer."),
                                       ("xl1", "conditioner.embedders.1.model."),
                                       ("refiner", "conditioner.embedders.0.model."))}
    if label is not None:
        label_in = label[1]
        if te["xl0"] or te["xl1"]:
            return "sdxl"
        if te["refiner"]:
            return "sdxl_refiner"
        if label_in == 2816 or context == 2048:
            return "sdxl"
        if label_in == 2560 or context == 1280:
            return "sdxl_refiner"
        if te["sd1"] or te["sd2"] or context in (768, 1024):
            raise CheckpointError(
                f"single-file UNet has a class/label embedding ('{prefix}label_emb.0.0.weight') with an SD 1.x/2.x text "
                "encoder: an unCLIP or class-conditioned model, which is not supported"
            )
        raise CheckpointError(
            f"single-file SDXL-style UNet ('{prefix}label_emb.0.0.weight' takes {label_in}, context {context}) without "
            "text encoders and with non-standard sizes: cannot tell SDXL base (6 size/crop ids, "
            "conditioner.embedders.0/1) from the refiner (5 ids, conditioner.embedders.0.model)"
        )
    if te["xl0"] or te["xl1"] or te["refiner"]:
        raise CheckpointError(f"single-file checkpoint has SDXL text encoders (conditioner.embedders.*) but its UNet has "
                              f"no '{prefix}label_emb.0.0.weight'; the file is inconsistent")
    if te["sd2"]:
        return "sd2"
    if te["sd1"]:
        return "sd1"
    if context == 1024:
        return "sd2"
    if context == 768:
        return "sd1"
    # Non-standard sizes without text encoders: SD 2.x uses linear attention projections, SD 1.x 1x1 convs.
    proj = next((s for k, s in shapes.items() if k.startswith(prefix) and k.endswith(".proj_in.weight")), None)
    if proj is None:
        raise CheckpointError(f"single-file UNet without attention layers ('{prefix}*.proj_in.weight') or text "
                              "encoders: cannot tell SD 1.x from SD 2.x")
    return "sd2" if len(proj) == 2 else "sd1"


# --------------------------------------------------------------------------------------------
# Rules: one table per component, applied forwards (single file -> diffusers) or backwards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """``src`` (single-file key, relative to the component prefix) <-> ``dst`` (diffusers key(s)).

    op ``prefix``: every key ``src[.rest]`` <-> ``dst[0][.rest]`` (an empty string matches all);
    ``copy``: one key to one key; ``split``: the fused tensor is cut along dim 0 into ``dst``
    (``sizes``, or equal parts) and concatenated back; ``swap``: the two halves along dim 0 trade
    places (the original adaLN order is shift, scale; diffusers' is scale, shift); ``transpose``:
    OpenCLIP's ``text_projection`` is stored (in, out); ``conv``: a 1x1 conv weight <-> a linear weight.
    """

    src: str
    dst: tuple[str, ...]
    op: str = "prefix"
    sizes: tuple[int, ...] | None = None


def _p(src: str, dst: str) -> _Rule:
    return _Rule(src, (dst,), "prefix")


def _c(src: str, dst: str, op: str = "copy") -> _Rule:
    return _Rule(src, (dst,), op)


def _split(src: str, dst: Iterable[str], sizes: tuple[int, ...] | None = None) -> _Rule:
    return _Rule(src, tuple(dst), "split", sizes)


def _forward_op(rule: _Rule, value: torch.Tensor) -> list[torch.Tensor]:
    if rule.op in ("copy", "prefix"):
        return [value]
    if rule.op == "split":
        if rule.sizes is not None:
            if sum(rule.sizes) != value.shape[0]:
                raise CheckpointError(f"'{rule.src}' has {value.shape[0]} rows, expected {sum(rule.sizes)} "
                                      f"({' + '.join(map(str, rule.sizes))})")
            return list(torch.split(value, list(rule.sizes), dim=0))
        if value.shape[0] % len(rule.dst):
            raise CheckpointError(f"'{rule.src}' has {value.shape[0]} rows, not divisible into {len(rule.dst)} parts")
        return list(value.chunk(len(rule.dst), dim=0))
    if rule.op == "swap":
        first, second = value.chunk(2, dim=0)
        return [torch.cat([second, first], dim=0)]
    if rule.op == "transpose":
        return [value.t().contiguous()]
    if rule.op == "conv":
        if value.ndim > 2 and any(d != 1 for d in value.shape[2:]):
            raise CheckpointError(f"'{rule.src}' has shape {tuple(value.shape)}; expected a 1x1 convolution weight")
        return [value.reshape(value.shape[0], value.shape[1]) if value.ndim > 2 else value]
    raise AssertionError(rule.op)


def _inverse_op(rule: _Rule, values: list[torch.Tensor]) -> torch.Tensor:
    if rule.op == "split":
        return torch.cat(values, dim=0)
    (value,) = values
    if rule.op == "swap":
        return _forward_op(rule, value)[0]  # self-inverse
    if rule.op == "transpose":
        return value.t().contiguous()
    if rule.op == "conv":
        return value[:, :, None, None] if value.ndim == 2 else value
    return value


def _swap_prefix(key: str, old: str, new: str) -> str:
    rest = key[len(old):] if old else "." + key  # "" or ".rest"
    return new + rest if new else rest[1:]


def _longest_prefix(key: str, table: Mapping[str, _Rule]) -> str | None:
    cut = len(key)
    while True:
        candidate = key[:cut]
        if candidate in table:
            return candidate
        if cut == 0:
            return None
        cut = key.rfind(".", 0, cut)
        if cut < 0:
            cut = 0


def _apply_forward(state: Mapping[str, torch.Tensor], rules: list[_Rule], where: str,
                   ignore: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    exact = {r.src: r for r in rules if r.op != "prefix"}
    prefixes = {r.src: r for r in rules if r.op == "prefix"}
    ignore = set(ignore)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in ignore:
            continue
        rule = exact.get(key)
        if rule is not None:
            try:
                parts = _forward_op(rule, value)
            except CheckpointError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
            out.update(zip(rule.dst, parts))
            continue
        found = _longest_prefix(key, prefixes)
        if found is not None:
            out[_swap_prefix(key, found, prefixes[found].dst[0])] = value
        else:
            unknown.append(key)
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise CheckpointError(f"{where}: unexpected key(s) {sorted(unknown)[:8]}{more} for this layout; "
                              "the file is not a supported single-file checkpoint of the detected family")
    return out


def _apply_inverse(state: Mapping[str, torch.Tensor], rules: list[_Rule], where: str) -> dict[str, torch.Tensor]:
    parts_of: dict[str, tuple[_Rule, int]] = {}
    for rule in rules:
        if rule.op != "prefix":
            for i, name in enumerate(rule.dst):
                parts_of[name] = (rule, i)
    prefixes = {r.dst[0]: r for r in rules if r.op == "prefix"}
    out: dict[str, torch.Tensor] = {}
    gathered: dict[_Rule, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in parts_of:
            rule, i = parts_of[key]
            gathered.setdefault(rule, {})[i] = value
            continue
        found = _longest_prefix(key, prefixes)
        if found is None:
            unknown.append(key)
        else:
            out[_swap_prefix(key, found, prefixes[found].src)] = value
    if unknown:
        raise CheckpointError(f"{where}: diffusers key(s) {sorted(unknown)[:8]} have no single-file name")
    for rule, parts in gathered.items():
        missing = [name for i, name in enumerate(rule.dst) if i not in parts]
        if missing:
            raise CheckpointError(f"{where}: {missing} missing; they are stored fused as '{rule.src}'")
        out[rule.src] = _inverse_op(rule, [parts[i] for i in range(len(rule.dst))])
    return out


def _indices(keys: Iterable[str], head: str) -> list[int]:
    """Sorted distinct N of keys ``head.N.*``."""
    pattern = re.compile(re.escape(head) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


# ---- UNet ----------------------------------------------------------------------------------

_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


@dataclass(frozen=True)
class _Level:
    resnets: int
    attentions: bool
    resample: bool  # a downsampler (down levels) or upsampler (up levels) ends the level


def _unet_structure_from_single_file(keys: set) -> tuple[list[_Level], bool, list[_Level]]:
    down: list[_Level] = []
    count, attn = 0, False
    for i in _indices(keys, "input_blocks")[1:]:
        if f"input_blocks.{i}.0.op.weight" in keys:
            down.append(_Level(count, attn, True))
            count, attn = 0, False
        else:
            count += 1
            attn = attn or any(k.startswith(f"input_blocks.{i}.1.") for k in keys)
    down.append(_Level(count, attn, False))
    mid_attention = any(k.startswith("middle_block.1.") for k in keys) and "middle_block.2.in_layers.0.weight" in keys
    up: list[_Level] = []
    count, attn = 0, False
    for i in _indices(keys, "output_blocks"):
        count += 1
        attn = attn or any(k.startswith(f"output_blocks.{i}.1.") and not k.startswith(f"output_blocks.{i}.1.conv.")
                           for k in keys)
        if f"output_blocks.{i}.1.conv.weight" in keys or f"output_blocks.{i}.2.conv.weight" in keys:
            up.append(_Level(count, attn, True))
            count, attn = 0, False
    if count:
        up.append(_Level(count, attn, False))
    return down, mid_attention, up


def _unet_structure_from_diffusers(keys: set) -> tuple[list[_Level], bool, list[_Level]]:
    def levels(head: str, resample: str) -> list[_Level]:
        out = []
        for b in _indices(keys, head):
            out.append(_Level(len(_indices(keys, f"{head}.{b}.resnets")),
                              any(k.startswith(f"{head}.{b}.attentions.") for k in keys),
                              any(k.startswith(f"{head}.{b}.{resample}.") for k in keys)))
        return out

    return levels("down_blocks", "downsamplers"), any(k.startswith("mid_block.attentions.") for k in keys), \
        levels("up_blocks", "upsamplers")


def _unet_rules(down: list[_Level], mid_attention: bool, up: list[_Level]) -> list[_Rule]:
    rules = [_p("time_embed.0", "time_embedding.linear_1"), _p("time_embed.2", "time_embedding.linear_2"),
             _p("time_embedding.cond_proj", "time_embedding.cond_proj"),  # guidance-distilled UNets (see _detect)
             _p("label_emb.0.0", "add_embedding.linear_1"), _p("label_emb.0.2", "add_embedding.linear_2"),
             _p("input_blocks.0.0", "conv_in"), _p("out.0", "conv_norm_out"), _p("out.2", "conv_out")]

    def resnet(src: str, dst: str) -> None:
        rules.extend(_p(f"{src}.{a}", f"{dst}.{b}") for a, b in _RESNET)

    k = 1
    for b, level in enumerate(down):
        for j in range(level.resnets):
            resnet(f"input_blocks.{k}.0", f"down_blocks.{b}.resnets.{j}")
            if level.attentions:
                rules.append(_p(f"input_blocks.{k}.1", f"down_blocks.{b}.attentions.{j}"))
            k += 1
        if level.resample:
            rules.append(_p(f"input_blocks.{k}.0.op", f"down_blocks.{b}.downsamplers.0.conv"))
            k += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    if mid_attention:
        rules.append(_p("middle_block.1", "mid_block.attentions.0"))
        resnet("middle_block.2", "mid_block.resnets.1")
    else:
        resnet("middle_block.1", "mid_block.resnets.1")
    k = 0
    for b, level in enumerate(up):
        for j in range(level.resnets):
            resnet(f"output_blocks.{k}.0", f"up_blocks.{b}.resnets.{j}")
            slot = 1
            if level.attentions:
                rules.append(_p(f"output_blocks.{k}.1", f"up_blocks.{b}.attentions.{j}"))
                slot = 2
            if level.resample and j == level.resnets - 1:
                rules.append(_p(f"output_blocks.{k}.{slot}.conv", f"up_blocks.{b}.upsamplers.0.conv"))
            k += 1
    return rules


# ---- VAE -----------------------------------------------------------------------------------

_VAE_ATTENTION = (("norm", "group_norm", "prefix"), ("q", "to_q", "conv"), ("k", "to_k", "conv"),
                  ("v", "to_v", "conv"), ("proj_out", "to_out.0", "conv"))


def _vae_rules(encoder_levels: list[int], decoder_levels: list[int]) -> list[_Rule]:
    """``encoder_levels[i]`` / ``decoder_levels[i]``: resnet count of encoder.down.i / decoder.up.i
    (original order; diffusers numbers the decoder's up blocks the other way round)."""
    rules = [_p("quant_conv", "quant_conv"), _p("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [_p(f"{part}.conv_in", f"{part}.conv_in"), _p(f"{part}.conv_out", f"{part}.conv_out"),
                  _p(f"{part}.norm_out", f"{part}.conv_norm_out")]
        for n in (1, 2):
            rules.append(_p(f"{part}.mid.block_{n}", f"{part}.mid_block.resnets.{n - 1}"))
            rules.append(_p(f"{part}.mid.block_{n}.nin_shortcut", f"{part}.mid_block.resnets.{n - 1}.conv_shortcut"))
        for src, dst, op in _VAE_ATTENTION:
            base_src, base_dst = f"{part}.mid.attn_1.{src}", f"{part}.mid_block.attentions.0.{dst}"
            if op == "conv":
                rules += [_c(f"{base_src}.weight", f"{base_dst}.weight", "conv"), _p(f"{base_src}.bias", f"{base_dst}.bias")]
            else:
                rules.append(_p(base_src, base_dst))
    for i, count in enumerate(encoder_levels):
        for j in range(count):
            rules.append(_p(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}"))
            rules.append(_p(f"encoder.down.{i}.block.{j}.nin_shortcut", f"encoder.down_blocks.{i}.resnets.{j}.conv_shortcut"))
        rules.append(_p(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    n = len(decoder_levels)
    for i, count in enumerate(decoder_levels):
        b = n - 1 - i
        for j in range(count):
            rules.append(_p(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}"))
            rules.append(_p(f"decoder.up.{i}.block.{j}.nin_shortcut", f"decoder.up_blocks.{b}.resnets.{j}.conv_shortcut"))
        rules.append(_p(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv"))
    return rules


def _vae_rules_from(keys: set, side: str) -> list[_Rule]:
    if side == "single_file":
        enc = [len(_indices(keys, f"encoder.down.{i}.block")) for i in _indices(keys, "encoder.down")]
        dec = [len(_indices(keys, f"decoder.up.{i}.block")) for i in _indices(keys, "decoder.up")]
    else:
        enc = [len(_indices(keys, f"encoder.down_blocks.{i}.resnets")) for i in _indices(keys, "encoder.down_blocks")]
        dec = [len(_indices(keys, f"decoder.up_blocks.{i}.resnets")) for i in _indices(keys, "decoder.up_blocks")][::-1]
    return _vae_rules(enc, dec)


# ---- text encoders -------------------------------------------------------------------------


@functools.cache
def clip_text_model_prefix() -> str:
    """``"text_model."`` if the installed transformers' CLIPTextModel nests its weights under
    ``text_model`` (transformers < 5.6, and every diffusers folder on disk), else ``""`` (flattened).
    convert() emits CLIPTextModel keys that load strictly into the installed class."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=2, bos_token_id=0, eos_token_id=1,
                            pad_token_id=0)
    with torch.device("meta"):
        keys = CLIPTextModel(config).state_dict().keys()
    return "text_model." if any(k.startswith("text_model.") for k in keys) else ""


def _clip_rules(with_projection: bool) -> list[_Rule]:
    inner = "text_model" if with_projection else clip_text_model_prefix().rstrip(".")
    rules = [_p("text_model", inner)]
    if with_projection:
        rules.append(_c("text_projection.weight", "text_projection.weight"))
    return rules


def _openclip_rules(layers: int, with_projection: bool) -> list[_Rule]:
    tm = "text_model." if with_projection else clip_text_model_prefix()
    rules = [_c("positional_embedding", f"{tm}embeddings.position_embedding.weight"),
             _p("token_embedding", f"{tm}embeddings.token_embedding"),
             _p("ln_final", f"{tm}final_layer_norm")]
    if with_projection:
        rules.append(_c("text_projection", "text_projection.weight", "transpose"))
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}", f"{tm}encoder.layers.{i}"
        rules += [_p(f"{src}.ln_1", f"{dst}.layer_norm1"), _p(f"{src}.ln_2", f"{dst}.layer_norm2"),
                  _p(f"{src}.mlp.c_fc", f"{dst}.mlp.fc1"), _p(f"{src}.mlp.c_proj", f"{dst}.mlp.fc2"),
                  _p(f"{src}.attn.out_proj", f"{dst}.self_attn.out_proj")]
        for kind in ("weight", "bias"):
            rules.append(_split(f"{src}.attn.in_proj_{kind}",
                                [f"{dst}.self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]))
    return rules


# ---- SD3 (MMDiT) ---------------------------------------------------------------------------


def _sd3_rules(blocks: int, dual: set[int], pre_only: set[int]) -> list[_Rule]:
    rules = [_c("pos_embed", "pos_embed.pos_embed"), _p("x_embedder.proj", "pos_embed.proj"),
             _p("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
             _p("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
             _p("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
             _p("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
             _p("context_embedder", "context_embedder"), _p("final_layer.linear", "proj_out")]
    rules += [_c(f"final_layer.adaLN_modulation.1.{w}", f"norm_out.linear.{w}", "swap") for w in ("weight", "bias")]
    for i in range(blocks):
        jb, tb = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        x, c = f"{jb}.x_block", f"{jb}.context_block"
        for w in ("weight", "bias"):
            rules.append(_split(f"{x}.attn.qkv.{w}", [f"{tb}.attn.to_{p}.{w}" for p in "qkv"]))
            rules.append(_split(f"{c}.attn.qkv.{w}", [f"{tb}.attn.add_{p}_proj.{w}" for p in "qkv"]))
        rules += [_p(f"{x}.attn.ln_q", f"{tb}.attn.norm_q"), _p(f"{x}.attn.ln_k", f"{tb}.attn.norm_k"),
                  _p(f"{c}.attn.ln_q", f"{tb}.attn.norm_added_q"), _p(f"{c}.attn.ln_k", f"{tb}.attn.norm_added_k"),
                  _p(f"{x}.attn.proj", f"{tb}.attn.to_out.0"), _p(f"{x}.adaLN_modulation.1", f"{tb}.norm1.linear"),
                  _p(f"{x}.mlp.fc1", f"{tb}.ff.net.0.proj"), _p(f"{x}.mlp.fc2", f"{tb}.ff.net.2")]
        if i in pre_only:  # the last context block only feeds the joint attention: (shift, scale) adaLN
            rules += [_c(f"{c}.adaLN_modulation.1.{w}", f"{tb}.norm1_context.linear.{w}", "swap")
                      for w in ("weight", "bias")]
        else:
            rules += [_p(f"{c}.adaLN_modulation.1", f"{tb}.norm1_context.linear"),
                      _p(f"{c}.attn.proj", f"{tb}.attn.to_add_out"),
                      _p(f"{c}.mlp.fc1", f"{tb}.ff_context.net.0.proj"), _p(f"{c}.mlp.fc2", f"{tb}.ff_context.net.2")]
        if i in dual:
            for w in ("weight", "bias"):
                rules.append(_split(f"{x}.attn2.qkv.{w}", [f"{tb}.attn2.to_{p}.{w}" for p in "qkv"]))
            rules += [_p(f"{x}.attn2.ln_q", f"{tb}.attn2.norm_q"), _p(f"{x}.attn2.ln_k", f"{tb}.attn2.norm_k"),
                      _p(f"{x}.attn2.proj", f"{tb}.attn2.to_out.0")]
    return rules


def _sd3_rules_from(keys: set, side: str) -> list[_Rule]:
    if side == "single_file":
        blocks = _indices(keys, "joint_blocks")
        dual = {i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in keys}
        pre_only = {i for i in blocks if f"joint_blocks.{i}.context_block.attn.proj.weight" not in keys}
    else:
        blocks = _indices(keys, "transformer_blocks")
        dual = {i for i in blocks if f"transformer_blocks.{i}.attn2.to_q.weight" in keys}
        pre_only = {i for i in blocks if f"transformer_blocks.{i}.attn.to_add_out.weight" not in keys}
    return _sd3_rules(len(blocks), dual, pre_only)


# ---- FLUX.1 --------------------------------------------------------------------------------


def _flux_rules(double: int, single: int, inner: int, mlp: int) -> list[_Rule]:
    rules = [_p("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
             _p("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
             _p("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
             _p("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
             _p("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
             _p("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
             _p("txt_in", "context_embedder"), _p("img_in", "x_embedder"), _p("final_layer.linear", "proj_out")]
    rules += [_c(f"final_layer.adaLN_modulation.1.{w}", f"norm_out.linear.{w}", "swap") for w in ("weight", "bias")]
    for i in range(double):
        db, tb = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for w in ("weight", "bias"):
            rules.append(_split(f"{db}.img_attn.qkv.{w}", [f"{tb}.attn.to_{p}.{w}" for p in "qkv"]))
            rules.append(_split(f"{db}.txt_attn.qkv.{w}", [f"{tb}.attn.add_{p}_proj.{w}" for p in "qkv"]))
        rules += [_p(f"{db}.img_mod.lin", f"{tb}.norm1.linear"), _p(f"{db}.txt_mod.lin", f"{tb}.norm1_context.linear"),
                  _c(f"{db}.img_attn.norm.query_norm.scale", f"{tb}.attn.norm_q.weight"),
                  _c(f"{db}.img_attn.norm.key_norm.scale", f"{tb}.attn.norm_k.weight"),
                  _c(f"{db}.txt_attn.norm.query_norm.scale", f"{tb}.attn.norm_added_q.weight"),
                  _c(f"{db}.txt_attn.norm.key_norm.scale", f"{tb}.attn.norm_added_k.weight"),
                  _p(f"{db}.img_mlp.0", f"{tb}.ff.net.0.proj"), _p(f"{db}.img_mlp.2", f"{tb}.ff.net.2"),
                  _p(f"{db}.txt_mlp.0", f"{tb}.ff_context.net.0.proj"), _p(f"{db}.txt_mlp.2", f"{tb}.ff_context.net.2"),
                  _p(f"{db}.img_attn.proj", f"{tb}.attn.to_out.0"), _p(f"{db}.txt_attn.proj", f"{tb}.attn.to_add_out")]
    for i in range(single):
        sb, tb = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for w in ("weight", "bias"):  # linear1 = [q; k; v; mlp-in] of the parallel attention + MLP block
            rules.append(_split(f"{sb}.linear1.{w}", [f"{tb}.attn.to_{p}.{w}" for p in "qkv"] + [f"{tb}.proj_mlp.{w}"],
                                (inner, inner, inner, mlp)))
        rules += [_p(f"{sb}.modulation.lin", f"{tb}.norm.linear"),
                  _c(f"{sb}.norm.query_norm.scale", f"{tb}.attn.norm_q.weight"),
                  _c(f"{sb}.norm.key_norm.scale", f"{tb}.attn.norm_k.weight"),
                  _p(f"{sb}.linear2", f"{tb}.proj_out")]
    return rules


def _flux_rules_from(shapes: dict, side: str) -> list[_Rule]:
    keys = set(shapes)
    if side == "single_file":
        double, single = _indices(keys, "double_blocks"), _indices(keys, "single_blocks")
        inner = shapes["img_in.weight"][0]
        mlp = shapes[f"single_blocks.{single[0]}.linear1.weight"][0] - 3 * inner if single else 0
    else:
        double, single = _indices(keys, "transformer_blocks"), _indices(keys, "single_transformer_blocks")
        inner = shapes["x_embedder.weight"][0]
        mlp = shapes[f"single_transformer_blocks.{single[0]}.proj_mlp.weight"][0] if single else 0
    return _flux_rules(len(double), len(single), inner, mlp)


def _zimage_rules_from(keys: set, side: str) -> list[_Rule]:
    """Z-Image's original names (ComfyUI's ``z_image_turbo_*.safetensors``) <-> diffusers': the patch
    embedder and head under ``all_*.2-1``, each block's fused ``attention.qkv`` split into q, k, v,
    ``attention.out`` -> ``to_out.0``, ``q_norm``/``k_norm`` -> ``norm_q``/``norm_k``; the rest as is."""
    rules = [_p("", ""), _p("x_embedder", "all_x_embedder.2-1"), _p("final_layer", "all_final_layer.2-1")]
    for stack in ("layers", "noise_refiner", "context_refiner"):
        for i in _indices(keys, stack):
            a = f"{stack}.{i}.attention"
            rules += [_split(f"{a}.qkv.weight", [f"{a}.to_{p}.weight" for p in "qkv"]),
                      _p(f"{a}.out", f"{a}.to_out.0"),
                      _c(f"{a}.q_norm.weight", f"{a}.norm_q.weight"), _c(f"{a}.k_norm.weight", f"{a}.norm_k.weight")]
    return rules


# ---- per component -------------------------------------------------------------------------


def _rules_for(kind: str, shapes: dict, side: str) -> list[_Rule]:
    keys = set(shapes)
    if kind == "unet":
        structure = (_unet_structure_from_single_file if side == "single_file" else _unet_structure_from_diffusers)(keys)
        return _unet_rules(*structure)
    if kind == "vae":
        return _vae_rules_from(keys, side)
    if kind in ("clip", "clip_proj"):
        return _clip_rules(kind == "clip_proj")
    if kind in ("openclip", "openclip_proj"):
        head = "transformer.resblocks" if side == "single_file" else (
            "text_model.encoder.layers" if any(k.startswith("text_model.") for k in keys) else "encoder.layers")
        return _openclip_rules(len(_indices(keys, head)), kind == "openclip_proj")
    if kind == "t5":
        return [_p("", "")]
    if kind == "sd3":
        return _sd3_rules_from(keys, side)
    if kind == "flux":
        return _flux_rules_from(shapes, side)
    if kind == "zimage":
        return _zimage_rules_from(keys, side)
    raise AssertionError(kind)


# Keys a component may carry that have no diffusers parameter (buffers, unused heads).
_IGNORED = {
    "clip": {"text_model.embeddings.position_ids", "logit_scale", "text_projection.weight"},
    "clip_proj": {"text_model.embeddings.position_ids", "logit_scale"},
    "openclip": {"logit_scale", "attn_mask"},
    "openclip_proj": {"logit_scale", "attn_mask"},
    "zimage": {"norm_final.weight"},  # an unused norm some exports carry (diffusers drops it too)
}


def _component_state(state: Mapping[str, torch.Tensor], prefix: str, others: Iterable[str]) -> dict[str, torch.Tensor]:
    others = [p for p in others if p and p != prefix]
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not any(k.startswith(o) for o in others)
            and (prefix or k not in (MARKER_V_PRED, MARKER_ZTSNR))}


def convert(state: Mapping[str, torch.Tensor], detected: Detected,
            source: str | Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per component (``unet`` | ``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``,
    ``text_encoder_3``) a state dict under diffusers / transformers names, in the stored dtypes.

    Keys outside the detected components (DDPM schedule buffers, EMA copies, markers) are ignored;
    a key inside a component that no rule knows is a CheckpointError naming it (and ``source``).
    """
    with _errors_from(source):
        return _convert(state, detected)


def _convert(state: Mapping[str, torch.Tensor], detected: Detected) -> dict[str, dict[str, torch.Tensor]]:
    kinds = COMPONENT_KINDS[detected.family]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, prefix in detected.components.items():
        sub = _component_state(state, prefix, detected.components.values())
        where = f"{component} ('{prefix}*')" if prefix else f"{component} (bare keys)"
        if not sub:
            raise CheckpointError(f"{where}: no tensors with this prefix in the state dict")
        out[component] = convert_component(sub, kinds[component], where)
    return out


def convert_component(sub: Mapping[str, torch.Tensor], kind: str, where: str = "") -> dict[str, torch.Tensor]:
    """One component's tensors (keys relative to its prefix) -> diffusers / transformers names.

    ``kind`` is a rule set of :data:`COMPONENT_KINDS` (``unet``, ``vae``, ``clip``, ``clip_proj``,
    ``openclip``, ``openclip_proj``, ``t5``, ``sd3``, ``flux``); the loader also uses it for
    separate component files (a VAE or text encoder file in the original layout).
    """
    if kind in ("clip", "clip_proj") and not any(k.startswith("text_model.") for k in sub):
        sub = {(k if k.startswith(("text_projection", "logit_scale")) else f"text_model.{k}"): v for k, v in sub.items()}
    if kind == "openclip" and "text_projection" in sub:
        sub = _drop_last_openclip_layer(sub, where)
    rules = _rules_for(kind, _shapes(sub), "single_file")
    converted = _apply_forward(sub, rules, where, _IGNORED.get(kind, ()))
    if kind == "clip_proj" and "text_projection.weight" not in converted:
        # SD3 files usually omit CLIP-L's projection; SD3 uses it as the identity (as diffusers does).
        token = converted["text_model.embeddings.token_embedding.weight"]
        converted["text_projection.weight"] = torch.eye(token.shape[1], dtype=token.dtype)
    if kind == "t5" and "shared.weight" in converted:
        converted.setdefault("encoder.embed_tokens.weight", converted["shared.weight"])  # tied embedding
    return converted


def _drop_last_openclip_layer(sub: dict, where: str) -> dict:
    """SD 2.x conditions on OpenCLIP's penultimate layer: diffusers' SD 2 text encoder has one layer
    fewer than the file's full OpenCLIP tower (23 of 24) and no projection. A file carrying the full
    tower (it has ``text_projection``) drops its last resblock and the projection here."""
    layers = _indices(sub, "transformer.resblocks")
    last = f"transformer.resblocks.{layers[-1]}."
    log.debug("%s: dropping %s* and text_projection (SD 2 uses the penultimate OpenCLIP layer)", where, last)
    return {k: v for k, v in sub.items() if not k.startswith(last) and k != "text_projection"}


def upcast(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with every floating-point tensor converted to ``dtype`` (fp8 / fp16 / bf16 -> the
    run dtype); integer tensors and tensors already in ``dtype`` are returned as they are."""
    return {k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# Inverse: diffusers -> single file
# --------------------------------------------------------------------------------------------


def to_single_file(components: Mapping[str, Mapping[str, torch.Tensor]], family: str, variant: str | None = None, *,
                   prediction_type: str | None = None, denoiser_prefix: str = DENOISER_PREFIX) -> dict[str, torch.Tensor]:
    """The single-file state dict of diffusers-layout ``components`` (``unet`` | ``transformer``,
    ``vae``, ``text_encoder``...), as :func:`convert` reads it back.

    ``variant``, when given, is checked against what :func:`detect` makes of the result.
    ``prediction_type="v_prediction"`` adds the ``v_pred`` marker key (UNet families).
    ``denoiser_prefix=""`` writes a bare transformer-only layout (SD3 / FLUX). CLIPTextModel keys
    may come with or without the ``text_model.`` prefix. T5's ``encoder.embed_tokens.weight`` is
    tied to ``shared.weight`` and not written (convert() restores it).
    """
    if family not in COMPONENT_KINDS:
        raise ValueError(f"family: unknown {family!r} (choose from {', '.join(FAMILIES)})")
    kinds = COMPONENT_KINDS[family]
    prefixes = {"unet": denoiser_prefix, "transformer": denoiser_prefix, "vae": VAE_PREFIXES[0],
                **TEXT_ENCODER_PREFIXES[family]}
    out: dict[str, torch.Tensor] = {}
    for component, state in components.items():
        if component not in kinds:
            raise ValueError(f"components: {family} has no '{component}' (it has {', '.join(kinds)})")
        kind = kinds[component]
        state = dict(state)
        if kind in ("clip", "clip_proj", "openclip", "openclip_proj"):
            state = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
                     for k, v in state.items()}
            state.pop("text_model.embeddings.position_ids", None)
            if kind in ("clip", "openclip") and clip_text_model_prefix() == "":
                state = {k.removeprefix("text_model."): v for k, v in state.items()}
        if kind == "t5":
            state.pop("encoder.embed_tokens.weight", None)
        rules = _rules_for(kind, _shapes(state), "diffusers")
        for key, value in _apply_inverse(state, rules, component).items():
            out[prefixes[component] + key] = value
    if prediction_type == "v_prediction":
        out[MARKER_V_PRED] = torch.zeros(0)
    elif prediction_type not in (None, "epsilon", "flow_matching"):
        raise ValueError(f"prediction_type: {prediction_type!r} (choose v_prediction, epsilon or None)")
    if variant is not None:
        got = detect(out)
        if (got.family, got.variant) != (family, variant):
            raise ValueError(f"variant: the components make a {got.family}/{got.variant} file, not {family}/{variant}")
    return out


# --------------------------------------------------------------------------------------------
# Standard configs of the real variants (diffusers' public model repos)
# --------------------------------------------------------------------------------------------

_CLIP_L = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768, "attention_dropout": 0.0,
    "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1,
}
_OPENCLIP_H = {**_CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
               "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
_OPENCLIP_BIGG = {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
                  "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu",
                  "projection_dim": 1280}
_CLIP_L_PROJ = {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"]}
_T5_XXL = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, "d_model": 4096, "d_kv": 64,
    "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
    "is_gated_act": True, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "initializer_factor": 1.0,
    "is_encoder_decoder": True, "tie_word_embeddings": False, "use_cache": True, "pad_token_id": 0,
    "eos_token_id": 1, "decoder_start_token_id": 0,
}

_UNET_SD1 = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True,
    "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    "use_linear_projection": False, "upcast_attention": False,
}
_UNET_SD2 = {**_UNET_SD1, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "use_linear_projection": True, "upcast_attention": True}
_UNET_SDXL = {
    **_UNET_SD1, "sample_size": 128, "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
    "use_linear_projection": True, "upcast_attention": None, "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
_UNET_REFINER = {
    **_UNET_SDXL, "block_out_channels": [384, 768, 1536, 1536],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [6, 12, 24, 24], "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
    "projection_class_embeddings_input_dim": 2560,
}

_VAE_SD = {
    "_class_name": "AutoencoderKL", "sample_size": 512, "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
    "act_fn": "silu", "scaling_factor": 0.18215,
}
_VAE_SDXL = {**_VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
_VAE_SD3 = {**_VAE_SD, "sample_size": 1024, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
_VAE_FLUX = {**_VAE_SD3, "scaling_factor": 0.3611, "shift_factor": 0.1159}

_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
_SCHED_SD1 = {"_class_name": "PNDMScheduler", **_SD_BETAS, "skip_prk_steps": True, "prediction_type": "epsilon"}
_SCHED_SD2 = {"_class_name": "DDIMScheduler", **_SD_BETAS, "prediction_type": "v_prediction"}
_SCHED_SDXL = {"_class_name": "EulerDiscreteScheduler", **_SD_BETAS, "prediction_type": "epsilon",
               "interpolation_type": "linear", "timestep_spacing": "leading", "use_karras_sigmas": False,
               "sample_max_value": 1.0, "skip_prk_steps": True}
_SCHED_SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
_SCHED_FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                   "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                   "max_image_seq_len": 4096}
_SCHED_FLUX_SCHNELL = {**_SCHED_FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}

_SD3_MEDIUM = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
    "out_channels": 16, "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": None,
}
_SD35_MEDIUM = {**_SD3_MEDIUM, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
                "qk_norm": "rms_norm"}
_SD35_LARGE = {**_SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
               "qk_norm": "rms_norm"}
_FLUX_DEV = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": None,
    "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
_FLUX_SCHNELL = {**_FLUX_DEV, "guidance_embeds": False}
_FLUX_FILL = {**_FLUX_DEV, "in_channels": 384, "out_channels": 64}  # black-forest-labs/FLUX.1-Fill-dev

# Tongyi-MAI/Z-Image-Turbo: transformer/config.json, scheduler_config.json and the Qwen3-4B text encoder.
_ZIMAGE_TURBO = {
    "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16,
    "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-05,
    "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}
_SCHED_ZIMAGE = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": False}
_QWEN3_4B = {
    "architectures": ["Qwen3Model"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
    "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
    "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
}

_T = ("transformers", "CLIPTokenizer")
_PIPELINES: dict[str, dict] = {
    "sd1": {"class": "StableDiffusionPipeline", "unet": _UNET_SD1, "vae": _VAE_SD, "scheduler": _SCHED_SD1,
            "text_encoder": _CLIP_L, "tokenizers": {"tokenizer": _T}},
    "sd2": {"class": "StableDiffusionPipeline", "unet": _UNET_SD2, "vae": {**_VAE_SD, "sample_size": 768},
            "scheduler": _SCHED_SD2, "text_encoder": _OPENCLIP_H, "tokenizers": {"tokenizer": _T}},
    "sdxl-base": {"class": "StableDiffusionXLPipeline", "unet": _UNET_SDXL, "vae": _VAE_SDXL, "scheduler": _SCHED_SDXL,
                  "text_encoder": _CLIP_L, "text_encoder_2": _OPENCLIP_BIGG,
                  "tokenizers": {"tokenizer": _T, "tokenizer_2": _T}},
    "sdxl-refiner": {"class": "StableDiffusionXLImg2ImgPipeline", "unet": _UNET_REFINER, "vae": _VAE_SDXL,
                     "scheduler": _SCHED_SDXL, "text_encoder": None, "text_encoder_2": _OPENCLIP_BIGG,
                     "tokenizers": {"tokenizer": None, "tokenizer_2": _T}},
    **{variant: {"class": "StableDiffusion3Pipeline", "transformer": config, "vae": _VAE_SD3, "scheduler": _SCHED_SD3,
                 "text_encoder": _CLIP_L_PROJ, "text_encoder_2": _OPENCLIP_BIGG, "text_encoder_3": _T5_XXL,
                 "tokenizers": {"tokenizer": _T, "tokenizer_2": _T, "tokenizer_3": ("transformers", "T5TokenizerFast")}}
       for variant, config in (("sd3-medium", _SD3_MEDIUM), ("sd3.5-medium", _SD35_MEDIUM), ("sd3.5-large", _SD35_LARGE))},
    **{variant: {"class": cls, "transformer": config, "vae": _VAE_FLUX, "scheduler": sched,
                 "text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL,
                 "tokenizers": {"tokenizer": _T, "tokenizer_2": ("transformers", "T5TokenizerFast")}}
       for variant, cls, config, sched in (("flux-dev", "FluxPipeline", _FLUX_DEV, _SCHED_FLUX_DEV),
                                           ("flux-schnell", "FluxPipeline", _FLUX_SCHNELL, _SCHED_FLUX_SCHNELL),
                                           ("flux-fill", "FluxFillPipeline", _FLUX_FILL, _SCHED_FLUX_DEV))},
    "zimage": {"class": "ZImagePipeline", "transformer": _ZIMAGE_TURBO, "vae": _VAE_FLUX, "scheduler": _SCHED_ZIMAGE,
               "text_encoder": _QWEN3_4B, "tokenizers": {"tokenizer": ("transformers", "Qwen2Tokenizer")}},
}


def _inpainting(base: str, cls: str, **unet) -> dict:
    """An inpainting file's pipeline: its text-to-image variant's configs with a 9-channel UNet."""
    spec = _PIPELINES[base]
    return {**spec, "class": cls, "unet": {**spec["unet"], "in_channels": 9, **unet}}


_PIPELINES.update({
    "sd1-inpaint": _inpainting("sd1", "StableDiffusionInpaintPipeline"),
    # 512-inpainting-ema (stabilityai/stable-diffusion-2-inpainting): epsilon at 512 px, like SD 2.1-base
    "sd2-inpaint": {**_inpainting("sd2", "StableDiffusionInpaintPipeline", sample_size=64, upcast_attention=False),
                    "vae": {**_VAE_SD, "sample_size": 512}, "scheduler": {**_SCHED_SD2, "prediction_type": "epsilon"}},
    "sdxl-inpaint": _inpainting("sdxl-base", "StableDiffusionXLInpaintPipeline"),
})
_MODEL_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def standard_configs(detected: Detected, prediction_type: str | None = None) -> dict:
    """Everything a loader needs for a real variant with no user config.

    Returns ``{"pipeline_class", "model_index", "scheduler", <component>: config}``: the diffusers
    pipeline class name, a model_index.json-like dict (component -> [library, class]; tokenizers
    are listed but single files carry no vocabulary), the scheduler config and one config.json-like
    dict per model component (``unet`` | ``transformer``, ``vae``, ``text_encoder``...; ``None``
    where the pipeline has no such component). Configs are deep copies.

    ``prediction_type`` overrides the detected one (UNet families). SD 2.x with an unknown type
    gets SD 2.1's v-prediction at 768 px; ``"epsilon"`` gives SD 2.1-base (512 px, no attention
    upcast); SD 2.x inpainting is epsilon at 512 px. A ``ztsnr`` marker sets the scheduler's
    ``rescale_betas_zero_snr``. Inpainting variants (``*-inpaint``: 9-channel UNets; ``flux-fill``)
    get the inpainting pipeline class and a denoiser config with those input channels.
    """
    if detected.variant not in _PIPELINES:
        raise CheckpointError(f"no standard config for variant '{detected.variant}' (known: {', '.join(_PIPELINES)})")
    spec = copy.deepcopy(_PIPELINES[detected.variant])
    prediction = prediction_type or detected.prediction_type
    if detected.family in TRANSFORMER_FAMILIES:
        if prediction not in (None, "flow_matching"):
            raise CheckpointError(f"prediction_type '{prediction}' does not apply to {detected.variant} (flow matching)")
        prediction = None
    elif prediction is not None:
        if prediction not in ("epsilon", "v_prediction"):
            raise CheckpointError(f"prediction_type '{prediction}' is not supported (choose epsilon or v_prediction)")
        spec["scheduler"]["prediction_type"] = prediction
        if detected.family == "sd2" and prediction == "epsilon":  # SD 2.1-base
            spec["unet"].update(sample_size=64, upcast_attention=False)
            spec["vae"]["sample_size"] = 512
    if detected.zero_terminal_snr and detected.family not in TRANSFORMER_FAMILIES:
        spec["scheduler"]["rescale_betas_zero_snr"] = True
    if detected.time_cond_proj_dim is not None and "unet" in spec:
        spec["unet"]["time_cond_proj_dim"] = detected.time_cond_proj_dim
    model_index: dict = {"_class_name": spec["class"]}
    result: dict = {"pipeline_class": spec["class"], "model_index": model_index}
    for component in _MODEL_COMPONENTS:
        if component in spec:
            config = spec[component]
            result[component] = config
            if config is None:
                model_index[component] = [None, None]
            elif "_class_name" in config:
                model_index[component] = ["diffusers", config["_class_name"]]
            else:
                model_index[component] = ["transformers", config["architectures"][0]]
    for name, entry in spec["tokenizers"].items():
        model_index[name] = list(entry) if entry else [None, None]
    model_index["scheduler"] = ["diffusers", spec["scheduler"]["_class_name"]]
    if detected.family in ("sd1", "sd2"):
        model_index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    elif detected.variant in ("sdxl-base", "sdxl-inpaint"):
        model_index.update(force_zeros_for_empty_prompt=True)
    elif detected.variant == "sdxl-refiner":  # 5 time ids with the aesthetic score (the refiner's model_index.json)
        model_index.update(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    result["scheduler"] = spec["scheduler"]
    return result
