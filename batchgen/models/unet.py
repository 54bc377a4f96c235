"""Conditional UNet of Stable Diffusion 1.x / 2.x, built from a diffusers ``unet/config.json`` dict.

Parameter names equal diffusers' ``UNet2DConditionModel`` state-dict keys. SDXL hooks in later
through ``addition_embed_type: text_time`` (an extra embedding added in :meth:`time_embed`);
until then that and every other feature we do not build is refused with a CheckpointError that
names the config key.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
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

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# key -> value we support; anything else is refused, naming the key.
_REQUIRED_VALUES = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
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


class UNet2DConditionModel(nn.Module):
    """SD 1.x / 2.x conditional UNet. ``forward(sample, timestep, encoder_hidden_states)``."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_unet_config(config)
        self.config = cfg
        channels = list(cfg["block_out_channels"])
        n = len(channels)
        # diffusers' naming quirk: without num_attention_heads, attention_head_dim is the head COUNT.
        heads_key = "num_attention_heads" if cfg["num_attention_heads"] is not None else "attention_head_dim"
        heads = _per_block(cfg, heads_key, n)
        cross_dims = _per_block(cfg, "cross_attention_dim", n)
        layers = _per_block(cfg, "layers_per_block", n)
        tlayers = _per_block(cfg, "transformer_layers_per_block", n)
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        linear, upcast = bool(cfg["use_linear_projection"]), bool(cfg["upcast_attention"])

        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], cfg["conv_in_kernel"],
                                 padding=(cfg["conv_in_kernel"] - 1) // 2)
        temb_ch = cfg["time_embedding_dim"] or channels[0] * 4
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch)

        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, kind in enumerate(cfg["down_block_types"]):
            in_ch, out_ch = out_ch, channels[i]
            last = i == n - 1
            if kind == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(in_ch, out_ch, temb_ch, layers[i], tlayers[i], heads[i], cross_dims[i],
                                             groups, eps, linear, upcast, not last, cfg["downsample_padding"],
                                             f"{heads_key}[{i}]")
            else:
                block = DownBlock2D(in_ch, out_ch, temb_ch, layers[i], groups, eps, not last,
                                    cfg["downsample_padding"])
            self.down_blocks.append(block)

        self.mid_block = None
        if cfg["mid_block_type"] is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1], temb_ch, tlayers[-1], heads[-1], cross_dims[-1], groups, eps,
                cfg["mid_block_scale_factor"], linear, upcast, f"{heads_key}[-1]",
            )

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

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

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

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if sample.ndim != 4:
            raise ValueError(f"sample: expected (B, C, H, W), got shape {tuple(sample.shape)}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(
                f"encoder_hidden_states: expected ({sample.shape[0]}, tokens, dim), "
                f"got shape {tuple(encoder_hidden_states.shape)}"
            )
        factor = 2**self.num_upsamplers
        forward_upsample_size = any(d % factor for d in sample.shape[-2:])
        if self.config["center_input_sample"]:
            sample = 2 * sample - 1.0
        temb = self.time_embed(sample, timestep)
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context)
            skips.extend(outputs)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context)
        for i, block in enumerate(self.up_blocks):
            mine = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            x = block(x, mine, temb, context, upsample_size=size)
        x = self.conv_act(self.conv_norm_out(x))
        return self.conv_out(x)
