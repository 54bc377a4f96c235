"""Autoscaling with Ray's fake_multinode provider: GPU worker nodes appear for the job, go after it.

Head: no GPUs. Node type ``gpu``: 1 logical GPU + 2 CPUs, min 0 / max 2. A job with
``max_workers: 2, gpus_per_worker: 1`` must take the cluster from 1 node to 3, finish exactly once,
and the autoscaler must remove the idle GPU nodes afterwards.
"""

from __future__ import annotations

import time

import pytest

from tests.fixtures_cluster import FakeAutoscalingCluster, read_output, start_driver, write_job

pytestmark = pytest.mark.timeout(300)


def test_job_scales_gpu_nodes_up_and_releases_them(tmp_path, tiny_sd1):
    cluster = FakeAutoscalingCluster(
        head_cpus=2,
        worker_types={"gpu": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {},
                              "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=0.1,
    ).start()
    try:
        assert len(cluster.nodes()) == 1
        spec_path, ids = write_job(tmp_path, tiny_sd1, n_items=8, gpus_per_worker=1,
                                   min_workers=1, max_workers=2)
        log = tmp_path / "driver.log"
        driver = start_driver(cluster.address, spec_path, log)
        max_nodes, gpu_nodes_seen = 1, set()
        deadline = time.time() + 200
        while driver.poll() is None and time.time() < deadline:
            nodes = cluster.nodes()
            max_nodes = max(max_nodes, len(nodes))
            gpu_nodes_seen |= {n["node_id"] for n in nodes if n["resources"].get("GPU")}
            time.sleep(1)
        if driver.poll() is None:
            driver.kill()
        assert driver.wait() == 0, log.read_text()[-4000:]
        assert max_nodes >= 3, f"cluster never grew to 3 nodes (max {max_nodes})\n{log.read_text()[-3000:]}"
        assert len(gpu_nodes_seen) >= 2

        images = read_output(tmp_path / "out")  # exactly once: one ok row + one image per input item
        assert sorted(images) == ids

        # The autoscaler releases the idle GPU nodes (idle_timeout 6 s) once the request is cleared.
        deadline = time.time() + 90
        while time.time() < deadline and len(cluster.nodes()) > 1:
            time.sleep(1)
        remaining = cluster.nodes()
        assert len(remaining) == 1 and not remaining[0]["resources"].get("GPU"), remaining
    finally:
        cluster.stop()
