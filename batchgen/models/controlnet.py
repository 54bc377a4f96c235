"""ControlNet for SD 1.x / 2.x and SDXL UNets, from a ControlNet ``config.json`` dict.

A ControlNet is a trainable copy of the UNet's encoder half (``conv_in``, the down blocks, the mid
block: built here by :func:`batchgen.models.unet.encoder_blocks`, so the two can never drift apart)
plus a small convolutional encoder of the control image (``controlnet_cond_embedding``), whose
output is added after ``conv_in``, and one zero-initialised 1x1 convolution per skip connection
and for the mid block. Its outputs, multiplied by the conditioning scale, are added to the UNet's
skip connections and mid-block output (``UNet2DConditionModel.forward``'s
``down_block_additional_residuals`` / ``mid_block_additional_residual``).

Parameter names and config keys equal diffusers' ``ControlNetModel``. The config is resolved with
the UNet's resolver (the same keys mean the same thing), so every feature the UNet refuses is
refused here too; ``global_pool_conditions`` (shuffle-style ControlNets, which diffusers runs in
guess mode only) is refused as well.

The conditioning scale may be one number or one per row (``(B,)``): the pipeline gives every item
its own scale and guidance window, and a per-row product keeps an item's bytes independent of its
batch-mates. Residuals are multiplied in float32 and rounded to the run dtype once, which is what
diffusers' ``residual * python_float`` computes on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .blocks import ModelModule, ResnetBlock2D, TimestepEmbedding, Timesteps
from .unet import TimeConditioning, encoder_blocks, resolve_unet_config

# diffusers' ControlNetModel defaults for the keys that differ from (or are absent in) the UNet's.
CONTROLNET_DEFAULTS: dict = {
    "in_channels": 4,
    "conditioning_channels": 3,
    "controlnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "global_pool_conditions": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
CHANNEL_ORDERS = ("rgb", "bgr")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
# Keys a ControlNet config shares with a UNet config (everything else of the UNet is not built here).
_UNET_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
)


def resolve_controlnet_config(config: dict) -> dict:
    """diffusers' ControlNetModel defaults applied to ``config``; a CheckpointError naming the key
    for anything not built here."""
    if not isinstance(config, dict):
        raise CheckpointError(f"controlnet config: expected a dict (config.json), got {type(config).__name__}")
    own = dict(CONTROLNET_DEFAULTS)
    own.update({k: v for k, v in config.items() if k in CONTROLNET_DEFAULTS and v is not None})
    if own["mid_block_type"] not in MID_BLOCKS:
        raise CheckpointError(f"config key 'mid_block_type': block type {own['mid_block_type']!r} is not supported "
                              f"(supported: {', '.join(MID_BLOCKS)})")
    unet_like = {k: config[k] for k in _UNET_KEYS if k in config}
    unet_like["in_channels"] = own["in_channels"]
    blocks = unet_like.get("block_out_channels", [320, 640, 1280, 1280])
    unet_like["up_block_types"] = ["UpBlock2D"] * len(blocks)  # not built; only counted by the resolver
    unet_like["mid_block_type"] = "UNetMidBlock2DCrossAttn" if own["mid_block_type"] == MID_BLOCKS[0] else None
    cfg = resolve_unet_config(unet_like)
    del cfg["up_block_types"]
    cfg.update(own)
    if cfg["controlnet_conditioning_channel_order"] not in CHANNEL_ORDERS:
        raise CheckpointError(f"config key 'controlnet_conditioning_channel_order': "
                              f"{cfg['controlnet_conditioning_channel_order']!r} is not one of rgb, bgr")
    if cfg["global_pool_conditions"]:
        raise CheckpointError("config key 'global_pool_conditions': true (a shuffle-style ControlNet, which diffusers "
                              "runs in guess mode only) is not supported by batchgen")
    channels = cfg["conditioning_embedding_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels:
        raise CheckpointError(f"config key 'conditioning_embedding_out_channels': expected a list of channel counts, "
                              f"got {channels!r}")
    cfg["conditioning_embedding_out_channels"] = list(channels)
    return cfg


class ControlNetConditioningEmbedding(nn.Module):
    """Control image -> latent-sized features: conv, then (conv, stride-2 conv) pairs, SiLU after
    each, and a zero-initialised output conv to the UNet's first channel count."""

    def __init__(self, embedding_channels: int, conditioning_channels: int, block_out_channels: list[int]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for ch_in, ch_out in zip(block_out_channels, block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(ch_in, ch_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(ch_in, ch_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, kernel_size=3, padding=1)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class UNetMidBlock2D(nn.Module):
    """The attention-free mid block some SDXL ControlNets have: one resnet."""

    def __init__(self, ch: int, temb_ch: int, groups: int, eps: float, output_scale_factor: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, groups, eps=eps,
                                                    output_scale_factor=output_scale_factor)])

    def forward(self, x, temb, context=None):
        return self.resnets[0](x, temb)


class ControlNetModel(TimeConditioning, ModelModule):
    """``forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
    text_embeds=None, time_ids=None) -> (down residuals, mid residual)``."""

    kind = "ControlNet"

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_controlnet_config(config)
        self.config = cfg
        channels = list(cfg["block_out_channels"])
        layers = cfg["layers_per_block"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], kernel_size=3, padding=1)
        temb_ch = channels[0] * 4
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch)
        self.add_time_proj = self.add_embedding = None
        if cfg["addition_embed_type"] == "text_time":
            self.add_time_proj = Timesteps(cfg["addition_time_embed_dim"], cfg["flip_sin_to_cos"], cfg["freq_shift"])
            self.add_embedding = TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], temb_ch)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], cfg["conditioning_channels"], cfg["conditioning_embedding_out_channels"])
        self.down_blocks, self.mid_block = encoder_blocks(cfg, temb_ch)
        if cfg["mid_block_type"] == "UNetMidBlock2D":
            self.mid_block = UNetMidBlock2D(channels[-1], temb_ch, cfg["norm_num_groups"], cfg["norm_eps"],
                                            cfg["mid_block_scale_factor"])
        # One zero conv per skip connection the UNet will receive: conv_in's output, each resnet's,
        # each downsampler's (layers_per_block may be per block).
        per_block = layers if isinstance(layers, (list, tuple)) else [layers] * len(channels)
        skip_channels = [channels[0]]
        for i, ch in enumerate(channels):
            skip_channels += [ch] * per_block[i] + ([ch] if i < len(channels) - 1 else [])
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(ch, ch, kernel_size=1) for ch in skip_channels)
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], kernel_size=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float | torch.Tensor = 1.0,
                text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The scaled residuals for the UNet's skip connections and mid block.

        ``controlnet_cond``: (B, conditioning_channels, H, W) images in [0, 1] at the pixel size
        (8x the latents). ``conditioning_scale``: a number, or a (B,) tensor (one per row).
        """
        if sample.ndim != 4:
            raise ValueError(f"sample: expected (B, C, H, W), got shape {tuple(sample.shape)}")
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[0] != sample.shape[0]:
            raise ValueError(f"controlnet_cond: expected ({sample.shape[0]}, {self.config['conditioning_channels']}, "
                             f"H, W), got shape {tuple(controlnet_cond.shape)}")
        self._check_added_conditioning(sample.shape[0], text_embeds, time_ids)
        if self.config["controlnet_conditioning_channel_order"] == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        temb = self._embed_time(sample, timestep, text_embeds, time_ids)
        context = encoder_hidden_states
        x = self.conv_in(sample)
        x = x + self.controlnet_cond_embedding(controlnet_cond)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context)
            skips.extend(outputs)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context)
        down = [conv(s) for s, conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(x)
        if torch.is_tensor(conditioning_scale):
            scale = conditioning_scale.to(device=mid.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
            return [(d * scale).to(d.dtype) for d in down], (mid * scale).to(mid.dtype)
        return [d * conditioning_scale for d in down], mid * conditioning_scale


class MultiControlNet(nn.Module):
    """The ControlNets of a pipeline, in order (diffusers' ``MultiControlNetModel`` holds them as
    ``nets`` too); :mod:`batchgen.control` runs them and sums their residuals."""

    def __init__(self, nets: list[ControlNetModel]):
        super().__init__()
        self.nets = nn.ModuleList(nets)
