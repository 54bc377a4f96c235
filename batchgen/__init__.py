"""batchgen: distributed, reproducible batch image generation for Stable-Diffusion-family models."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_pipeline"]


def load_pipeline(path, device=None, dtype=None, variant=None):
    """Load a checkpoint (diffusers folder, ``builtin:tiny`` ...) into a ready :class:`Pipeline`.

    ``device``/``dtype`` None pick cuda + float16 when a GPU is present, else cpu + float32.
    """
    from .pipeline import load_pipeline as _load

    return _load(path, device=device, dtype=dtype, variant=variant)
