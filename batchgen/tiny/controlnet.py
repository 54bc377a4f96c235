"""Tiny random-weight ControlNets (a diffusers ControlNet folder: config.json +
diffusion_pytorch_model.safetensors) for the tiny SD 1.x and SDXL checkpoints.

The ControlNet copies the encoder half of its base's tiny UNet config, so it fits ``builtin:tiny``
(``sd1``) / ``builtin:tiny-sdxl`` (``sdxl``). Its zero convolutions get random weights like every
other tensor (a trained ControlNet's are not zero either), so the control image visibly steers
the tiny models' output.
"""

from __future__ import annotations

import copy
from pathlib import Path

# The tiny UNet presets a ControlNet can copy (sd2: not a builtin; tests use it).
BASES = ("sd1", "sd2", "sdxl")
_SHARED = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
           "attention_head_dim", "norm_num_groups", "norm_eps", "act_fn", "flip_sin_to_cos", "freq_shift",
           "use_linear_projection", "upcast_attention", "transformer_layers_per_block", "addition_embed_type",
           "addition_time_embed_dim", "projection_class_embeddings_input_dim", "mid_block_type")
# Three stride-2 convolutions: control images are 8x the latent side, as with the tiny VAE.
EMBEDDING_CHANNELS = [8, 8, 16, 16]


def controlnet_config(base: str) -> dict:
    """The tiny ControlNet config for the tiny ``base`` (sd1 or sdxl) UNet."""
    from ..models import UNET_SD1_TINY, UNET_SD2_TINY
    from ..models.unet import UNET_SDXL_TINY

    if base not in BASES:
        raise ValueError(f"base: expected one of {', '.join(BASES)}, got {base!r}")
    unet = {"sd1": UNET_SD1_TINY, "sd2": UNET_SD2_TINY, "sdxl": UNET_SDXL_TINY}[base]
    config = {"_class_name": "ControlNetModel", "_diffusers_version": "0.42.1"}
    config.update({k: copy.deepcopy(unet[k]) for k in _SHARED if k in unet})
    config["conditioning_channels"] = 3
    config["conditioning_embedding_out_channels"] = list(EMBEDDING_CHANNELS)
    return config


def write_controlnet(root: Path, base: str, seed: int) -> Path:
    """Write a tiny ``base`` ControlNet folder at ``root`` (weights deterministic from ``seed``)."""
    import json

    import torch
    from safetensors.torch import save_file

    from ..models.controlnet import ControlNetModel
    from .common import random_state_dict

    config = controlnet_config(base)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with torch.device("cpu"):
        module = ControlNetModel(config)
    state = {k: v.contiguous() for k, v in random_state_dict(module, seed).items()}
    save_file(state, str(root / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return root


def build(out, variant: str) -> None:
    """:func:`batchgen.tiny.make_tiny_model`'s builder for ``sd1-controlnet`` / ``sdxl-controlnet``."""
    write_controlnet(out.root, variant.removesuffix("-controlnet"), out.seed)


def write_ldm_single_file(folder: Path, out: Path, dtype=None) -> Path:
    """The ControlNet folder ``folder`` as one file in the original layout (``control_model.*``,
    ``input_hint_block``, ``zero_convs``), as ``control_v11p_sd15_canny.safetensors`` is stored."""
    from safetensors.torch import load_file, save_file

    from ..checkpoints.controlnet import to_ldm_controlnet

    state = load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))
    ldm = {k: (v if dtype is None else v.to(dtype)).contiguous().clone() for k, v in to_ldm_controlnet(state).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm, str(out), metadata={"format": "pt"})
    return out
