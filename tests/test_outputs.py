"""`batchgen.outputs`: reading job outputs (manifest, job.json, images, an item's row for rerender)."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import InputError
from batchgen.manifest import MANIFEST_SCHEMA
from batchgen.outputs import Output, decode_image, find_row, image_location, open_output, read_manifest
from tests.fixtures_regression import noise_image, write_job_output


def _job(tmp_path):
    items = [dict(item_id=f"it-{k}", image=noise_image(k)) for k in range(4)]
    items[2] = dict(item_id="it-2", status="failed", error="RuntimeError: boom")
    out = write_job_output(tmp_path / "job", items)
    job = {"name": "fixture", "spec": {"input": {"uri": "in.parquet", "passthrough": ["label", "caption"]}}}
    (out / "job.json").write_text(json.dumps(job))
    return out, items


def test_output_reads_job_manifest_rows_and_images(tmp_path):
    out, items = _job(tmp_path)
    o = Output.open(str(out))
    assert o.uri == open_output(str(out)).uri
    assert o.job["name"] == "fixture" and o.passthrough == ["label", "caption"]
    assert o.summary is None
    (out / "summary.json").write_text(json.dumps({"ok": 3}))
    assert Output.open(str(out)).summary == {"ok": 3}
    assert o.manifest.equals(read_manifest(o.root))
    rows = list(o.rows(chunk=2))
    assert [r["item_id"] for r in rows] == ["it-0", "it-1", "it-2", "it-3"]
    assert o.ok_table().column("item_id").to_pylist() == ["it-0", "it-1", "it-3"]
    row = rows[1]
    assert np.array_equal(o.read_image(row), items[1]["image"])
    data = o.read_image_bytes(row)
    assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
    assert np.array_equal(decode_image(data, "x"), items[1]["image"])
    # A copied output (another root) finds its images under its own images/, not image_uri.
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(out)).write_bytes(p.read_bytes())
    c = Output.open(str(copy))
    assert c.image_location(row).uri == image_location(c.root, row).uri
    assert c.image_location(row).uri.startswith(str(copy))
    # Tampered bytes are refused unless verify=False; undecodable bytes name the file.
    (out / "images" / "it-1.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="do not match the manifest sha256 of item 'it-1'"):
        o.read_image_bytes(row)
    assert o.read_image_bytes(row, verify=False) == b"not a png"
    with pytest.raises(InputError, match="it-1.png: not a readable image"):
        o.read_image(row, verify=False)


def test_output_errors(tmp_path):
    (tmp_path / "empty" / "manifest").mkdir(parents=True)
    with pytest.raises(InputError, match="no manifest.parquet.*not consolidated"):
        Output.open(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no job.json, not a batchgen job output"):
        Output.at(str(tmp_path / "empty")).job
    assert Output.at(str(tmp_path / "empty")).spec == {}  # no job.json: no spec
    out, _ = _job(tmp_path)
    (out / "job.json").write_text("{broken")
    with pytest.raises(InputError, match="job.json: not a readable job.json"):
        Output.open(str(out)).job
    bad = pa.Table.from_pylist([{"item_id": "a", "status": "ok"}])
    pq.write_table(bad, out / "manifest.parquet")
    with pytest.raises(InputError, match="manifest has no column"):
        Output.open(str(out)).manifest


def _part(out, name, rows):
    (out / "manifest").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "manifest" / name)


def test_find_row_in_manifest_and_in_part_files(tmp_path):
    out, _ = _job(tmp_path)
    row = find_row(str(out), "it-3")
    assert row["item_id"] == "it-3" and row["status"] == "ok" and row["seed"] == 1003
    assert Output.at(str(out)).find_row("it-2", status="failed")["error"] == "RuntimeError: boom"
    with pytest.raises(InputError, match="item 'it-2' has no ok row in the manifest"):
        find_row(str(out), "it-2")
    with pytest.raises(InputError, match="item 'nope' has no ok row"):
        find_row(str(out), "nope")

    # An unconsolidated output (a crashed job): the newest ok row of the part files wins.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    base = {"prompt": "p", "status": "ok", "attempt": 1, "image_uri": "/x.png"}
    _part(crashed, "part-20260101T000000-aaaa-000000.parquet",
          [dict(base, item_id="a", seed=1), dict(base, item_id="b", status="failed", error="E: x")])
    _part(crashed, "part-20260101T000000-aaaa-000001.parquet",
          [dict(base, item_id="b", seed=2, attempt=2), dict(base, item_id="c", status="failed", error="E: y")])
    _part(crashed, "part-20260102T000000-bbbb-000000.parquet", [dict(base, item_id="a", seed=3, attempt=2)])
    (crashed / "manifest" / "part-20260103T000000-cccc-000000.parquet").write_bytes(b"torn write")
    assert find_row(str(crashed), "a")["seed"] == 3
    assert find_row(str(crashed), "b")["seed"] == 2 and find_row(str(crashed), "b")["attempt"] == 2
    with pytest.raises(InputError, match="item 'c' has no ok row"):
        find_row(str(crashed), "c")
    # Output objects are accepted too.
    assert find_row(Output.at(str(crashed)), "a")["seed"] == 3


def test_compare_keeps_its_reading_names():
    import batchgen.compare as compare
    import batchgen.outputs as outputs

    for name in ("open_output", "read_manifest", "image_location", "decode_image", "iter_rows"):
        assert getattr(compare, name) is getattr(outputs, name)
