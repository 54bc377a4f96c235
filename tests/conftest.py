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
