"""Shared fixtures. Areas add their own fixture modules under tests/ and list them in pytest_plugins."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Keep the built-in model cache and any other cache of the suite out of the user's home.
os.environ.setdefault("BATCHGEN_CACHE", tempfile.mkdtemp(prefix="batchgen-test-cache-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

pytest_plugins: list[str] = ["tests.fixtures_s3", "tests.fixtures_ray", "tests.fixtures_jobs", "tests.fixtures_cluster"]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """Path to a tiny random-weight SD1-layout diffusers folder (seed 0)."""
    from batchgen.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "sd1"
    make_tiny_model(path, variant="sd1", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """Path to a tiny random-weight SD2-layout (v-prediction, linear proj) diffusers folder."""
    from batchgen.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "sd2"
    make_tiny_model(path, variant="sd2", seed=0)
    return path


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter teardown once pytest has reported everything.

    A full run once passed every test and then died of SIGSEGV during interpreter teardown (Ray's
    core-worker threads writing their log after ray.shutdown, pyarrow's S3 SDK destroyed out of
    order: native destructors racing at exit), turning a green suite into exit code 139. CI reads
    the exit code, so: shut Ray and pyarrow's S3 down while the interpreter is whole, flush, and
    exit with pytest's own status."""
    import sys

    if not _EXIT_STATUS or os.environ.get("BATCHGEN_TEST_NORMAL_EXIT"):
        return
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    from batchgen.cli import finalize_s3

    finalize_s3()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
