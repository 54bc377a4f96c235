"""AutoencoderKL (the VAE of SD 1.x/2.x, SDXL, SD3 and FLUX), built from a diffusers ``vae/config.json`` dict.

The four generations share one architecture and differ in configuration only: SDXL keeps SD's 4
latent channels with another ``scaling_factor`` (and must run in float32: ``force_upcast``); SD3
and FLUX have 16 latent channels, no 1x1 ``quant_conv`` / ``post_quant_conv`` and a
``shift_factor`` (latents are ``(z - shift) * scaling`` for the diffusion model). The real configs
are kept here (:data:`SDXL_VAE_CONFIG`, :data:`SD3_VAE_CONFIG`, :data:`FLUX_VAE_CONFIG`) for
meta-device architecture tests; :data:`VAE_TINY_16CH` is a tiny SD3/FLUX-shaped preset.

Parameter names equal diffusers' ``AutoencoderKL`` state-dict keys; legacy VAE attention names
(``query``/``key``/``value``/``proj_attn``, found in older diffusers folders) are converted at
load time by :func:`convert_legacy_vae_keys`. ``encode`` returns a :class:`DiagonalGaussian`
whose ``sample(generators)`` draws one noise item per generator, in diffusers' per-item order.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..noise import randn_items
from .blocks import Downsample2D, ModelModule, ResnetBlock2D, Upsample2D, check_activation

# diffusers' defaults for the keys we read (AutoencoderKL.__init__).
VAE_DEFAULTS: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

_FOUR_LEVELS = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "force_upcast": True,
}

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (SD's VAE retrained; NaNs in float16).
SDXL_VAE_CONFIG: dict = {**_FOUR_LEVELS, "latent_channels": 4, "scaling_factor": 0.13025}

# stabilityai/stable-diffusion-3-medium-diffusers vae/config.json.
SD3_VAE_CONFIG: dict = {
    **_FOUR_LEVELS,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# black-forest-labs/FLUX.1-dev vae/config.json.
FLUX_VAE_CONFIG: dict = {
    **SD3_VAE_CONFIG,
    "mid_block_add_attention": True,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}

# Tiny SD3/FLUX-shaped preset: 16 latent channels, no quant convs, four levels (1/8 scale) like
# batchgen.models.VAE_TINY; SD3's scaling and shift.
VAE_TINY_16CH: dict = {
    "_class_name": "AutoencoderKL",
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def convert_legacy_vae_keys(state_dict: dict) -> dict:
    """Return a copy of ``state_dict`` with legacy VAE attention keys renamed to the modern ones.

    ``<path>.attentions.N.query|key|value|proj_attn.weight|bias`` become ``to_q|to_k|to_v|to_out.0``;
    1x1-conv shaped weights ``(C, C, 1, 1)`` are squeezed to linear ``(C, C)``. Other keys pass
    through unchanged; a legacy key whose modern name is also present is a CheckpointError.
    """
    converted: dict = {}
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        if match is None:
            new_key = key
        else:
            path, name, kind = match.groups()
            new_key = f"{path}.{_LEGACY_ATTENTION_NAMES[name]}.{kind}"
            if new_key in state_dict:
                raise CheckpointError(f"VAE state dict has both legacy key {key!r} and {new_key!r}; keep one")
            if kind == "weight" and getattr(value, "ndim", 0) == 4 and tuple(value.shape[2:]) == (1, 1):
                value = value[:, :, 0, 0]
        converted[new_key] = value
    return converted


def resolve_vae_config(config: dict) -> dict:
    """diffusers' defaults applied to ``config``; raises CheckpointError naming unsupported keys."""
    if not isinstance(config, dict):
        raise CheckpointError(f"vae config: expected a dict (config.json), got {type(config).__name__}")
    cfg = dict(VAE_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if k in VAE_DEFAULTS})
    check_activation(cfg["act_fn"])
    n = len(cfg["block_out_channels"])
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        names = list(cfg[key])
        if len(names) != n:
            raise CheckpointError(f"config key {key!r}: {len(names)} blocks but block_out_channels has {n} entries")
        for i, name in enumerate(names):
            if name != allowed:
                raise CheckpointError(
                    f"config key {key!r}[{i}]: block type {name!r} is not supported (supported: {allowed})"
                )
    if not cfg["norm_num_groups"]:
        raise CheckpointError("config key 'norm_num_groups': must be a positive integer")
    for key in ("latents_mean", "latents_std"):
        # Per-channel latent normalisation (e.g. Playground v2.5) is applied by the pipeline, which
        # only knows scaling_factor / shift_factor: refuse rather than render with wrong latents.
        if cfg[key] is not None:
            raise CheckpointError(
                f"config key {key!r}: per-channel latent normalisation is not supported by batchgen "
                "(supported: null; the latents are scaled with scaling_factor and shift_factor only)"
            )
    if cfg["shift_factor"] is None:
        cfg["shift_factor"] = 0.0
    if cfg["scaling_factor"] is None:
        cfg["scaling_factor"] = VAE_DEFAULTS["scaling_factor"]
    return cfg


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with GroupNorm and residual (mid block of the VAE)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        hs = x.view(b, c, h * w).transpose(1, 2)
        hs = self.group_norm(hs.transpose(1, 2)).transpose(1, 2)
        q, k, v = (proj(hs)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = self.to_out[0](out[:, 0].to(q.dtype))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return out + residual


class MidBlock(nn.Module):
    """resnet, attention (optional), resnet — no time embedding (``UNetMidBlock2D``)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups) for _ in range(2))
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, out_ch, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch, out_ch)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior parameters (B, 2*latent, H/f, W/f)."""

    def __init__(self, cfg: dict):
        super().__init__()
        ch, groups, n = list(cfg["block_out_channels"]), cfg["norm_num_groups"], len(cfg["block_out_channels"])
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg["layers_per_block"], groups, i < n - 1)
            for i in range(n)
        )
        self.mid_block = MidBlock(ch[-1], groups, cfg["mid_block_add_attention"])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg["latent_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, 3, h*f, w*f) in [-1, 1] (not clamped)."""

    def __init__(self, cfg: dict):
        super().__init__()
        ch, groups, n = list(cfg["block_out_channels"]), cfg["norm_num_groups"], len(cfg["block_out_channels"])
        rev = list(reversed(ch))
        self.conv_in = nn.Conv2d(cfg["latent_channels"], ch[-1], kernel_size=3, stride=1, padding=1)
        self.mid_block = MidBlock(ch[-1], groups, cfg["mid_block_add_attention"])
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg["layers_per_block"] + 1, groups, i < n - 1)
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents; logvar clamped to [-30, 20] like diffusers."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """mean + std * noise, the noise drawn per item (float32, CPU) from its own generator."""
        generators = list(generators)
        if len(generators) != self.mean.shape[0]:
            raise ValueError(
                f"generators: expected {self.mean.shape[0]} (one per batch item), got {len(generators)}"
            )
        noise = randn_items(generators, self.mean.shape[1:], self.mean.device, torch.float32)
        return self.mean + self.std * noise.to(self.mean.dtype)


class AutoencoderKL(ModelModule):
    """SD VAE: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> Tensor``; x and output in [-1, 1]."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_vae_config(config)
        self.config = cfg
        latent = cfg["latent_channels"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg["use_post_quant_conv"] else None

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    @property
    def scaling_factor(self) -> float:
        return float(self.config["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.config["shift_factor"])

    @property
    def force_upcast(self) -> bool:
        """True when the checkpoint overflows in float16 (SD, SDXL VAEs) and must decode in float32."""
        return bool(self.config["force_upcast"])

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"x: expected (B, {self.config['in_channels']}, H, W) images, got shape {tuple(x.shape)}"
            )
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"z: expected (B, {self.latent_channels}, h, w) latents, got shape {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after :func:`convert_legacy_vae_keys`."""
        return super().load_state_dict(convert_legacy_vae_keys(state_dict), strict=strict, assign=assign)
