"""Model families batchgen renders, keyed by the diffusers pipeline class in ``model_index.json``.

To add a family: write ``families/<name>.py`` with a :class:`~batchgen.families.base.Family`
subclass (components, prompt encoding, denoiser call, latent format, defaults), register any new
component class with :func:`batchgen.checkpoints.register_model_class`, and add its module here.
"""

from __future__ import annotations

import importlib

from ..errors import CheckpointError

# family module -> the class it defines; a module lists its pipeline classes itself.
FAMILIES: dict[str, str] = {
    "sd": "StableDiffusion",
    "sdxl": "StableDiffusionXL",
    "sd3": "StableDiffusion3",
    "dit": "DiT",
    "flux": "Flux",
    "zimage": "ZImage",
}


def family_classes() -> list[type]:
    return [getattr(importlib.import_module(f".{module}", __name__), cls) for module, cls in FAMILIES.items()]


def family_for(folder) -> type:
    """The family class for a diffusers folder's ``_class_name``; unknown classes name the known ones."""
    name = folder.pipeline_class
    known = {}
    for cls in family_classes():
        for pipeline_class in cls.pipeline_classes:
            known[pipeline_class] = cls
    if name not in known:
        listing = "; ".join(f"{c.name}: {', '.join(c.pipeline_classes)}" for c in family_classes())
        raise CheckpointError(f"{folder.root}/model_index.json: pipeline class {name!r} is not a model family "
                              f"batchgen renders (known families: {listing})")
    return known[name]


__all__ = ["FAMILIES", "family_for", "family_classes"]
