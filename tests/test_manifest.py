"""Manifest parts, resume state and consolidation (one row per item, sorted, ok beats failed)."""

import pyarrow.parquet as pq

from batchgen.manifest import (MANIFEST_SCHEMA, PartWriter, committed_state, consolidate, part_locations,
                               read_manifest, to_manifest_table)
from batchgen.storage import Location


def _rows(ids, status="ok", attempt=1, tag="a"):
    n = len(ids)
    cols = {f.name: [None] * n for f in MANIFEST_SCHEMA}
    cols.update(item_id=ids, status=[status] * n, attempt=[attempt] * n, worker=[tag] * n,
                error=[None if status == "ok" else "boom"] * n, seed=list(range(n)))
    return to_manifest_table(cols)


def _write_parts(out, *tables):
    w = PartWriter(out, max_rows=10**9, max_seconds=10**9)
    for t in tables:
        w.add(t)
        w.flush()
    return w


def test_part_writer_flushes_by_rows_and_is_atomic(tmp_path):
    out = Location.parse(tmp_path)
    w = PartWriter(out, max_rows=3, max_seconds=10**9)
    w.add(_rows(["a", "b"]))
    assert part_locations(out) == []
    w.add(_rows(["c", "d"]))
    assert len(part_locations(out)) == 1 and w.parts_written == 1
    w.flush()  # nothing buffered: no empty part
    assert len(part_locations(out)) == 1
    w.add(_rows(["e"]))
    w.flush()
    parts = part_locations(out)
    assert len(parts) == 2 and not [p for p in (tmp_path / "manifest").iterdir() if p.name.startswith(".")]
    assert sum(pq.read_table(p.uri).num_rows for p in parts) == 5


def test_consolidate_keeps_one_row_per_item(tmp_path):
    out = Location.parse(tmp_path)
    _write_parts(out, _rows(["c", "a"], tag="run1"), _rows(["b"], status="failed"),
                 _rows(["a", "b"], attempt=2, tag="run2"), _rows(["d"], status="failed", attempt=2))
    (tmp_path / "manifest" / "part-zz-broken.parquet").write_bytes(b"PAR1 torn write")
    counts = consolidate(out)
    t = read_manifest(out)
    assert t.schema == MANIFEST_SCHEMA
    assert t.column("item_id").to_pylist() == ["a", "b", "c", "d"]
    assert t.column("status").to_pylist() == ["ok", "ok", "ok", "failed"]
    assert t.column("worker").to_pylist()[:2] == ["run2", "run2"]
    assert counts == {"ok": 3, "failed": 1}
    state = committed_state(out)
    assert sorted(state.done.to_pylist()) == ["a", "b", "c"] and state.attempts == {"d": 2}


def test_consolidate_streamed_matches_in_memory(tmp_path, monkeypatch):
    """Above the in-memory limit the manifest streams through sorted runs and a k-way merge (here
    with runs of 700 rows merged 2 at a time, so several merge passes run): same bytes of rows."""
    import batchgen.sorted_runs as sr

    monkeypatch.setattr(sr, "RUN_ROWS", 700)
    monkeypatch.setattr(sr, "FAN_IN", 2)
    monkeypatch.setattr(sr, "BATCH_ROWS", 64)
    monkeypatch.setattr(sr, "OUT_ROWS", 500)
    mem, big = Location.parse(tmp_path / "mem"), Location.parse(tmp_path / "big")
    ids = [f"i{i:05d}" for i in range(3000)]
    tables = [_rows(ids[::-1][:2000], tag="x"), _rows(ids[:1000], status="failed", attempt=2),
              _rows(ids[500:2500], attempt=3, tag="y")]
    _write_parts(mem, *tables)
    _write_parts(big, *tables)
    assert consolidate(mem) == consolidate(big, in_memory_limit=10) == {"ok": 2500, "failed": 500}
    a, b = read_manifest(mem), read_manifest(big)
    assert a.num_rows == 3000 and a.equals(b)
