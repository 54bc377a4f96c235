"""Conditional UNet of Stable Diffusion 1.x / 2.x and SDXL (base and refiner), from a ``unet/config.json`` dict.

Parameter names equal diffusers' ``UNet2DConditionModel`` state-dict keys. One class covers the
three generations because they differ only in configuration: SD2 switches to linear projections
and per-block head counts, SDXL adds per-block transformer depths (``transformer_layers_per_block``)
and "micro-conditioning" (``addition_embed_type: text_time``): the pooled text embedding plus a few
numbers (original size, crop, target size for the base; original size, crop, aesthetic score for
the refiner), each embedded sinusoidally like a timestep, go through one more MLP
(``add_embedding``) whose output is added to the timestep embedding. Every config value we do not
build is refused with a CheckpointError that names the key, never silently ignored.

The real SDXL configs are kept here (:data:`SDXL_BASE_UNET_CONFIG`, :data:`SDXL_REFINER_UNET_CONFIG`)
so tests can check the full-size architecture on the meta device without downloading anything;
:data:`UNET_SDXL_TINY` / :data:`UNET_SDXL_REFINER_TINY` are the same shapes scaled down for tiny
test checkpoints.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import (
    Downsample2D,
    ModelModule,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Transformer2DModel,
    Upsample2D,
    check_activation,
    timestep_embedding,
)

# diffusers' defaults for the keys we read (UNet2DConditionModel.__init__).
UNET_DEFAULTS: dict = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# The real SDXL 1.0 UNet configs (stabilityai/stable-diffusion-xl-{base,refiner}-1.0, unet/config.json).
# Base: 3 levels, transformer depth 1/2/10 (10 also in the mid block), 2048-wide context (CLIP-L 768
# + OpenCLIP-bigG 1280 hidden states concatenated), add_embedding input 1280 (pooled bigG) + 6 * 256.
SDXL_BASE_UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# Refiner: 4 levels of 384/768/1536/1536 (64-wide heads), cross-attention only in levels 2-3 and the
# mid block, transformer depth 4 everywhere, 1280-wide context (OpenCLIP-bigG only), add_embedding
# input 1280 (pooled) + 5 * 256 (original size, crop top-left, aesthetic score).
SDXL_REFINER_UNET_CONFIG: dict = {
    **SDXL_BASE_UNET_CONFIG,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

# Tiny SDXL-shaped presets for test checkpoints: two levels (plain, then cross-attention), depth 1/2,
# 8-wide time-id embeddings; pooled text embeddings are 32 wide.
UNET_SDXL_TINY: dict = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "upcast_attention": False,
    "cross_attention_dim": 64,  # two 32-wide text encoders, hidden states concatenated
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled + 6 time ids
}

UNET_SDXL_REFINER_TINY: dict = {
    **UNET_SDXL_TINY,
    "cross_attention_dim": 32,  # one text encoder
    "projection_class_embeddings_input_dim": 32 + 5 * 8,  # pooled + 5 time ids
}

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
ADDITION_EMBED_TYPES = (None, "text_time")

# key -> value we support; anything else is refused, naming the key.
_REQUIRED_VALUES = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}


def _per_block(config: dict, key: str, count: int) -> list:
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise CheckpointError(
                f"config key {key!r}: expected {count} values (one per down block), got {len(value)}"
            )
        return list(value)
    return [value] * count


def resolve_unet_config(config: dict) -> dict:
    """diffusers' defaults applied to ``config``; bookkeeping (``_*``) and unknown keys dropped.

    Raises CheckpointError naming the key for a feature this module does not build.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"unet config: expected a dict (config.json), got {type(config).__name__}")
    resolved = dict(UNET_DEFAULTS)
    resolved.update({k: v for k, v in config.items() if k in UNET_DEFAULTS})
    for key, supported in _REQUIRED_VALUES.items():
        if resolved[key] != supported:
            raise CheckpointError(
                f"config key {key!r}: value {resolved[key]!r} is not supported by batchgen's UNet "
                f"(supported: {supported!r})"
            )
    _check_addition_embed(resolved)
    only_cross = resolved["only_cross_attention"]
    if any(only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]):
        raise CheckpointError("config key 'only_cross_attention': only False is supported")
    if resolved["mid_block_only_cross_attention"]:
        raise CheckpointError("config key 'mid_block_only_cross_attention': only False/null is supported")
    check_activation(resolved["act_fn"])
    if not resolved["norm_num_groups"]:
        raise CheckpointError("config key 'norm_num_groups': must be a positive integer, got null")
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        names = [_strip_res(n) for n in resolved[key]]
        for i, name in enumerate(names):
            if name not in allowed:
                raise CheckpointError(
                    f"config key {key!r}[{i}]: block type {name!r} is not supported "
                    f"(supported: {', '.join(allowed)})"
                )
        resolved[key] = names
    if resolved["mid_block_type"] not in MID_BLOCKS:
        raise CheckpointError(
            f"config key 'mid_block_type': block type {resolved['mid_block_type']!r} is not supported "
            "(supported: UNetMidBlock2DCrossAttn or null)"
        )
    n = len(resolved["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if len(resolved[key]) != n:
            raise CheckpointError(
                f"config key {key!r}: {len(resolved[key])} blocks but block_out_channels has {n} entries"
            )
    for key in ("layers_per_block", "attention_head_dim", "cross_attention_dim", "transformer_layers_per_block"):
        _per_block(resolved, key, n)
    if resolved["num_attention_heads"] is not None:
        _per_block(resolved, "num_attention_heads", n)
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if int(resolved[key]) % 2 != 1:
            raise CheckpointError(f"config key {key!r}: kernel size must be odd, got {resolved[key]!r}")
    return resolved


def _check_addition_embed(resolved: dict) -> None:
    kind = resolved["addition_embed_type"]
    if kind not in ADDITION_EMBED_TYPES:
        raise CheckpointError(
            f"config key 'addition_embed_type': value {kind!r} is not supported by batchgen's UNet "
            "(supported: None, 'text_time' as in SDXL)"
        )
    if kind != "text_time":
        return
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(
                f"config key {key!r}: addition_embed_type 'text_time' needs a positive integer, got {value!r}"
            )


def _strip_res(name):
    return name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name


def _heads(channels: int, heads: int, key: str) -> tuple[int, int]:
    if not heads or channels % heads:
        raise CheckpointError(f"config key {key!r}: {channels} channels do not split into {heads} heads")
    return heads, channels // heads


def _layer_counts(value, num_layers: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_layers


class CrossAttnDownBlock2D(nn.Module):
    """(resnet, transformer) x num_layers, then an optional stride-2 conv."""

    has_cross_attention = True

    def __init__(self, in_ch, out_ch, temb_ch, num_layers, transformer_layers, heads, cross_dim, groups, eps,
                 linear_proj, upcast, add_downsample, downsample_padding, heads_key):
        super().__init__()
        heads, dim_head = _heads(out_ch, heads, heads_key)
        layers = _layer_counts(transformer_layers, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps=eps) for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(heads, dim_head, out_ch, layers[i], cross_dim, groups, linear_proj, upcast)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_ch, out_ch, padding=downsample_padding)]) if add_downsample else None
        )

    def forward(self, x, temb, context):
        outputs = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class DownBlock2D(nn.Module):
    """resnet x num_layers, then an optional stride-2 conv."""

    has_cross_attention = False

    def __init__(self, in_ch, out_ch, temb_ch, num_layers, groups, eps, add_downsample, downsample_padding):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps=eps) for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_ch, out_ch, padding=downsample_padding)]) if add_downsample else None
        )

    def forward(self, x, temb, context=None):
        outputs = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then (transformer, resnet) x num_layers."""

    def __init__(self, ch, temb_ch, transformer_layers, heads, cross_dim, groups, eps, output_scale_factor,
                 linear_proj, upcast, heads_key, num_layers=1):
        super().__init__()
        heads, dim_head = _heads(ch, heads, heads_key)
        layers = _layer_counts(transformer_layers, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(ch, ch, temb_ch, groups, eps=eps, output_scale_factor=output_scale_factor)
            for _ in range(num_layers + 1)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(heads, dim_head, ch, layers[i], cross_dim, groups, linear_proj, upcast)
            for i in range(num_layers)
        )

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock2D(nn.Module):
    """(concat skip, resnet) x num_layers, then an optional nearest-2x + conv."""

    has_cross_attention = False

    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, num_layers, groups, eps, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (prev_ch if i == 0 else out_ch) + (in_ch if i == num_layers - 1 else out_ch),
                out_ch, temb_ch, groups, eps=eps,
            )
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch, out_ch)]) if add_upsample else None

    def forward(self, x, skips, temb, context=None, upsample_size=None):
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class CrossAttnUpBlock2D(nn.Module):
    """(concat skip, resnet, transformer) x num_layers, then an optional nearest-2x + conv."""

    has_cross_attention = True

    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, num_layers, transformer_layers, heads, cross_dim,
                 groups, eps, linear_proj, upcast, add_upsample, heads_key):
        super().__init__()
        heads, dim_head = _heads(out_ch, heads, heads_key)
        layers = _layer_counts(transformer_layers, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (prev_ch if i == 0 else out_ch) + (in_ch if i == num_layers - 1 else out_ch),
                out_ch, temb_ch, groups, eps=eps,
            )
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(heads, dim_head, out_ch, layers[i], cross_dim, groups, linear_proj, upcast)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch, out_ch)]) if add_upsample else None

    def forward(self, x, skips, temb, context, upsample_size=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(torch.cat([x, skips.pop()], dim=1), temb), context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def _heads_key(cfg: dict) -> str:
    # diffusers' naming quirk: without num_attention_heads, attention_head_dim is the head COUNT.
    return "num_attention_heads" if cfg["num_attention_heads"] is not None else "attention_head_dim"


def _blocks_layout(cfg: dict) -> tuple:
    """Per-block settings of a resolved config, as the UNet and its ControlNet copy build blocks:
    (channels, n, heads_key, heads, cross_dims, layers, tlayers, groups, eps, linear, upcast)."""
    channels = list(cfg["block_out_channels"])
    n = len(channels)
    heads_key = _heads_key(cfg)
    heads = _per_block(cfg, heads_key, n)
    cross_dims = _per_block(cfg, "cross_attention_dim", n)
    layers = _per_block(cfg, "layers_per_block", n)
    tlayers = _per_block(cfg, "transformer_layers_per_block", n)
    groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
    linear, upcast = bool(cfg["use_linear_projection"]), bool(cfg["upcast_attention"])
    return channels, n, heads_key, heads, cross_dims, layers, tlayers, groups, eps, linear, upcast


def encoder_blocks(cfg: dict, temb_ch: int) -> tuple[nn.ModuleList, nn.Module | None]:
    """The down blocks and the cross-attention mid block of a resolved config: the half of the
    UNet a ControlNet copies (:mod:`batchgen.models.controlnet`)."""
    channels, n, heads_key, heads, cross_dims, layers, tlayers, groups, eps, linear, upcast = _blocks_layout(cfg)
    down_blocks = nn.ModuleList()
    out_ch = channels[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        in_ch, out_ch = out_ch, channels[i]
        last = i == n - 1
        if kind == "CrossAttnDownBlock2D":
            block = CrossAttnDownBlock2D(in_ch, out_ch, temb_ch, layers[i], tlayers[i], heads[i], cross_dims[i],
                                         groups, eps, linear, upcast, not last, cfg["downsample_padding"],
                                         f"{heads_key}[{i}]")
        else:
            block = DownBlock2D(in_ch, out_ch, temb_ch, layers[i], groups, eps, not last, cfg["downsample_padding"])
        down_blocks.append(block)
    mid_block = None
    if cfg["mid_block_type"] is not None:
        mid_block = UNetMidBlock2DCrossAttn(
            channels[-1], temb_ch, tlayers[-1], heads[-1], cross_dims[-1], groups, eps,
            cfg["mid_block_scale_factor"], linear, upcast, f"{heads_key}[-1]",
        )
    return down_blocks, mid_block


class TimeConditioning:
    """The timestep embedding and SDXL's added conditioning, shared by the UNet and the ControlNet
    (both own ``config``, ``time_embedding`` and, with ``text_time``, ``add_time_proj`` / ``add_embedding``)."""

    config: dict
    kind = "UNet"  # in error messages

    def time_embed(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Timestep (number, 0-dim or (B,)/(1,) tensor, int or float) -> (B, temb) embedding."""
        t = timestep
        if not torch.is_tensor(t):
            if isinstance(t, bool) or not isinstance(t, numbers.Real):
                raise ValueError(f"timestep: expected a number or tensor, got {type(timestep).__name__}")
            is_int = isinstance(t, numbers.Integral)
            float_dtype = torch.float32 if sample.device.type in ("mps", "npu") else torch.float64
            t = torch.tensor([t], dtype=torch.int64 if is_int else float_dtype, device=sample.device)
        elif t.ndim == 0:
            t = t[None].to(sample.device)
        elif t.ndim != 1 or t.shape[0] not in (1, sample.shape[0]):
            raise ValueError(
                f"timestep: expected a scalar or a ({sample.shape[0]},) tensor, got shape {tuple(t.shape)}"
            )
        t = t.to(sample.device).expand(sample.shape[0])
        cfg = self.config
        emb = timestep_embedding(t, cfg["block_out_channels"][0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        return self.time_embedding(emb.to(dtype=sample.dtype))

    @property
    def uses_added_conditioning(self) -> bool:
        """True for SDXL-style models, whose forward needs ``text_embeds`` and ``time_ids``."""
        return self.add_embedding is not None

    def _check_added_conditioning(self, batch: int, text_embeds, time_ids) -> None:
        if not self.uses_added_conditioning:
            given = [name for name, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is not None]
            if given:
                raise ValueError(
                    f"{' and '.join(given)}: this {self.kind}'s config has no addition_embed_type "
                    f"'text_time' (an SD1/SD2 {self.kind} takes no pooled text embeddings or time "
                    "ids); do not pass them"
                )
            return
        missing = [name for name, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is None]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} missing: this {self.kind}'s config has addition_embed_type 'text_time' "
                "(SDXL), "
                "so forward needs text_embeds (B, pooled_dim), the pooled text embedding, and time_ids (B, n), "
                "the micro-conditioning numbers (6 for the base, 5 for the refiner)"
            )
        for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
            if not torch.is_tensor(value) or value.ndim != 2 or value.shape[0] != batch:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"{name}: expected a ({batch}, n) tensor, got {shape}")
        cfg = self.config
        width = text_embeds.shape[1] + time_ids.shape[1] * cfg["addition_time_embed_dim"]
        if width != cfg["projection_class_embeddings_input_dim"]:
            raise ValueError(
                f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)}: "
                f"{text_embeds.shape[1]} + {time_ids.shape[1]} * addition_time_embed_dim "
                f"{cfg['addition_time_embed_dim']} = {width}, but the config's "
                f"projection_class_embeddings_input_dim is {cfg['projection_class_embeddings_input_dim']}"
            )

    def added_embed(self, text_embeds: torch.Tensor, time_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL micro-conditioning: add_embedding([text_embeds, sinusoid(time_ids) flattened per item])."""
        time_embeds = self.add_time_proj(time_ids.to(text_embeds.device).flatten())
        time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
        # torch.cat promotes a half text_embeds to the float32 sinusoids, as diffusers' concat does.
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))

    def _embed_time(self, sample, timestep, text_embeds, time_ids) -> torch.Tensor:
        temb = self.time_embed(sample, timestep)
        if self.uses_added_conditioning:
            temb = temb + self.added_embed(text_embeds, time_ids, temb.dtype)
        return temb


class UNet2DConditionModel(TimeConditioning, ModelModule):
    """SD 1.x / 2.x / SDXL conditional UNet.

    ``forward(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None)``; the last
    two are required exactly when the config has ``addition_embed_type: text_time`` (SDXL).
    """

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_unet_config(config)
        self.config = cfg
        channels, n, heads_key, heads, cross_dims, layers, tlayers, groups, eps, linear, upcast = (
            _blocks_layout(cfg))

        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], cfg["conv_in_kernel"],
                                 padding=(cfg["conv_in_kernel"] - 1) // 2)
        temb_ch = cfg["time_embedding_dim"] or channels[0] * 4
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch)
        self.add_time_proj = self.add_embedding = None
        if cfg["addition_embed_type"] == "text_time":
            self.add_time_proj = Timesteps(cfg["addition_time_embed_dim"], cfg["flip_sin_to_cos"], cfg["freq_shift"])
            self.add_embedding = TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], temb_ch)

        self.down_blocks, self.mid_block = encoder_blocks(cfg, temb_ch)

        rev_channels = list(reversed(channels))
        rev_heads, rev_layers = list(reversed(heads)), list(reversed(layers))
        rev_cross = list(reversed(cross_dims))
        rev_tlayers = cfg["reverse_transformer_layers_per_block"] or list(reversed(tlayers))
        self.up_blocks = nn.ModuleList()
        self.num_upsamplers = 0
        out_ch = rev_channels[0]
        for i, kind in enumerate(cfg["up_block_types"]):
            last = i == n - 1
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, n - 1)]
            self.num_upsamplers += 0 if last else 1
            if kind == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(in_ch, prev_ch, out_ch, temb_ch, rev_layers[i] + 1, rev_tlayers[i],
                                           rev_heads[i], rev_cross[i], groups, eps, linear, upcast, not last,
                                           f"{heads_key}[{n - 1 - i}]")
            else:
                block = UpBlock2D(in_ch, prev_ch, out_ch, temb_ch, rev_layers[i] + 1, groups, eps, not last)
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], cfg["conv_out_kernel"],
                                  padding=(cfg["conv_out_kernel"] - 1) // 2)
        for slot, (_name, attn) in enumerate(self.cross_attentions()):
            attn.ip_slot = slot

    def cross_attentions(self) -> list[tuple[str, nn.Module]]:
        """The cross-attention layers (``attn2``) in the order diffusers lists its attention
        processors (down blocks, up blocks, then the mid block): the order IP-Adapter files number
        their ``to_k_ip`` / ``to_v_ip`` weights in. Returns (qualified name, module) pairs."""
        blocks = [("down_blocks", self.down_blocks), ("up_blocks", self.up_blocks)]
        if self.mid_block is not None:
            blocks.append(("mid_block", self.mid_block))
        out = []
        for prefix, module in blocks:
            for name, sub in module.named_modules(prefix=prefix):
                if name.endswith(".attn2"):
                    out.append((name, sub))
        return out

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        down_block_additional_residuals: list[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        ip_adapter: tuple | None = None,
    ) -> torch.Tensor:
        """Noise (or v) prediction (B, out, H, W).

        ``text_embeds`` (B, pooled_dim) and ``time_ids`` (B, n) are the SDXL added conditioning:
        required when the config has ``addition_embed_type: text_time``, refused otherwise.
        ``down_block_additional_residuals`` (one per skip connection) and
        ``mid_block_additional_residual`` are a ControlNet's outputs, added to the skips and to the
        mid block's output as diffusers adds them. ``ip_adapter``: an IP-Adapter's image keys / values
        per cross-attention layer and per-row scales (:class:`batchgen.models.blocks.Attention`).
        """
        if sample.ndim != 4:
            raise ValueError(f"sample: expected (B, C, H, W), got shape {tuple(sample.shape)}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(
                f"encoder_hidden_states: expected ({sample.shape[0]}, tokens, dim), "
                f"got shape {tuple(encoder_hidden_states.shape)}"
            )
        self._check_added_conditioning(sample.shape[0], text_embeds, time_ids)
        factor = 2**self.num_upsamplers
        forward_upsample_size = any(d % factor for d in sample.shape[-2:])
        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0
        temb = self._embed_time(sample, timestep, text_embeds, time_ids)
        context = encoder_hidden_states if ip_adapter is None else (encoder_hidden_states, ip_adapter)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context)
            skips.extend(outputs)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals: expected {len(skips)} tensors (one per skip "
                                 f"connection), got {len(down_block_additional_residuals)}")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for i, block in enumerate(self.up_blocks):
            mine = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            x = block(x, mine, temb, context, upsample_size=size)
        x = self.conv_act(self.conv_norm_out(x))
        return self.conv_out(x)
