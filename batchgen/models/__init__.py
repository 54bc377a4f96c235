"""Native torch modules for the Stable Diffusion family, with diffusers-equal parameter names.

Every model class (``UNet2DConditionModel``, ``AutoencoderKL``, ``SD3Transformer2DModel``,
``FluxTransformer2DModel``, ``DiTTransformer2DModel``) takes the dict of its diffusers
``config.json``; a diffusers-layout state dict then loads with ``load_state_dict(strict=True)``. The classes are imported lazily so that importing this package
(e.g. for the tiny presets below) does not import torch.
"""

from __future__ import annotations

import copy

__all__ = [
    "UNet2DConditionModel",
    "AutoencoderKL",
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "DiTTransformer2DModel",
    "DiagonalGaussian",
    "convert_legacy_vae_keys",
    "UNET_SD1_TINY",
    "UNET_SD2_TINY",
    "VAE_TINY",
    "tiny_config",
]

_LAZY = {
    "UNet2DConditionModel": ".unet",
    "resolve_unet_config": ".unet",
    "AutoencoderKL": ".vae",
    "DiagonalGaussian": ".vae",
    "convert_legacy_vae_keys": ".vae",
    "resolve_vae_config": ".vae",
    "SD3Transformer2DModel": ".mmdit",
    "resolve_mmdit_config": ".mmdit",
    "FluxTransformer2DModel": ".flux",
    "resolve_flux_config": ".flux",
    "DiTTransformer2DModel": ".dit",
    "resolve_dit_config": ".dit",
}

# Tiny presets (diffusers config.json format) for `make-tiny-model` and tests.
UNET_SD1_TINY: dict = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "use_linear_projection": False,
    "upcast_attention": False,
}

UNET_SD2_TINY: dict = {
    **UNET_SD1_TINY,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "upcast_attention": True,
}

VAE_TINY: dict = {
    "_class_name": "AutoencoderKL",
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],  # four levels: latents are 1/8 of the image side, like SD
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

_PRESETS = {"unet-sd1": UNET_SD1_TINY, "unet-sd2": UNET_SD2_TINY, "vae": VAE_TINY}


def tiny_config(name: str) -> dict:
    """A deep copy of a tiny preset: ``unet-sd1``, ``unet-sd2`` or ``vae``."""
    if name not in _PRESETS:
        raise ValueError(f"name: unknown tiny preset {name!r} (choose from {', '.join(_PRESETS)})")
    return copy.deepcopy(_PRESETS[name])


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
