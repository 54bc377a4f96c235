"""A local Ray for the job tests: 4 logical CPUs and 2 logical GPUs on this machine.

``ray_local`` (module scope) starts Ray unless one is already initialized (then it is reused and
left running). It depends on ``s3_server`` so the test AWS credentials and region are in the
environment *before* Ray starts: workers inherit the environment of the process that started Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local(s3_server):
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # workers must import batchgen even when it is not pip-installed
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, object_store_memory=300 * 2**20,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
