"""Tiny DiT checkpoint (learned sigma, a 4-channel VAE), loadable by diffusers' ``DiTPipeline``.

``id2label`` sits in ``model_index.json``, where the hub's DiT folders keep it and DiTPipeline reads
it (an ``__init__`` argument). It lists a few ImageNet classes under their real ids, one of them
with several comma-separated names, as the real table has. The class table keeps ImageNet's 1000
classes (``num_embeds_ada_norm``) because DiTPipeline hard-codes 1000 as the null class id for
guidance; 1000 rows of 32 floats cost nothing.
"""

from __future__ import annotations

import copy

from .common import FolderWriter

ID2LABEL = {
    "0": "tench, Tinca tinca",
    "1": "goldfish, Carassius auratus",
    "88": "macaw",
    "207": "golden retriever",
    "279": "arctic fox, white fox, Alopex lagopus",
    "281": "tabby, tabby cat",
    "360": "otter",
    "417": "balloon",
    "437": "beacon, lighthouse, beacon light, pharos",
    "511": "convertible",
    "980": "volcano",
}


def scheduler_config() -> dict:
    """facebook/DiT-XL-2-256/scheduler/scheduler_config.json."""
    return {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
            "steps_offset": 0, "trained_betas": None}


def build(out: FolderWriter, variant: str) -> None:
    import torch

    from ..models import VAE_TINY, AutoencoderKL, DiTTransformer2DModel
    from ..models.dit import DIT_TINY

    out.scheduler(scheduler_config())
    transformer_config = {**copy.deepcopy(DIT_TINY), "num_embeds_ada_norm": 1000}
    vae_config = copy.deepcopy(VAE_TINY)
    with torch.device("cpu"):
        out.model("transformer", "diffusers", "DiTTransformer2DModel", transformer_config,
                  DiTTransformer2DModel(transformer_config))
        out.model("vae", "diffusers", "AutoencoderKL", vae_config, AutoencoderKL(vae_config))
    out.finish(id2label=dict(ID2LABEL))
