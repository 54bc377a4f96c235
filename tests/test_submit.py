"""`batchgen submit`: what travels with a job, and a real submission to a local Ray job server."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stdout

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.errors import InputError
from batchgen.submit import SubmitError, dashboard_address, prepare_submission, status_submission
from tests.fixtures_cluster import _base_env, free_port, read_output, write_job


def _spec(tmp_path, input_uri, **extra):
    spec = {"name": "sub test", "input": {"uri": input_uri}, "model": {"uri": "builtin:tiny"},
            "output": {"uri": str(tmp_path / "out")}, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_local_input_folder_travels_with_same_relative_paths(tmp_path, monkeypatch):
    data = tmp_path / "prompts"
    (data / "part-b").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["a", "b"]}), data / "x.parquet")
    pq.write_table(pa.table({"prompt": ["c"]}), data / "part-b" / "y.parquet")
    (data / "notes.txt").write_text("not an input")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):  # other tests' S3 fixtures may have set them
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-sent")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-never-sent")
    monkeypatch.chdir(tmp_path)

    sub = prepare_submission(_spec(tmp_path, "prompts"), ["sampling.steps=3"], run_args=["--overwrite"],
                             staging_dir=tmp_path / "staging")
    shipped = sorted(p.relative_to(sub.staging_dir).as_posix() for p in sub.staging_dir.rglob("*") if p.is_file())
    assert shipped == ["inputs/part-b/y.parquet", "inputs/x.parquet", "job.yaml"]
    assert sub.shipped_inputs == ["part-b/y.parquet", "x.parquet"]
    job = yaml.safe_load((sub.staging_dir / "job.yaml").read_text())
    assert job["input"]["uri"] == "inputs"
    assert job["sampling"]["steps"] == 3  # --set applied before shipping
    assert job["output"]["uri"] == str(tmp_path / "out")  # made absolute
    assert sub.runtime_env["working_dir"] == str(sub.staging_dir)
    assert sub.runtime_env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    blob = repr(sub.runtime_env) + (sub.staging_dir / "job.yaml").read_text()
    assert "never-sent" not in blob
    assert sub.entrypoint == "python -m batchgen.cli run job.yaml --overwrite"
    assert "py_modules" not in sub.runtime_env


def test_single_file_and_glob_inputs(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "one.parquet")
    pq.write_table(pa.table({"prompt": ["b"]}), tmp_path / "two.parquet")
    sub = prepare_submission(_spec(tmp_path, str(tmp_path / "one.parquet")), staging_dir=tmp_path / "s1")
    assert yaml.safe_load((sub.staging_dir / "job.yaml").read_text())["input"]["uri"] == "inputs/one.parquet"
    sub = prepare_submission(_spec(tmp_path, str(tmp_path / "t*.parquet")), ship_code=True,
                             staging_dir=tmp_path / "s2")
    assert yaml.safe_load((sub.staging_dir / "job.yaml").read_text())["input"]["uri"] == "inputs/t*.parquet"
    assert sub.shipped_inputs == ["two.parquet"]
    assert sub.runtime_env["py_modules"][0].endswith("batchgen")


def test_s3_input_is_not_shipped_and_bad_spec_fails_before_submitting(tmp_path):
    sub = prepare_submission(_spec(tmp_path, "s3://bucket/prompts/"), staging_dir=tmp_path / "s")
    assert yaml.safe_load((sub.staging_dir / "job.yaml").read_text())["input"]["uri"] == "s3://bucket/prompts/"
    assert not (sub.staging_dir / "inputs").exists()
    with pytest.raises(InputError, match="sampling.stepz"):
        prepare_submission(_spec(tmp_path, "s3://b/p", sampling={"stepz": 3}), staging_dir=tmp_path / "s3")
    with pytest.raises(InputError, match="no such file or folder"):
        prepare_submission(_spec(tmp_path, str(tmp_path / "missing")), staging_dir=tmp_path / "s4")


def test_address_normalization_and_unreachable_server(tmp_path):
    assert dashboard_address("HEAD:8265") == "http://HEAD:8265"
    assert dashboard_address("https://ray.example.com/") == "https://ray.example.com"
    with pytest.raises(ValueError, match="ray://"):
        dashboard_address("ray://HEAD:10001")
    with pytest.raises(SubmitError, match="cannot reach the Ray job server"):
        status_submission("batchgen-x", f"http://127.0.0.1:{free_port()}")


@pytest.mark.timeout(300)
def test_submit_wait_runs_job_to_completion(tmp_path, tiny_sd1, ray_head_with_dashboard):
    head = ray_head_with_dashboard
    spec, ids = write_job(tmp_path, tiny_sd1, n_items=4, gpus_per_worker=0, min_workers=1, max_workers=1)
    # No --ship-code: the probe job finds this checkout's batchgen on the head (PYTHONPATH), so
    # nothing is shipped (item 18 of issue 9: a cluster without it gets the package automatically).
    proc = subprocess.run(
        [sys.executable, "-m", "batchgen.cli", "submit", str(spec), "--address", head.dashboard_url,
         "--wait", "--set", "name=submitted"],
        env=_base_env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shipping" not in proc.stderr and "cannot import" not in proc.stderr
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.startswith("batchgen-submitted-")
    assert "4/4 items ok" in proc.stdout  # the job's own log, followed by --wait
    images = read_output(tmp_path / "out")
    assert sorted(images) == ids

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert status_submission(job_id, head.dashboard_url) == 0
    assert "SUCCEEDED" in buf.getvalue()

    from batchgen.submit import local_code_info, probe_cluster

    report = probe_cluster(head.dashboard_url)
    assert report["batchgen_digest"] == local_code_info()["batchgen_digest"] and report["torch"] and report["ray"]
