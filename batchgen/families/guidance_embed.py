"""UNets distilled with a guidance embedding: guidance as an input of the network, not two passes.

Latent Consistency Models (LCM-Dreamshaper, LCM-SDXL) and some DMD2 UNets were distilled with the
guidance scale folded in: their UNet config has ``time_cond_proj_dim`` and the time embedding takes
a sinusoidal embedding of ``w = guidance_scale - 1`` (``timestep_cond``). diffusers' SD and SDXL
pipelines (and ``LatentConsistencyModelPipeline``) then run no classifier-free guidance whatever
the guidance scale (``do_classifier_free_guidance`` is false when the UNet has the key): one model
row per item, the negative prompt unused. The same holds here; ``model_info`` records the
embedding width (``guidance_embedding``).

Mixed into the SD and SDXL families ahead of :class:`~.base.Family`; a family whose UNet has no
``time_cond_proj_dim`` behaves exactly as before.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.unet import guidance_scale_embedding
from .base import Batch, Conditioning


class GuidanceEmbedding:
    """Family hooks for UNets with ``time_cond_proj_dim`` (needs ``self.unet``)."""

    @property
    def guidance_embedding_dim(self) -> int | None:
        return self.unet.config.get("time_cond_proj_dim")

    def guided(self, settings: dict[str, Any]) -> bool:
        return self.guidance_embedding_dim is None and super().guided(settings)

    def info(self) -> dict[str, Any]:
        info = super().info()
        if self.guidance_embedding_dim is not None:
            info["guidance_embedding"] = self.guidance_embedding_dim
        return info

    def with_guidance_embedding(self, cond: Conditioning, batch: Batch) -> Conditioning:
        """``cond`` plus ``extra["timestep_cond"]``: one w-embedding row per item (w = guidance - 1)."""
        dim = self.guidance_embedding_dim
        if dim is None:
            return cond
        w = torch.tensor(batch.settings["guidance_scale"] - 1).repeat(batch.size)
        cond.extra["timestep_cond"] = guidance_scale_embedding(w, dim).to(device=self.device, dtype=self.dtype)
        return cond
