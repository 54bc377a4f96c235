"""Manifest: schema, part files, the resume state, consolidation and summary.

Part files (``manifest/part-<run>-<seq>.parquet``) are written atomically as work completes; after
a crash they may overlap. Consolidation keeps one row per item: ``ok`` beats ``failed``, then the
highest attempt, then the newest part. Small manifests are consolidated in memory; large ones
through sorted runs on local disk and a k-way merge, streamed into ``manifest.parquet`` row group
by row group (driver memory stays flat).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .columns import (EXPORT_FIELDS, LABEL_COLUMNS, MANIFEST_SCHEMA, RESERVED_NAMES, STAGE_COLUMNS,  # noqa: F401
                      manifest_schema, reserved_name_error, reserved_names)

log = logging.getLogger(__name__)

PARTS_DIR = "manifest"
MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "summary.json"
JOB_FILE = "job.json"
IN_MEMORY_CONSOLIDATE_ROWS = 50_000



# render_env: JSON of what else decides an item's bytes (device kind and name, dtype, torch
# intra-op threads, torch/CUDA/cuDNN versions, deterministic flags); see stages.render_env().


def image_parameters(row: dict[str, Any]) -> dict[str, Any]:
    """The metadata dict embedded in an item's image (same for the job and ``rerender``): the
    fields that decide its pixels (no timings or workers, so any renderer writes the same bytes)."""
    from .settings import SETTINGS

    fields = ("item_id", "prompt", *(s.name for s in SETTINGS), "control_image", "mask_image", "control_preprocess",
              "canny_low", "canny_high", "sampler", "sampler_options", "batch_size",
              "loras", "model_fingerprint", "model_family", "class_name")
    params = {k: row.get(k) for k in fields}
    if params.get("loras") == "[]":
        params["loras"] = None
    return {k: v for k, v in params.items() if v is not None}


def to_manifest_table(columns: dict[str, Any], schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """A dict of columns (lists or arrays) as a table with exactly ``schema``."""
    arrays = []
    for f in schema:
        value = columns[f.name]
        arr = value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(value, f.type)
        arrays.append(arr.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def table_bytes(table: pa.Table) -> bytes:
    """Parquet file bytes of ``table``."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class PartWriter:
    """Buffers manifest rows and writes them as part files, each one atomically.

    A part is flushed when ``max_rows`` rows are buffered or ``max_seconds`` passed since the
    last flush, so committed progress trails the work by seconds, not by the whole job.
    """

    def __init__(self, out_loc, max_rows: int = 2048, max_seconds: float = 5.0):
        self.dir = out_loc.join(PARTS_DIR)
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.seq = 0
        self.last_flush = time.monotonic()
        self.parts_written = 0
        self._committed = 0
        self._lock = threading.RLock()  # the runner's commit thread flushes on the time bound

    def add(self, table: pa.Table) -> None:
        with self._lock:
            if table.num_rows:
                self.buffer.append(table)
                self.buffered += table.num_rows
            self.flush_if_due()

    def flush_if_due(self) -> None:
        """Flush on the row bound, or on the time bound (the runner calls this while it waits, so
        rows are committed within ``max_seconds`` even when no further batch arrives)."""
        with self._lock:
            if self.buffered >= self.max_rows or time.monotonic() - self.last_flush >= self.max_seconds:
                self.flush()

    @property
    def committed_rows(self) -> int:
        """Rows this writer has written to part files."""
        return self._committed

    def flush(self) -> None:
        with self._lock:
            self.last_flush = time.monotonic()
            if not self.buffered:
                return
            table = pa.concat_tables(self.buffer)
            name = f"part-{self.run_id}-{self.seq:06d}.parquet"
            self.dir.join(name).write_bytes(table_bytes(table))
            self.seq += 1
            self.parts_written += 1
            self._committed += table.num_rows
            self.buffer, self.buffered = [], 0


def part_locations(out_loc) -> list:
    """Committed part files, oldest run first (names sort by run time then sequence)."""
    parts = out_loc.join(PARTS_DIR).list(recursive=False)
    return [p for p in parts if p.name.startswith("part-") and p.name.endswith(".parquet")]


def conform(table: pa.Table, names: list[str] | None = None) -> pa.Table:
    """``table`` with the manifest columns ``names`` (default: all of MANIFEST_SCHEMA, then the
    job's own extra columns as they are): parts written by an older batchgen lack newer columns,
    which read as nulls."""
    if names is None:
        extra = [table.schema.field(n) for n in table.column_names if n not in MANIFEST_SCHEMA.names]
        fields = list(MANIFEST_SCHEMA) + extra
    else:
        fields = [MANIFEST_SCHEMA.field(n) if n in MANIFEST_SCHEMA.names else table.schema.field(n) for n in names]
    arrays = []
    for f in fields:
        if f.name in table.column_names:
            arrays.append(table.column(f.name).cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def read_part(loc, columns: list[str] | None = None) -> pa.Table | None:
    """One part file's rows (conformed to the schema), or None (with a warning) when unreadable."""
    try:
        pf = pq.ParquetFile(io.BytesIO(loc.read_bytes()))
        wanted = [n for n in columns if n in pf.schema_arrow.names] if columns else None
        table = pf.read(columns=wanted)
    except (OSError, pa.ArrowException) as exc:
        log.warning("ignoring unreadable manifest part %s: %s", loc.uri, exc)
        return None
    return conform(table, columns)


def iter_parts(out_loc, columns: list[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
    for index, loc in enumerate(part_locations(out_loc)):
        table = read_part(loc, columns)
        if table is not None:
            yield index, table


class CommittedState:
    """What earlier runs committed: ok item ids (sorted Arrow array) and attempts so far."""

    def __init__(self, done: pa.Array, attempts: dict[str, int], failed: int, parts: int):
        self.done = done
        self.attempts = attempts  # item_id -> attempts used, for items without an ok row
        self.failed = failed
        self.parts = parts

    @property
    def done_count(self) -> int:
        return len(self.done)

    def failed_ids(self) -> pa.Array:
        return pa.array(list(self.attempts), pa.string())

    def render_again(self, check: "ImageCheck") -> "CommittedState":
        """This state with the items of ``check`` (ok rows whose image is gone or wrong) no longer
        done: the run renders them again, at their next attempt number."""
        if not len(check.ids):
            return self
        done = self.done.filter(pc.invert(pc.is_in(self.done, value_set=check.ids)))
        attempts = {**self.attempts, **check.attempts}
        return CommittedState(done, attempts, len(attempts), self.parts)


def empty_state() -> CommittedState:
    return CommittedState(pa.array([], pa.string()), {}, 0, 0)


def committed_state(out_loc) -> CommittedState:
    """Scan part files (item_id, status, attempt only). The ok-id set is kept as one Arrow
    string array (no Python objects): about the size of the ids themselves."""
    ok_chunks: list[pa.Array] = []
    failed_rows: list[pa.Table] = []
    parts = 0
    for _, table in iter_parts(out_loc, ["item_id", "status", "attempt"]):
        parts += 1
        is_ok = pc.equal(table.column("status"), "ok")
        ok_chunks.append(table.filter(is_ok).column("item_id").combine_chunks())
        failed_rows.append(table.filter(pc.invert(is_ok)))
    done = pc.unique(pa.concat_arrays(ok_chunks)) if ok_chunks else pa.array([], pa.string())
    attempts: dict[str, int] = {}
    if failed_rows:
        failed = pa.concat_tables(failed_rows)
        failed = failed.filter(pc.invert(pc.is_in(failed.column("item_id"), value_set=done)))
        for item_id, attempt in zip(failed.column("item_id").to_pylist(), failed.column("attempt").to_pylist()):
            attempts[item_id] = max(attempts.get(item_id, 0), attempt or 1)
    return CommittedState(done, attempts, len(attempts), parts)


class ImageCheck:
    """Committed ok items whose stored image is missing (or, verified, wrong): their ids, the
    attempt of their ok row, how many per source file, and the first few problems in words."""

    def __init__(self, ids: pa.Array, attempts: dict[str, int], by_file: dict[str, int], missing: int,
                 wrong: int, first: list[str]):
        self.ids, self.attempts, self.by_file = ids, attempts, by_file
        self.missing, self.wrong, self.first = missing, wrong, first

    def in_files(self, uris) -> int:
        """How many of the items came from the input files ``uris``."""
        return sum(n for uri, n in self.by_file.items() if uri in set(uris))

    def as_dict(self) -> dict[str, Any]:
        return {"missing": self.missing, "wrong": self.wrong, "first": self.first}


def check_images(out_loc, done: pa.Array, ext: str, verify: bool = False, workers: int = 8) -> ImageCheck:
    """Which committed ok items (ids ``done``) lack their image ``images/<id>.<ext>``.

    Always one listing of ``images/`` (names and sizes), never a request per item. With
    ``verify`` the newest ok row of each item is also checked against the stored file: its
    ``image_bytes`` against the listed size, then its ``image_sha256`` against the file's bytes
    (read with ``workers`` threads). Rows written before sizes and digests were recorded are
    checked for existence only."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    images = out_loc.join("images")
    sizes = images.file_sizes() if len(done) else {}
    names = pa.array(list(sizes), pa.string())
    expected = pc.binary_join_element_wise(done, ext, ".")
    bad = done.filter(pc.invert(pc.is_in(expected, value_set=names))) if len(done) else done
    missing, wrong, first = len(bad), 0, [f"{i}: images/{i}.{ext} is missing" for i in bad.slice(0, 5).to_pylist()]
    if verify and len(done):
        suspects: list[tuple[str, str | None, str]] = []
        for rows in _newest_ok_rows(out_loc, ["item_id", "status", "attempt", "image_bytes", "image_sha256"]):
            rows = rows.filter(pc.is_in(rows.column("item_id"), value_set=done))
            rows = rows.filter(pc.is_in(pc.binary_join_element_wise(rows.column("item_id"), ext, "."),
                                        value_set=names))
            for item_id, size, sha in zip(rows.column("item_id").to_pylist(), rows.column("image_bytes").to_pylist(),
                                          rows.column("image_sha256").to_pylist()):
                listed = sizes[f"{item_id}.{ext}"]
                if size is not None and size != listed:
                    suspects.append((item_id, None, f"{item_id}: images/{item_id}.{ext} has {listed} bytes, the "
                                                    f"manifest says {size}"))
                elif sha:
                    suspects.append((item_id, sha, ""))

        def judge(case: tuple[str, str | None, str]) -> str | None:
            item_id, sha, why = case
            if sha is None:
                return why
            try:
                data = images.join(f"{item_id}.{ext}").read_bytes()
            except Exception as exc:  # noqa: BLE001 - gone since the listing: render it again
                return f"{item_id}: {exc}"
            if hashlib.sha256(data).hexdigest() != sha:
                return f"{item_id}: images/{item_id}.{ext} does not match the manifest sha256"
            return None

        with ThreadPoolExecutor(max_workers=workers) as pool:
            verdicts = list(pool.map(judge, suspects))
        wrong_ids = [case[0] for case, why in zip(suspects, verdicts) if why]
        wrong = len(wrong_ids)
        first += [why for why in verdicts if why][:max(0, 5 - len(first))]
        bad = pa.concat_arrays([bad, pa.array(wrong_ids, pa.string())])
    if not len(bad):
        return ImageCheck(bad, {}, {}, 0, 0, [])
    attempts: dict[str, int] = {}
    by_file: dict[str, int] = {}
    for _, table in iter_parts(out_loc, ["item_id", "status", "attempt", "source_file"]):
        table = table.filter(pc.and_(pc.equal(table.column("status"), "ok"),
                                     pc.is_in(table.column("item_id"), value_set=bad)))
        for item_id, attempt, source in zip(table.column("item_id").to_pylist(), table.column("attempt").to_pylist(),
                                            table.column("source_file").to_pylist()):
            if item_id not in attempts:
                by_file[source] = by_file.get(source, 0) + 1
            attempts[item_id] = max(attempts.get(item_id, 0), attempt or 1)
    return ImageCheck(bad, attempts, by_file, missing, wrong, first)


def _newest_ok_rows(out_loc, columns: list[str]) -> Iterator[pa.Table]:
    """The ok row of each item that consolidation would keep (highest attempt, then newest part),
    sorted by item id, a table at a time (bounded memory: :mod:`batchgen.sorted_runs`)."""
    from .sorted_runs import sorted_unique

    ranked = (_with_rank(t.filter(pc.equal(t.column("status"), "ok")), i) for i, t in iter_parts(out_loc, columns))
    for table in sorted_unique(ranked, "item_id", _ORDER):
        yield table.drop_columns(["_ok", "_part"])


# ----------------------------------------------------------------------------- consolidation

_ORDER = [("item_id", "ascending"), ("_ok", "descending"), ("attempt", "descending"), ("_part", "descending")]


def _with_rank(table: pa.Table, part_index: int) -> pa.Table:
    table = table.append_column("_ok", pc.cast(pc.equal(table.column("status"), "ok"), pa.int8()))
    return table.append_column("_part", pa.array([part_index] * table.num_rows, pa.int32()))


def _first_per_item(table: pa.Table, carry_id: str | None) -> tuple[pa.Table, str | None]:
    """Rows of a sorted table that start a new item_id (dropping a continuation of ``carry_id``)."""
    from .sorted_runs import first_per_key

    return first_per_key(table, "item_id", carry_id)


class FailureSummary:
    """Failed items for people: a count per error kind and the first ``keep`` items with their errors."""

    def __init__(self, keep: int = 20):
        self.keep = keep
        self.count = 0
        self.by_kind: dict[str, int] = {}
        self.first: list[dict[str, Any]] = []

    def add(self, table: pa.Table) -> None:
        failed = table.filter(pc.not_equal(table.column("status"), "ok"))
        if not failed.num_rows:
            return
        attempts = failed.column("attempt").to_pylist() if "attempt" in failed.column_names else [None] * failed.num_rows
        for item_id, error, attempt in zip(failed.column("item_id").to_pylist(),
                                           failed.column("error").to_pylist(), attempts):
            self.count += 1
            kind = error_kind(error)
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            if len(self.first) < self.keep:
                self.first.append({"item_id": item_id, "error": error, "attempt": attempt})

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "by_kind": dict(sorted(self.by_kind.items(), key=lambda kv: -kv[1])),
                "first": self.first}


def error_kind(error: str | None) -> str:
    """The kind of a manifest error: its exception name, after a 'render failed: ' style stage prefix."""
    import re

    if not error:
        return "unknown"
    m = re.match(r"^((?:render|store) failed: )?([A-Za-z_][A-Za-z0-9_.]*)(?=:)", error)
    return (m.group(1) or "") + m.group(2) if m else error.split(":", 1)[0][:60]


def consolidate(out_loc, in_memory_limit: int = IN_MEMORY_CONSOLIDATE_ROWS,
                failures: FailureSummary | None = None) -> dict[str, int]:
    """Write ``manifest.parquet``: one row per item, sorted by item_id. Returns status counts
    (and adds the failed rows to ``failures`` when given).

    Small manifests are sorted in memory; larger ones stream through sorted runs on local disk
    and a k-way merge (:mod:`batchgen.sorted_runs`), written row group by row group: the memory
    it takes does not grow with the number of rows, and no Ray is needed."""
    from .sorted_runs import sorted_unique

    parts = part_locations(out_loc)
    total_rows = 0
    for loc in parts:
        try:
            fs, path = loc.pyarrow_fs()
            total_rows += pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
        except (OSError, pa.ArrowException):
            pass
    target = out_loc.join(MANIFEST_FILE)
    counts = {"ok": 0, "failed": 0}
    if total_rows <= in_memory_limit:
        tables = [_with_rank(t, i) for i, t in iter_parts(out_loc)]
        table = (pa.concat_tables(tables, promote_options="default") if tables
                 else _with_rank(MANIFEST_SCHEMA.empty_table(), 0))
        table, _ = _first_per_item(table.sort_by(_ORDER), None)
        table = table.drop_columns(["_ok", "_part"])
        target.write_bytes(table_bytes(table))
        _count(table, counts)
        if failures is not None:
            failures.add(table)
        return counts
    first = next((t for _, t in iter_parts(out_loc)), None)
    schema = first.schema if first is not None else MANIFEST_SCHEMA  # the job's columns, extras included
    ranked = (_with_rank(t, i) for i, t in iter_parts(out_loc))
    # published only when complete (storage's atomic writer: temp + rename, or a completed multipart)
    with target.open_atomic() as stream, pq.ParquetWriter(stream, schema, compression="zstd") as writer:
        for batch in sorted_unique(ranked, "item_id", _ORDER):
            batch = batch.drop_columns(["_ok", "_part"]).select(schema.names).cast(schema)
            writer.write_table(batch)
            _count(batch, counts)
            if failures is not None:
                failures.add(batch)
    return counts


def _count(table: pa.Table, counts: dict[str, int]) -> None:
    vc = pc.value_counts(table.column("status"))
    for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        counts[value] = counts.get(value, 0) + n


def read_manifest(out_loc) -> pa.Table | None:
    """The consolidated manifest, or None when the job has not consolidated yet."""
    loc = out_loc.join(MANIFEST_FILE)
    if not loc.exists():
        return None
    return pq.read_table(io.BytesIO(loc.read_bytes()))


def write_json(loc, data: dict) -> None:
    loc.write_bytes((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(loc) -> dict:
    return json.loads(loc.read_bytes().decode())
