"""Z-Image transformer (Z-Image, Z-Image-Turbo), built from a diffusers ``transformer/config.json`` dict.

Z-Image is a *single-stream* DiT: image tokens and caption tokens are refined separately for a few
layers, then concatenated into one sequence that every main layer processes with the same weights.
What :class:`ZImageTransformer2DModel` does, in order (diffusers' ``ZImageTransformer2DModel``
basic mode):

1. **Time**: sinusoidal embedding of ``t * t_scale`` (``[cos, sin]`` order) and an MLP to a
   ``min(dim, 256)``-wide vector ``adaln`` that drives every modulation (no pooled text vector).
2. **Patchify**: latents ``(B, C, H, W)`` -> 2x2 patches, ``(ph, pw, c)``-ordered 4C-wide tokens;
   the token count is padded to a multiple of 32 (:data:`SEQ_MULTIPLE`) with copies of the last
   token that are replaced by the learned ``x_pad_token`` after the embedding Linear. Captions are
   padded the same way (``cap_pad_token``). Pad tokens are attended to, not masked.
3. **3-axis RoPE** (complex multiply, float32) over position ids: caption token ``j`` is at
   ``(1 + j, 0, 0)``; image token ``(row, col)`` at ``(Lc + 1, row, col)`` where ``Lc`` is the
   row's padded caption length; image pad tokens at ``(0, 0, 0)``.
4. **Refiners**: ``noise_refiner`` (modulated blocks) over the image tokens, ``context_refiner``
   (unmodulated) over the caption tokens.
5. **Main layers** over ``[image tokens, caption tokens]`` per row, then an adaLN-scaled
   LayerNorm + Linear head; the image tokens are unpatchified back to ``(B, C, H, W)``.

Rows of one call may have captions of different lengths (each prompt keeps only its real tokens,
as ZImagePipeline hands them over): rows are then zero-padded to the longest and a boolean
attention mask hides the padding, exactly when diffusers uses one (lengths differ), so each row's
arithmetic is what diffusers does for it. The pipeline keeps an item's batch-mates from changing
its shapes by grouping items by padded caption length (``families/zimage.py``).

Why our own copy: the same as for FLUX (numerics under our control, no hooks or dispatch layers).
Parameter names equal diffusers' state-dict keys (``all_x_embedder.2-1``, ``layers.N.attention.to_q``,
``adaLN_modulation.0`` ...), loaded with ``strict=True``; float32 outputs equal diffusers' bitwise
(tests/test_models_zimage.py). The Omni variant (SigLIP image features, ``siglip_feat_dim``) and
patch sizes other than 2x2x1 are refused at build time.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .blocks import ModelModule
from .mmdit import RMSNorm  # diffusers' RMSNorm op order (float32 statistics, half-precision weight cast)

SEQ_MULTIPLE = 32  # image and caption token counts are padded to a multiple of this
ADALN_DIM = 256  # width of the modulation input: min(dim, 256)
TIME_FREQ_DIM = 256  # sinusoidal timestep features
TIME_MID_DIM = 1024  # t_embedder hidden width

# diffusers' defaults for every key of ZImageTransformer2DModel.__init__ (Z-Image 6B).
ZIMAGE_DEFAULTS: dict = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "siglip_feat_dim": None,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}
# The published Tongyi-MAI/Z-Image-Turbo transformer/config.json (6B: 30 layers, 30 heads x 128,
# Qwen3-4B captions 2560 wide).
ZIMAGE_TURBO: dict = {"_class_name": "ZImageTransformer2DModel", **ZIMAGE_DEFAULTS}
# Tiny preset for tests and builtin:tiny-zimage: 2 heads x 16 (RoPE axes 4+6+6), 16 latent channels.
ZIMAGE_TINY: dict = {
    "_class_name": "ZImageTransformer2DModel",
    **ZIMAGE_DEFAULTS,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 32,
    "axes_dims": [4, 6, 6],
    "axes_lens": [1024, 512, 512],
}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def resolve_zimage_config(config: dict) -> dict:
    """diffusers' defaults applied to ``config``; bookkeeping and unknown keys dropped. A value this
    module does not build is a CheckpointError naming the key."""
    if not isinstance(config, dict):
        raise CheckpointError(f"zimage transformer config: expected a dict (transformer/config.json), "
                              f"got {type(config).__name__}")
    cfg = dict(ZIMAGE_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if k in ZIMAGE_DEFAULTS})
    if list(cfg["all_patch_size"]) != [2] or list(cfg["all_f_patch_size"]) != [1]:
        raise CheckpointError(f"config keys 'all_patch_size' / 'all_f_patch_size': {cfg['all_patch_size']!r} / "
                              f"{cfg['all_f_patch_size']!r} are not supported (supported: [2] / [1], Z-Image's)")
    if cfg["siglip_feat_dim"] is not None:
        raise CheckpointError("config key 'siglip_feat_dim': set, i.e. a Z-Image Omni transformer (SigLIP image "
                              "features), which batchgen does not render; use Z-Image or Z-Image-Turbo")
    for key in ("in_channels", "dim", "n_heads", "cap_feat_dim"):
        if not _is_int(cfg[key]) or cfg[key] <= 0:
            raise CheckpointError(f"config key {key!r}: expected a positive integer, got {cfg[key]!r}")
    for key in ("n_layers", "n_refiner_layers"):
        if not _is_int(cfg[key]) or cfg[key] < 0:
            raise CheckpointError(f"config key {key!r}: expected a non-negative integer, got {cfg[key]!r}")
    if cfg["dim"] % cfg["n_heads"]:
        raise CheckpointError(f"config key 'dim': {cfg['dim']} is not a multiple of n_heads ({cfg['n_heads']})")
    axes, lens = cfg["axes_dims"], cfg["axes_lens"]
    ok = (isinstance(axes, (list, tuple)) and isinstance(lens, (list, tuple)) and len(axes) == 3 and len(lens) == 3
          and all(_is_int(d) and d > 0 and d % 2 == 0 for d in axes) and all(_is_int(n) and n > 0 for n in lens))
    if not ok:
        raise CheckpointError(f"config keys 'axes_dims' / 'axes_lens': expected three positive even integers and "
                              f"three positive integers, got {axes!r} / {lens!r}")
    head_dim = cfg["dim"] // cfg["n_heads"]
    if sum(axes) != head_dim:
        raise CheckpointError(f"config key 'axes_dims': {list(axes)} sums to {sum(axes)} but RoPE must cover the "
                              f"whole head (dim / n_heads = {head_dim})")
    if not isinstance(cfg["qk_norm"], bool):
        raise CheckpointError(f"config key 'qk_norm': expected true or false, got {cfg['qk_norm']!r}")
    cfg["axes_dims"], cfg["axes_lens"] = [int(d) for d in axes], [int(n) for n in lens]
    return cfg


def padded_length(tokens: int) -> int:
    """``tokens`` rounded up to a multiple of :data:`SEQ_MULTIPLE` (what the model pads sequences to)."""
    return tokens + (-tokens) % SEQ_MULTIPLE


def _rope_tables(axes_dims: list[int], axes_lens: list[int], theta: float) -> list[torch.Tensor]:
    """Per axis, the complex64 table ``exp(i * pos * theta^(-2k/d))`` for positions ``0..len-1``
    (angles in float64, then float32, as diffusers computes them)."""
    tables = []
    for d, n in zip(axes_dims, axes_lens):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs).float()
        tables.append(torch.polar(torch.ones_like(angles), angles).to(torch.complex64))
    return tables


def _apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x`` (B, S, heads, D) rotated by ``freqs`` (B, S, D/2) complex, in float32; back to x's dtype."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


class ZImageAttention(nn.Module):
    """Self-attention with per-head RMS QK-norm and RoPE; no biases (keys ``to_q``, ``norm_q``, ``to_out.0``)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor) -> torch.Tensor:
        query = self.to_q(x).unflatten(-1, (self.heads, -1))
        key = self.to_k(x).unflatten(-1, (self.heads, -1))
        value = self.to_v(x).unflatten(-1, (self.heads, -1))
        if self.norm_q is not None:
            query, key = self.norm_q(query), self.norm_k(key)
        query, key = _apply_rope(query, freqs), _apply_rope(key, freqs)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :],
                                             dropout_p=0.0, is_causal=False)
        out = out.permute(0, 2, 1, 3).flatten(2, 3).to(query.dtype)
        return self.to_out[0](out)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, no biases (keys ``w1``, ``w2``, ``w3``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ZImageBlock(nn.Module):
    """Pre- and post-normed (sandwich RMSNorm) attention + SwiGLU; with ``modulation`` the pre-norms
    are scaled by ``1 + scale`` and the residual branches gated by ``tanh(gate)`` from ``adaln``."""

    def __init__(self, dim: int, heads: int, eps: float, qk_norm: bool, modulation: bool):
        super().__init__()
        self.attention = ZImageAttention(dim, heads, qk_norm)
        self.feed_forward = SwiGLU(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, eps)
        self.ffn_norm1 = RMSNorm(dim, eps)
        self.attention_norm2 = RMSNorm(dim, eps)
        self.ffn_norm2 = RMSNorm(dim, eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_DIM), 4 * dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor,
                adaln: torch.Tensor | None = None) -> torch.Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, freqs))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        x = x + gate_msa * self.attention_norm2(self.attention(self.attention_norm1(x) * scale_msa, mask, freqs))
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm scaled by ``1 + Linear(silu(adaln))``, then the patch head."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_DIM), dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = (1.0 + self.adaLN_modulation(adaln)).unsqueeze(1)
        return self.linear(self.norm_final(x) * scale)


class TimestepEmbedder(nn.Module):
    """``[cos, sin]`` features of ``t`` (float32) -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, TIME_MID_DIM), nn.SiLU(), nn.Linear(TIME_MID_DIM, out))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def _length_mask(lengths: list[int], device: torch.device) -> torch.Tensor | None:
    """(B, max) True on each row's first ``lengths[i]`` positions; None when all lengths are equal
    (diffusers passes no mask then, and SDPA without one takes another code path)."""
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return None
    return torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


class ZImageTransformer2DModel(ModelModule):
    """Z-Image transformer. ``forward(latents, t, captions, caption_lengths) -> (B, C, H, W)``: the
    model's raw output for latents ``(B, C, H, W)`` at ``t`` (B,) in [0, 1] (1 = clean, as
    ZImagePipeline passes ``(1000 - timestep) / 1000``), with ``captions`` (B, L, cap_feat_dim) of
    which row ``i`` uses its first ``caption_lengths[i]`` tokens."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_zimage_config(config)
        self.config = cfg
        dim, heads, eps = cfg["dim"], cfg["n_heads"], cfg["norm_eps"]
        channels = cfg["in_channels"]
        self.patch = 2
        self.all_x_embedder = nn.ModuleDict({"2-1": nn.Linear(4 * channels, dim)})
        self.all_final_layer = nn.ModuleDict({"2-1": FinalLayer(dim, 4 * channels)})
        self.noise_refiner = nn.ModuleList(ZImageBlock(dim, heads, eps, cfg["qk_norm"], True)
                                           for _ in range(cfg["n_refiner_layers"]))
        self.context_refiner = nn.ModuleList(ZImageBlock(dim, heads, eps, cfg["qk_norm"], False)
                                             for _ in range(cfg["n_refiner_layers"]))
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_DIM))
        self.cap_embedder = nn.Sequential(RMSNorm(cfg["cap_feat_dim"], eps), nn.Linear(cfg["cap_feat_dim"], dim))
        self.x_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.cap_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.layers = nn.ModuleList(ZImageBlock(dim, heads, eps, cfg["qk_norm"], True) for _ in range(cfg["n_layers"]))
        self._rope: list[torch.Tensor] | None = None  # per-axis tables, built on first use (not state)

    # ----------------------------------------------------------------------------- positions
    def _freqs(self, ids: torch.Tensor) -> torch.Tensor:
        """RoPE factors (..., head_dim/2) complex64 of integer position ids (..., 3)."""
        if self._rope is None or self._rope[0].device != ids.device:
            tables = _rope_tables(self.config["axes_dims"], self.config["axes_lens"], self.config["rope_theta"])
            self._rope = [t.to(ids.device) for t in tables]
        return torch.cat([table[ids[..., axis]] for axis, table in enumerate(self._rope)], dim=-1)

    def _check_positions(self, caption_tokens: int, rows: int, cols: int) -> None:
        lens = self.config["axes_lens"]
        if caption_tokens + 1 >= lens[0] or rows > lens[1] or cols > lens[2]:
            raise ValueError(f"zimage transformer: {caption_tokens} padded caption tokens and a {rows}x{cols} patch "
                             f"grid exceed the RoPE tables (axes_lens {lens}); use fewer tokens or a smaller image")

    # ------------------------------------------------------------------------------- forward
    def forward(self, latents: torch.Tensor, t: torch.Tensor, captions: torch.Tensor,
                caption_lengths) -> torch.Tensor:
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg["in_channels"] or latents.shape[2] % 2 or latents.shape[3] % 2:
            raise ValueError(f"latents: expected (B, {cfg['in_channels']}, H, W) with even H and W, "
                             f"got shape {tuple(latents.shape)}")
        batch, channels, height, width = latents.shape
        if captions.ndim != 3 or captions.shape[0] != batch or captions.shape[2] != cfg["cap_feat_dim"]:
            raise ValueError(f"captions: expected ({batch}, tokens, {cfg['cap_feat_dim']}), "
                             f"got shape {tuple(captions.shape)}")
        lengths = [int(n) for n in caption_lengths]
        if len(lengths) != batch or not all(0 < n <= captions.shape[1] for n in lengths):
            raise ValueError(f"caption_lengths: expected {batch} lengths in 1..{captions.shape[1]}, got {lengths}")
        device = latents.device
        rows, cols = height // 2, width // 2
        tokens = rows * cols
        x_len = padded_length(tokens)
        cap_lens = [padded_length(n) for n in lengths]
        self._check_positions(max(cap_lens), rows, cols)

        adaln = self.t_embedder(t * cfg["t_scale"]).type_as(latents)

        # image tokens: 2x2 patches, (ph, pw, c) inside a token; padded with the last token, whose
        # embeddings become x_pad_token
        patches = latents.view(batch, channels, rows, 2, cols, 2).permute(0, 2, 4, 3, 5, 1).reshape(batch, tokens, -1)
        if x_len > tokens:
            patches = torch.cat([patches, patches[:, -1:].expand(-1, x_len - tokens, -1)], dim=1)
        x = self.all_x_embedder["2-1"](patches)
        if x_len > tokens:
            is_pad = (torch.arange(x_len, device=device) >= tokens)[None, :, None]
            x = torch.where(is_pad, self.x_pad_token, x)
        grid = torch.stack(torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device),
                                          indexing="ij"), dim=-1).reshape(tokens, 2)
        x_ids = torch.zeros(batch, x_len, 3, dtype=torch.long, device=device)
        x_ids[:, :tokens, 1:] = grid
        x_ids[:, :tokens, 0] = torch.tensor(cap_lens, device=device)[:, None] + 1
        x_freqs = self._freqs(x_ids)
        for layer in self.noise_refiner:
            x = layer(x, None, x_freqs, adaln)

        # caption tokens: each row's real tokens, padded to its own multiple of 32 (last token,
        # then cap_pad_token), rows zero-padded to the longest
        longest = max(cap_lens)
        positions = torch.arange(longest, device=device)
        index = torch.minimum(positions[None, :], torch.tensor(lengths, device=device)[:, None] - 1)
        cap = torch.gather(captions, 1, index[..., None].expand(-1, -1, captions.shape[2]))
        cap = self.cap_embedder(cap)
        is_pad = (positions[None, :] >= torch.tensor(lengths, device=device)[:, None])[..., None]
        cap = torch.where(is_pad, self.cap_pad_token, cap)
        beyond = (positions[None, :] >= torch.tensor(cap_lens, device=device)[:, None])[..., None]
        cap = cap.masked_fill(beyond, 0.0)
        cap_ids = torch.zeros(batch, longest, 3, dtype=torch.long, device=device)
        cap_ids[..., 0] = positions[None, :] + 1
        cap_freqs = self._freqs(cap_ids).masked_fill(beyond, 0)
        cap_mask = _length_mask(cap_lens, device)
        for layer in self.context_refiner:
            cap = layer(cap, cap_mask, cap_freqs)

        # one sequence per row: [image tokens, the row's caption tokens], rows zero-padded
        unified = torch.cat([x, cap], dim=1)
        freqs = torch.cat([x_freqs, cap_freqs], dim=1)
        mask = _length_mask([x_len + n for n in cap_lens], device)
        for layer in self.layers:
            unified = layer(unified, mask, freqs, adaln)
        out = self.all_final_layer["2-1"](unified, adaln)[:, :tokens]
        return out.reshape(batch, rows, cols, 2, 2, channels).permute(0, 5, 1, 3, 2, 4).reshape(
            batch, channels, height, width)
