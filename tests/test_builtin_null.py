"""builtin:null as a user meets it: a dry run with no weights whose items rerender byte for byte."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from batchgen.jobcli import rerender_item
from batchgen.runner import run_job
from batchgen.spec import spec_from_dict

from .fixtures_jobs import job_dict, write_prompts


def test_null_model_job_records_its_model_and_rerenders_identically(tmp_path, ray_local):
    write_prompts(tmp_path / "in" / "p.parquet", 5)
    out = tmp_path / "out"
    spec = spec_from_dict(job_dict(tmp_path / "in", out, model={"uri": "builtin:null"}))
    result = run_job(spec)
    assert (result.ok, result.failed) == (5, 0)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {row["model_uri"] for row in manifest} == {"builtin:null"}
    job = json.loads((out / "job.json").read_text())
    assert job["model_fingerprint"] == manifest[0]["model_fingerprint"]
    # seeded noise: different items differ, and each re-renders to the stored bytes
    assert len({row["image_sha256"] for row in manifest}) == 5
    for row in manifest[:2]:
        data, again = rerender_item(str(out), row["item_id"])
        assert again["item_id"] == row["item_id"]
        assert data == (out / "images" / f"{row['item_id']}.png").read_bytes()
