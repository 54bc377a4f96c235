"""The README's "build a synthetic classification set" walkthrough, end to end.

A 3-class template expands to 3 x 4 prompts with labels; the job renders 2 images per prompt
(24 items) with the labels passed through; a run killed mid-way resumes to the same 24 items,
byte for byte equal to an uninterrupted run; the WebDataset export has `.cls` and the HF export a
`ClassLabel`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from batchgen.export import export_output
from batchgen.prompts import expand_to_parquet, load_template
from batchgen.runner import run_job
from batchgen.spec import spec_from_dict

from .faults import cli as faults_cli
from .fixtures_jobs import image_digests, job_dict
from .fixtures_ray import subprocess_env

EXAMPLE = Path(__file__).resolve().parents[1] / "jobs" / "synthetic"  # the README walkthrough's files


def _prompts(folder: Path) -> Path:
    """``batchgen prompts jobs/synthetic/template.yaml`` on a copy of the shipped example."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("classes.csv", "lighting.txt", "template.yaml"):
        shutil.copy(EXAMPLE / name, folder / name)
    out = folder / "prompts.parquet"
    expand_to_parquet(load_template(folder / "template.yaml"), str(out))
    return out


def _job(prompts: Path, out: Path) -> dict:
    """jobs/synthetic/job.yaml with the test's input and output, at the suite's small size."""
    shipped = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    return job_dict(prompts, out, input=dict(shipped["input"], uri=str(prompts)),
                    sampling={"images_per_prompt": shipped["sampling"]["images_per_prompt"]})


def test_synthetic_classification_set(tmp_path, ray_local, builtin_tiny, ray_tmpdir):
    import datasets
    import webdataset

    prompts = _prompts(tmp_path / "template")
    table = pq.read_table(prompts)
    assert table.num_rows == 12 and sorted(set(table.column("label").to_pylist())) == [0, 1, 2]

    clean = tmp_path / "clean"
    result = run_job(spec_from_dict(_job(prompts, clean)))
    assert result.all_ok and result.total == 24
    reference = image_digests(clean)

    # Killed mid-way (SIGKILL to the driver and its Ray), then run again: the same 24 items.
    out = tmp_path / "out"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(_job(prompts, out)))
    env = subprocess_env(ray_tmpdir, BATCHGEN_TEST_FAULTS=json.dumps({"sleep_per_call_s": 1.0, "part_max_rows": 2}))
    proc = subprocess.Popen(faults_cli("run", str(spec_path), "--num-cpus", "2"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out / "manifest"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.is_dir() and any(p.name.startswith("part-") for p in parts.iterdir()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.parquet").exists()
    resumed = run_job(spec_from_dict(_job(prompts, out)))
    assert resumed.all_ok and resumed.skipped > 0 and resumed.total == 24
    assert image_digests(out) == reference

    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 24 and {r["item_id"].rsplit("-", 1)[1] for r in rows} == {"0", "1"}
    names = {r["label"]: r["class_name"] for r in rows}
    assert names == {0: "tabby cat", 1: "golden retriever", 2: "red fox"}

    export_output(str(out), "webdataset", str(tmp_path / "wds"), shard_size=100)
    samples = list(webdataset.WebDataset(str(tmp_path / "wds" / "000000.tar"), shardshuffle=False).decode())
    assert len(samples) == 24 and sorted({s["cls"] for s in samples}) == [0, 1, 2]
    export_output(str(out), "parquet", str(tmp_path / "hf"), shard_size=100)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "hf" / "data" / "*.parquet"), split="train")
    assert ds.features["label"].names == ["tabby cat", "golden retriever", "red fox"] and len(ds) == 24
