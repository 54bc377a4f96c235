"""IP-Adapter modules: the image projection (plain or Plus) and the decoupled cross-attention weights.

An IP-Adapter turns a CLIP image encoding of a reference image into a few "image tokens" and lets
every cross-attention layer of the UNet attend to them beside the text tokens, with its own key
and value projections (``to_k_ip`` / ``to_v_ip``): ``out = attn(q, k_text, v_text) + scale *
attn(q, to_k_ip(img), to_v_ip(img))`` before the layer's output projection. The UNet side of that
sum lives in :class:`batchgen.models.blocks.Attention`; this module holds the adapter's own weights.

Parameter names are the ones of the files people download (h94/IP-Adapter ``*.safetensors``:
``image_proj.*`` and ``ip_adapter.<n>.to_k_ip.weight``), so a file loads strictly with no key
conversion. ``<n>`` counts the UNet's attention layers self and cross alike (1, 3, 5 ... are the
cross-attention ones) in the order diffusers lists attention processors: down blocks, up blocks,
then the mid block (:meth:`batchgen.models.unet.UNet2DConditionModel.cross_attentions`).

- :class:`ImageProjection` (IP-Adapter): the CLIP image embedding (``image_embeds``) -> Linear ->
  ``tokens`` x cross-attention width -> LayerNorm;
- :class:`Resampler` (IP-Adapter Plus): a perceiver over the encoder's penultimate hidden states:
  learned query latents, ``depth`` blocks of (attention over [states; latents], feed-forward),
  then a projection to the cross-attention width. Computed as diffusers' ``IPAdapterPlusImageProjection``
  computes it (64-wide heads, the fused ``to_kv`` weight used as two projections).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import attention

HEAD_DIM = 64  # IP-Adapter Plus: 64-wide heads (diffusers reads heads = to_q rows // 64)


class ImageProjection(nn.Module):
    """IP-Adapter's projection: image embedding (B, E) -> (B, tokens, C) (keys ``proj``, ``norm``)."""

    def __init__(self, embed_dim: int, tokens: int, cross_dim: int):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(out.reshape(embeds.shape[0], self.tokens, -1))


class PerceiverAttention(nn.Module):
    """Latents attend to [image states; latents] (keys ``norm1``, ``norm2``, ``to_q``, ``to_kv``, ``to_out``)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.heads, self.inner = inner // HEAD_DIM, inner
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        states = self.norm1(x)
        latents = self.norm2(latents)
        both = torch.cat([states, latents], dim=-2)
        weight = self.to_kv.weight  # diffusers splits it into to_k / to_v: the same two matmuls
        k, v = F.linear(both, weight[:self.inner]), F.linear(both, weight[self.inner:])
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear (keys ``0``, ``1``, ``3``), no biases in the Linears."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter Plus: penultimate CLIP states (B, N, E) -> (B, queries, C)."""

    def __init__(self, embed_dim: int, hidden: int, inner: int, cross_dim: int, queries: int, depth: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, hidden))
        self.proj_in = nn.Linear(embed_dim, hidden)
        self.proj_out = nn.Linear(hidden, cross_dim)
        self.norm_out = nn.LayerNorm(cross_dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(hidden, inner), _feed_forward(hidden)])
                                    for _ in range(depth))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(states.shape[0], 1, 1)
        x = self.proj_in(states)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class CrossAttentionIP(nn.Module):
    """One cross-attention layer's image key / value projections (keys ``to_k_ip``, ``to_v_ip``)."""

    def __init__(self, cross_dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, inner, bias=False)


class IPAdapterModel(nn.Module):
    """The weights of one IP-Adapter file: ``image_proj`` and ``ip_adapter.<n>`` (n = 1, 3, 5 ...).

    ``kind``: "plain" (:class:`ImageProjection`, fed the encoder's ``image_embeds``) or "plus"
    (:class:`Resampler`, fed its penultimate hidden states). ``inner`` lists each cross-attention
    layer's attention width, in diffusers' processor order.
    """

    def __init__(self, kind: str, image_proj: nn.Module, cross_dim: int, inner: list[int]):
        super().__init__()
        self.kind = kind
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleDict({str(2 * j + 1): CrossAttentionIP(cross_dim, width)
                                         for j, width in enumerate(inner)})

    @property
    def layers(self) -> list[CrossAttentionIP]:
        return list(self.ip_adapter.values())

    def keys_values(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Projected image tokens (rows, T, C) -> each cross-attention layer's (keys, values):
        the same for every model call of a micro-batch, so computed once per micro-batch."""
        return [(layer.to_k_ip(tokens), layer.to_v_ip(tokens)) for layer in self.layers]


__all__ = ["ImageProjection", "Resampler", "PerceiverAttention", "CrossAttentionIP", "IPAdapterModel", "HEAD_DIM"]
