"""ControlNet checkpoints: the layouts people download -> a loaded ``ControlNetModel``.

Three layouts are read:

- a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or its fp16
  variant / shards);
- a single file in the original ControlNet layout (``control_v11p_sd15_canny.safetensors``): LDM
  UNet-encoder names (``input_blocks``, ``middle_block``, ``time_embed``, SDXL's ``label_emb``),
  plus ``input_hint_block`` (the control-image encoder), ``zero_convs`` and ``middle_block_out``,
  with or without a ``control_model.`` prefix;
- a single file in diffusers' key layout (how SDXL ControlNets are shared:
  ``diffusers_xl_canny_full.safetensors``), which carries no config.

A single file carries no config, so one is read off the tensor shapes (channels, layers per
block, transformer depths, cross-attention width, linear or conv projections, the control
encoder's channels, SDXL's added-conditioning width). What shapes cannot tell (attention head
counts, norm groups and eps, the time-embedding flips, ``addition_time_embed_dim``) is taken from
the UNet the ControlNet is loaded for: a ControlNet is a copy of that UNet's encoder, so these are
the UNet's by construction. The LDM names are converted with the same rule tables as single-file
UNets (:mod:`batchgen.checkpoints.single_file`), so the conversion also runs backwards
(:func:`to_ldm_controlnet`, used to write test files).

:func:`check_controlnet_fits` refuses a ControlNet made for another model (another family, another
cross-attention width, other block channels) with an error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import CheckpointError
from .folder import file_digest, find_weight_files, fingerprint, load_weights_into, read_json_file, read_state_dict
from .single_file import (
    _apply_forward,
    _apply_inverse,
    _indices,
    _p,
    _unet_rules,
    _unet_structure_from_diffusers,
    _unet_structure_from_single_file,
    read_header,
)

CONTROLNET_CLASSES = ("ControlNetModel", "SD3ControlNetModel", "FluxControlNetModel")
# A key only that class's diffusers-named single files have.
DIT_KEYS = {"SD3ControlNetModel": "pos_embed_input.proj.weight", "FluxControlNetModel": "controlnet_x_embedder.weight"}
FAMILY_OF_CLASS = {"ControlNetModel": "SD 1.x/2.x or SDXL", "SD3ControlNetModel": "SD3/SD3.5",
                   "FluxControlNetModel": "FLUX.1"}
LDM_PREFIX = "control_model."
HINT = "input_hint_block"
# UNet config keys a ControlNet takes from its UNet when its own config is read off shapes.
FROM_UNET = ("attention_head_dim", "num_attention_heads", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
             "freq_shift", "upcast_attention", "act_fn", "addition_time_embed_dim", "downsample_padding",
             "mid_block_scale_factor")


@dataclass
class ControlNetFile:
    """Where a ControlNet's weights are and how they are laid out (before loading)."""

    path: Path  # the folder or the single file
    layout: str  # "diffusers" (folder) | "ldm-single-file" | "diffusers-single-file"
    files: list[Path] = field(default_factory=list)
    config: dict | None = None  # config.json (folders only)
    model_class: str = "ControlNetModel"  # or SD3ControlNetModel / FluxControlNetModel (controlnet_dit.py)

    @property
    def sha256(self) -> str:
        """The single file's sha256; a folder's: over (relative path, sha256) of its config and weights."""
        if self.layout == "diffusers":
            return fingerprint(self.path, self.files)
        return file_digest(self.path)


def open_controlnet(path: str | Path, allow_pickle: bool = False) -> ControlNetFile:
    """Find a ControlNet's files at local ``path`` (a folder or a ``.safetensors`` file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: ControlNet checkpoint does not exist")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            hint = (" (a whole pipeline folder: pass its controlnet/ sub-folder)" if (path / "controlnet").is_dir()
                    else "")
            raise CheckpointError(f"{path}: missing 'config.json': a ControlNet folder holds config.json and "
                                  f"diffusion_pytorch_model.safetensors{hint}")
        config = read_json_file(config_path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
        cls = config.get("_class_name", "ControlNetModel")
        if cls not in CONTROLNET_CLASSES:
            raise CheckpointError(f"{config_path}: _class_name is {cls!r}; batchgen loads "
                                  f"{', '.join(CONTROLNET_CLASSES)} ControlNets")
        weights = find_weight_files(path, "diffusion_pytorch_model", None, allow_pickle)
        files = [config_path] + ([weights.index] if weights.index else []) + weights.files
        return ControlNetFile(path, "diffusers", files, config, cls)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: a ControlNet single file must be .safetensors (pickle files are not read)")
    keys = set(read_header(path))
    if any(k.endswith(f"{HINT}.0.weight") for k in keys):
        return ControlNetFile(path, "ldm-single-file", [path])
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return ControlNetFile(path, "diffusers-single-file", [path])
    for cls, key in DIT_KEYS.items():
        if key in keys:
            return ControlNetFile(path, "diffusers-single-file", [path], model_class=cls)
    raise CheckpointError(f"{path}: not a ControlNet checkpoint (no '{HINT}.0.weight' or "
                          f"'controlnet_cond_embedding.conv_in.weight' key); is it a base model or a LoRA?")


# ---- LDM <-> diffusers names ---------------------------------------------------------------------


def _ldm_rules(keys: set, side: str) -> list:
    """The rule table for the keys of one side ("single_file": LDM names, "diffusers")."""
    if side == "single_file":
        down, mid_attention, _ = _unet_structure_from_single_file(keys)
        zero = len(_indices(keys, "zero_convs"))
        hint = _indices(keys, HINT)
        blocks = len(hint) - 2  # conv_in and conv_out besides the (conv, stride-2 conv) pairs
    else:
        down, mid_attention, _ = _unet_structure_from_diffusers(keys)
        zero = len(_indices(keys, "controlnet_down_blocks"))
        blocks = len(_indices(keys, "controlnet_cond_embedding.blocks"))
    rules = _unet_rules(down, mid_attention, [])
    rules += [_p(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(zero)]
    rules += [_p("middle_block_out.0", "controlnet_mid_block"), _p(f"{HINT}.0", "controlnet_cond_embedding.conv_in"),
              _p(f"{HINT}.{2 * (blocks + 1)}", "controlnet_cond_embedding.conv_out")]
    rules += [_p(f"{HINT}.{2 * (j + 1)}", f"controlnet_cond_embedding.blocks.{j}") for j in range(blocks)]
    return rules


def from_ldm_controlnet(state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Original-layout ControlNet tensors (``control_model.`` prefix optional) -> diffusers names."""
    if any(k.startswith(LDM_PREFIX) for k in state):
        others = sorted(k for k in state if not k.startswith(LDM_PREFIX))
        if others:
            raise CheckpointError(f"{where}: key(s) {others[:5]} outside '{LDM_PREFIX}' in a ControlNet file")
        state = {k[len(LDM_PREFIX):]: v for k, v in state.items()}
    return _apply_forward(state, _ldm_rules(set(state), "single_file"), where)


def to_ldm_controlnet(state: Mapping[str, torch.Tensor], prefix: str = LDM_PREFIX) -> dict[str, torch.Tensor]:
    """diffusers ControlNet tensors -> the original single-file names (the inverse of the above)."""
    out = _apply_inverse(state, _ldm_rules(set(state), "diffusers"), "controlnet")
    return {prefix + k: v for k, v in out.items()}


# ---- config from shapes --------------------------------------------------------------------------


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], unet_config: dict, where: str) -> dict:
    """A ControlNetModel config for diffusers-named tensors of these shapes (see the module doc)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{where}: missing weight key '{key}' (cannot read the ControlNet's layout)")
        return tuple(shapes[key])

    keys = set(shapes)
    levels = _indices(keys, "down_blocks")
    if not levels:
        raise CheckpointError(f"{where}: no down_blocks in the ControlNet's weights")
    channels, types, layers, depths = [], [], [], []
    for b in levels:
        resnets = _indices(keys, f"down_blocks.{b}.resnets")
        channels.append(shape(f"down_blocks.{b}.resnets.0.conv1.weight")[0])
        layers.append(len(resnets))
        attn = _indices(keys, f"down_blocks.{b}.attentions")
        types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depths.append(len(_indices(keys, f"down_blocks.{b}.attentions.0.transformer_blocks")) if attn else None)
    mid_depth = len(_indices(keys, "mid_block.attentions.0.transformer_blocks"))
    # Levels without attention take the mid block's depth where the mid block reads it (the last).
    depths = [d if d is not None else (mid_depth or 1) for d in depths]
    attn_keys = sorted(k for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = sorted(k for k in keys if k.endswith(".proj_in.weight"))
    hint = _indices(keys, "controlnet_cond_embedding.blocks")
    embedding = [shape("controlnet_cond_embedding.conv_in.weight")[0]]
    embedding += [shape(f"controlnet_cond_embedding.blocks.{j}.weight")[0] for j in hint[1::2]]
    config = {
        "_class_name": "ControlNetModel",
        "in_channels": shape("conv_in.weight")[1],
        "conditioning_channels": shape("controlnet_cond_embedding.conv_in.weight")[1],
        "conditioning_embedding_out_channels": embedding,
        "block_out_channels": channels,
        "down_block_types": types,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "transformer_layers_per_block": depths,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_depth else "UNetMidBlock2D",
        "cross_attention_dim": shape(attn_keys[0])[1] if attn_keys else unet_config.get("cross_attention_dim"),
        "use_linear_projection": bool(proj_in) and len(shape(proj_in[0])) == 2,
    }
    if "add_embedding.linear_1.weight" in keys:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shape("add_embedding.linear_1.weight")[1]
    for key in FROM_UNET:
        if unet_config.get(key) is not None:
            config[key] = unet_config[key]
    if "addition_embed_type" not in config:
        config.pop("addition_time_embed_dim", None)
    return config


# ---- fitting and loading -------------------------------------------------------------------------


def describe(config: dict) -> str:
    """What a UNet / ControlNet config is for, in words (SDXL, SD 2.x, SD 1.x)."""
    if config.get("addition_embed_type") == "text_time":
        return "SDXL"
    cross = config.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(cross, f"{cross}-wide cross-attention")


def check_controlnet_fits(config: dict, unet_config: dict, latent_channels: int, where: str) -> None:
    """CheckpointError naming ``where`` unless a ControlNet of (resolved) ``config`` can condition a
    UNet of (resolved) ``unet_config``: its residuals must match the UNet's skips one to one."""
    def first(value):  # a per-block list of one value == that value; lists and tuples alike
        if isinstance(value, (list, tuple)):
            return value[0] if len(set(value)) == 1 else list(value)
        return value

    problems = []
    for key in ("cross_attention_dim", "block_out_channels", "layers_per_block",
                "projection_class_embeddings_input_dim"):
        mine, theirs = first(config.get(key)), first(unet_config.get(key))
        if mine != theirs:
            problems.append(f"{key} {mine!r} (the model's UNet has {theirs!r})")
    if (config.get("addition_embed_type") == "text_time") != (unet_config.get("addition_embed_type") == "text_time"):
        problems.append("addition_embed_type (SDXL micro-conditioning) differs")
    if config.get("in_channels", 4) != latent_channels:
        problems.append(f"in_channels {config.get('in_channels')} (the model's latents have {latent_channels})")
    if problems:
        raise CheckpointError(f"{where}: this ControlNet ({describe(config)}) does not fit the model "
                              f"({describe(unet_config)}): {'; '.join(problems)}; use a ControlNet trained for "
                              f"this base model")


def controlnet_config(source: ControlNetFile, unet_config: dict, latent_channels: int) -> dict:
    """The config of the ControlNet at ``source`` (config.json, or read off a single file's header),
    checked to fit a UNet of ``unet_config``; no weights are read (the job's pre-flight uses it)."""
    from ..models.controlnet import resolve_controlnet_config

    where = str(source.path)
    if source.model_class != "ControlNetModel":
        raise CheckpointError(f"{where}: this is a {FAMILY_OF_CLASS[source.model_class]} ControlNet "
                              f"({source.model_class}); the model is {describe(unet_config)}: use a ControlNet "
                              f"trained for this base model")
    if source.layout == "diffusers":
        config = source.config
    else:
        header = read_header(source.path)
        shapes = {k: v[1] for k, v in header.items()}
        if source.layout == "ldm-single-file":
            meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
            shapes = {k: tuple(v.shape) for k, v in from_ldm_controlnet(meta, where).items()}
        config = config_from_shapes(shapes, unet_config, where)
    try:
        resolved = resolve_controlnet_config(config)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    check_controlnet_fits(resolved, unet_config, latent_channels, where)
    return config


def load_controlnet(source: ControlNetFile, unet_config: dict, latent_channels: int,
                    dtype: torch.dtype | None = None):
    """Build and strictly load the ControlNet at ``source`` for a UNet of ``unet_config``."""
    from ..models.controlnet import ControlNetModel
    from .components import ModelClass

    where = str(source.path)
    config = controlnet_config(source, unet_config, latent_channels)
    module = ModelClass(ControlNetModel).checked_build(config, where)
    module = (module if dtype is None else module.to(dtype)).to_empty(device="cpu")
    state, where = read_controlnet_weights(source)
    if source.layout == "ldm-single-file":
        state = from_ldm_controlnet(state, where)
    load_weights_into(module, state, where)
    return module.eval().requires_grad_(False), config


def read_controlnet_weights(source: ControlNetFile) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a ControlNet folder (its diffusion_pytorch_model weights, sharded or not) or
    single .safetensors file, as stored (no key conversion), and where they came from for errors."""
    if source.layout == "diffusers":
        weights = find_weight_files(source.path, "diffusion_pytorch_model", None, True)
        return read_state_dict(weights), ", ".join(str(p) for p in ([weights.index] if weights.index
                                                                    else weights.files))
    from safetensors.torch import load_file

    try:
        return load_file(str(source.path), device="cpu"), str(source.path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise CheckpointError(f"{source.path}: cannot read weights ({exc})") from None


__all__ = ["ControlNetFile", "open_controlnet", "controlnet_config", "load_controlnet", "read_controlnet_weights",
           "check_controlnet_fits", "config_from_shapes",
           "from_ldm_controlnet", "to_ldm_controlnet", "describe"]
