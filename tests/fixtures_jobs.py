"""Helpers and fixtures for the job tests: prompt Parquet writers and small job specs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def write_prompts(path, n: int, start: int = 0, **columns) -> Path:
    """A prompt Parquet with ``n`` rows (prompt "prompt i"), plus any extra columns given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"prompt": [f"prompt {i}" for i in range(start, start + n)]}
    data.update(columns)
    pq.write_table(pa.table(data), path)
    return path


def job_dict(input_uri, output_uri, **sections) -> dict:
    """A small fast job: tiny model, 64x64, 2 steps, batch 2, one CPU worker."""
    spec = {
        "name": "test",
        "input": {"uri": str(input_uri)},
        "model": {"uri": "builtin:tiny"},
        "sampling": {"steps": 2, "width": 64, "height": 64, "guidance_scale": 5.0},
        "output": {"uri": str(output_uri)},
        "compute": {"batch_size": 2, "gpus_per_worker": 0, "min_workers": 1, "max_workers": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            spec.setdefault(section, {}).update(values)
        else:
            spec[section] = values
    return spec


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_digests(out_dir) -> dict[str, str]:
    """{file name: sha256} of every image in a local job output."""
    return {p.name: sha256_file(p) for p in sorted(Path(out_dir, "images").iterdir())}


@pytest.fixture(scope="session")
def builtin_tiny():
    """Build ``builtin:tiny`` into the test cache once, before any actor needs it."""
    from batchgen.builtin import builtin_model_path

    return builtin_model_path("tiny")
