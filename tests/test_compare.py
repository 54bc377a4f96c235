"""`batchgen compare` on job outputs written in the runner's layout (no Ray, no model)."""

import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from batchgen.cli import main
from batchgen.compare import Thresholds, compare_outputs
from batchgen.errors import InputError
from batchgen.metrics import max_abs_diff, psnr, ssim
from batchgen.report import COLORMAP, heat_levels
from tests.fixtures_regression import noise_image, write_job_output


def _items(n=6, **overrides):
    return [dict(item_id=f"item-{k:02d}", image=noise_image(k), **overrides) for k in range(n)]


def test_same_job_twice_is_identical(tmp_path, capsys):
    base = write_job_output(tmp_path / "base", _items(), worker="w0")
    # Another run: other worker, timings, attempts and image_uri; same bytes.
    cand = write_job_output(tmp_path / "cand", [dict(i, attempt=2, render_ms=99.0) for i in _items()],
                            worker="w7")
    res = compare_outputs(str(base), str(cand))
    assert res.passed and res.counts["identical"] == 6 and res.items == []
    assert res.settings_differ == {}
    assert main(["compare", str(base), str(cand), "--report", str(tmp_path / "rep")]) == 0
    assert "6 identical" in capsys.readouterr().out
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["passed"] is True and summary["counts"]["identical"] == 6
    # Asking for the worker column makes it a differing setting (still identical images).
    res = compare_outputs(str(base), str(cand), ignore_settings=["render_ms", "attempt", "image_uri"])
    assert res.settings_differ == {"worker": 6}


def test_changed_items_metrics_settings_and_heatmaps(tmp_path):
    items = _items()
    base = write_job_output(tmp_path / "base", items)
    cand_items = [dict(i) for i in items]
    # item-01: a different sampler moved a patch of pixels.
    moved = items[1]["image"].copy()
    moved[4:10, 6:12] = np.clip(moved[4:10, 6:12].astype(int) + 30, 0, 255).astype(np.uint8)
    cand_items[1].update(image=moved, sampler="euler")
    # item-03: another seed, an unrelated image.
    cand_items[3].update(image=noise_image(1003), seed=424242)
    # item-04: another model weight, a one-level change of one pixel.
    nudged = items[4]["image"].copy()
    nudged[0, 0, 0] ^= 1
    cand_items[4].update(image=nudged, model_fingerprint="e" * 64)
    # item-05: only the PNG metadata differs: bytes differ, pixels do not.
    cand_items[5].update(png_text="another version")
    cand = write_job_output(tmp_path / "cand", cand_items)

    report = tmp_path / "report"
    assert main(["compare", str(base), str(cand), "--report", str(report)]) == 1
    summary = json.loads((report / "summary.json").read_text())
    assert summary["passed"] is False
    assert summary["counts"] == {"identical": 2, "within_tolerance": 1, "changed": 3, "missing": 0, "new": 0}
    by_id = {i["item_id"]: i for i in summary["items"]}
    assert {k for k, v in by_id.items() if v["status"] == "changed"} == {"item-01", "item-03", "item-04"}
    assert by_id["item-05"]["status"] == "within_tolerance" and by_id["item-05"]["max_abs_diff"] == 0
    assert by_id["item-01"]["settings"] == {"sampler": ["ddim", "euler"]}
    assert by_id["item-03"]["settings"] == {"seed": [1003, 424242]}
    assert by_id["item-04"]["settings"] == {"model_fingerprint": ["f" * 64, "e" * 64]}
    assert summary["settings_differ"] == {"sampler": 1, "seed": 1, "model_fingerprint": 1}
    for k, img in ((1, moved), (3, noise_image(1003)), (4, nudged)):
        got = by_id[f"item-{k:02d}"]
        assert got["max_abs_diff"] == max_abs_diff(items[k]["image"], img)
        assert got["psnr"] == pytest.approx(psnr(items[k]["image"], img))
        assert got["ssim"] == pytest.approx(ssim(items[k]["image"], img))
    assert by_id["item-04"]["max_abs_diff"] == 1 and by_id["item-01"]["max_abs_diff"] == 30
    # Worst first: the unrelated image, then the moved patch, then the one-level nudge.
    changed = [i["item_id"] for i in summary["items"] if i["status"] == "changed"]
    assert changed == ["item-03", "item-01", "item-04"]

    page = (report / "index.html").read_text()
    assert page.index("item-03") < page.index("item-01") < page.index("item-04")
    # The heatmap of item-01 (second worst -> 00001): bright exactly where the patch moved.
    heat = np.asarray(Image.open(report / "images" / "00001-diff.png").convert("RGB"))
    assert heat.shape == (24, 24, 3)
    diff = np.abs(moved.astype(int) - items[1]["image"].astype(int)).max(axis=2)
    expected = COLORMAP[heat_levels(diff)]
    assert np.array_equal(heat, expected)
    assert (heat[4:10, 6:12] > 0).any(axis=2).all() and not heat[:4].any()
    base_thumb = np.asarray(Image.open(report / "images" / "00001-baseline.png").convert("RGB"))
    assert np.array_equal(base_thumb, items[1]["image"])


def test_missing_new_failed_and_thresholds(tmp_path, caplog):
    items = _items(5)
    base_items = [dict(i) for i in items] + [dict(item_id="only-base", image=noise_image(50))]
    base_items[2] = dict(item_id="item-02", status="failed", error="OOM")  # failed in baseline
    base = write_job_output(tmp_path / "base", base_items)
    cand_items = [dict(i) for i in items] + [dict(item_id="only-cand", image=noise_image(60))]
    cand_items[3] = dict(item_id="item-03", status="failed", error="CUDA error")
    noisy = np.clip(items[0]["image"].astype(int) + 2, 0, 255).astype(np.uint8)
    cand_items[0]["image"] = noisy
    cand = write_job_output(tmp_path / "cand", cand_items)

    with caplog.at_level(logging.INFO, logger="batchgen.compare"):
        res = compare_outputs(str(base), str(cand), progress_every=2, workers=2)
    assert sum("compare: 2 items" in r.getMessage() for r in caplog.records) == 1
    assert res.counts == {"identical": 2, "within_tolerance": 0, "changed": 1, "missing": 2, "new": 2}
    by_id = {i.item_id: i for i in res.items}
    assert by_id["only-base"].status == "missing" and by_id["only-base"].note == "not in candidate"
    assert by_id["item-03"].status == "missing" and "CUDA error" in by_id["item-03"].note
    assert by_id["only-cand"].status == "new"
    assert by_id["item-02"].status == "new" and "OOM" in by_id["item-02"].note
    assert by_id["item-00"].max_abs_diff == 2
    # Loose thresholds turn the changed item into within tolerance; the missing ones still fail.
    loose = Thresholds(max_pixel_diff=2, min_psnr=40.0, min_ssim=0.99)
    res = compare_outputs(str(base), str(cand), loose)
    assert res.counts["within_tolerance"] == 1 and res.counts["changed"] == 0 and not res.passed
    assert main(["compare", str(base), str(cand), "--max-pixel-diff", "2", "--min-psnr", "60"]) == 1
    strict = compare_outputs(str(base), str(cand), Thresholds(max_pixel_diff=None, min_psnr=60.0))
    assert "PSNR" in {i.item_id: i for i in strict.items}["item-00"].note

    # Without the missing items everything passes at the loose thresholds -> exit 0.
    cand2 = write_job_output(tmp_path / "cand2", [dict(i, image=noisy if i["item_id"] == "item-00" else i["image"])
                                                   for i in items])
    base2 = write_job_output(tmp_path / "base2", items)
    assert main(["compare", str(base2), str(cand2), "--max-pixel-diff", "2"]) == 0
    assert main(["compare", str(base2), str(cand2)]) == 1


def test_size_change_blessed_copy_and_errors(tmp_path, capsys):
    items = _items(3)
    base = write_job_output(tmp_path / "run1", items)
    cand_items = [dict(i) for i in items]
    cand_items[1]["image"] = noise_image(1, h=32, w=24)
    cand = write_job_output(tmp_path / "run2", cand_items)
    # Bless run1 as the baseline by copying the folder; the original run folder is gone.
    blessed = tmp_path / "baselines" / "nightly"
    shutil.copytree(base, blessed)
    shutil.rmtree(base)
    res = compare_outputs(str(blessed), str(cand))
    (item,) = res.items
    assert item.item_id == "item-01" and item.status == "changed" and item.ssim is None
    assert "size differs: baseline 24x24, candidate 24x32" in item.note
    assert item.baseline_image.startswith(str(blessed))
    assert main(["compare", str(blessed), str(cand), "--report", str(tmp_path / "r")]) == 1
    page = (tmp_path / "r" / "index.html").read_text()
    assert "size differs" in page and "00000-diff.png" not in page  # no heatmap across sizes

    with pytest.raises(InputError, match="no manifest.parquet"):
        compare_outputs(str(tmp_path / "nowhere"), str(cand))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="manifest.parquet: not a readable Parquet"):
        compare_outputs(str(tmp_path / "bad"), str(cand))
    assert main(["compare", str(tmp_path / "nowhere"), str(cand)]) == 2
    assert "no manifest.parquet" in capsys.readouterr().err
    # A corrupt image is a changed item with a note, not a crash. (Items whose manifest sha256
    # values agree are not read at all: the manifest is trusted.)
    (cand / "images" / "item-01.png").write_bytes(b"garbage")
    res = compare_outputs(str(blessed), str(cand))
    (bad,) = res.items
    assert bad.status == "changed" and "item-01.png: not a readable image" in bad.note
    with pytest.raises(ValueError, match="max_pixel_diff"):
        Thresholds(max_pixel_diff=300)


def test_compare_over_s3(request, tmp_path):
    """Both outputs in an S3 bucket (moto server) and the report written back to S3."""
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    from batchgen.storage import Location, StorageConfig

    cfg = StorageConfig(endpoint_url=endpoint)
    items = _items(3)
    cand_items = [dict(i) for i in items]
    cand_items[2]["image"] = noise_image(77)
    for name, its in (("base", items), ("cand", cand_items)):
        local = write_job_output(tmp_path / name, its)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            Location.parse(f"s3://{bucket}/{name}/{f.relative_to(local).as_posix()}", cfg).write_bytes(
                f.read_bytes())
    # The manifests still name local image URIs: images are found under the output's images/.
    shutil.rmtree(tmp_path / "base")
    shutil.rmtree(tmp_path / "cand")
    res = compare_outputs(f"s3://{bucket}/base", f"s3://{bucket}/cand", storage_config=cfg)
    assert res.counts["identical"] == 2 and [i.item_id for i in res.items] == ["item-02"]
    assert res.items[0].baseline_image == f"s3://{bucket}/base/images/item-02.png"
    argv = ["compare", f"s3://{bucket}/base", f"s3://{bucket}/cand", "--report", f"s3://{bucket}/rep",
            "--endpoint-url", endpoint]
    assert main(argv) == 1
    page = Location.parse(f"s3://{bucket}/rep/index.html", cfg).read_bytes().decode()
    assert "item-02" in page
    heat = Location.parse(f"s3://{bucket}/rep/images/00000-diff.png", cfg).read_bytes()
    assert Image.open(io.BytesIO(heat)).size == (24, 24)


def test_nightly_spec_and_prompt_set_are_valid():
    """jobs/nightly.yaml loads as a JobSpec and its prompt set is the generator's output."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from batchgen.spec import load_spec

    repo = Path(__file__).resolve().parents[1]
    spec = load_spec(repo / "jobs" / "nightly.yaml", ["sampling.sampler=euler_a", "output.uri=out/x"])
    assert spec.sampling.sampler == "euler_a" and spec.input.id_column == "id"
    table = pq.read_table(repo / "jobs" / "prompts" / "regression.parquet")
    import importlib.util

    gen_path = repo / "jobs" / "prompts" / "make_regression_prompts.py"
    gen_spec = importlib.util.spec_from_file_location("make_regression_prompts", gen_path)
    gen = importlib.util.module_from_spec(gen_spec)
    gen_spec.loader.exec_module(gen)
    assert table.to_pylist() == gen.rows()  # the committed file is the generator's output
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) >= 20
    assert len({r["seed"] for r in rows}) >= 5 and all(0 <= r["seed"] < 2**63 for r in rows)


@pytest.mark.slow
def test_two_real_jobs_compare(ray_local, builtin_tiny, tmp_path):
    """End to end: two tiny jobs through the runner; one row's seed differs in the second."""
    from batchgen.runner import run_job
    from batchgen.spec import spec_from_dict
    from tests.fixtures_jobs import job_dict, write_prompts

    ids = ["a", "b", "c", "d"]
    seeds_a = [11, 22, 33, 44]
    seeds_b = [11, 22, 999, 44]
    results = {}
    for name, seeds in (("base", seeds_a), ("cand", seeds_b)):
        prompts = write_prompts(tmp_path / f"{name}.parquet", 4, id=ids, seed=seeds)
        spec = spec_from_dict(job_dict(prompts, tmp_path / name, input={"uri": str(prompts), "id_column": "id"}))
        results[name] = run_job(spec)
        assert results[name].all_ok
    res = compare_outputs(str(tmp_path / "base"), str(tmp_path / "cand"))
    assert res.counts == {"identical": 3, "within_tolerance": 0, "changed": 1, "missing": 0, "new": 0}
    (item,) = res.items
    assert item.item_id == "c" and item.max_abs_diff > 0 and item.ssim < 1.0
    # The input files differ by name: provenance (source_file) is not a setting unless asked for.
    assert set(item.settings) == {"seed"} and item.settings["seed"] == [33, 999]
    assert res.settings_differ == {"seed": 1}
    with_source = compare_outputs(str(tmp_path / "base"), str(tmp_path / "cand"), ignore_settings=["worker"])
    assert with_source.settings_differ["source_file"] == 4
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "cand"), "--report", str(tmp_path / "r")]) == 1
    assert (tmp_path / "r" / "images" / "00000-diff.png").exists()
