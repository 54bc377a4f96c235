"""The job end to end on a local Ray with the tiny model: manifest, resume, rerender, failures."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.cli import main
from batchgen.errors import InputError
from batchgen.images import read_generation_parameters
from batchgen.jobcli import job_status
from batchgen.runner import TooManyFailures
from batchgen.spec import spec_from_dict

from .faults import run_job
from .fixtures_jobs import image_digests, job_dict, write_prompts

NULL = {"renderer": "null"}


def _check_output(out: Path, expected_ids):
    t = pq.read_table(out / "manifest.parquet")
    assert t.column("item_id").to_pylist() == sorted(expected_ids)  # one row per item, sorted
    for row in t.to_pylist():
        assert row["status"] == "ok", row
        data = Path(row["image_uri"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"] and len(data) == row["image_bytes"]
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(expected_ids)
    return t


def test_job_renders_resumes_and_rerenders(tmp_path, ray_local, builtin_tiny, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_prompts(inp / "a.parquet", 5)
    write_prompts(inp / "b.parquet", 3, start=5, width=pa.array([None, 32, 32], pa.int32()),
                  seed=pa.array([7, None, 9], pa.int64()))
    spec = spec_from_dict(job_dict(inp, out))
    result = run_job(spec)
    assert result.all_ok and result.rendered_this_run == 8
    ids = [f"a-{i:08d}" for i in range(5)] + [f"b-{i:08d}" for i in range(3)]
    t = _check_output(out, ids)
    rows = {r["item_id"]: r for r in t.to_pylist()}
    assert rows["b-00000000"]["seed"] == 7 and rows["b-00000001"]["width"] == 32
    assert rows["a-00000003"]["source_row"] == 3 and rows["a-00000003"]["source_file"].endswith("a.parquet")
    assert {r["batch_size"] for r in rows.values()} == {2}
    params = read_generation_parameters((out / "images" / "b-00000000.png").read_bytes())
    assert params["seed"] == 7 and params["prompt"] == "prompt 5" and params["batch_size"] == 2
    job = json.loads((out / "job.json").read_text())
    assert job["model_fingerprint"] == rows["a-00000000"]["model_fingerprint"] and job["total_items"] == 8
    assert {"batchgen", "torch", "transformers", "ray"} <= set(job["versions"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 8 and summary["images_per_s"] > 0 and "render_stream" in summary["timings_s"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    digests = image_digests(out)

    # same spec again: nothing to render; a new file in the input folder: only its rows render
    assert run_job(spec).rendered_this_run == 0
    write_prompts(inp / "c.parquet", 2, start=8)
    again = run_job(spec)
    assert again.rendered_this_run == 2 and again.skipped == 8 and again.all_ok
    _check_output(out, ids + ["c-00000000", "c-00000001"])
    assert all((out / "images" / n).stat().st_mtime_ns == m for n, m in before.items())
    assert {n: d for n, d in image_digests(out).items() if n in digests} == digests
    status = job_status(str(out))
    assert (status["total"], status["done"], status["failed"], status["remaining"]) == (10, 10, 0, 0)

    # rerender: alone, with the stored batch size -> the stored bytes
    target = tmp_path / "re.png"
    assert main(["rerender", str(out), "b-00000001", "--out", str(target)]) == 0
    assert target.read_bytes() == (out / "images" / "b-00000001.png").read_bytes()
    assert "identical to the stored image" in capsys.readouterr().out
    assert main(["status", str(out)]) == 0


def test_different_spec_is_refused_unless_overwrite(tmp_path, ray_local):
    inp, out = write_prompts(tmp_path / "p.parquet", 4), tmp_path / "out"
    run_job(spec_from_dict(job_dict(inp, out)), faults=NULL)
    keep = image_digests(out)
    changed = spec_from_dict(job_dict(inp, out, sampling={"steps": 3}, output={"format": "webp"}))
    with pytest.raises(InputError) as err:
        run_job(changed, faults=NULL)
    assert "keys differ: output.format, sampling.steps" in str(err.value) and "--overwrite" in str(err.value)
    assert image_digests(out) == keep  # nothing lost
    result = run_job(changed, overwrite=True, faults=NULL)
    assert result.rendered_this_run == 4 and sorted(p.suffix for p in (out / "images").iterdir()) == [".webp"] * 4


def test_failed_items_become_rows_and_max_failures_aborts(tmp_path, ray_local, builtin_tiny):
    from PIL import Image

    good = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    write_prompts(inp, 4, init_image=[str(good), str(tmp_path / "missing.png"), None, str(tmp_path / "p.parquet")],
                  strength=[0.5, 0.5, None, 0.5])
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_dict(inp, out)))
    # CLI: the job goes on, failed rows are recorded, exit code 1
    assert main(["run", str(spec_path), "--max-failures", "5"]) == 1
    t = pq.read_table(out / "manifest.parquet").to_pylist()
    by_id = {r["item_id"]: r for r in t}
    assert [r["status"] for r in t] == ["ok", "failed", "ok", "failed"]
    assert "missing.png" in by_id["p-00000001"]["error"] and "not a readable image" in by_id["p-00000003"]["error"]
    assert by_id["p-00000000"]["strength"] == 0.5 and by_id["p-00000000"]["init_image"] == str(good)
    assert by_id["p-00000002"]["strength"] is None
    assert sorted(p.name for p in (out / "images").iterdir()) == ["p-00000000.png", "p-00000002.png"]
    # resume retries only the failed items, counting attempts
    with pytest.raises(TooManyFailures, match=r"aborted after 2 failed items \(more than --max-failures 0\)"):
        run_job(spec_from_dict(job_dict(inp, out)), max_failures=0)
    t = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["attempt"] for r in t] == [1, 2, 1, 2]
    assert json.loads((out / "summary.json").read_text())["aborted"] is True
