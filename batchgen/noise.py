"""Seeds -> per-item noise streams: the reproducibility core.

Every random draw for an item comes from that item's own CPU ``torch.Generator`` seeded with its
seed, drawn in float32 on the CPU with shape ``(1, *item_shape)`` and only then moved to the
device and cast. This is exactly how diffusers' pipelines draw from a per-item list of generators
(``randn_tensor(shape, generator=[...])``), so the same seed gives the same noise as diffusers on
any machine. Batch composition never changes an item's stream: padding items get generators of
their own.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import torch  # imported where noise is drawn: the pre-flight's seed helpers must not pay for it

SEED_LIMIT = 2**63  # seeds are unsigned 63-bit integers: 0 <= seed < 2**63


def check_seed(seed, where: str = "seed") -> int:
    """Return ``seed`` as int, or raise ValueError naming ``where`` if it is not in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, (int,)) and not hasattr(seed, "__index__"):
        raise ValueError(f"{where}: seed must be an integer in [0, 2**63), got {seed!r}")
    value = int(seed)
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{where}: seed {value} is outside [0, 2**63)")
    return value


def check_seeds(seeds: Sequence, count: int, name: str = "seeds") -> list[int]:
    """Validate a seeds list against the number of items it must cover."""
    seeds = list(seeds)
    if len(seeds) != count:
        raise ValueError(f"{name}: expected {count} seeds (one per prompt), got {len(seeds)}")
    return [check_seed(s, f"{name}[{i}]") for i, s in enumerate(seeds)]


def derive_seed(job_seed: int, item_id: str) -> int:
    """Stable per-item seed from (job seed, item id): first 8 bytes of sha256, top bit cleared."""
    job_seed = check_seed(job_seed, "job seed")
    digest = hashlib.sha256(f"{job_seed}:{item_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (SEED_LIMIT - 1)


def item_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per item, seeded with the item's seed."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def randn_items(
    generators: Sequence[torch.Generator],
    item_shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Draw ``(len(generators), *item_shape)`` standard normal noise, one item per generator.

    Each item is drawn on the CPU in float32 as ``(1, *item_shape)`` from its own generator (the
    diffusers per-item order), then the batch is moved to ``device`` and cast to ``dtype`` (None: float32).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    shape = (1, *tuple(int(d) for d in item_shape))
    draws = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators], dim=0)
    if torch.device(device).type == "cuda":  # pinned + non_blocking: the copy does not stall the host
        draws = draws.pin_memory()
        return draws.to(device=device, non_blocking=True).to(dtype)
    return draws.to(device=device, dtype=dtype)
