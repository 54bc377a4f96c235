"""Tiny random-weight ControlNets (a diffusers ControlNet folder: config.json +
diffusion_pytorch_model.safetensors) for the tiny SD 1.x, SDXL, SD3 and FLUX.1-dev checkpoints.

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
DIT_BASES = ("sd3", "sd35", "flux-dev", "flux-schnell")
_SHARED = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
           "attention_head_dim", "norm_num_groups", "norm_eps", "act_fn", "flip_sin_to_cos", "freq_shift",
           "use_linear_projection", "upcast_attention", "transformer_layers_per_block", "addition_embed_type",
           "addition_time_embed_dim", "projection_class_embeddings_input_dim", "mid_block_type")
# Three stride-2 convolutions: control images are 8x the latent side, as with the tiny VAE.
EMBEDDING_CHANNELS = [8, 8, 16, 16]


def dit_controlnet_config(base: str) -> dict:
    """The tiny SD3 / SD3.5 / FLUX.1 ControlNet config: the tiny transformer's own keys (every
    layer of it, as the published ControlNets copy the first layers), and for FLUX the dev
    transformer's guidance embedder (InstantX ControlNets are made for dev)."""
    from ..models.flux import FLUX_TINY_DEV, FLUX_TINY_SCHNELL
    from ..models.mmdit import MMDIT_TINY, MMDIT_TINY_SD35

    if base in ("sd3", "sd35"):
        config = copy.deepcopy(MMDIT_TINY_SD35 if base == "sd35" else MMDIT_TINY)
        config["_class_name"] = "SD3ControlNetModel"
        config.update(extra_conditioning_channels=0, pos_embed_type="sincos", use_pos_embed=True,
                      force_zeros_for_pooled_projection=True)
        return config
    config = copy.deepcopy(FLUX_TINY_SCHNELL if base == "flux-schnell" else FLUX_TINY_DEV)
    config.pop("out_channels")
    config.update(_class_name="FluxControlNetModel", num_mode=None, conditioning_embedding_channels=None)
    return config


def controlnet_config(base: str) -> dict:
    """The tiny ControlNet config for the tiny ``base`` model (sd1, sd2, sdxl UNets; sd3, sd35,
    flux-dev, flux-schnell transformers)."""
    from ..models import UNET_SD1_TINY, UNET_SD2_TINY
    from ..models.unet import UNET_SDXL_TINY

    if base in DIT_BASES:
        return dit_controlnet_config(base)
    if base not in BASES:
        raise ValueError(f"base: expected one of {', '.join(BASES + DIT_BASES)}, got {base!r}")
    unet = {"sd1": UNET_SD1_TINY, "sd2": UNET_SD2_TINY, "sdxl": UNET_SDXL_TINY}[base]
    config = {"_class_name": "ControlNetModel", "_diffusers_version": "0.42.1"}
    config.update({k: copy.deepcopy(unet[k]) for k in _SHARED if k in unet})
    config["conditioning_channels"] = 3
    config["conditioning_embedding_out_channels"] = list(EMBEDDING_CHANNELS)
    return config


def write_controlnet(root: Path, base: str, seed: int, overrides: dict | None = None) -> Path:
    """Write a tiny ``base`` ControlNet folder at ``root`` (weights deterministic from ``seed``;
    ``overrides``: config keys to change, for tests)."""
    import json

    import torch
    from safetensors.torch import save_file

    from ..models.controlnet import ControlNetModel
    from ..models.controlnet_flux import FluxControlNetModel
    from ..models.controlnet_sd3 import SD3ControlNetModel
    from .common import random_state_dict

    config = {**controlnet_config(base), **(overrides or {})}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cls = {"SD3ControlNetModel": SD3ControlNetModel, "FluxControlNetModel": FluxControlNetModel}.get(
        config["_class_name"], ControlNetModel)
    with torch.device("cpu"):
        module = cls(config)
    state = {k: v.contiguous() for k, v in random_state_dict(module, seed).items()}
    save_file(state, str(root / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return root


def build(out, variant: str) -> None:
    """:func:`batchgen.tiny.make_tiny_model`'s builder for ``sd1-controlnet`` / ``sdxl-controlnet`` /
    ``sd3-controlnet`` / ``flux-controlnet`` (for the dev transformer)."""
    base = variant.removesuffix("-controlnet")
    write_controlnet(out.root, "flux-dev" if base == "flux" else base, out.seed)


def write_ldm_single_file(folder: Path, out: Path, dtype=None) -> Path:
    """The ControlNet folder ``folder`` as one file in the original layout (``control_model.*``,
    ``input_hint_block``, ``zero_convs``), as ``control_v11p_sd15_canny.safetensors`` is stored;
    an SD3 / FLUX ControlNet as one file with its diffusers names (how those are shared)."""
    from safetensors.torch import load_file, save_file

    from ..checkpoints.controlnet import to_ldm_controlnet

    state = load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))
    if "controlnet_cond_embedding.conv_in.weight" in state:
        state = to_ldm_controlnet(state)
    # SD3 / FLUX ControlNets have no original layout: they are shared as diffusers-named single files
    ldm = {k: (v if dtype is None else v.to(dtype)).contiguous().clone() for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm, str(out), metadata={"format": "pt"})
    return out
