"""MMDiT denoiser of Stable Diffusion 3 / 3.5, built from a diffusers ``transformer/config.json`` dict.

Why a transformer and not a UNet: SD3 drops the convolutional hierarchy for a flat sequence of
latent patch tokens, and instead of cross-attending to the prompt it runs the prompt tokens as a
second stream ("context") through every block. Each block keeps separate weights per stream
(norms, QKV, output projection, MLP) but attends jointly over the concatenation of both, so text
and image tokens exchange information in both directions. The last block only needs the image
side, so its context stream stops after contributing keys and values (``context_pre_only``).

Conditioning is DiT-style: the timestep embedding plus an MLP of the pooled CLIP text vector form
one vector per item, which drives adaLN-Zero (shift / scale / gate) in every block and the final
continuous adaptive norm. SD3.5 adds RMS-normalised queries and keys (``qk_norm: rms_norm``) for
stability at 8B scale, and SD3.5-Medium a second, image-only self-attention ``attn2`` in the early
blocks (``dual_attention_layers``, MMDiT-X) whose modulation comes from three extra adaLN chunks.

Parameter names equal diffusers' ``SD3Transformer2DModel`` state-dict keys; the arithmetic follows
its default (SDPA) code path op for op, so float32 outputs match bitwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .blocks import ModelModule, TimestepEmbedding, check_text_inputs, timestep_embedding
from .dit_blocks import AdaLayerNormZero, GELUFeedForward, PatchEmbed, batch_timesteps, modulate, unpatchify

# diffusers' defaults for SD3Transformer2DModel.__init__.
SD3_DEFAULTS: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": [],
    "qk_norm": None,
}

QK_NORMS = (None, "rms_norm")

# Real transformer configs (stabilityai/*/transformer/config.json).
SD3_MEDIUM: dict = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}

SD35_MEDIUM: dict = {
    **SD3_MEDIUM,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}

SD35_LARGE: dict = {
    **SD3_MEDIUM,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}

# Tiny presets for random-weight test checkpoints. The model width (2 heads x 16 = 32) is kept a
# multiple of 32 floats on purpose: torch's CPU elementwise kernels (SiLU, GELU) run the last
# ``numel % 32`` elements through a scalar path that can differ by 1 ulp from the AVX-512 one, so
# with a 16-wide model the item at position 2 of a batch of 3 came out 1 ulp different from the
# same item at position 0 (in diffusers exactly as in ours). Real models (1536, 2432 wide) are
# multiples of 64.
MMDIT_TINY: dict = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "out_channels": 16,
    "pos_embed_max_size": 32,
}

MMDIT_TINY_SD35: dict = {**MMDIT_TINY, "qk_norm": "rms_norm", "dual_attention_layers": [0]}


def _positive_int(cfg: dict, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"config key {key!r}: expected a positive integer, got {value!r}")
    return value


def resolve_mmdit_config(config: dict) -> dict:
    """diffusers' defaults applied to ``config``; bookkeeping (``_*``) and unknown keys dropped.

    Raises CheckpointError naming the key for a value this module does not build.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"transformer config: expected a dict (config.json), got {type(config).__name__}")
    cfg = dict(SD3_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if k in SD3_DEFAULTS})
    if cfg["out_channels"] is None:
        cfg["out_channels"] = cfg["in_channels"]
    if cfg["pos_embed_max_size"] is None:
        raise CheckpointError(
            "config key 'pos_embed_max_size': null is not supported (SD3 checkpoints store a cropped "
            "position table; set the size of the checkpoint's table, e.g. 192)"
        )
    for key in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                "pooled_projection_dim", "out_channels", "pos_embed_max_size"):
        _positive_int(cfg, key)
    if cfg["qk_norm"] not in QK_NORMS:
        raise CheckpointError(
            f"config key 'qk_norm': value {cfg['qk_norm']!r} is not supported by batchgen's SD3 transformer "
            "(supported: null, 'rms_norm')"
        )
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_projection_dim"] != inner:
        raise CheckpointError(
            f"config key 'caption_projection_dim': {cfg['caption_projection_dim']} must equal "
            f"num_attention_heads * attention_head_dim = {inner} (the context stream runs at the model width)"
        )
    if inner % 4:
        raise CheckpointError(
            f"config key 'attention_head_dim': model width {inner} must be divisible by 4 (2-D sin-cos table)"
        )
    layers = cfg["dual_attention_layers"]
    if not isinstance(layers, (list, tuple)) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg["num_layers"] for i in layers
    ):
        raise CheckpointError(
            f"config key 'dual_attention_layers': expected a list of block indices in [0, {cfg['num_layers']}), "
            f"got {layers!r}"
        )
    cfg["dual_attention_layers"] = sorted(set(layers))
    return cfg


# --------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned scale (key ``weight``); statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm modulated by ``Linear(SiLU(cond))`` into (scale, shift): SD3's output norm and the
    last block's context norm (keys ``linear``)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(cond).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class AdaLayerNormZeroX(nn.Module):
    """SD3.5-Medium's adaLN-Zero with three extra chunks (shift, scale, gate) for ``attn2``.

    Both modulations share one LayerNorm of the input. Returns ``(x, gate_msa, shift_mlp,
    scale_mlp, gate_mlp, x2, gate_msa2)``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 9 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_msa2, scale_msa2, gate_msa2) = self.linear(self.silu(cond)).chunk(9, dim=1)
        normed = self.norm(x)
        return (modulate(normed, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp,
                modulate(normed, shift_msa2, scale_msa2), gate_msa2)


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, _, inner = x.shape
    return x.view(b, -1, heads, inner // heads).transpose(1, 2)


class JointAttention(nn.Module):
    """Attention over image tokens, optionally joined by the context tokens.

    ``context="joint"``: the context stream has its own QKV (``add_*_proj``) and output
    (``to_add_out``) projections and both streams attend over their concatenation.
    ``context="pre_only"`` (last block): the context still contributes keys and values, but its own
    output is dropped, so there is no ``to_add_out``. ``context=None`` (``attn2``): image-only
    self-attention. ``qk_norm="rms_norm"`` RMS-normalises every head's queries and keys.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, context: str | None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.context = heads, context
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        if context is not None:
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim) if context == "joint" else None

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (_heads_view(proj(x), self.heads) for proj in (to_q, to_k, to_v))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        b, n, _ = x.shape
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if self.context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        if self.context is None:
            return self.to_out[0](out)
        x_out, c_out = out[:, :n], out[:, n:]
        c_out = self.to_add_out(c_out) if self.to_add_out is not None else None
        return self.to_out[0](x_out), c_out


class JointTransformerBlock(nn.Module):
    """One MMDiT block: adaLN-Zero on both streams, joint attention, per-stream gated MLPs.

    ``context_pre_only`` (last block) returns ``None`` for the context; ``dual_attention`` adds the
    image-only ``attn2`` right after the joint attention.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool, qk_norm: str | None,
                 dual_attention: bool):
        super().__init__()
        self.context_pre_only, self.dual_attention = context_pre_only, dual_attention
        self.norm1 = AdaLayerNormZeroX(dim) if dual_attention else AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, head_dim, qk_norm, "pre_only" if context_pre_only else "joint")
        self.attn2 = JointAttention(dim, heads, head_dim, qk_norm, None) if dual_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = GELUFeedForward(dim)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = GELUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor):
        if self.dual_attention:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = self.norm1(x, temb)
        else:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            nc = self.norm1_context(context, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)

        attn_x, attn_c = self.attn(nx, nc)
        x = x + gate_msa.unsqueeze(1) * attn_x
        if self.dual_attention:
            x = x + gate_msa2.unsqueeze(1) * self.attn2(nx2)
        x = x + gate_mlp.unsqueeze(1) * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return None, x
        context = context + c_gate_msa.unsqueeze(1) * attn_c
        ff_c = self.ff_context(modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp))
        return context + c_gate_mlp.unsqueeze(1) * ff_c, x


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """Per-item conditioning: MLP(sinusoidal timestep, 256) + MLP(pooled text vector).

    Keys ``timestep_embedder.linear_{1,2}`` and ``text_embedder.linear_{1,2}``; both MLPs are
    Linear -> SiLU -> Linear, so the text one reuses :class:`TimestepEmbedding`'s layout.
    """

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, timesteps: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = timestep_embedding(timesteps, 256, flip_sin_to_cos=True, freq_shift=0)
        return self.timestep_embedder(t.to(dtype=pooled.dtype)) + self.text_embedder(pooled)


# --------------------------------------------------------------------------- model


class SD3Transformer2DModel(ModelModule):
    """SD3 / SD3.5 MMDiT. ``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep)``."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_mmdit_config(config)
        self.config = cfg
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        dim = heads * head_dim
        n = cfg["num_layers"]
        self.inner_dim, self.out_channels, self.patch_size = dim, cfg["out_channels"], cfg["patch_size"]

        self.pos_embed = PatchEmbed(cfg["sample_size"], cfg["patch_size"], cfg["in_channels"], dim,
                                    pos_embed_max_size=cfg["pos_embed_max_size"])
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg["pooled_projection_dim"])
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], cfg["caption_projection_dim"])
        dual = set(cfg["dual_attention_layers"])
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, heads, head_dim, i == n - 1, cfg["qk_norm"], i in dual) for i in range(n)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, cfg["patch_size"] ** 2 * self.out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep,
        block_controlnet_hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(B, C, H, W)`` latent, ``(B, T, joint_attention_dim)`` text tokens, ``(B, pooled)`` pooled
        text, timestep (``(B,)`` tensor, or one value for all) -> ``(B, out_channels, H, W)``.

        ``block_controlnet_hidden_states``: an SD3 ControlNet's residuals; block ``i`` (all but the
        last) adds residual ``int(i / (blocks / residuals))`` to its image tokens, as diffusers does."""
        cfg = self.config
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states: expected (B, C, H, W), got shape {tuple(hidden_states.shape)}")
        b = hidden_states.shape[0]
        check_text_inputs(encoder_hidden_states, pooled_projections, b, cfg)
        gh, gw = self.pos_embed.check_size(*hidden_states.shape[-2:])
        timesteps = batch_timesteps(timestep, b, hidden_states.device)

        x = self.pos_embed(hidden_states).contiguous()
        temb = self.time_text_embed(timesteps, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        residuals = block_controlnet_hidden_states
        for i, block in enumerate(self.transformer_blocks):
            context, x = block(x, context, temb)
            if residuals is not None and not block.context_pre_only:
                x = x + residuals[int(i / (len(self.transformer_blocks) / len(residuals)))]
        x = self.proj_out(self.norm_out(x, temb))
        return unpatchify(x, gh, gw, self.patch_size, self.out_channels)
