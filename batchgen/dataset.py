"""Prompt Parquet -> validated, normalized rows with stable item ids.

One function, :func:`normalize_batch`, turns a slice of an input file into rows with every
setting resolved (per-row columns override the job). The driver runs it over every input file in a
streaming pre-flight pass (:func:`scan_inputs`) so bad input fails before anything renders; the
Ray read stage runs the same function again on the workers, so both agree by construction.

Duplicate ids are found with bounded memory: ids are spilled to hash buckets on local disk and
each bucket is checked on its own.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError, StorageError
from .noise import SEED_LIMIT, derive_seed

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
SCAN_BATCH_ROWS = 65536
MAX_GROUPS_TO_SPLIT = 8

ROW_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("strength", pa.float64()),
        ("init_image", pa.string()),
        ("group", pa.string()),
    ]
)

# Optional per-row columns: name -> (value family, allowed range as words, row type)
ROW_OVERRIDES = {
    "negative_prompt": ("string", None, pa.string()),
    "seed": ("int", "[0, 2**63)", pa.int64()),
    "width": ("int", "[8, 4096]", pa.int32()),
    "height": ("int", "[8, 4096]", pa.int32()),
    "steps": ("int", "[1, 1000]", pa.int32()),
    "guidance_scale": ("float", "[0, 100]", pa.float64()),
    "init_image": ("string", None, pa.string()),
    "strength": ("float", "(0, 1]", pa.float64()),
}
_FAMILY_TYPE = {"string": pa.string(), "int": pa.int64(), "float": pa.float64()}


@dataclass(frozen=True)
class InputFile:
    """One input Parquet file: its URI and its path relative to the input root (for ids)."""

    uri: str
    rel: str
    row_groups: tuple[int, ...] = ()  # rows per row group


MAX_SAMPLER_CASES = 1000


@dataclass
class ScanResult:
    """What the pre-flight pass learned: files, row count, settings groups, what is done."""

    files: list[InputFile]
    total_rows: int
    groups: dict[str, int] = field(default_factory=dict)  # group key -> rows (None when too many)
    too_many_groups: bool = False
    identities: list[dict] = field(default_factory=list)  # per file: uri, rel, rows, size, sha256|etag
    done_in_input: int = 0  # items of this input with a committed ok row
    failed_in_input: int = 0  # items of this input whose committed rows all failed
    # (steps, strength or None) -> (file uri, row) of its first row: the sampler schedules to check
    sampler_cases: dict[tuple, tuple[str, int]] = field(default_factory=dict)


def row_settings(spec) -> dict[str, Any]:
    """The plain dict of job settings the row normalizer needs (picklable, small)."""
    s = spec.sampling
    return {
        "id_column": spec.input.id_column,
        "prompt_column": spec.input.prompt_column,
        "negative_prompt": s.negative_prompt,
        "seed": s.seed,
        "width": s.width,
        "height": s.height,
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "strength": s.strength,
    }


# ----------------------------------------------------------------------------- files


def _is_glob(uri: str) -> bool:
    return any(ch in uri for ch in "*?[")


def list_input_files(uri: str, storage_cfg) -> list[InputFile]:
    """Resolve the input URI (file, folder, glob, s3 prefix) to sorted Parquet files."""
    from .storage import Location

    pattern = None
    base_uri = uri
    if _is_glob(uri):
        cut = min(uri.index(ch) for ch in "*?[" if ch in uri)
        slash = uri.rfind("/", 0, cut)
        base_uri, pattern = (uri[:slash], uri[slash + 1 :]) if slash >= 0 else (".", uri)
    base = Location.parse(base_uri, storage_cfg)
    if pattern is None and base.exists() and not base.is_dir_like():
        return [InputFile(base.uri, base.uri.rstrip("/").rsplit("/", 1)[-1])]
    if not base.is_dir_like():
        raise InputError(f"input.uri {uri!r}: no such file or folder ({base.uri})")
    root = base.uri.rstrip("/") + "/"
    files = []
    for loc in base.list(recursive=True):
        rel = loc.uri[len(root):] if loc.uri.startswith(root) else loc.uri.rsplit("/", 1)[-1]
        if pattern is not None:
            if not fnmatch.fnmatch(rel, pattern):
                continue
        elif not rel.endswith(".parquet"):
            continue
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden / _SUCCESS style files
        files.append(InputFile(loc.uri, rel))
    if not files:
        what = f"matching {pattern!r}" if pattern else "*.parquet"
        raise InputError(f"input.uri {uri!r}: no Parquet files {what} under {base.uri}")
    return sorted(files, key=lambda f: f.rel)


def open_parquet(file_uri: str, storage_cfg):
    """Open one input file as a ``pyarrow.parquet.ParquetFile`` (errors name the file)."""
    import pyarrow.parquet as pq

    from .storage import Location

    loc = Location.parse(file_uri, storage_cfg)
    fs, path = loc.pyarrow_fs()
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"input file {file_uri}: cannot read as Parquet: {exc}") from None


def derived_id_prefix(rel: str) -> str:
    """Id prefix for a file without an id column: its relative path, made key-safe and stable."""
    stem = rel[: -len(".parquet")] if rel.endswith(".parquet") else rel
    if ID_RE.match(stem) and not stem.startswith(".") and len(stem) <= 100:
        return stem
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80] or "input"
    return f"{safe}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------- rows


def _fail(file_uri: str, row: int, column: str, message: str) -> InputError:
    return InputError(f"input file {file_uri}, row {row}, column {column!r}: {message}")


def _first_true(mask: pa.Array) -> int:
    return pc.index(mask.fill_null(False), True).as_py()


def _column(table: pa.Table, name: str, family: str, file_uri: str, first_row: int, allowed: str | None = None):
    """Column ``name`` as string / int64 / float64 (dictionary-encoded columns decoded), or None
    when the file has no such column. Errors name the file, column and, for a value, the row."""
    col = table.column(name).combine_chunks() if name in table.column_names else None
    if col is None:
        return None
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    target = _FAMILY_TYPE[family]
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), target)
    family_ok = {
        "string": pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        or pa.types.is_string_view(col.type),
        "int": pa.types.is_integer(col.type),
        "float": pa.types.is_integer(col.type) or pa.types.is_floating(col.type),
    }
    if not family_ok[family]:
        raise InputError(
            f"input file {file_uri}, column {name!r}: expected {family} values, got {col.type}"
        )
    if family == "int" and pa.types.is_unsigned_integer(col.type) and col.type.bit_width == 64:
        too_big = pc.greater(col, pa.scalar(SEED_LIMIT - 1, pa.uint64()))
        if pc.any(too_big).as_py():
            i = _first_true(too_big)
            raise _fail(file_uri, first_row + i, name,
                        f"{col[i].as_py()} is outside {allowed or '[0, 2**63)'}")
    return col.cast(target)


def normalize_batch(
    table: pa.Table, file_uri: str, rel: str, first_row: int, settings: dict[str, Any]
) -> pa.Table:
    """Validate and resolve one slice of an input file (rows ``first_row...``) into ROW_SCHEMA.

    Raises InputError naming the file, row and column of the first bad value.
    """
    n = table.num_rows
    rows = pa.array(range(first_row, first_row + n), pa.int64())
    pcol = settings["prompt_column"]
    if pcol not in table.column_names:
        raise InputError(
            f"input file {file_uri}: no prompt column {pcol!r} (columns: {table.column_names}); "
            f"set input.prompt_column"
        )
    prompt = _column(table, pcol, "string", file_uri, first_row)
    if prompt.null_count:
        i = _first_true(pc.is_null(prompt))
        raise _fail(file_uri, first_row + i, pcol, "prompt is null (use \"\" for an unconditional prompt)")

    idcol = settings["id_column"]
    if idcol:
        if idcol not in table.column_names:
            raise InputError(f"input file {file_uri}: no id column {idcol!r} (columns: {table.column_names})")
        ids = table.column(idcol).combine_chunks()
        if pa.types.is_dictionary(ids.type):
            ids = ids.dictionary_decode()
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
                or pa.types.is_integer(ids.type)):
            raise InputError(f"input file {file_uri}, column {idcol!r}: ids must be strings or integers, got {ids.type}")
        ids = ids.cast(pa.string())
        bad = pc.invert(pc.match_substring_regex(ids, ID_PATTERN).fill_null(False))
        bad = pc.or_(bad, pc.match_substring_regex(ids, r"^\.+$").fill_null(False))
        if pc.any(bad).as_py():
            i = _first_true(bad)
            raise _fail(file_uri, first_row + i, idcol,
                        f"unsafe item id {ids[i].as_py()!r}: ids must be 1..128 characters of "
                        f"[A-Za-z0-9._-] and not only dots")
    else:
        prefix = derived_id_prefix(rel)
        ids = pa.array([f"{prefix}-{r:08d}" for r in range(first_row, first_row + n)], pa.string())

    cols: dict[str, pa.Array] = {}
    for name, (family, allowed, _typ) in ROW_OVERRIDES.items():
        col = _column(table, name, family, file_uri, first_row, allowed)
        if name in ("init_image", "seed"):
            cols[name] = col if col is not None else pa.nulls(n, _FAMILY_TYPE[family])
            continue
        default = pa.scalar(settings.get(name), _FAMILY_TYPE[family])
        cols[name] = col.fill_null(default) if col is not None else pa.array([default.as_py()] * n, default.type)

    # Range checks run on int64 / float64, before the cast to the row types (no overflow there).
    _check_range(cols["seed"], 0, SEED_LIMIT - 1, file_uri, first_row, "seed", "is outside [0, 2**63)")
    for side in ("width", "height"):
        _check_range(cols[side], 8, 4096, file_uri, first_row, side, "must be in [8, 4096]")
        odd = pc.not_equal(pc.bit_wise_and(cols[side], pa.scalar(7, pa.int64())), 0)
        if pc.any(odd).as_py():
            i = _first_true(odd)
            raise _fail(file_uri, first_row + i, side, f"{cols[side][i].as_py()} is not a multiple of 8")
    _check_range(cols["steps"], 1, 1000, file_uri, first_row, "steps", "must be in [1, 1000]")
    _check_range(cols["guidance_scale"], 0.0, 100.0, file_uri, first_row, "guidance_scale", "must be in [0, 100]")
    _check_range(cols["strength"], 1e-9, 1.0, file_uri, first_row, "strength", "must be in (0, 1]")
    for name, (_family, _allowed, typ) in ROW_OVERRIDES.items():
        if name != "seed":
            cols[name] = cols[name].cast(typ)

    if cols["seed"].null_count:
        seeds = [
            s if s is not None else derive_seed(settings["seed"], i)
            for s, i in zip(cols["seed"].to_pylist(), ids.to_pylist())
        ]
        cols["seed"] = pa.array(seeds, pa.int64())
    img2img = pc.is_valid(cols["init_image"])
    cols["strength"] = pc.if_else(img2img, cols["strength"], pa.scalar(None, pa.float64()))
    group = pc.binary_join_element_wise(
        cols["width"].cast(pa.string()), cols["height"].cast(pa.string()), cols["steps"].cast(pa.string()),
        cols["guidance_scale"].cast(pa.string()),
        pc.if_else(img2img, cols["strength"].cast(pa.string()), pa.scalar("txt2img")), "|",
    )
    return pa.table(
        {
            "item_id": ids,
            "source_file": pa.array([file_uri] * n, pa.string()),
            "source_row": rows,
            "prompt": prompt,
            "negative_prompt": cols["negative_prompt"],
            "seed": cols["seed"],
            "width": cols["width"],
            "height": cols["height"],
            "steps": cols["steps"],
            "guidance_scale": cols["guidance_scale"],
            "strength": cols["strength"],
            "init_image": cols["init_image"],
            "group": group,
        },
        schema=ROW_SCHEMA,
    )


def _check_range(col, lo, hi, file_uri, first_row, name, message):
    if len(col) == 0 or col.null_count == len(col):
        return
    if pa.types.is_floating(col.type):
        nan = pc.is_nan(col)
        if pc.any(nan).as_py():
            raise _fail(file_uri, first_row + _first_true(nan), name, f"NaN is not a number ({name} {message})")
    bad = pc.or_(pc.less(col, pa.scalar(lo, col.type)), pc.greater(col, pa.scalar(hi, col.type)))
    if pc.any(bad).as_py():
        i = _first_true(bad)
        raise _fail(file_uri, first_row + i, name, f"{col[i].as_py()} {message}")


# ----------------------------------------------------------------------------- reading


def iter_file_batches(pf, batch_rows: int = SCAN_BATCH_ROWS) -> Iterator[tuple[int, pa.Table]]:
    """(first_row, table) slices of an open ParquetFile, in row order."""
    first = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        yield first, pa.Table.from_batches([batch])
        first += batch.num_rows


def read_row_group(file: InputFile, index: int, first_row: int, settings, storage_cfg) -> pa.Table:
    """Normalized rows of one row group of one input file (the Ray read stage's unit)."""
    pf = open_parquet(file.uri, storage_cfg)
    table = pf.read_row_group(index)
    return normalize_batch(table, file.uri, file.rel, first_row, settings)


# ----------------------------------------------------------------------------- pre-flight scan


class _DuplicateFinder:
    """Bounded-memory duplicate id check: spill (id, file, row) to hash buckets, check each."""

    def __init__(self, buckets: int = 64):
        self.dir = tempfile.mkdtemp(prefix="batchgen-ids-")
        self.buckets = buckets
        self.handles = [open(os.path.join(self.dir, f"{b}.tsv"), "w") for b in range(buckets)]

    def add(self, ids: list[str], file_index: int, first_row: int) -> None:
        for offset, item_id in enumerate(ids):
            b = zlib.crc32(item_id.encode()) % self.buckets
            self.handles[b].write(f"{item_id}\t{file_index}\t{first_row + offset}\n")

    def check(self, files: list[InputFile], id_column: str) -> None:
        try:
            for h in self.handles:
                h.close()
            for b in range(self.buckets):
                seen: dict[str, tuple[int, int]] = {}
                with open(os.path.join(self.dir, f"{b}.tsv")) as fh:
                    for line in fh:
                        item_id, fi, row = line.rstrip("\n").split("\t")
                        if item_id in seen:
                            pf, prow = seen[item_id]
                            raise InputError(
                                f"input file {files[int(fi)].uri}, row {row}, column {id_column!r}: "
                                f"duplicate item id {item_id!r} (first seen in {files[pf].uri}, row {prow})"
                            )
                        seen[item_id] = (int(fi), int(row))
        finally:
            self.close()

    def close(self) -> None:
        import shutil

        for h in self.handles:
            h.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def scan_inputs(spec, storage_cfg, committed=None) -> ScanResult:
    """Streaming pre-flight pass: every file readable, every row valid, ids unique.

    Memory stays flat: one batch of one file at a time, ids spilled to disk buckets. With
    ``committed`` (a :class:`~batchgen.manifest.CommittedState`) it also counts how many items of
    this input are already done or failed.
    """
    from .storage import Location

    settings = row_settings(spec)
    files = list_input_files(spec.input.uri, storage_cfg)
    dupes = _DuplicateFinder() if settings["id_column"] else None
    groups: dict[str, int] = {}
    cases: dict[tuple, tuple[str, int]] = {}
    too_many = False
    total = done = failed = 0
    planned: list[InputFile] = []
    identities: list[dict] = []
    done_ids = committed.done if committed is not None and len(committed.done) else None
    failed_ids = committed.failed_ids() if committed is not None and committed.failed else None
    try:
        for fi, f in enumerate(files):
            pf = open_parquet(f.uri, storage_cfg)
            meta = pf.metadata
            row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            planned.append(InputFile(f.uri, f.rel, row_groups))
            identities.append({"uri": f.uri, "rel": f.rel, "rows": meta.num_rows,
                               **Location.parse(f.uri, storage_cfg).identity()})
            try:
                for first, table in iter_file_batches(pf):
                    rows = normalize_batch(table, f.uri, f.rel, first, settings)
                    ids = rows.column("item_id")
                    if dupes is not None:
                        dupes.add(ids.to_pylist(), fi, first)
                    if not too_many:
                        for g, c in zip(*_value_counts(rows.column("group"))):
                            groups[g] = groups.get(g, 0) + c
                        too_many = len(groups) > MAX_GROUPS_TO_SPLIT
                    if len(cases) < MAX_SAMPLER_CASES:
                        _sampler_cases(rows, f.uri, cases)
                    if done_ids is not None:
                        done += _count_in(ids, done_ids)
                    if failed_ids is not None:
                        failed += _count_in(ids, failed_ids)
                    total += rows.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"input file {f.uri}: cannot read as Parquet: {exc}") from None
        if dupes is not None:
            dupes.check(planned, settings["id_column"])
            dupes = None
    finally:
        if dupes is not None:
            dupes.close()
    if total == 0:
        raise InputError(f"input.uri {spec.input.uri!r}: the input has no rows")
    return ScanResult(planned, total, {} if too_many else groups, too_many, identities, done, failed, cases)


def _count_in(ids, value_set: pa.Array) -> int:
    return int(pc.sum(pc.cast(pc.is_in(ids, value_set=value_set), pa.int64())).as_py() or 0)


def _sampler_cases(rows: pa.Table, file_uri: str, cases: dict) -> None:
    """Record each new (steps, strength) pair of ``rows`` with the row it first appears on."""
    firsts = rows.group_by(["steps", "strength"], use_threads=False).aggregate([("source_row", "min")])
    for steps, strength, row in zip(firsts.column("steps").to_pylist(), firsts.column("strength").to_pylist(),
                                    firsts.column("source_row_min").to_pylist()):
        cases.setdefault((steps, strength), (file_uri, row))


def _value_counts(col: pa.ChunkedArray):
    vc = pc.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
