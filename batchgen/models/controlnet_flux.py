"""ControlNet for FLUX.1 (diffusers' ``FluxControlNetModel``, the InstantX / Shakker layout), from
its config.json.

A FLUX ControlNet is a shallow FLUX transformer: its own embedders (packed latents, text,
timestep + guidance + pooled text, RoPE over the same position ids) and ``num_layers`` double-
stream plus ``num_single_layers`` single-stream blocks. The control image enters as packed VAE
latents through a zero-initialised Linear (``controlnet_x_embedder``) added to the embedded image
tokens; after every block a zero-initialised Linear (``controlnet_blocks`` /
``controlnet_single_blocks``) turns the image tokens into a residual. The transformer adds
residual ``i // ceil(blocks / residuals)`` after its block ``i``, separately for the double and the
single stream (:class:`batchgen.models.flux.FluxTransformer2DModel`).

Parameter names and config keys equal diffusers'. A *union* ControlNet (``num_mode``: one
network trained for several kinds of control image) has a ``controlnet_mode_embedder``: the mode's
embedding is put in front of the text tokens (with one more zero text position id), so the same
weights know which kind of image they see. ``conditioning_embedding_channels`` (XLabs ControlNets,
which take pixels through a convolutional hint encoder and repeat their residuals over the
transformer's blocks) is refused naming the key.

The conditioning scale may be one number or one per row (``(B,)``), multiplied in float32 and
rounded to the run dtype once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import ModelModule, check_text_inputs
from .flux import (
    FLUX_DEFAULTS,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    TimeTextEmbedding,
    _per_item,
    resolve_flux_config,
    rope_frequencies,
)

FLUX_CONTROLNET_DEFAULTS: dict = {"num_mode": None, "conditioning_embedding_channels": None}


def resolve_flux_controlnet_config(config: dict) -> dict:
    """diffusers' FluxControlNetModel defaults applied to ``config``; a CheckpointError naming the
    key for anything not built here."""
    if not isinstance(config, dict):
        raise CheckpointError(f"controlnet config: expected a dict (config.json), got {type(config).__name__}")
    own = dict(FLUX_CONTROLNET_DEFAULTS)
    own.update({k: config[k] for k in FLUX_CONTROLNET_DEFAULTS if k in config})
    if own["conditioning_embedding_channels"] is not None:
        raise CheckpointError(f"config key 'conditioning_embedding_channels': {own['conditioning_embedding_channels']!r} "
                              f"(an XLabs-style ControlNet with a pixel hint encoder) is not supported; batchgen "
                              f"builds InstantX-style FLUX ControlNets (control images as VAE latents)")
    mode = own["num_mode"]
    if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or mode <= 0):
        raise CheckpointError(f"config key 'num_mode': expected a positive integer or null, got {mode!r}")
    cfg = resolve_flux_config({k: v for k, v in config.items() if k in FLUX_DEFAULTS and k != "out_channels"})
    cfg.update(own)
    return cfg


class FluxControlNetModel(ModelModule):
    """``forward(hidden_states, controlnet_cond, conditioning_scale, encoder_hidden_states,
    pooled_projections, timestep, img_ids, txt_ids, guidance=None, controlnet_mode=None)
    -> (double-stream residuals or None, single-stream residuals or None)``."""

    kind = "FluxControlNet"

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_flux_controlnet_config(config)
        self.config = cfg
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        dim = heads * head_dim
        self.inner_dim = dim
        self.time_text_embed = TimeTextEmbedding(dim, cfg["pooled_projection_dim"], cfg["guidance_embeds"])
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], dim)
        self.x_embedder = nn.Linear(cfg["in_channels"], dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(cfg["num_layers"]))
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(cfg["num_single_layers"]))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(cfg["num_layers"]))
        self.controlnet_single_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(cfg["num_single_layers"]))
        self.union = cfg["num_mode"] is not None
        if self.union:
            self.controlnet_mode_embedder = nn.Embedding(cfg["num_mode"], dim)
        self.controlnet_x_embedder = nn.Linear(cfg["in_channels"], dim)

    def forward(self, hidden_states: torch.Tensor, controlnet_cond: torch.Tensor,
                conditioning_scale: float | torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None,
                controlnet_mode: torch.Tensor | None = None):
        """Packed latents and packed control latents (B, tokens, in_channels); the rest as the
        FLUX transformer takes them (``timestep`` t/1000, ``guidance`` the raw scale);
        ``controlnet_mode`` (B, 1) int64 for a union ControlNet."""
        cfg = self.config
        if hidden_states.ndim != 3 or controlnet_cond.shape != hidden_states.shape:
            raise ValueError(f"controlnet_cond: expected packed control latents of shape {tuple(hidden_states.shape)}, "
                             f"got {tuple(controlnet_cond.shape)}")
        batch = hidden_states.shape[0]
        check_text_inputs(encoder_hidden_states, pooled_projections, batch, cfg)
        x = self.x_embedder(hidden_states)
        x = x + self.controlnet_x_embedder(controlnet_cond)
        t = _per_item(timestep, batch, "timestep").to(x.dtype) * 1000
        if cfg["guidance_embeds"]:
            if guidance is None:
                raise ValueError("guidance: this ControlNet is guidance-distilled (guidance_embeds: true); pass the "
                                 "guidance scale")
            guidance = _per_item(guidance, batch, "guidance").to(x.dtype) * 1000
        else:
            guidance = None
        temb = self.time_text_embed(t, guidance, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        if self.union:
            if controlnet_mode is None:
                raise ValueError("controlnet_mode: a union ControlNet (num_mode) needs a control mode per row")
            context = torch.cat([self.controlnet_mode_embedder(controlnet_mode), context], dim=1)
            txt_ids = torch.cat([txt_ids[:1], txt_ids], dim=0)
        txt_len = context.shape[1]
        rope = rope_frequencies(torch.cat((txt_ids, img_ids), dim=0), list(cfg["axes_dims_rope"]))
        double, single = [], []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks):
            x, context = block(x, context, temb, rope)
            double.append(out(x))
        if self.single_transformer_blocks:
            joint = torch.cat([context, x], dim=1)
            for block, out in zip(self.single_transformer_blocks, self.controlnet_single_blocks):
                joint = block(joint, temb, rope)
                single.append(out(joint[:, txt_len:]))
        return _scaled(double, conditioning_scale), _scaled(single, conditioning_scale)


def _scaled(residuals: list[torch.Tensor], scale) -> list[torch.Tensor] | None:
    if not residuals:
        return None
    if torch.is_tensor(scale):
        s = scale.to(device=residuals[0].device, dtype=torch.float32).reshape(-1, 1, 1)
        return [(r * s).to(r.dtype) for r in residuals]
    return [r * scale for r in residuals]
