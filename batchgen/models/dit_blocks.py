"""Building blocks shared by the patch transformers (class-conditional DiT and SD3's MMDiT).

Both architectures turn a latent into a sequence of patch tokens with a strided conv plus a fixed
2-D sin-cos position table, steer every block through adaLN-Zero (a SiLU -> Linear projection of
the conditioning vector into shift / scale / gate triples), use a tanh-GELU MLP, and fold the
tokens back into a latent at the end. Keeping these pieces here, once, is what makes the two model
files read as "the same skeleton, different conditioning".

Parameter names equal diffusers' state-dict keys (``pos_embed.proj``, ``norm1.linear``,
``ff.net.0.proj``, ``ff.net.2`` ...). The arithmetic follows diffusers op for op (same dtypes, same
order, same memory layout where a kernel could see it), so float32 outputs are bitwise equal.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- position table


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``(M, dim)`` [sin | cos] of positions ``pos`` at ``dim/2`` geometric frequencies (float64)."""
    # float64 frequencies (float32 where the device has no float64) as diffusers computes them.
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = torch.arange(dim // 2, dtype=dtype, device=pos.device)
    omega = omega / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.outer(pos.reshape(-1), omega)  # float32 positions promote to omega's dtype
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_table(
    dim: int,
    grid_h: int,
    grid_w: int,
    base_size: int,
    interpolation_scale: float = 1.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``(1, grid_h*grid_w, dim)`` float32, row-major over (row, column).

    Positions are rescaled so that ``base_size`` patches span the same range at any grid size (the
    DiT / SD3 convention). The first ``dim/2`` channels encode the column, the last ``dim/2`` the row.
    """
    if dim % 4:
        raise ValueError(f"position table: width {dim} must be divisible by 4")
    rows = torch.arange(grid_h, dtype=torch.float32, device=device) / (grid_h / base_size) / interpolation_scale
    cols = torch.arange(grid_w, dtype=torch.float32, device=device) / (grid_w / base_size) / interpolation_scale
    col_pos, row_pos = torch.meshgrid(cols, rows, indexing="xy")  # each (grid_h, grid_w)
    table = torch.cat([_sincos_1d(dim // 2, col_pos), _sincos_1d(dim // 2, row_pos)], dim=1)
    return table.float().unsqueeze(0)


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` latent -> ``(B, H/p * W/p, dim)`` tokens plus the sin-cos position table.

    Without ``pos_embed_max_size`` (DiT) the table for ``sample_size`` is a non-persistent buffer and
    is recomputed for other latent sizes. With it (SD3) one ``max x max`` table is stored in the
    checkpoint (key ``pos_embed.pos_embed``) and the centred window of the latent's size is cut out.
    """

    def __init__(
        self,
        sample_size: int,
        patch_size: int,
        in_channels: int,
        embed_dim: int,
        pos_embed_max_size: int | None = None,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.grid = sample_size // patch_size
        self.base_size = sample_size // patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=(patch_size, patch_size), stride=patch_size)
        side = pos_embed_max_size or self.grid
        table = sincos_pos_table(embed_dim, side, side, self.base_size)
        self.register_buffer("pos_embed", table, persistent=bool(pos_embed_max_size))

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch-grid size of a ``height x width`` latent; ValueError if it cannot be patchified."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"hidden_states: latent size {height}x{width} is not a multiple of patch_size {p}; "
                f"use an image size whose latent side is divisible by {p}"
            )
        gh, gw = height // p, width // p
        limit = self.pos_embed_max_size
        if limit is not None and (gh > limit or gw > limit):
            raise ValueError(
                f"hidden_states: latent size {height}x{width} is {gh}x{gw} patches, more than the "
                f"checkpoint's position table allows (pos_embed_max_size {limit}); use a smaller image size"
            )
        return gh, gw

    def position_table(self, gh: int, gw: int, device: torch.device) -> torch.Tensor:
        if self.pos_embed_max_size is not None:
            side = self.pos_embed_max_size
            top, left = (side - gh) // 2, (side - gw) // 2
            table = self.pos_embed.reshape(1, side, side, -1)[:, top : top + gh, left : left + gw, :]
            return table.reshape(1, -1, table.shape[-1])
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        return sincos_pos_table(self.pos_embed.shape[-1], gh, gw, self.base_size, device=device)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        gh, gw = self.check_size(*latent.shape[-2:])
        tokens = self.proj(latent).flatten(2).transpose(1, 2)  # BCHW -> BNC (a non-contiguous view)
        return (tokens + self.position_table(gh, gw, latent.device)).to(tokens.dtype)


def unpatchify(tokens: torch.Tensor, gh: int, gw: int, patch_size: int, channels: int) -> torch.Tensor:
    """``(B, gh*gw, p*p*C)`` tokens -> ``(B, C, gh*p, gw*p)`` latent (inverse of the patch conv's layout)."""
    p = patch_size
    x = tokens.reshape(tokens.shape[0], gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, gh * p, gw * p)


# --------------------------------------------------------------------------- conditioning


def batch_timesteps(timestep, batch: int, device: torch.device) -> torch.Tensor:
    """A number, 0-dim, ``(1,)`` or ``(batch,)`` tensor -> a ``(batch,)`` tensor on ``device``."""
    t = timestep
    if not torch.is_tensor(t):
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise ValueError(f"timestep: expected a number or tensor, got {type(timestep).__name__}")
        is_int = isinstance(t, numbers.Integral)
        float_dtype = torch.float32 if device.type == "mps" else torch.float64
        t = torch.tensor([t], dtype=torch.int64 if is_int else float_dtype, device=device)
    elif t.ndim == 0:
        t = t[None]
    elif t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"timestep: expected a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t.to(device).expand(batch)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-item ``(B, D)`` shift/scale over the token axis."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: parameter-free LayerNorm modulated by ``Linear(SiLU(cond))`` into six chunks.

    Returns ``(modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp)``; the block applies the
    gates and the MLP modulation itself. ``emb`` (DiT) is a module that builds the conditioning
    vector from ``(timestep, class_labels)`` inside this norm, as diffusers does per block.
    """

    def __init__(self, dim: int, emb: nn.Module | None = None):
        super().__init__()
        self.emb = emb
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(cond)).chunk(6, dim=1)
        return modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


# --------------------------------------------------------------------------- feed-forward


class GELU(nn.Module):
    """Linear then GELU (key ``proj``); ``approximate="tanh"`` is DiT's and SD3's ``gelu-approximate``."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class GELUFeedForward(nn.Module):
    """4x-wide GELU MLP (keys ``net.0.proj``, ``net.2``; ``net.1`` is diffusers' parameter-free dropout)."""

    def __init__(self, dim: int, mult: int = 4, approximate: str = "tanh"):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([GELU(dim, inner, approximate), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x
