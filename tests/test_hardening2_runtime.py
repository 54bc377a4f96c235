"""Issue 19 (hardening, part 2), the runtime items, on real runs:

- 2: a LoRA file replaced between the pre-flight (which records its sha256 in job.json) and the
  workers' load: the items that would fuse the other bytes fail, naming the file; a base model
  replaced before a resume: the workers refuse it before rendering (its fingerprint is not the one
  job.json recorded) and the driver stops naming model.uri, nothing written.
- 14: the pre-flight is cheapest first: a bad input row is reported before the model is checked
  (without even importing torch), with one line per phase.
- 15: `batchgen run` into a pipe: no ANSI colour codes; the raylet's retry / dead-worker chatter only with -v.
- 17: `--address auto` joins a cluster that requires Ray's token (a head started here with
  `ray start --head`, token in its own HOME), exactly as Ray's own ``auto`` would.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.runner import execute, prepare
from batchgen.spec import spec_from_dict
from tests.test_job_families import sdxl_lora  # noqa: F401 - a fixture of this module too

from .faults import cli as faults_cli
from .fixtures_jobs import job_dict, write_prompts
from .fixtures_ray import REPO, subprocess_env

NULL = json.dumps({"renderer": "null"})


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchgen.cli", *args]


def _spec_file(tmp_path: Path, n: int = 4, **sections) -> Path:
    inp = write_prompts(tmp_path / "p.parquet", n)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(inp, tmp_path / "out", **sections)))
    return path


# ----------------------------------------------------------------------------- item 2


def test_a_lora_replaced_after_the_preflight_fails_its_items_naming_the_file(tmp_path, ray_local, sdxl_lora):  # noqa: F811
    lora = tmp_path / "style.safetensors"
    shutil.copy(sdxl_lora, lora)
    inp, out = write_prompts(tmp_path / "p.parquet", 2), tmp_path / "out"
    spec = spec_from_dict(job_dict(inp, out, model={"uri": "builtin:tiny-sdxl", "loras": [{"uri": str(lora)}]},
                                   sampling={"guidance_scale": None}))
    plan = prepare(spec, max_failures=10)
    recorded = json.loads((out / "job.json").read_text())["lora_sha256"][str(lora)]
    try:
        data = bytearray(lora.read_bytes())
        data[-1] ^= 1  # one weight bit: still a valid LoRA with the same keys, other bytes
        lora.write_bytes(bytes(data))
        result = execute(plan)
    finally:
        plan.release()
    assert result.ok == 0 and result.failed == 2
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["failed", "failed"]
    for row in rows:
        assert f"LoRA {lora} changed since the pre-flight (sha256 {recorded[:12]}" in row["error"], row["error"]
    assert not (out / "images").is_dir() or not any((out / "images").iterdir())


def test_a_base_model_replaced_before_a_resume_renders_nothing(tmp_path, ray_local, builtin_tiny):
    from safetensors.torch import load_file, save_file

    from batchgen.errors import BatchgenError

    model = tmp_path / "model"
    shutil.copytree(builtin_tiny, model)
    inp, out = write_prompts(tmp_path / "p.parquet", 3), tmp_path / "out"
    spec = spec_from_dict(job_dict(inp, out, model={"uri": str(model)}))
    plan = prepare(spec)
    try:
        assert execute(plan).all_ok
    finally:
        plan.release()
    recorded = json.loads((out / "job.json").read_text())["model_fingerprint"]
    lost = sorted((out / "images").iterdir())[0]
    lost.unlink()
    weights = next((model / "unet").glob("*.safetensors"))
    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key] = state[key] + 1.0
    save_file(state, str(weights))
    before = sorted(p.name for p in out.rglob("*"))
    plan = prepare(spec, max_failures=10)
    try:
        with pytest.raises(BatchgenError, match="the checkpoint changed"):
            execute(plan)
    finally:
        plan.release()
    assert not lost.exists()  # the worker refused to render with the other weights
    assert sorted(p.name for p in out.rglob("*")) == before  # no manifest part, no image
    assert json.loads((out / "job.json").read_text())["model_fingerprint"] == recorded


# ----------------------------------------------------------------------------- item 14


def test_a_bad_row_is_reported_before_the_model_is_checked(tmp_path, ray_tmpdir):
    """The model does not exist and row 2 is bad: the row is what the user hears about, the
    phases before it are logged, and torch was never imported (the model check needs it)."""
    inp = write_prompts(tmp_path / "p.parquet", 4, steps=pa.array([4, 4, -1, 4], pa.int32()))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job_dict(inp, tmp_path / "out", model={"uri": str(tmp_path / "no-model")})))
    code = ("import sys; from batchgen.cli import main; rc = main(['run', sys.argv[1]]); "
            "print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], env=subprocess_env(ray_tmpdir),
                          capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert f"input file {inp}, row 2, column 'steps'" in proc.stderr
    assert "no-model" not in proc.stderr
    assert "torch imported: False" in proc.stdout
    assert "pre-flight: job test (spec ok)" in proc.stderr and "pre-flight: output" in proc.stderr
    assert not (tmp_path / "out").exists()
    print(f"bad input reported in {took:.2f} s")


def test_preflight_logs_each_phase_and_times_it(tmp_path, caplog):
    inp, out = write_prompts(tmp_path / "p.parquet", 3), tmp_path / "out"
    with caplog.at_level("INFO", logger="batchgen.job.preflight"):
        plan = prepare(spec_from_dict(job_dict(inp, out)))
    plan.release()
    phases = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pre-flight:")]
    assert [p.split(":")[1].split()[0] for p in phases] == ["job", "output", "inputs", "model", "settings"], phases
    assert "inputs: 1 files, 3 items" in phases[2] and "model builtin:tiny: sd" in phases[3]
    assert {"preflight_output", "preflight_inputs", "preflight_model", "preflight_scan"} <= set(plan.timings)


# ----------------------------------------------------------------------------- item 15


def test_plain_logs_in_a_pipe_and_ray_chatter_only_with_verbose(tmp_path, ray_tmpdir):
    """A worker that says something (the fault hook logs a warning, then its actor exits and Ray
    restarts it): its line comes through without colour codes in a pipe; the raylet's messages
    about the dead worker and the retried calls only with -v."""
    spec = _spec_file(tmp_path)
    for verbose in (False, True):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        faults = json.dumps({"renderer": "null", "die_once": {"flag": str(tmp_path / f"flag-{verbose}"), "on_call": 1}})
        args = (["-v"] if verbose else []) + ["run", str(spec)]
        proc = subprocess.run(faults_cli(*args), env=subprocess_env(ray_tmpdir, BATCHGEN_TEST_FAULTS=faults),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = proc.stdout + proc.stderr
        assert "\x1b[" not in text, [ln for ln in text.splitlines() if "\x1b[" in ln][:3]
        worker_lines = [ln for ln in text.splitlines() if re.match(r"\((.* )?pid=\d+(, ip=[^)]*)?\) ", ln)]
        raylet_lines = [ln for ln in text.splitlines() if re.match(r"\(raylet(, ip=[^)]*)?\) ", ln)]
        # batchgen's own warnings on a worker come through, plain
        assert any("fault hook: generator actor" in ln for ln in worker_lines), text[-3000:]
        if not verbose:
            assert raylet_lines == [], raylet_lines[:3]
        assert "4/4 items ok" in proc.stdout


# ----------------------------------------------------------------------------- item 17


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (the head this test started with its own session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # fields after the name: state, ppid, pgrp, session
                pids.append(int(entry))
    return pids


@pytest.fixture
def token_head(tmp_path):
    """A one-node cluster started with `ray start --head` that requires a token (Ray turns token
    auth on for a head when a token file exists: ~/.ray/auth_token, here in a HOME of its own).
    Started in a session of its own; stopped by pid: the `ray start --block` process first, then
    whatever is left of that session."""
    pytest.importorskip("ray._private.authentication.authentication_token_setup")  # token auth: Ray >= 2.52

    home, temp = tmp_path / "home", Path(f"/tmp/bgh-{secrets.token_hex(3)}")  # short: Ray's socket paths
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    ports = _free_ports(7)
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus", "3", "--include-dashboard=false",
         "--port", str(ports[0]), "--ray-client-server-port", str(ports[1]), "--dashboard-port", str(ports[2]),
         "--dashboard-agent-listen-port", str(ports[3]), "--dashboard-agent-grpc-port", str(ports[4]),
         "--runtime-env-agent-port", str(ports[5]), "--metrics-export-port", str(ports[6])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (temp / "ray" / "ray_current_cluster").exists():
            assert head.poll() is None, head.stderr.read()
            assert time.monotonic() < deadline, "the head did not start within 120 s"
            time.sleep(0.5)
        yield env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if head.poll() is None:
            head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def test_address_auto_joins_a_cluster_that_requires_the_token(tmp_path, token_head):
    spec = _spec_file(tmp_path)
    proc = subprocess.run(faults_cli("run", str(spec), "--address", "auto"), env={**token_head, "BATCHGEN_TEST_FAULTS": NULL},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4/4 items ok" in proc.stdout
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").num_rows == 4
