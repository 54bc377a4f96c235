"""Kept for one release: the Ray Data stages moved to :mod:`batchgen.job.stages`. Re-exported."""

from __future__ import annotations

from .job.stages import (  # noqa: F401
    EncodeAndStore, FileChanged, GeneratorActor, ReadRows, _REF_CACHE, _TooLarge, _cached_get, _cpu_name,
    _open_header, _quiet_libraries, _read_init_image, apply_render_env, check_lora_digests, env_differences,
    generate_kwargs, load_renderer, read_init_image, render_env, set_deterministic,
)
