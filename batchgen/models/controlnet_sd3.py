"""ControlNet for Stable Diffusion 3 / 3.5 (diffusers' ``SD3ControlNetModel``), from its config.json.

An SD3 ControlNet is a shallow copy of the MMDiT: its own patch embedding (with the position
table), timestep + pooled-text embedding, context embedder and ``num_layers`` joint blocks, all
with the context stream kept to the end. The control image enters as VAE latents through a
zero-initialised patch embedding without a position table (``pos_embed_input``) whose tokens are
added to the image tokens; after every block one zero-initialised Linear (``controlnet_blocks``)
turns the image tokens into a residual. The transformer adds residual ``int(i / (blocks /
residuals))`` after its block ``i`` (all blocks but the last, which has no context output), so a
ControlNet with fewer layers than the transformer steers several blocks with each residual.

Parameter names and config keys equal diffusers'. What the config says is built; what is not
built is refused naming the key:

- ``extra_conditioning_channels`` > 0 (the inpainting ControlNet, whose control latents carry a
  mask channel: ``StableDiffusion3ControlNetInpaintingPipeline``, not the pipeline built here);
- ``joint_attention_dim: null`` / ``use_pos_embed: false`` (SD3.5 Large's official 8B ControlNets:
  single-stream blocks without a context, and the position embedding borrowed from the
  transformer at pipeline construction);
- ``pos_embed_type`` other than ``sincos``.

``force_zeros_for_pooled_projection`` (InstantX ControlNets, true by default) is read by the
pipeline (:mod:`batchgen.control_dit`): the ControlNet then gets zeros for the pooled text and
its control latents are not shifted by the VAE's ``shift_factor``. SD3.5's ``qk_norm`` and
``dual_attention_layers`` are built as in the transformer (the blocks are the same modules).

The conditioning scale may be one number or one per row (``(B,)``), multiplied in float32 and
rounded to the run dtype once, as :mod:`batchgen.models.controlnet` does for the UNet ControlNets.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import ModelModule, check_text_inputs
from .dit_blocks import PatchEmbed, batch_timesteps
from .mmdit import SD3_DEFAULTS, CombinedTimestepTextProjEmbeddings, JointTransformerBlock, resolve_mmdit_config

# diffusers' SD3ControlNetModel defaults for the keys the transformer does not have.
SD3_CONTROLNET_DEFAULTS: dict = {
    "extra_conditioning_channels": 0,
    "pos_embed_type": "sincos",
    "use_pos_embed": True,
    "force_zeros_for_pooled_projection": True,
}


def resolve_sd3_controlnet_config(config: dict) -> dict:
    """diffusers' SD3ControlNetModel defaults applied to ``config``; a CheckpointError naming the
    key for anything not built here (see the module doc)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"controlnet config: expected a dict (config.json), got {type(config).__name__}")
    own = dict(SD3_CONTROLNET_DEFAULTS)
    own.update({k: config[k] for k in SD3_CONTROLNET_DEFAULTS if k in config})
    if "joint_attention_dim" in config and config["joint_attention_dim"] is None:
        raise CheckpointError("config key 'joint_attention_dim': null (an SD3.5 Large 8B ControlNet with single-stream "
                              "blocks and no text context) is not supported by batchgen; use an InstantX-style "
                              "SD3 ControlNet (joint blocks)")
    if own["use_pos_embed"] is not True:
        raise CheckpointError(f"config key 'use_pos_embed': {own['use_pos_embed']!r} (a ControlNet that borrows the "
                              f"transformer's position embedding, as SD3.5 Large's 8B ControlNets do) is not "
                              f"supported by batchgen")
    if own["pos_embed_type"] != "sincos":
        raise CheckpointError(f"config key 'pos_embed_type': {own['pos_embed_type']!r} is not supported "
                              f"(supported: 'sincos')")
    extra = own["extra_conditioning_channels"]
    if isinstance(extra, bool) or not isinstance(extra, int) or extra != 0:
        raise CheckpointError(f"config key 'extra_conditioning_channels': {extra!r} (an inpainting ControlNet, whose "
                              f"control latents carry a mask) is not supported; batchgen builds ControlNets with 0")
    if not isinstance(own["force_zeros_for_pooled_projection"], bool):
        raise CheckpointError(f"config key 'force_zeros_for_pooled_projection': expected true or false, got "
                              f"{own['force_zeros_for_pooled_projection']!r}")
    cfg = resolve_mmdit_config({k: v for k, v in config.items() if k in SD3_DEFAULTS})
    cfg.update(own)
    return cfg


class PatchTokens(nn.Module):
    """A patch embedding without a position table (diffusers' ``PatchEmbed(pos_embed_type=None)``):
    the strided conv ``proj`` and the flattening to tokens."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=(patch_size, patch_size), stride=patch_size)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.proj(latent).flatten(2).transpose(1, 2)


class SD3ControlNetModel(ModelModule):
    """``forward(hidden_states, controlnet_cond, conditioning_scale, encoder_hidden_states,
    pooled_projections, timestep) -> [residual per block]`` (each ``(B, tokens, inner_dim)``)."""

    kind = "SD3ControlNet"

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_sd3_controlnet_config(config)
        self.config = cfg
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        dim = heads * head_dim
        self.inner_dim = dim
        self.pos_embed = PatchEmbed(cfg["sample_size"], cfg["patch_size"], cfg["in_channels"], dim,
                                    pos_embed_max_size=cfg["pos_embed_max_size"])
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg["pooled_projection_dim"])
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], cfg["caption_projection_dim"])
        dual = set(cfg["dual_attention_layers"])
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, heads, head_dim, False, cfg["qk_norm"], i in dual)
            for i in range(cfg["num_layers"])
        )
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(cfg["num_layers"]))
        self.pos_embed_input = PatchTokens(cfg["patch_size"], cfg["in_channels"] + cfg["extra_conditioning_channels"],
                                           dim)

    def forward(self, hidden_states: torch.Tensor, controlnet_cond: torch.Tensor,
                conditioning_scale: float | torch.Tensor = 1.0, encoder_hidden_states: torch.Tensor | None = None,
                pooled_projections: torch.Tensor | None = None, timestep=None) -> list[torch.Tensor]:
        """``hidden_states`` and ``controlnet_cond``: (B, C, h, w) latents (the control image's VAE
        latents); the text inputs as the transformer takes them; ``conditioning_scale`` a number or
        a (B,) tensor."""
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states: expected (B, C, H, W), got shape {tuple(hidden_states.shape)}")
        b = hidden_states.shape[0]
        if tuple(controlnet_cond.shape) != tuple(hidden_states.shape[:1]) + (
                self.config["in_channels"] + self.config["extra_conditioning_channels"],
                *hidden_states.shape[2:]):
            raise ValueError(f"controlnet_cond: expected control latents of shape ({b}, "
                             f"{self.config['in_channels']}, {hidden_states.shape[2]}, {hidden_states.shape[3]}), "
                             f"got {tuple(controlnet_cond.shape)}")
        check_text_inputs(encoder_hidden_states, pooled_projections, b, self.config)
        timesteps = batch_timesteps(timestep, b, hidden_states.device)
        x = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timesteps, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        x = x + self.pos_embed_input(controlnet_cond)
        residuals = []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks):
            context, x = block(x, context, temb)
            residuals.append(out(x))
        if torch.is_tensor(conditioning_scale):
            scale = conditioning_scale.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1)
            return [(r * scale).to(r.dtype) for r in residuals]
        return [r * conditioning_scale for r in residuals]
