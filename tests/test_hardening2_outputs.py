"""Issue 19 (hardening, part 2): outputs and writers. A resume renders lost images again (item 3),
writers publish atomically (4), ``compare --report`` only writes into its own folders (5), ``run``
refuses unrelated folders and ``--overwrite`` removes only what the job wrote (6), CLI exit codes
over S3 are clean (11), and from item 18 the summary's run history, the heatmap of small
differences, "metadata only" and a single ``--overwrite`` warning. Each test names its item."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batchgen.cli import main
from batchgen.errors import InputError
from batchgen.jobcli import job_status
from batchgen.spec import spec_from_dict

from .faults import injected, run_job
from .fixtures_jobs import image_digests, job_dict, write_prompts
from .fixtures_ray import REPO
from .fixtures_regression import noise_image, write_job_output

NULL = {"renderer": "null"}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- item 3 (+ 18: summary runs)


def test_resume_renders_lost_images_once_and_verify_renders_wrong_ones(tmp_path, ray_local, capsys):
    """Item 3: a deleted image is rendered again by a plain resume, exactly once; a corrupted one
    (same name, other bytes) by `run --verify`; `status --verify` reports both. Item 18: summary.json
    keeps every run's figures in ``runs``."""
    inp, out = write_prompts(tmp_path / "p.parquet", 4), tmp_path / "out"
    spec = spec_from_dict(job_dict(inp, out))
    assert run_job(spec, faults=NULL).rendered_this_run == 4
    original = image_digests(out)
    images = out / "images"
    (images / "p-00000001.png").unlink()
    corrupt = bytearray((images / "p-00000002.png").read_bytes())
    corrupt[-20] ^= 0xFF
    (images / "p-00000002.png").write_bytes(bytes(corrupt))

    checked = job_status(str(out), verify=True)["images"]
    assert (checked["missing"], checked["wrong"]) == (1, 1)
    assert main(["status", str(out), "--verify"]) == 1
    assert "1 missing, 1 not as the manifest records" in capsys.readouterr().out

    again = run_job(spec, faults=NULL)  # no flag: existence only
    assert (again.rendered_this_run, again.ok) == (1, 4)
    assert image_digests(out)["p-00000001.png"] == original["p-00000001.png"]
    assert image_digests(out)["p-00000002.png"] != original["p-00000002.png"]
    assert run_job(spec, faults=NULL).rendered_this_run == 0  # once: the new row names the new image

    verified = run_job(spec, faults=NULL, verify=True)
    assert (verified.rendered_this_run, verified.ok, verified.failed) == (1, 4, 0)
    assert image_digests(out) == original
    assert run_job(spec, faults=NULL, verify=True).rendered_this_run == 0
    status = job_status(str(out), verify=True)
    assert (status["done"], status["failed"], status["images"]["missing"], status["images"]["wrong"]) == (4, 0, 0, 0)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 4 and {r["status"] for r in manifest} == {"ok"}

    summary = json.loads((out / "summary.json").read_text())
    assert [r["rendered_this_run"] for r in summary["runs"]] == [4, 1, 0, 1, 0]
    assert summary["rendered_this_run"] == 0 and summary["ok"] == 4  # the top level: latest run, totals
    assert summary["runs"][1]["rendered_again"]["missing"] == 1 and summary["runs"][3]["rendered_again"]["wrong"] == 1


def test_existence_check_is_one_listing_not_a_request_per_image(tmp_path, s3_server, s3_bucket):
    """Item 3: without --verify the images of an S3 output are checked with one listing."""
    from batchgen.manifest import check_images
    from batchgen.storage import Location, StorageConfig, _s3_client

    local = write_job_output(tmp_path / "job", [dict(item_id=f"i{k}", image=noise_image(k)) for k in range(6)])
    cfg = StorageConfig(endpoint_url=s3_server)
    root = Location.parse(f"s3://{s3_bucket}/job", cfg)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        root.join(f.relative_to(local).as_posix()).write_bytes(f.read_bytes())
    root.join("images", "i3.png").delete()
    calls: list[tuple[str, str]] = []
    client = _s3_client(cfg.resolved_endpoint())
    client.meta.events.register("before-parameter-build.s3.*", lambda model, params, **_: calls.append(
        (model.name, params.get("Prefix") or params.get("Key") or "")))
    try:
        import pyarrow as pa

        check = check_images(root, pa.array([f"i{k}" for k in range(6)]), "png")
    finally:
        client.meta.events.unregister("before-parameter-build.s3.*")
    assert check.ids.to_pylist() == ["i3"] and check.missing == 1
    on_images = [c for c in calls if "images" in c[1]]
    assert on_images == [("ListObjectsV2", "job/images/")]  # the parts are read for the lost item's attempt


# ----------------------------------------------------------------------------- item 4


def _big_template(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(f"mode: sampled\ncount: {rows}\nseed: 1\ntemplates: [\"a {{red|green|blue}} {{cat|dog|fox}} "
                    "number {0|1|2|3|4|5|6|7|8|9}{0|1|2|3|4|5|6|7|8|9}\"]\n")
    return path


class _Stop(KeyboardInterrupt):
    pass


def test_interrupted_prompts_leave_nothing_local_or_on_s3(tmp_path, s3_server, s3_bucket, monkeypatch):
    """Item 4: `prompts --out` interrupted after some row groups publishes nothing: no truncated
    Parquet (S3: the multipart upload is aborted), no temp file; completed writes are whole."""
    import batchgen.storage as storage
    from batchgen.prompts import expand_to_parquet
    from batchgen.storage import Location, StorageConfig

    from .fixtures_s3 import s3_client

    monkeypatch.setattr(storage, "_MULTIPART_PART", 64 << 10, raising=False)  # several parts, small file
    template = _big_template(tmp_path, 100000)

    def stop_after(rows: int):
        def progress(written, _total):
            if written >= rows:
                raise _Stop()
        return progress

    cfg = StorageConfig(endpoint_url=s3_server)
    local = tmp_path / "out" / "prompts.parquet"
    for target in (str(local), f"s3://{s3_bucket}/prompts.parquet"):
        with pytest.raises(_Stop):
            expand_to_parquet(template, target, row_group_rows=5000, storage_config=cfg, progress=stop_after(60000))
        assert not Location.parse(target, cfg).exists()
    assert os.listdir(local.parent) == []
    client = s3_client(s3_server)
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0

    monkeypatch.undo()  # S3's real part sizes again (a completed upload needs parts of >= 5 MiB)
    for target in (str(local), f"s3://{s3_bucket}/prompts.parquet"):
        assert expand_to_parquet(template, target, row_group_rows=5000, storage_config=cfg) == 100000
        data = Location.parse(target, cfg).read_bytes()
        assert pq.read_table(io.BytesIO(data)).num_rows == 100000
    assert os.listdir(local.parent) == ["prompts.parquet"]


def test_sigterm_during_a_local_write_leaves_no_temp_file(tmp_path):
    """Item 4: SIGTERM while `batchgen prompts` writes: the temp file is removed, the process
    still ends by SIGTERM, and no output appears."""
    template = _big_template(tmp_path, 5_000_000)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "prompts", str(template), "--out",
                             str(out / "p.parquet"), "--row-group-rows", "20000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not os.listdir(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert os.listdir(out), "the write never started"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.listdir(out) == []


def test_s3_multipart_write_completes_whole(s3_server, s3_bucket, monkeypatch):
    """Item 4: a write larger than a part goes up as a multipart upload and reads back whole."""
    import batchgen.storage as storage
    from batchgen.storage import Location, StorageConfig

    monkeypatch.setattr(storage, "_MULTIPART_PART", 5 << 20)  # S3's smallest part
    data = np.random.default_rng(0).integers(0, 256, (11 << 20) + 123, dtype=np.uint8).tobytes()
    loc = Location.parse(f"s3://{s3_bucket}/big.bin", StorageConfig(endpoint_url=s3_server))
    with loc.open_atomic() as fh:
        for start in range(0, len(data), 3 << 20):
            fh.write(data[start:start + (3 << 20)])
        assert not loc.exists()  # nothing visible before the end
    assert loc.read_bytes() == data


# ----------------------------------------------------------------------------- item 5 (+ 18: heatmap, metadata only)


def test_report_writes_only_into_new_empty_or_earlier_report_folders(tmp_path, capsys):
    """Item 5: --report refuses a job output and a folder of other files (nothing changes there);
    an earlier report is replaced, its images this report does not write are removed."""
    items = [dict(item_id=f"item-{k}", image=noise_image(k)) for k in range(3)]
    base = write_job_output(tmp_path / "base", items)
    changed = [dict(i) for i in items]
    changed[1]["image"] = noise_image(99)
    cand = write_job_output(tmp_path / "cand", changed)
    for target in (base, tmp_path / "mine"):
        if target.name == "mine":
            (target / "sub").mkdir(parents=True)
            (target / "notes.txt").write_text("mine")
            (target / "sub" / "summary.json").write_text("{}")
        before = _tree(target)
        assert main(["compare", str(base), str(cand), "--report", str(target)]) == 2
        err = capsys.readouterr().err
        assert "but no batchgen .batchgen-report.json" in err and "choose another --report folder" in err
        assert _tree(target) == before
    report = tmp_path / "report"
    assert main(["compare", str(base), str(cand), "--report", str(report)]) == 1
    assert (report / "images" / "00000-diff.png").exists() and (report / ".batchgen-report.json").exists()
    (report / "my-notes.txt").write_text("kept")
    assert main(["compare", str(base), str(base), "--report", str(report)]) == 0  # over the earlier report
    assert sorted(_tree(report)) == [".batchgen-report.json", "index.html", "my-notes.txt", "summary.json"]
    assert json.loads((report / "summary.json").read_text())["passed"] is True


def test_heatmap_shows_one_level_differences_and_metadata_only_is_named(tmp_path):
    """Item 18: a 1-level difference is bright in the heatmap (alone and next to a large one);
    pixel-identical images whose files differ are named "metadata only"."""
    from batchgen.compare import compare_outputs
    from batchgen.report import COLORMAP, HEAT_FLOOR, diff_heatmap

    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[1, 1, 0] = 1
    heat = diff_heatmap(a, b)
    assert (heat[1, 1] == COLORMAP[255]).all() and not heat[0, 0].any()
    b[2, 2, 1] = 40
    heat = diff_heatmap(a, b)
    assert (heat[2, 2] == COLORMAP[255]).all() and int(heat[1, 1].astype(int).sum()) >= int(
        COLORMAP[HEAT_FLOOR].astype(int).sum()) > 100

    items = [dict(item_id="x", image=noise_image(1))]
    base = write_job_output(tmp_path / "base", items)
    cand = write_job_output(tmp_path / "cand", [dict(items[0], png_text="other version")])
    (res,) = compare_outputs(str(base), str(cand)).items
    assert res.status == "within_tolerance" and res.note.startswith("metadata only")


# ----------------------------------------------------------------------------- item 6 (+ 18: one warning)


def test_run_refuses_a_folder_of_unrelated_files(tmp_path):
    """Item 6: a non-empty output without job.json is refused, naming files; nothing is written."""
    inp = write_prompts(tmp_path / "p.parquet", 2)
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "data" / "x.csv").write_text("1,2")
    before = _tree(out)
    with pytest.raises(InputError, match=r"is not empty \(data, notes.txt\) and holds no job.json"):
        run_job(spec_from_dict(job_dict(inp, out)), faults=NULL)
    assert _tree(out) == before and sorted(os.listdir(out)) == ["data", "notes.txt"]


def test_overwrite_removes_only_what_the_job_wrote_and_warns_once(tmp_path, ray_local, monkeypatch, capsys,
                                                                  caplog):
    """Item 6: --overwrite deletes the job's images, parts, manifest and summary, never a user's
    file inside images/ or manifest/, and names those. Item 18: one warning, not five."""
    inp, out = write_prompts(tmp_path / "p.parquet", 3), tmp_path / "out"
    run_job(spec_from_dict(job_dict(inp, out)), faults=NULL)
    (out / "images" / "mine.png").write_bytes(b"my own picture")
    (out / "manifest" / "README.txt").write_text("my notes")
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(job_dict(inp, out, sampling={"steps": 3})))
    with caplog.at_level(logging.INFO), injected(NULL):
        assert main(["run", str(spec), "--overwrite"]) == 0
    assert (out / "images" / "mine.png").read_bytes() == b"my own picture"
    assert (out / "manifest" / "README.txt").read_text() == "my notes"
    assert sorted(os.listdir(out / "images")) == ["mine.png"] + [f"p-{i:08d}.png" for i in range(3)]
    captured = capsys.readouterr()
    said = [r.getMessage() for r in caplog.records if "--overwrite" in r.getMessage()]
    said += [line for line in (captured.out + captured.err).splitlines() if "--overwrite" in line]
    assert len(said) == 1, said
    assert "images/ (3 files)" in said[0] and "left 2 files it did not write" in said[0]
    assert "images/mine.png" in said[0] and "manifest/README.txt" in said[0]


# ----------------------------------------------------------------------------- item 11


def test_cli_exit_codes_against_s3_are_all_zero():
    """Item 11: consecutive export / compare / status runs against a moto S3 output all exit 0
    (benchmarks/exit_codes.py runs 200 of them)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import exit_codes
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    result = exit_codes.run(15)
    assert result["exit_codes"] == {c: {"0": 5} for c in ("export", "compare", "status")}, result["failures"]
