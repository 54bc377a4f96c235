"""Float8 (e4m3) weight storage with upcast at the matmul: half the bytes of bf16 weights.

Why: a 12B-parameter FLUX.1 transformer is 23.8 GB in bf16, more than a 24 GB GPU holds next to
its activations; in float8 it is 11.9 GB. Only the *storage* is float8: each quantized layer keeps
its weight as float8_e4m3fn codes plus one float32 scale per tensor (``amax / 448``, so the largest
weight maps to e4m3's largest finite value and small weights keep as much precision as e4m3 has),
and every forward dequantizes the weight to the activation dtype (bf16 on a GPU) just before
``F.linear``. Activations, biases, norms and the layers a family keeps in high precision
(embedders, the output head) are untouched, so this works on any GPU (no fp8 tensor cores needed)
and on the CPU. The cost is one weight-sized dequantize per layer per call: memory traffic that
is small next to the matmul at image-sized token counts.

The float8 codes are held in a ``uint8`` buffer (their bit pattern): ``Module.to(dtype)`` casts
every floating-point tensor, float8 included, so a float8 buffer would be silently widened back to
bf16 by the family's ``to(device, dtype)``; integer buffers move between devices but keep their
dtype.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# FLUX.1 transformer Linears kept in the run dtype under fp8: the input / conditioning embedders and
# the output head (small, and every token passes through them once), as FLUX fp8 checkpoints do.
FLUX_TRANSFORMER_KEEP = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


class Fp8Linear(nn.Module):
    """``nn.Linear`` whose weight is stored as float8 e4m3 codes + a per-tensor float32 scale.

    ``forward(x) = F.linear(x, weight dequantized to x.dtype, bias)``. Built from an existing Linear
    with :meth:`from_linear`. The scale is kept as the bit pattern of a float32 (an int32 buffer) so
    ``Module.to(bf16)`` cannot round it; a zero-size buffer follows the module's dtype and device,
    which is what :attr:`weight` dequantizes to (code such as transformers' T5 reads
    ``layer.weight.dtype``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale_bits", torch.ones((), dtype=torch.float32).view(torch.int32))
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        weight = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, bias=False, dtype=weight.dtype).to(weight.device)
        amax = weight.abs().max().float()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        codes = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        out.weight_codes = codes.view(torch.uint8)
        out.weight_scale_bits = scale.reshape(()).view(torch.int32)
        out.bias = linear.bias
        return out

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.weight_scale_bits.view(torch.float32)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``: e4m3 values are exact in bf16/fp16/fp32; the scale multiplies in ``dtype``."""
        return self.weight_codes.view(FP8_DTYPE).to(dtype) * self.weight_scale.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the module dtype (a fresh tensor on each access)."""
        return self.dequantized_weight(self.dtype_ref.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, storage=float8_e4m3fn")


def quantize_linears(module: nn.Module, keep: Iterable[str] = ()) -> int:
    """Replace every ``nn.Linear`` in ``module`` by an :class:`Fp8Linear`, in place; returns how many.

    ``keep``: qualified-name prefixes (``"x_embedder"``, ``"time_text_embed"``) whose Linears stay
    in their dtype. Quantize on the device the weights are on (the CPU before a model is moved, so
    the full-precision copy never reaches the GPU).
    """
    keep = tuple(keep)
    targets = [(name, child) for name, child in module.named_modules()
               if isinstance(child, nn.Linear) and not any(name == k or name.startswith(k + ".") for k in keep)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, Fp8Linear.from_linear(linear))
    return len(targets)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (float8 codes count one byte each)."""
    tensors = list(module.parameters()) + list(module.buffers())
    seen, total = set(), 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


__all__ = ["FLUX_TRANSFORMER_KEEP", "FP8_DTYPE", "Fp8Linear", "quantize_linears", "weight_bytes"]
