"""batchgen: distributed, reproducible batch image generation for Stable-Diffusion-family models."""

__version__ = "0.2.0"

__all__ = ["__version__", "load_pipeline"]


def load_pipeline(path, device=None, dtype=None, **options):
    """Load a checkpoint (diffusers folder, file://, s3://, ``builtin:tiny``) into a ready Pipeline.

    ``device``/``dtype`` None pick cuda + float16 when a GPU is present, else cpu + float32.
    ``options``: ``variant`` ("fp16"), ``allow_pickle``, ``storage_config`` (for s3:// models).
    """
    from .pipeline import load_pipeline as _load

    return _load(path, device=device, dtype=dtype, **options)
