"""A worker node dies mid-job (``ray.cluster_utils.Cluster``): the job completes, exactly once, and
every image's bytes equal a clean run's.

Head (no GPUs) + two worker nodes with one logical GPU each, so generator actors only live on the
workers. Once images exist, the node of a running generator actor is removed (its raylet, workers
and object store are killed, like a preempted spot instance). The items it held are re-rendered on
the other node. Then a clean run of the same spec on the surviving node gives the reference bytes.

The cluster lives in a child process with its own RAY_TMPDIR, so it cannot meet a Ray session of
another test in this pytest process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures_cluster import DRIVER, _base_env, read_output, write_job

pytestmark = pytest.mark.timeout(360)

ORCHESTRATOR = r"""
import json, os, subprocess, sys, tempfile, time
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="bgnf-")
from ray.cluster_utils import Cluster

driver_src, spec, clean_spec, out_dir, result_path = sys.argv[1:6]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
result = {"removed": None}

def run_driver(spec_path, log_name, on_progress=None):
    with open(os.path.join(os.path.dirname(out_dir), log_name), "wb") as log:
        p = subprocess.Popen([sys.executable, "-c", driver_src, cluster.address, spec_path],
                             stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 150
    while p.poll() is None and time.time() < deadline:
        if on_progress:
            on_progress()
        time.sleep(0.1)
    if p.poll() is None:
        p.kill()
    return p.wait()

def maybe_remove_node():
    if result["removed"]:
        return
    images = os.path.join(out_dir, "images")
    done = len(os.listdir(images)) if os.path.isdir(images) else 0
    if done < 1:
        return
    actor_nodes = {a["Address"]["NodeID"] for a in cluster.global_state.actor_table(None).values()
                   if a["State"] == "ALIVE" and "GeneratorActor" in a["ActorClassName"]}
    for node in workers:
        if node.node_id in actor_nodes:
            cluster.remove_node(node, allow_graceful=False)
            result["removed"] = {"node_id": node.node_id, "images_done": done, "actor_nodes": len(actor_nodes)}
            return

try:
    result["rc_faulty"] = run_driver(spec, "driver-faulty.log", maybe_remove_node)
    result["rc_clean"] = run_driver(clean_spec, "driver-clean.log")
    result["alive_nodes"] = sum(1 for n in cluster.global_state.node_table() if n["Alive"])
finally:
    with open(result_path, "w") as f:
        json.dump(result, f)
    cluster.shutdown()
    import shutil
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
"""


def test_node_removed_mid_job_completes_exactly_once_with_clean_bytes(tmp_path, tiny_sd1):
    n = 48
    spec, ids = write_job(tmp_path, tiny_sd1, n_items=n, gpus_per_worker=1, min_workers=2, max_workers=2,
                          out_name="faulty", steps=12)
    clean_spec, _ = write_job(tmp_path, tiny_sd1, n_items=n, gpus_per_worker=1, min_workers=1,
                              max_workers=1, out_name="clean", steps=12)
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-c", ORCHESTRATOR, DRIVER, str(spec), str(clean_spec), str(tmp_path / "faulty"),
         str(result_path)],
        env=_base_env(), capture_output=True, text=True, timeout=330,
    )
    logs = "".join((tmp_path / f).read_text()[-3000:] for f in ("driver-faulty.log", "driver-clean.log")
                   if (tmp_path / f).exists())
    assert result_path.exists(), proc.stderr[-4000:]
    result = json.loads(result_path.read_text())
    assert result["removed"], f"no generator node was removed mid-job: {result}\n{logs}"
    assert result["removed"]["images_done"] < n, result
    assert result["rc_faulty"] == 0, logs
    assert result["rc_clean"] == 0, logs
    assert result["alive_nodes"] == 2  # head + the surviving worker

    faulty = read_output(tmp_path / "faulty")  # one ok row and one image per item, sha256 checked
    clean = read_output(tmp_path / "clean")
    assert sorted(faulty) == sorted(clean) == ids
    differing = [i for i in ids if faulty[i] != clean[i]]
    assert not differing, f"{len(differing)} images differ from the clean run: {differing[:5]}"
