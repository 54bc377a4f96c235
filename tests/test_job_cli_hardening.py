"""Issue 9 hardening: `batchgen run` as a user runs it, in a subprocess with a private RAY_TMPDIR
(so it leaves no Ray session behind and sees no other Ray's files): a stale cluster file, a job
whose workers would take every CPU, real SIGINT/SIGTERM, unreachable addresses, bad models
refused before Ray starts, and what a quiet run prints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.cli import main
from batchgen.spec import spec_from_dict

from .faults import cli as faults_cli
from .faults import run_job
from .fixtures_jobs import image_digests, job_dict, write_prompts
from .fixtures_ray import subprocess_env

NOISE = ("core_worker.cc", "Token authentication", "Total Progress", "botocore", "Started a local Ray instance",
         "Execution plan", "Token indices sequence length", "Progress bars disabled", "logging_progress")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(tmp_path: Path, n: int = 12, prompts=None, **sections) -> Path:
    ids = [f"item-{i:02d}" for i in range(n)]
    inp = tmp_path / "in.parquet"
    write_prompts(inp, n, id=ids)
    if prompts is not None:
        import pyarrow as pa

        table = pq.read_table(inp)
        pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts)), inp)
    data = job_dict(inp, tmp_path / "out", input={"id_column": "id"}, **sections)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchgen.cli", *args]


def _parts_rows(out: Path) -> int:
    parts = out / "manifest"
    if not parts.is_dir():
        return 0
    return sum(pq.read_table(p).num_rows for p in parts.iterdir() if p.name.startswith("part-"))


def test_stale_cluster_file_and_cpu_hungry_workers_still_complete_quietly(tmp_path, ray_tmpdir, builtin_tiny):
    """Items 1, 2, 17 (and the `make demo` condition): /tmp/ray/ray_current_cluster names a dead
    cluster, the spec asks for two CPU workers on a 2-CPU Ray: the run starts a private Ray, keeps
    a CPU for reading and encoding, completes, and prints its progress, not Ray's chatter."""
    stale = Path(ray_tmpdir) / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text(f"127.0.0.1:{_free_port()}")
    long_prompt = "a lighthouse at dawn, " * 400
    spec = _spec(tmp_path, 8, prompts=[long_prompt] + [f"prompt {i}" for i in range(1, 8)],
                 compute={"min_workers": 2, "max_workers": 2})
    start = time.monotonic()
    proc = subprocess.run(_cli("run", str(spec), "--num-cpus", "2"), env=subprocess_env(ray_tmpdir),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "8/8 items ok" in proc.stdout and time.monotonic() - start < 240
    assert stale.read_text().startswith("127.0.0.1:")  # left alone, and not joined
    for noise in NOISE:
        assert noise not in proc.stderr, noise
    assert "generator pool capped at 1 CPU workers" in proc.stderr
    assert "rendered 8/8 items" in proc.stderr
    # the truncation warning names the item and shows a short excerpt, not the 8800-char prompt
    assert "item item-00: prompt is" in proc.stderr and "truncated" in proc.stderr
    assert max(len(line) for line in proc.stderr.splitlines()) < 1000


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_commits_what_arrived_then_resume_is_exactly_once(tmp_path, ray_tmpdir, ray_local, sig):
    """Item 7: two quick batches, then a long render: the second batch is committed on the time
    bound while nothing arrives; SIGINT/SIGTERM then commits and exits 130 at once (on a 1-CPU Ray,
    item 1's other case). Resuming renders the rest, each item once."""
    spec = _spec(tmp_path, 12, compute={"batches_per_call": 1})
    out = tmp_path / "out"
    faults = {"renderer": "null", "sleep_per_call_s": [0, 0, 60]}
    proc = subprocess.Popen(faults_cli("run", str(spec), "--num-cpus", "1"),
                            env=subprocess_env(ray_tmpdir, BATCHGEN_TEST_FAULTS=json.dumps(faults)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            images = out / "images"
            if images.is_dir() and len(list(images.iterdir())) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        seen = time.monotonic()
        while _parts_rows(out) < 4 and time.monotonic() - seen < 15:
            time.sleep(0.2)
        assert _parts_rows(out) == 4, "the second batch was not committed while the third call renders"
        assert time.monotonic() - seen < 10
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert f"{sig.name} received: committing" in stderr
    assert "4 items of this run are committed (4 of 12 done); run the same command again" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.stem for p in (out / "images").iterdir()) == [f"item-{i:02d}" for i in range(4)]
    assert not (out / ".batchgen-lease.json").exists()
    result = run_job(spec_from_dict(yaml.safe_load(spec.read_text())), faults={"renderer": "null"})
    assert (result.skipped, result.rendered_this_run, result.ok) == (4, 8, 12)
    ids = pq.read_table(out / "manifest.parquet").column("item_id").to_pylist()
    assert ids == [f"item-{i:02d}" for i in range(12)] and len(image_digests(out)) == 12


def test_unreachable_address_fails_fast_and_clearly(tmp_path, monkeypatch, capsys):
    """Item 2: a dead --address / RAY_ADDRESS is an error in seconds (nothing written); a
    dashboard URL points to `batchgen submit`."""
    spec = _spec(tmp_path, 2)
    port = _free_port()
    start = time.monotonic()
    assert main(["run", str(spec), "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"nothing answers at 127.0.0.1:{port}" in err and time.monotonic() - start < 15
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["run", str(spec)]) == 2
    assert "(from RAY_ADDRESS)" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(["run", str(spec), "--address", "http://127.0.0.1:8265"]) == 2
    assert "use `batchgen submit --address http://127.0.0.1:8265`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_model_exits_2_before_ray_starts(tmp_path, ray_tmpdir, builtin_tiny):
    """Items 12 and 15: pickle weights fail in pre-flight with exit 2 and one clear line; Ray never
    started (no session in RAY_TMPDIR), nothing written."""
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(builtin_tiny, model)
    weights = model / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(weights)), model / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    spec = _spec(tmp_path, 2, model={"uri": str(model)})
    start = time.monotonic()
    proc = subprocess.run(_cli("run", str(spec)), env=subprocess_env(ray_tmpdir), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pickle weights are refused" in proc.stderr and "pytorch_model.bin" in proc.stderr
    assert "ActorDiedError" not in proc.stderr and len(proc.stderr.splitlines()) < 5
    assert not (Path(ray_tmpdir) / "ray").exists()  # Ray was never started
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - start < 60


def test_s3_run_prints_no_library_chatter(tmp_path, ray_tmpdir, s3_bucket, s3_server, builtin_tiny):
    """Item 17 with S3 on both sides: botocore's credential lines and the other libraries' logs
    stay out of a run's output (they appear with -v)."""
    import boto3

    local = write_prompts(tmp_path / "in.parquet", 4)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.upload_file(str(local), s3_bucket, "in/p.parquet")
    data = job_dict(f"s3://{s3_bucket}/in/p.parquet", f"s3://{s3_bucket}/out")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(data))
    env = subprocess_env(ray_tmpdir, AWS_ENDPOINT_URL=s3_server)
    proc = subprocess.run(_cli("run", str(spec), "--num-cpus", "2"), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "4/4 items ok" in proc.stdout
    for noise in NOISE + ("Found credentials",):
        assert noise not in proc.stderr, noise
    # The same S3 reads with -v show botocore's own lines: what the quiet run leaves out is there.
    loud = subprocess.run(_cli("status", f"s3://{s3_bucket}/out", "-v"), env=env, capture_output=True, text=True,
                          timeout=120)
    assert loud.returncode == 0 and "botocore" in loud.stderr, loud.stderr[-2000:]
