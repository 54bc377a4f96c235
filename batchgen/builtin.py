"""Built-in models: the ``builtin:NAME`` registry, and resolving any model URI to a local path.

The built-in models are tiny random-weight checkpoints (:mod:`batchgen.tiny`) built once into the
user cache (``$BATCHGEN_CACHE`` or ``~/.cache/batchgen``) and reused by every run, and
``builtin:null`` (:mod:`batchgen.nullmodel`): no weights, seeded noise, for dry runs of a job. This module sits
above both ``checkpoints/`` (reading folders and files) and ``tiny/`` (which writes folders with the
checkpoint helpers): each of them only imports downward, and code that takes a model URI from a
user (pipeline, pre-flight, inspect) resolves it here.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoints import BUILTIN_PREFIX, local_model_path
from .nullmodel import NULL_NAME
from .storage import cache_root, file_lock
from .tiny import TINY_FORMAT, make_tiny_model

log = logging.getLogger(__name__)

# builtin:NAME -> (variant, seed)
BUILTINS = {"tiny": ("sd1", 0), "tiny-sd1": ("sd1", 0), "tiny-sd2": ("sd2", 0), "tiny-sdxl": ("sdxl", 0),
            "tiny-sdxl-refiner": ("sdxl-refiner", 0), "tiny-sd3": ("sd3", 0), "tiny-sd35": ("sd35", 0),
            "tiny-dit": ("dit", 0), "tiny-sd1-inpaint": ("sd1-inpaint", 0),
            "tiny-sdxl-inpaint": ("sdxl-inpaint", 0)}
BUILTINS.update({"tiny-flux-schnell": ("flux-schnell", 0), "tiny-flux-dev": ("flux-dev", 0),
                 "tiny-flux-fill": ("flux-fill", 0)})
BUILTINS["tiny-zimage"] = ("zimage", 0)
# ControlNets for builtin:tiny and builtin:tiny-sdxl: load_pipeline(..., controlnets=["builtin:..."])
BUILTINS.update({"tiny-sd1-controlnet": ("sd1-controlnet", 0), "tiny-sdxl-controlnet": ("sdxl-controlnet", 0)})
# IP-Adapters (weight file + image_encoder/) for them: load_pipeline(..., ip_adapter="builtin:...")
BUILTINS.update({"tiny-sd1-ip-adapter": ("sd1-ip-adapter", 0), "tiny-sdxl-ip-adapter": ("sdxl-ip-adapter", 0)})
# ... and for builtin:tiny-sd3 and builtin:tiny-flux-dev
BUILTINS.update({"tiny-sd3-controlnet": ("sd3-controlnet", 0), "tiny-flux-controlnet": ("flux-controlnet", 0)})
BUILTINS[NULL_NAME] = (None, 0)  # no weights: jobs render seeded noise (batchgen.nullmodel)


def builtin_model_path(name: str) -> Path:
    """Path of built-in model ``name`` (``tiny``, ``tiny-sdxl`` ...), building it on first use.

    Concurrent callers (several actors on one node) build it once: a file lock serialises them and
    the folder appears atomically by rename.
    """
    if name not in BUILTINS:
        raise ValueError(f"model: unknown built-in model 'builtin:{name}'; known: "
                         + ", ".join(f"builtin:{n}" for n in BUILTINS))
    variant, seed = BUILTINS[name]
    if variant is None:
        raise ValueError(f"model: builtin:{name} has no weights to load: it renders seeded noise in jobs "
                         "(batchgen run, dry runs); use builtin:tiny for a loadable pipeline")
    target = cache_root() / "builtin" / f"tiny-{variant}-seed{seed}-f{TINY_FORMAT}"
    # a pipeline folder has model_index.json, a component folder (a ControlNet) config.json, an
    # IP-Adapter folder its weight file and image_encoder/
    built = target / ("config.json" if variant.endswith("-controlnet") else
                      "image_encoder/config.json" if variant.endswith("-ip-adapter") else "model_index.json")
    if built.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if built.is_file():
            return target
        log.info("building built-in model builtin:%s into %s", name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            make_tiny_model(tmp / "m", variant=variant, seed=seed)
            os.replace(tmp / "m", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_uri(uri: str | Path, storage_config=None) -> Path:
    """A model URI as a local path: ``builtin:NAME`` (built on first use), a local path, ``file://``
    or ``s3://`` (downloaded once into the cache)."""
    text = str(uri)
    if text.startswith(BUILTIN_PREFIX):
        return builtin_model_path(text[len(BUILTIN_PREFIX):])
    return local_model_path(text, storage_config)
