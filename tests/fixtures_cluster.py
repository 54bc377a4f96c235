"""Multi-node Ray clusters on one machine for the cluster tests.

- :class:`FakeAutoscalingCluster`: a head started with Ray's ``fake_multinode`` node provider, so the
  real autoscaler adds and removes (fake, same-machine) worker nodes with logical GPUs.
- :class:`LocalHead`: a plain head with the dashboard / Jobs API on 127.0.0.1 (for ``batchgen submit``).

Everything runs with its own temp dir and free ports, and is stopped by killing exactly the process
tree we started (never ``ray stop``, which would kill every Ray on the machine, other tests' too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

HEAD_NODE_TYPE = "ray.head.default"
REPO_ROOT = Path(__file__).resolve().parents[1]

# A job driver as a separate process (the test process never calls ray.init): joins the cluster at
# argv[1], runs the spec at argv[2] with the autoscaler request around it, exits 0 only if all ok.
DRIVER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from batchgen.cluster import worker_nodes
from batchgen.runner import ensure_ray, run_job
from batchgen.spec import load_spec
spec = load_spec(sys.argv[2])
ensure_ray(sys.argv[1])
with worker_nodes(spec):
    result = run_job(spec, progress_every_s=2.0)
sys.exit(0 if result.all_ok else 1)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    import ray._private.services as services

    return services.get_node_ip_address()


def kill_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``proc`` and every process under it, by pid (SIGTERM, then SIGKILL)."""
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def alive_nodes(address: str) -> list[dict]:
    """Alive nodes of the cluster at ``address`` (``ip:port``) as dicts, without ``ray.init``."""
    from ray._raylet import GcsClient

    infos = GcsClient(address=address).get_all_node_info(timeout=10)
    out = []
    for info in infos.values():
        if info.state == 0:  # GcsNodeInfo.ALIVE
            out.append({"node_id": info.node_id.hex(), "resources": dict(info.resources_total)})
    return out


def _base_env() -> dict:
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    # Job entrypoints run `python` from PATH on the head, as on a real node: make it this interpreter
    # (the test run may not have its virtualenv activated).
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), env.get("PATH")) if p)
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60 turns token auth on for a new head when ~/.ray/auth_token exists (any earlier local
    # ray.init creates it); these throwaway loopback clusters run without it.
    env["RAY_AUTH_MODE"] = "disabled"
    return env


class _Head:
    """A ``ray start --head --block`` process tree owned by the test."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bgray-"))
        self.port = free_port()
        self.ip = node_ip()
        self.proc: subprocess.Popen | None = None
        self.log = self.tmp / "head.log"

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def _start(self, extra_args: list[str], env: dict, ready_timeout_s: float = 90) -> None:
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
            f"--port={self.port}", f"--temp-dir={self.tmp / 'r'}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            "--disable-usage-stats", *extra_args,
        ]
        env = {**env, "RAY_TMPDIR": str(self.tmp)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.time() + ready_timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if alive_nodes(self.address):
                    return
            except Exception:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"ray head not up after {ready_timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def nodes(self) -> list[dict]:
        return alive_nodes(self.address)

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc)
            self.proc = None
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


class FakeAutoscalingCluster(_Head):
    """Head with no GPUs + the real autoscaler driving Ray's ``fake_multinode`` provider."""

    def __init__(self, head_cpus: int, worker_types: dict, idle_timeout_minutes: float = 0.1) -> None:
        super().__init__()
        self.head_cpus = head_cpus
        self.config = {
            "cluster_name": "batchgen-fake",
            "max_workers": sum(t["max_workers"] for t in worker_types.values()),
            "upscaling_speed": 10.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": self.address,
            },
            "head_node_type": HEAD_NODE_TYPE,
            "available_node_types": {
                HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
                **worker_types,
            },
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self) -> "FakeAutoscalingCluster":
        config_path = self.tmp / "autoscaling.json"
        config_path.write_text(json.dumps(self.config))
        env = _base_env()
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self._start([f"--autoscaling-config={config_path}", f"--num-cpus={self.head_cpus}",
                     "--num-gpus=0", "--include-dashboard=false"], env)
        return self


class LocalHead(_Head):
    """Plain head with the dashboard (Ray Jobs API) on 127.0.0.1."""

    def __init__(self, num_cpus: int = 2) -> None:
        super().__init__()
        self.num_cpus = num_cpus
        self.dashboard_port = free_port()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, ready_timeout_s: float = 120) -> "LocalHead":
        self._start([f"--num-cpus={self.num_cpus}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"],
                    _base_env(), ready_timeout_s)
        import urllib.request

        deadline = time.time() + ready_timeout_s
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as r:
                    if r.status == 200:
                        return self
            except Exception:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"dashboard not up at {self.dashboard_url}:\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def ray_head_with_dashboard():
    head = LocalHead(num_cpus=2).start()
    try:
        yield head
    finally:
        head.stop()


# ----------------------------------------------------------------------------- small jobs


def write_job(tmp: Path, model_path, n_items: int = 8, gpus_per_worker: float = 1, min_workers: int = 1,
              max_workers: int = 2, batch_size: int = 2, out_name: str = "out",
              steps: int = 2) -> tuple[Path, list[str]]:
    """A tiny 64x64 job (2 steps by default) over ``n_items`` prompts with explicit ids; returns (spec path, ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    ids = [f"item-{i:03d}" for i in range(n_items)]
    prompts = [f"a small test picture number {i}" for i in range(n_items)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), tmp / "prompts.parquet", row_group_size=2)
    spec = {
        "name": "cluster-test",
        "input": {"uri": str(tmp / "prompts.parquet"), "id_column": "id"},
        "model": {"uri": str(model_path), "dtype": "float32"},
        "sampling": {"sampler": "ddim", "steps": steps, "guidance_scale": 5.0, "width": 64, "height": 64,
                     "seed": 7},
        "output": {"uri": str(tmp / out_name), "format": "png"},
        "compute": {"batch_size": batch_size, "gpus_per_worker": gpus_per_worker,
                    "min_workers": min_workers, "max_workers": max_workers, "batches_per_call": 1},
    }
    path = tmp / f"{out_name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, ids


def start_driver(address: str, spec_path: Path, log_path: Path) -> subprocess.Popen:
    env = _base_env()
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-c", DRIVER, address, str(spec_path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def read_output(out_dir: Path) -> dict[str, bytes]:
    """Check a finished job output is complete and consistent; return {item_id: image bytes}."""
    import hashlib

    import pyarrow.parquet as pq

    rows = pq.read_table(out_dir / "manifest.parquet").to_pylist()
    ids = [r["item_id"] for r in rows]
    assert len(ids) == len(set(ids)), "manifest has duplicate item ids"
    images = {}
    for r in rows:
        assert r["status"] == "ok", (r["item_id"], r["error"])
        data = (out_dir / "images" / f"{r['item_id']}.png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["image_sha256"], r["item_id"]
        images[r["item_id"]] = data
    on_disk = sorted(p.stem for p in (out_dir / "images").iterdir() if not p.name.startswith("."))
    assert on_disk == sorted(ids), "images on disk differ from the manifest"
    return images
