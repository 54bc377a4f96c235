"""Module-level parity helpers: a diffusers module and ours holding the very same (perturbed) weights."""

from __future__ import annotations

import torch


def public(config: dict) -> dict:
    """A diffusers config without its ``_class_name`` / ``_diffusers_version`` entries (constructor kwargs)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (zero-initialised output layers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def module_pair(reference_cls, our_cls, config: dict, seed: int):
    """``(reference, ours)`` in eval mode: the diffusers module built from ``config`` and perturbed
    with ``seed``, and ours built from the same config with its state dict loaded strictly."""
    torch.manual_seed(0)
    ref = reference_cls(**public(config)).eval()
    perturb(ref, seed)
    ours = our_cls(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours
