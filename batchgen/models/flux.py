"""FLUX.1 transformer (dev and schnell), built from a diffusers ``transformer/config.json`` dict.

FLUX.1 is a rectified-flow DiT over *packed* latents: the 16-channel VAE latent is cut into 2x2
patches, each flattened to a 64-wide token (:func:`pack_latents`), and the model predicts the flow
velocity for every token. The network, in the order :class:`FluxTransformer2DModel` runs it:

1. **Conditioning vector** ``temb`` (:class:`TimeTextEmbedding`): sinusoidal timestep embedding
   (+ a second one of the guidance scale for the guidance-distilled *dev*) + an MLP of the pooled
   CLIP text vector. It drives every adaLN modulation below.
2. **3-axis RoPE** (:func:`rope_frequencies`) over position ids of the text tokens followed by the
   image tokens; ids are (unused, row, column) for image tokens and all zero for text tokens.
3. **Double-stream blocks** (:class:`FluxTransformerBlock`, MMDiT): image and text tokens keep
   separate weights (adaLN-Zero modulation, QKV, output projection, MLP) but attend jointly over the
   concatenation ``[text, image]`` with RMS-normalised queries and keys.
4. **Single-stream blocks** (:class:`FluxSingleTransformerBlock`): one token sequence, attention and
   MLP computed in parallel from the same modulated input and fused by one output projection.
5. **Output**: adaLN (no zero gate, :class:`AdaLayerNormContinuous`) and a linear head on the image
   tokens only.

Why our own copy: the pipeline needs a module whose numerics it controls (batch invariance, dtypes)
without diffusers' hooks, processors and dispatch layers. Parameter names equal diffusers'
``FluxTransformer2DModel`` state-dict keys, so a diffusers-layout checkpoint loads with
``load_state_dict(strict=True)``; the op order follows diffusers' default (``native`` SDPA) path so
float32 outputs are bitwise equal (tests/test_models_flux.py).

Conventions inherited from diffusers (and from BFL's reference code): the module multiplies both
``timestep`` and ``guidance`` by 1000 after casting them to the model dtype. FluxPipeline therefore
passes ``timestep = t / 1000`` (i.e. the flow sigma in [0, 1]) and ``guidance`` as the *raw* guidance
scale (e.g. 3.5), which becomes 3500 inside.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .blocks import ModelModule, TimestepEmbedding, check_text_inputs, timestep_embedding

# diffusers' defaults for every key of FluxTransformer2DModel.__init__.
FLUX_DEFAULTS: dict = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}

# The published black-forest-labs/FLUX.1-{dev,schnell} transformer/config.json (12B class:
# 19 double + 38 single blocks, 24 heads x 128, T5-XXL context 4096, CLIP-L pooled 768).
FLUX_1_DEV: dict = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_1_SCHNELL: dict = {**FLUX_1_DEV, "guidance_embeds": False}

# Tiny presets for tests and `make-tiny-model`: 2 heads x 16 (RoPE axes 4+6+6 = 16), 16 latent
# channels packed 2x2 -> 64 input channels, small text widths.
FLUX_TINY_SCHNELL: dict = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": [4, 6, 6],
}
FLUX_TINY_DEV: dict = {**FLUX_TINY_SCHNELL, "guidance_embeds": True}

ROPE_THETA = 10000.0
_POSITIVE_INT_KEYS = (
    "in_channels",
    "num_attention_heads",
    "attention_head_dim",
    "joint_attention_dim",
    "pooled_projection_dim",
)
_COUNT_KEYS = ("num_layers", "num_single_layers")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def resolve_flux_config(config: dict) -> dict:
    """diffusers' defaults applied to ``config``; bookkeeping (``_*``) and unknown keys dropped.

    Raises CheckpointError naming the key for a value this module does not build.
    """
    if not isinstance(config, dict):
        raise CheckpointError(
            f"flux transformer config: expected a dict (transformer/config.json), got {type(config).__name__}"
        )
    cfg = dict(FLUX_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if k in FLUX_DEFAULTS})
    if cfg["patch_size"] != 1:
        raise CheckpointError(
            f"config key 'patch_size': value {cfg['patch_size']!r} is not supported by batchgen's FLUX "
            "transformer (supported: 1; 2x2 patching is done outside the model by pack_latents)"
        )
    for key in _POSITIVE_INT_KEYS:
        if not _is_int(cfg[key]) or cfg[key] <= 0:
            raise CheckpointError(f"config key {key!r}: expected a positive integer, got {cfg[key]!r}")
    for key in _COUNT_KEYS:
        if not _is_int(cfg[key]) or cfg[key] < 0:
            raise CheckpointError(f"config key {key!r}: expected a non-negative integer, got {cfg[key]!r}")
    if cfg["out_channels"] is None:
        cfg["out_channels"] = cfg["in_channels"]
    elif not _is_int(cfg["out_channels"]) or cfg["out_channels"] <= 0:
        raise CheckpointError(
            f"config key 'out_channels': expected a positive integer or null, got {cfg['out_channels']!r}"
        )
    if not isinstance(cfg["guidance_embeds"], bool):
        raise CheckpointError(
            f"config key 'guidance_embeds': expected true or false, got {cfg['guidance_embeds']!r}"
        )
    axes = cfg["axes_dims_rope"]
    if (
        not isinstance(axes, (list, tuple))
        or len(axes) != 3
        or not all(_is_int(d) and d > 0 and d % 2 == 0 for d in axes)
    ):
        raise CheckpointError(
            f"config key 'axes_dims_rope': expected three positive even integers (one per position-id "
            f"axis), got {axes!r}"
        )
    if sum(axes) != cfg["attention_head_dim"]:
        raise CheckpointError(
            f"config key 'axes_dims_rope': {list(axes)} sums to {sum(axes)} but RoPE must cover the "
            f"whole head (attention_head_dim = {cfg['attention_head_dim']})"
        )
    cfg["axes_dims_rope"] = [int(d) for d in axes]
    return cfg


# ---------------------------------------------------------------------------------------------
# Latent packing (FluxPipeline's static helpers)
# ---------------------------------------------------------------------------------------------


def _check_even_latent(height: int, width: int, what: str) -> None:
    if height % 2 or width % 2:
        raise ValueError(
            f"{what}: latent height and width must be even for 2x2 packing, got {height}x{width} "
            "(choose an image size divisible by 2 * vae_scale_factor)"
        )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latents -> ``(B, H/2 * W/2, C*4)`` tokens, one per 2x2 patch, row-major.

    Each token holds its patch channel-major: ``(c, dy, dx)``. Equals ``FluxPipeline._pack_latents``.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents: expected (B, C, H, W), got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    _check_even_latent(h, w, "latents")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height_px: int, width_px: int, vae_scale_factor: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for an image of ``height_px x width_px`` pixels -> ``(B, C, H, W)``.

    The latent side is ``2 * (px // (2 * vae_scale_factor))``, as ``FluxPipeline._unpack_latents``.
    """
    if packed.ndim != 3:
        raise ValueError(f"packed: expected (B, tokens, channels), got shape {tuple(packed.shape)}")
    b, tokens, channels = packed.shape
    h = 2 * (int(height_px) // (vae_scale_factor * 2))
    w = 2 * (int(width_px) // (vae_scale_factor * 2))
    if tokens != (h // 2) * (w // 2) or channels % 4:
        raise ValueError(
            f"packed: shape {tuple(packed.shape)} does not fit a {height_px}x{width_px} image at "
            f"vae_scale_factor {vae_scale_factor} (expected {(h // 2) * (w // 2)} tokens, channels divisible by 4)"
        )
    patches = packed.reshape(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def latent_image_ids(
    latent_height: int,
    latent_width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Position ids ``(h/2 * w/2, 3)`` of the packed tokens of an ``h x w`` latent: ``(0, row, col)``.

    ``latent_height``/``latent_width`` are the *unpacked* latent sides (what FluxPipeline.prepare_latents
    holds); the pipeline calls ``_prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)``
    with them, and this returns the same values and dtype (float32 unless ``dtype`` says otherwise).
    """
    _check_even_latent(latent_height, latent_width, "latent_image_ids")
    rows, cols = latent_height // 2, latent_width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Conditioning: timestep (+ guidance) + pooled text, and rotary position embedding
# ---------------------------------------------------------------------------------------------

TIME_PROJ_DIM = 256  # width of the sinusoidal timestep / guidance features


class TimeTextEmbedding(nn.Module):
    """``temb = MLP(sin(t)) [+ MLP(sin(g))] + MLP(pooled)`` (keys of diffusers' CombinedTimestep*Embeddings).

    ``timestep_embedder`` / ``guidance_embedder`` / ``text_embedder`` are all Linear-SiLU-Linear with
    keys ``linear_1`` / ``linear_2``, hence one class for the three.
    """

    def __init__(self, dim: int, pooled_projection_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim)
        self.guidance_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim) if guidance_embeds else None
        self.text_embedder = TimestepEmbedding(pooled_projection_dim, dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        temb = self.timestep_embedder(self._sinusoid(timestep).to(dtype=pooled.dtype))
        if self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(self._sinusoid(guidance).to(dtype=pooled.dtype))
        return temb + self.text_embedder(pooled)

    @staticmethod
    def _sinusoid(t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, TIME_PROJ_DIM, flip_sin_to_cos=True, freq_shift=0)


def rope_frequencies(ids: torch.Tensor, axes_dim: list[int], theta: float = ROPE_THETA):
    """``(cos, sin)``, each ``(S, sum(axes_dim))`` float32, for position ids ``(S, len(axes_dim))``.

    Axis ``i`` rotates ``axes_dim[i]`` channels of every head at frequencies
    ``theta ** (-2j / axes_dim[i])``; each angle is repeated for the (real, imag) pair it rotates.
    Angles are computed in float64 (float32 where the device has no float64), as diffusers does.
    """
    pos = ids.float()
    freq_dtype = torch.float32 if ids.device.type in ("mps", "npu", "neuron") else torch.float64
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freq_dtype, device=ids.device) / dim))
        angles = torch.outer(pos[:, axis], inv_freq)  # float64 (S, dim/2)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, heads, D)`` by per-position angles; adjacent channels form (real, imag) pairs."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _layer_norm(dim: int) -> nn.LayerNorm:
    """The parameter-free LayerNorm (eps 1e-6) every FLUX modulation wraps."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero of a double-stream block: ``linear(silu(temb))`` -> 6 vectors (key ``linear``).

    Returns the attention input ``norm(x) * (1 + scale_msa) + shift_msa`` and the attention gate and
    the MLP shift / scale / gate, which the block applies after the attention residual.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = _layer_norm(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(temb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """adaLN-Zero of a single-stream block: shift, scale and one gate (key ``linear``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 3 * dim)
        self.norm = _layer_norm(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        shift, scale, gate = self.linear(self.silu(temb)).chunk(3, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate


class AdaLayerNormContinuous(nn.Module):
    """Final adaLN without gate: ``norm(x) * (1 + scale) + shift``; note scale comes first in ``linear``."""

    def __init__(self, dim: int, conditioning_dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, 2 * dim)
        self.norm = _layer_norm(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class GeluTanhProjection(nn.Module):
    """Linear then tanh-approximated GELU (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class GeluFeedForward(nn.Module):
    """4x-wide tanh-GELU MLP (keys ``net.0.proj``, ``net.2``; ``net.1`` is diffusers' parameter-free dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GeluTanhProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention over ``(B, S, heads, D)`` tensors -> ``(B, S, heads*D)`` (diffusers' native backend layout)."""
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return out.permute(0, 2, 1, 3).flatten(2, 3).to(query.dtype)


class FluxAttention(nn.Module):
    """Multi-head attention with RMS QK-norm and RoPE (keys ``to_q``, ``norm_q``, ``to_out.0`` ...).

    ``joint=True`` (double-stream): a second set of projections for the text tokens (``add_*_proj``,
    ``norm_added_*``, ``to_add_out``); both streams attend over ``[text, image]`` and get separate
    output projections. ``joint=False`` (single-stream): the sequence is already joint and the output
    projection is left to the block (diffusers' ``pre_only``), which fuses it with the MLP.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, eps: float = 1e-6):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.joint = heads, head_dim, joint
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        if joint:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
            self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor | None = None):
        query = self.norm_q(self._split_heads(self.to_q(x)))
        key = self.norm_k(self._split_heads(self.to_k(x)))
        value = self._split_heads(self.to_v(x))
        if self.joint:
            c_query = self.norm_added_q(self._split_heads(self.add_q_proj(context)))
            c_key = self.norm_added_k(self._split_heads(self.add_k_proj(context)))
            c_value = self._split_heads(self.add_v_proj(context))
            # Text tokens first: the RoPE table is built over [txt_ids, img_ids] in that order.
            query = torch.cat([c_query, query], dim=1)
            key = torch.cat([c_key, key], dim=1)
            value = torch.cat([c_value, value], dim=1)
        query, key = apply_rope(query, *rope), apply_rope(key, *rope)
        out = _sdpa(query, key, value)
        if not self.joint:
            return out
        text_len = context.shape[1]
        c_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        return self.to_out[0](out.contiguous()), self.to_add_out(c_out.contiguous())


class FluxTransformerBlock(nn.Module):
    """Double-stream (MMDiT) block: per-stream adaLN-Zero and MLP, one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True)
        self.norm2 = _layer_norm(dim)
        self.ff = GeluFeedForward(dim)
        self.norm2_context = _layer_norm(dim)
        self.ff_context = GeluFeedForward(dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope):
        img_in, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(img, temb)
        txt_in, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(txt, temb)
        img_attn, txt_attn = self.attn(img_in, rope, context=txt_in)

        img = img + gate_msa.unsqueeze(1) * img_attn
        img_mlp_in = self.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        img = img + gate_mlp.unsqueeze(1) * self.ff(img_mlp_in)

        txt = txt + c_gate_msa.unsqueeze(1) * txt_attn
        txt_mlp_in = self.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        txt = txt + c_gate_mlp.unsqueeze(1) * self.ff_context(txt_mlp_in)
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over the joint ``[text, image]`` sequence: attention and MLP in parallel."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + mlp_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope) -> torch.Tensor:
        x_in, gate = self.norm(x, temb)
        mlp = self.act_mlp(self.proj_mlp(x_in))
        attn = self.attn(x_in, rope)
        x = x + gate.unsqueeze(1) * self.proj_out(torch.cat([attn, mlp], dim=2))
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _per_item(value: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``value`` as a (B,) or (1,) tensor. A (1,) value is NOT expanded: like diffusers, its embedding is
    computed once and broadcast in the sum with the pooled-text embedding (a 1-row matmul rounds
    differently from a B-row one, so expanding first would break bitwise parity)."""
    if not torch.is_tensor(value):
        raise ValueError(f"{name}: expected a ({batch},) float tensor, got {type(value).__name__}")
    if value.ndim == 0:
        value = value[None]
    if value.ndim != 1 or value.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected a ({batch},) or (1,) tensor, got shape {tuple(value.shape)}")
    return value


def _check_ids(ids: torch.Tensor, tokens: int, name: str) -> None:
    if ids.ndim != 2 or ids.shape != (tokens, 3):
        raise ValueError(
            f"{name}: expected ({tokens}, 3) position ids (2-D, no batch dimension), got shape {tuple(ids.shape)}"
        )


class FluxTransformer2DModel(ModelModule):
    """FLUX.1 transformer. ``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
    img_ids, txt_ids, guidance=None) -> (B, N, out_channels)`` velocity over the packed latent tokens."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_flux_config(config)
        self.config = cfg
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        dim = heads * head_dim
        self.inner_dim = dim
        self.axes_dims_rope = list(cfg["axes_dims_rope"])

        self.time_text_embed = TimeTextEmbedding(dim, cfg["pooled_projection_dim"], cfg["guidance_embeds"])
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], dim)
        self.x_embedder = nn.Linear(cfg["in_channels"], dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim) for _ in range(cfg["num_layers"])
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(cfg["num_single_layers"])
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, cfg["out_channels"])

    def conditioning(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
        """``temb`` (B, inner_dim). ``timestep`` is t/1000 and ``guidance`` the raw scale; both are cast
        to ``dtype`` and multiplied by 1000 here, as in diffusers."""
        batch = pooled.shape[0]
        timestep = _per_item(timestep, batch, "timestep").to(dtype) * 1000
        if self.time_text_embed.guidance_embedder is not None:
            if guidance is None:
                raise ValueError(
                    "guidance: this transformer is guidance-distilled (config guidance_embeds: true, FLUX.1-dev); "
                    "pass the guidance scale as a (B,) float tensor"
                )
            guidance = _per_item(guidance, batch, "guidance").to(dtype) * 1000
        elif guidance is not None:
            raise ValueError(
                "guidance: this transformer has no guidance embedder (config guidance_embeds: false, "
                "FLUX.1-schnell); pass guidance=None"
            )
        return self.time_text_embed(timestep, guidance, pooled)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        controlnet_single_block_samples: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``controlnet_*_samples``: a FLUX ControlNet's residuals; double block ``i`` adds residual
        ``i // ceil(blocks / residuals)`` to its image tokens, single blocks likewise (diffusers)."""
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg["in_channels"]:
            raise ValueError(
                f"hidden_states: expected packed latents (B, tokens, {cfg['in_channels']}), "
                f"got shape {tuple(hidden_states.shape)}"
            )
        batch, img_len = hidden_states.shape[:2]
        check_text_inputs(encoder_hidden_states, pooled_projections, batch, cfg)
        txt_len = encoder_hidden_states.shape[1]
        _check_ids(img_ids, img_len, "img_ids")
        _check_ids(txt_ids, txt_len, "txt_ids")

        img = self.x_embedder(hidden_states)
        temb = self.conditioning(timestep, guidance, pooled_projections, img.dtype)
        txt = self.context_embedder(encoder_hidden_states)
        rope = rope_frequencies(torch.cat((txt_ids, img_ids), dim=0), self.axes_dims_rope)

        double, single = controlnet_block_samples, controlnet_single_block_samples
        for i, block in enumerate(self.transformer_blocks):
            img, txt = block(img, txt, temb, rope)
            if double is not None:
                img = img + double[i // math.ceil(len(self.transformer_blocks) / len(double))]
        if self.single_transformer_blocks:
            joint = torch.cat([txt, img], dim=1)
            for i, block in enumerate(self.single_transformer_blocks):
                joint = block(joint, temb, rope)
                if single is not None:
                    step = math.ceil(len(self.single_transformer_blocks) / len(single))
                    joint = torch.cat([joint[:, :txt_len], joint[:, txt_len:] + single[i // step]], dim=1)
            img = joint[:, txt_len:]

        return self.proj_out(self.norm_out(img, temb))
