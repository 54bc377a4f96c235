"""A local Ray for the job tests: 4 logical CPUs and 2 logical GPUs on this machine.

``ray_local`` (module scope) starts Ray unless one is already initialized (then it is reused and
left running). It depends on ``s3_server`` so the test AWS credentials and region are in the
environment *before* Ray starts: workers inherit the environment of the process that started Ray.
The Ray is private (``address="local"``: never a cluster named in /tmp/ray/ray_current_cluster)
and keeps its session files in a temp folder of its own, removed afterwards.

``ray_tmpdir`` gives a subprocess a private ``RAY_TMPDIR`` (removed afterwards), so a
``batchgen run`` started by a test leaves no Ray session behind and cannot see other Rays' files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
    temp = tempfile.mkdtemp(prefix="bgt-")  # short: Ray's socket paths live below it
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, object_store_memory=300 * 2**20,
             log_to_driver=False, configure_logging=False, _temp_dir=temp)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_tmpdir():
    """A private RAY_TMPDIR for `batchgen run` subprocesses (removed afterwards)."""
    temp = tempfile.mkdtemp(prefix="bgt-")
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def subprocess_env(ray_tmpdir: str, **extra: str) -> dict:
    """The environment for a `batchgen` subprocess: this checkout importable, a private Ray temp dir,
    no RAY_ADDRESS inherited."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["RAY_TMPDIR"] = ray_tmpdir
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env
