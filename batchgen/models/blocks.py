"""Shared building blocks of the LDM family: timestep embedding, resnet, up/downsample, attention.

Parameter names equal diffusers' state-dict keys (``norm1``, ``conv1``, ``time_emb_proj``,
``to_q``, ``to_out.0``, ``ff.net.0.proj`` ...) so a diffusers-layout state dict loads with
``load_state_dict(strict=True)`` and no key conversion. Numerics follow diffusers' default
(torch >= 2 ``scaled_dot_product_attention``) code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

SUPPORTED_ACTIVATIONS = ("silu", "swish")


class ModelModule(nn.Module):
    """A top-level model (denoiser, VAE): its dtype and device are those of its parameters."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def check_text_inputs(encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, batch: int,
                      cfg: dict) -> None:
    """Shapes of a transformer's text conditioning: ``(batch, tokens, joint_attention_dim)`` tokens
    and a ``(batch, pooled_projection_dim)`` pooled vector (SD3's MMDiT, FLUX)."""
    context_shape = tuple(encoder_hidden_states.shape)
    if len(context_shape) != 3 or context_shape[0] != batch or context_shape[2] != cfg["joint_attention_dim"]:
        raise ValueError(f"encoder_hidden_states: expected ({batch}, tokens, {cfg['joint_attention_dim']}), "
                         f"got shape {context_shape}")
    if tuple(pooled_projections.shape) != (batch, cfg["pooled_projection_dim"]):
        raise ValueError(f"pooled_projections: expected ({batch}, {cfg['pooled_projection_dim']}), "
                         f"got shape {tuple(pooled_projections.shape)}")


def check_activation(name, key: str = "act_fn") -> None:
    """Raise CheckpointError naming ``key`` unless ``name`` is SiLU (the only one SD uses)."""
    if name not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(
            f"config key {key!r}: activation {name!r} is not supported (supported: silu)"
        )


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding ``(N, dim)`` float32 of a 1-D tensor of (possibly fractional) timesteps."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps: expected a 1-D tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    """Parameter-free :func:`timestep_embedding` of a 1-D tensor (diffusers' ``Timesteps``).

    A module rather than a bare call so that the UNet's structure mirrors diffusers' (``add_time_proj``
    of SDXL embeds micro-conditioning ids exactly as ``time_proj`` embeds the timestep).
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos, self.freq_shift = num_channels, flip_sin_to_cos, freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear over the sinusoidal embedding (keys ``linear_1``, ``linear_2``)."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added after the first conv, 1x1 shortcut if needed."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = None,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (key ``conv``); padding 0 pads right/bottom by one first (the VAE encoder)."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x (or to ``output_size``) then 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if x.shape[0] >= 64:
            x = x.contiguous()
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False):
    """Multi-head SDPA over ``(B, N, heads*d)`` projections; ``upcast`` computes it in float32."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * d).to(dtype)


class Attention(nn.Module):
    """Self- or cross-attention (keys ``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    A UNet's cross-attention layers also take IP-Adapter image tokens (decoupled cross-attention,
    :mod:`batchgen.models.ip_adapter`): ``context`` is then ``(text states, (keys_values, scales))``
    with each layer's precomputed image keys / values (picked by ``ip_slot``, which the UNet sets)
    and per-row scales (rows, 1, 1), and the image attention, times its row's scale, is added to
    the text attention before ``to_out`` (diffusers' ``IPAdapterAttnProcessor2_0``).
    """

    ip_slot: int | None = None  # this layer's index among the UNet's cross-attention layers

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=True)])

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        image = None
        if isinstance(context, tuple):
            context, image = context
        context = x if context is None else context
        q = self.to_q(x)
        out = attention(q, self.to_k(context), self.to_v(context), self.heads, self.upcast)
        if image is not None and self.ip_slot is not None:
            keys_values, scales = image
            k, v = keys_values[self.ip_slot]
            # a float32 scale x the image attention, rounded once: diffusers' python-float multiply
            out = out + (scales * attention(q, k, v, self.heads, self.upcast)).to(out.dtype)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear to 2x width, value * gelu(gate) (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x inner width (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text states, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head, None, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, proj_in (1x1 conv or linear), N blocks, proj_out, residual."""

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        upcast_attention: bool,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast_attention)
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, -1))
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, x.shape[1])
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return x + residual
