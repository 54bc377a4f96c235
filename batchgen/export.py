"""`batchgen export OUTPUT --format webdataset|parquet --to URI`: training-ready copies of a job.

Only ``status == "ok"`` items are exported (the failed ones are counted and left out), in sorted
item-id order, so shard membership is deterministic and a re-export writes identical bytes.

webdataset
    ``000000.tar``, ``000001.tar``, ... with ``shard_size`` samples each. A sample is
    ``<key>.<png|jpg|webp>`` (the stored image bytes), ``<key>.cls`` (the class id, when the job has
    labels), ``<key>.txt`` (the prompt, UTF-8) and ``<key>.json`` (the manifest row, with any
    passthrough columns). The key is the item id with ``.`` replaced by ``_`` (WebDataset
    splits file names at the first dot); two ids mapping to one key are an error. Tar headers are
    fixed (mtime 0, uid/gid 0, empty owner names, mode 0644, PAX format). Beside each tar,
    ``NNNNNN.parquet`` holds the shard's rows (``key`` + manifest columns), and ``sizes.json``
    maps each tar name to its sample count (as OpenCLIP reads it).
parquet
    ``data/train-NNNNN-of-MMMMM.parquet`` (Hugging Face datasets layout) with ``shard_size`` rows
    each: ``image`` struct<bytes: binary, path: string>, ``text`` (the prompt) and the manifest
    columns, with the ``huggingface`` schema metadata declaring ``image`` an ``Image`` feature.

``with_conditioning``: each conditioned item also carries the images it was conditioned on, at
its size, as the model used them (a Canny map derived again, a mask blurred and binarized), read
again from the recorded files (a file whose sha256 is not the manifest's is an error naming it):
WebDataset ``<key>.control.png`` (``control.0.png``, ... with several ControlNets) and
``<key>.mask.png``; Parquet Image columns ``conditioning_image`` (``conditioning_image_0``, ...;
the name diffusers' ControlNet training scripts read) and ``mask``, null where an item has none.

Both write ``export.json`` (counts). One shard is held in memory at a time.

Filters (``where=``, ``min_score=``): only ok items for which a :mod:`batchgen.where` expression
holds are exported, e.g. ``clip_score >= 28 and label != 3``; ``min_score=X`` is
``clip_score >= X`` (an output without a ``clip_score`` column is an error that says to run the job
with ``scoring.clip``). Nothing is deleted; the items left out are counted (``filtered_out``) beside
the failed ones (``failed_skipped``) in ``export.json``, with the expression.

Labels (``label_column=``, ``label_names_column=``): a sample's class is an integer manifest
column: by default ``label`` (an ``input.passthrough`` column) when it is an integer, else
``class_id`` (DiT jobs); ``"none"`` exports no labels. WebDataset samples then get ``<key>.cls``
(the id as ASCII digits, which ``webdataset`` decodes to an int). The Parquet export gets an int64
``label`` column (beside the original columns) which, when a names column exists (``class_name``
by default), is declared a ``ClassLabel`` with ``names[id]`` for ids ``0..max``: the id -> name
table comes from every manifest row (failed and filtered ones too, so the classes do not depend on
what rendered), an id without a name is named ``str(id)``, an id with two names is an error. An
exported row without a class id is an error (filter it out or pass ``"none"``).

Provenance (``provenance=``): the manifest records where each item came from on the machine that
rendered it: ``source_file`` (an absolute input path), ``image_uri`` (an absolute output path),
``init_image``, a local ``model_uri`` and ``worker`` (``host:pid``). ``keep`` (the default) exports
them as they are; ``relative`` rewrites paths relative to the job's input / output roots (and a
local model or init image to its file name) and blanks ``worker``; ``drop`` leaves those columns
out. Use ``relative`` or ``drop`` for exports meant for publishing.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import posixpath
import re
import tarfile
import time

from .errors import InputError, StorageError

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "parquet")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}
_OUR_FILES = re.compile(r"^(\d{6}\.(tar|parquet)|sizes\.json|export\.json|data/train-\d{5}-of-\d{5}\.parquet)$")
AUTO_LABEL_COLUMNS = ("label", "class_id")  # the integer class, first present wins
AUTO_NAMES_COLUMN = "class_name"
MAX_CLASSES = 1_000_000  # a ClassLabel lists every name; larger ids are a data error, not classes
SCORE_COLUMN = "clip_score"


def sample_key(item_id: str) -> str:
    """WebDataset key of an item: the id with every ``.`` replaced by ``_``."""
    return item_id.replace(".", "_")


PROVENANCE = ("keep", "relative", "drop")
PROVENANCE_COLUMNS = ("source_file", "image_uri", "init_image", "mask_image", "control_image", "model_uri", "worker")


@dataclasses.dataclass
class Selection:
    """What an export writes: the job output, its selected ok rows and what was left out."""

    output: object  # batchgen.outputs.Output
    rows: object  # Arrow table: ok rows that pass the filters, sorted by item_id
    failed: int  # rows whose status is not ok
    filtered: int  # ok rows the filters left out
    where: str | None
    min_score: float | None

    @property
    def root(self):
        return self.output.root


@dataclasses.dataclass
class Labels:
    """The integer class of each sample: ``column`` of the manifest, and when a names column
    exists, ``names[id]`` for every id ``0..max id`` (a ``ClassLabel``)."""

    column: str
    names_column: str | None = None
    names: list[str] | None = None

    def as_json(self) -> dict:
        return {"column": self.column, "names_column": self.names_column,
                "num_classes": None if self.names is None else len(self.names)}


def _select(output: str, shard_size, storage_config, provenance: str = "keep", where: str | None = None,
            min_score: float | None = None) -> Selection:
    """The job output to export and its ok manifest rows (in manifest order: sorted by item id)
    that pass ``where`` and ``min_score``. Rows become Python dicts one shard at a time."""
    import pyarrow.compute as pc

    from .outputs import Output
    from .where import filter_table

    _check_shard_size(shard_size)
    if provenance not in PROVENANCE:
        raise ValueError(f"provenance must be one of {', '.join(PROVENANCE)}, got {provenance!r}")
    if min_score is not None:
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not math.isfinite(min_score):
            raise ValueError(f"min_score must be a finite number, got {min_score!r}")
        min_score = float(min_score)
    out = Output.open(output, storage_config)
    table = out.manifest
    ok = out.ok_table()
    selected = ok
    if where is not None:
        selected = filter_table(selected, where)
    if min_score is not None:
        if SCORE_COLUMN not in table.column_names or table.column(SCORE_COLUMN).null_count == table.num_rows:
            raise InputError(f"{out.uri}: the manifest has no {SCORE_COLUMN} column (or no scores in it) for "
                             f"--min-score ({SCORE_COLUMN} >= X); run the job with scoring.clip to get scores")
        scores = selected.column(SCORE_COLUMN)
        if not _is_number(scores.type):
            raise InputError(f"{out.uri}: column {SCORE_COLUMN} has type {scores.type}, not a number")
        selected = selected.filter(pc.fill_null(pc.greater_equal(scores, min_score), False))
    return Selection(out, selected, table.num_rows - ok.num_rows, ok.num_rows - selected.num_rows,
                     where, min_score)


def _prepare(output, shard_size, storage_config, provenance, where, min_score, label_column, label_names_column):
    """What both formats start from: the selection, its labels (checked on every exported row)
    and, for ``provenance="relative"``, the job's input roots."""
    sel = _select(output, shard_size, storage_config, provenance, where, min_score)
    _check_export_fields(sel)
    labels = resolve_labels(sel.output.manifest, label_column, label_names_column, sel.output.uri)
    _check_labelled(sel, labels)
    inputs = _input_roots(sel.output) if provenance == "relative" else {}
    return sel, labels, inputs


def export_fields() -> tuple[str, ...]:
    """The fields an export adds beside the manifest columns (the reserved-name list of
    :mod:`batchgen.manifest`, which input.passthrough columns may not take)."""
    from .manifest import EXPORT_FIELDS

    return tuple(name for names in EXPORT_FIELDS.values() for name in names)


def _check_export_fields(sel: Selection) -> None:
    """A manifest column named like an export field (an output written before passthrough names
    were checked) would be replaced in one format and kept in the other: refuse it in both."""
    clash = [name for name in export_fields() if name in sel.rows.column_names]
    if clash:
        raise InputError(f"{sel.output.uri}: the manifest has column(s) {', '.join(map(repr, clash))}, which the "
                         f"exports use themselves ({', '.join(export_fields())}); rename the input column and "
                         f"render the job again")


def _is_number(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_null(arrow_type)


def _input_roots(out) -> dict[str, str]:
    """{input file uri: its path relative to the input root}, from the job's job.json."""
    try:
        job = out.job
    except Exception:  # noqa: BLE001 - an output without job.json: fall back to file names
        return {}
    return {i["uri"]: i["rel"] for i in job.get("inputs") or [] if isinstance(i, dict) and "uri" in i and "rel" in i}


# --- labels ---------------------------------------------------------------------------------


def resolve_labels(table, label_column: str | None = "auto", names_column: str | None = "auto",
                   source: str = "") -> Labels | None:
    """Which integer column is each sample's class, and its names (see the module doc).

    ``table`` is the whole manifest (failed rows included), so the class list does not depend on
    which items rendered or passed a filter. ``"auto"``: ``label`` when it is an integer column with
    values, else ``class_id`` (a DiT job's; when no other ``label`` column exists); names from
    ``class_name`` when it has values.
    ``None`` or ``"none"``: no labels / no names.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = table.schema
    label_column = None if label_column in (None, "none") else label_column
    names_column = None if names_column in (None, "none") else names_column
    if label_column == "auto":
        # every manifest has class_id (null unless the model is a DiT): a column counts when it has values
        label_column = None
        for name in AUTO_LABEL_COLUMNS:
            if (name in schema.names and pa.types.is_integer(schema.field(name).type)
                    and table.column(name).null_count < table.num_rows):
                if name == "label" or "label" not in schema.names:
                    label_column = name
                break
    elif label_column is not None:
        if label_column not in schema.names:
            raise InputError(f"{source}: --label-column {label_column!r}: no such manifest column "
                             f"({_close(label_column, schema.names)})")
        if not pa.types.is_integer(schema.field(label_column).type):
            raise InputError(f"{source}: --label-column {label_column!r} has type {schema.field(label_column).type}; "
                             f"the label must be an integer class id")
        if label_column != "label" and "label" in schema.names:
            raise InputError(f"{source}: the manifest already has a column 'label', so {label_column!r} cannot be "
                             f"exported as 'label'; pass --label-column label or rename the input column")
    if names_column == "auto":
        names_column = AUTO_NAMES_COLUMN if AUTO_NAMES_COLUMN in schema.names and _is_string(
            schema.field(AUTO_NAMES_COLUMN).type) and table.column(AUTO_NAMES_COLUMN).null_count < table.num_rows \
            else None
    elif names_column is not None:
        if names_column not in schema.names:
            raise InputError(f"{source}: --label-names-column {names_column!r}: no such manifest column "
                             f"({_close(names_column, schema.names)})")
        if not _is_string(schema.field(names_column).type):
            raise InputError(f"{source}: --label-names-column {names_column!r} has type "
                             f"{schema.field(names_column).type}; class names must be strings")
    if label_column is None:
        return None
    if names_column is None:
        return Labels(label_column)
    ids = table.column(label_column)
    if ids.null_count == len(ids):
        return Labels(label_column, names_column, [])
    low, high = pc.min(ids).as_py(), pc.max(ids).as_py()
    if low < 0:
        raise InputError(f"{source}: column {label_column!r} has the class id {low}; a ClassLabel needs ids >= 0 "
                         f"(pass --label-names-column none to export the ids as plain integers)")
    if high >= MAX_CLASSES:
        raise InputError(f"{source}: column {label_column!r} has the class id {high}; a ClassLabel lists every id "
                         f"up to the largest (at most {MAX_CLASSES}); pass --label-names-column none")
    pairs = table.select([label_column, names_column])
    pairs = pairs.filter(pc.and_(pc.is_valid(pairs.column(0)), pc.is_valid(pairs.column(1))))
    pairs = pairs.group_by([label_column, names_column]).aggregate([]).sort_by(
        [(label_column, "ascending"), (names_column, "ascending")])
    by_id: dict[int, str] = {}
    for i, name in zip(pairs.column(label_column).to_pylist(), pairs.column(names_column).to_pylist()):
        if i in by_id:
            raise InputError(f"{source}: class id {i} has two names in column {names_column!r}: "
                             f"{by_id[i]!r} and {name!r}; give each id one name")
        by_id[i] = name
    return Labels(label_column, names_column, [by_id.get(i, str(i)) for i in range(high + 1)])


def _is_string(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _close(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return ("did you mean " + " or ".join(repr(n) for n in close) + "?") if close else \
        "the columns are " + ", ".join(names)


def _check_labelled(sel: Selection, labels: Labels | None) -> None:
    """Every exported row has a class id (a training sample without one is a data error)."""
    import pyarrow.compute as pc

    if labels is None:
        return
    col = sel.rows.column(labels.column)
    if col.null_count:
        first = sel.rows.filter(pc.is_null(col)).column("item_id")[0].as_py()
        raise InputError(f"{sel.output.uri}: item {first!r} has no class id (column {labels.column!r} is null in "
                         f"{col.null_count} exported rows); leave those out with --where \"{labels.column} >= 0\" "
                         f"or export without labels with --label-column none")


def _is_local_path(value) -> bool:
    return isinstance(value, str) and (value.startswith("/") or value.startswith("file:"))


def public_row(row: dict, provenance: str, root_uri: str, inputs: dict[str, str]) -> dict:
    """A manifest row as exported under the ``provenance`` policy (see the module doc)."""
    if provenance == "keep":
        return row
    if provenance == "drop":
        return {k: v for k, v in row.items() if k not in PROVENANCE_COLUMNS}
    out = dict(row)
    src = row.get("source_file")
    if src is not None:
        out["source_file"] = inputs.get(src) or posixpath.basename(src)
    uri = row.get("image_uri")
    prefix = root_uri.rstrip("/") + "/"
    if uri is not None:
        out["image_uri"] = uri[len(prefix):] if uri.startswith(prefix) else posixpath.basename(uri)
    for key in ("init_image", "mask_image", "model_uri"):
        if _is_local_path(row.get(key)):
            out[key] = posixpath.basename(row[key].rstrip("/"))
    control = row.get("control_image")
    if isinstance(control, str) and control.startswith("["):
        out["control_image"] = json.dumps([posixpath.basename(u) if _is_local_path(u) else u
                                           for u in json.loads(control)], separators=(",", ":"))
    elif _is_local_path(control):
        out["control_image"] = posixpath.basename(control.rstrip("/"))
    out["worker"] = None
    return out


def _shards(ok, shard_size: int):
    """(shard index, rows of that shard as dicts) over the ok table."""
    for shard, start in enumerate(range(0, ok.num_rows, shard_size)):
        yield shard, ok.slice(start, shard_size).to_pylist()


def _image_bytes(sel: Selection, row: dict) -> tuple[bytes, str]:
    """The stored image of a row, checked against its manifest sha256; and its extension."""
    from .outputs import check_sha256

    loc = sel.output.image_location(row)
    data = loc.read_bytes()
    check_sha256(data, row, loc.uri)
    fmt = (row.get("image_format") or posixpath.splitext(loc.uri)[1].lstrip(".")).lower()
    if fmt not in EXTENSIONS:
        raise InputError(f"item {row['item_id']!r}: unknown image_format {fmt!r} (expected png, jpeg or webp)")
    return data, EXTENSIONS[fmt]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def _json_row(row: dict) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")


def _parquet_bytes(table, row_group_size: int | None = None) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def _prepare_destination(dest, overwrite: bool) -> list:
    """Existing files at ``dest``: refuse a non-empty destination unless ``overwrite``, and even
    then unless its ``export.json`` proves it is an earlier export (``--overwrite`` replaces our
    shards; it never writes over, or deletes from, a folder of other files)."""
    from .storage import destination_files

    return destination_files(dest, "export.json", _is_export, overwrite=overwrite,
                             refuse="--overwrite only replaces an earlier export; choose an empty or new --to",
                             not_empty="pass --overwrite to replace an export")


def _is_export(marker) -> bool:
    if not marker.exists():
        return False
    try:
        counts = json.loads(marker.read_bytes())
    except (ValueError, StorageError):
        return False
    return isinstance(counts, dict) and counts.get("format") in FORMATS


def _remove_stale(dest, existing: list, written: set[str]) -> None:
    """After an overwrite, delete our own file names that this export did not write again."""
    from .storage import remove_stale

    remove_stale(dest, existing, written, _OUR_FILES)


def _counts(fmt: str, sel: Selection, provenance: str, labels: Labels | None, shard_size: int, **extra) -> dict:
    root = sel.root
    return {"format": fmt, "source": root.uri if provenance == "keep" else root.name,
            "exported": sel.rows.num_rows, "failed_skipped": sel.failed, "filtered_out": sel.filtered,
            "where": sel.where, "min_score": sel.min_score, "labels": None if labels is None else labels.as_json(),
            "shard_size": shard_size, "provenance": provenance, **extra}


def _log_done(sel: Selection, shards: int, t0: float) -> None:
    log.info("export: %d samples in %d shards in %.1f s (%d failed and %d filtered items left out)",
             sel.rows.num_rows, shards, time.monotonic() - t0, sel.failed, sel.filtered)


def _conditioning(sel: Selection, row: dict, storage_config) -> dict[str, bytes]:
    """The conditioning images of one row as PNG bytes by sample extension ({} when none)."""
    if not (row.get("control_image") or row.get("mask_image")):
        return {}
    from .job.conditioning import conditioning_pngs

    limit = ((sel.output.job or {}).get("spec") or {}).get("input", {}).get("max_init_image_pixels")
    try:
        return conditioning_pngs(row, storage_config, limit)
    except (InputError, StorageError, ValueError) as exc:
        raise InputError(f"item {row['item_id']!r}: its conditioning images cannot be exported: {exc}") from None


def export_webdataset(output: str, to: str, shard_size: int = 1000, storage_config=None,
                      overwrite: bool = False, provenance: str = "keep", where: str | None = None,
                      min_score: float | None = None, label_column: str | None = "auto",
                      label_names_column: str | None = "auto", with_conditioning: bool = False) -> dict:
    """Write WebDataset shards of a job output's selected ok items; returns the counts.
    ``with_conditioning``: each conditioned sample also gets the images it was conditioned on,
    at its size: ``<key>.control.png`` (``control.0.png`` ... with several ControlNets) and
    ``<key>.mask.png`` (see :func:`batchgen.job.conditioning.conditioning_pngs`)."""
    import pyarrow as pa

    from .manifest import EXPORT_FIELDS
    from .storage import Location

    sel, labels, inputs = _prepare(output, shard_size, storage_config, provenance, where, min_score,
                                   label_column, label_names_column)
    ok = sel.rows
    (key_field,) = EXPORT_FIELDS["webdataset"]
    schema = pa.schema([(key_field, pa.string())] + [f for f in ok.schema if provenance != "drop"
                                                  or f.name not in PROVENANCE_COLUMNS])
    keys: dict[str, str] = {}
    for item_id in ok.column("item_id").to_pylist():
        key = sample_key(item_id)
        if key in keys:
            raise InputError(f"items {keys[key]!r} and {item_id!r} both map to WebDataset key {key!r} "
                             f"('.' becomes '_'); rename one of them")
        keys[key] = item_id
    del keys
    dest = Location.parse(str(to), storage_config)
    existing = _prepare_destination(dest, overwrite)
    sizes: dict[str, int] = {}
    written: set[str] = set()
    t0 = time.monotonic()
    done = 0
    for shard, chunk in _shards(ok, shard_size):
        name = f"{shard:06d}"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for r in chunk:
                key = sample_key(r["item_id"])
                data, ext = _image_bytes(sel, r)
                _tar_add(tar, f"{key}.{ext}", data)
                if labels is not None:
                    _tar_add(tar, f"{key}.cls", str(int(r[labels.column])).encode("ascii"))
                _tar_add(tar, f"{key}.txt", (r.get("prompt") or "").encode("utf-8"))
                if with_conditioning:
                    for cname, cdata in _conditioning(sel, r, storage_config).items():
                        _tar_add(tar, f"{key}.{cname}", cdata)
                _tar_add(tar, f"{key}.json", _json_row(public_row(r, provenance, sel.root.uri, inputs)))
        dest.join(f"{name}.tar").write_bytes(buf.getvalue())
        shard_rows = pa.Table.from_pylist(
            [{key_field: sample_key(r["item_id"]), **public_row(r, provenance, sel.root.uri, inputs)} for r in chunk],
            schema=schema)
        dest.join(f"{name}.parquet").write_bytes(_parquet_bytes(shard_rows))
        sizes[f"{name}.tar"] = len(chunk)
        written |= {f"{name}.tar", f"{name}.parquet"}
        done += len(chunk)
        log.info("export: shard %s (%d samples, %d/%d done)", name, len(chunk), done, ok.num_rows)
    dest.join("sizes.json").write_bytes(json.dumps(sizes, indent=2, sort_keys=True).encode())
    counts = _counts("webdataset", sel, provenance, labels, shard_size, shards=len(sizes))
    dest.join("export.json").write_bytes(json.dumps(counts, indent=2, sort_keys=True).encode())
    _remove_stale(dest, existing, written | {"sizes.json", "export.json"})
    _log_done(sel, len(sizes), t0)
    return counts


_HF_DTYPES = {"string": "string", "large_string": "large_string", "bool": "bool", "null": "null",
              "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8",
              "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "halffloat": "float16",
              "float": "float32", "double": "float64", "binary": "binary", "large_binary": "large_binary"}


def hf_features(schema, class_names: list[str] | None = None, image_columns: tuple[str, ...] = ()) -> dict:
    """The ``huggingface`` metadata: ``image`` (and ``image_columns``) as Image features, ``label``
    as a ClassLabel when ``class_names`` are given, other columns as Values."""
    features = {name: {"_type": "Image"} for name in ("image", *image_columns)}
    for f in schema:
        if f.name in features:
            continue
        if f.name == "label" and class_names is not None:
            features["label"] = {"names": list(class_names), "_type": "ClassLabel"}
            continue
        dtype = _HF_DTYPES.get(str(f.type))
        if dtype is None:
            raise InputError(f"manifest column {f.name!r} has type {f.type}, which the export cannot describe")
        features[f.name] = {"dtype": dtype, "_type": "Value"}
    return {"info": {"features": features}}


def export_parquet(output: str, to: str, shard_size: int = 1000, storage_config=None,
                   overwrite: bool = False, provenance: str = "keep", where: str | None = None,
                   min_score: float | None = None, label_column: str | None = "auto",
                   label_names_column: str | None = "auto", with_conditioning: bool = False) -> dict:
    """Write Hugging Face datasets Parquet files of a job output's selected ok items; returns the counts.
    ``with_conditioning``: Image columns beside ``image`` with what each item was conditioned on, at
    its size (see :func:`_conditioning_columns`); null where an item has none."""
    import pyarrow as pa

    from .manifest import EXPORT_FIELDS
    from .storage import Location

    sel, labels, inputs = _prepare(output, shard_size, storage_config, provenance, where, min_score,
                                   label_column, label_names_column)
    ok = sel.rows
    dest = Location.parse(str(to), storage_config)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field("image", image_type), pa.field("text", pa.string())]
    ours = set(EXPORT_FIELDS["parquet"])
    if labels is not None:  # HF's convention: the class is the column "label"
        fields.append(pa.field("label", pa.int64()))
        ours.add("label")
    cond_columns = _conditioning_columns(sel) if with_conditioning else {}
    for name in cond_columns.values():
        if name in ok.schema.names or name in ours:
            raise InputError(f"export --with-conditioning: the manifest already has a column {name!r}, the name "
                             "of a conditioning image column; rename that input column")
        fields.append(pa.field(name, image_type))
        ours.add(name)
    existing = _prepare_destination(dest, overwrite)
    fields += [f for f in ok.schema if f.name not in ours
               and (provenance != "drop" or f.name not in PROVENANCE_COLUMNS)]
    schema = pa.schema(fields)
    schema = schema.with_metadata({"huggingface": json.dumps(hf_features(
        schema, labels.names if labels is not None else None, tuple(cond_columns.values())))})
    n_files = max(1, -(-ok.num_rows // shard_size))
    written: set[str] = set()
    t0 = time.monotonic()
    for shard, chunk in _shards(ok, shard_size) if ok.num_rows else [(0, [])]:
        out_rows = []
        for r in chunk:
            data, ext = _image_bytes(sel, r)
            pub = public_row(r, provenance, sel.root.uri, inputs)
            row = {"image": {"bytes": data, "path": f"{r['item_id']}.{ext}"}, "text": r.get("prompt")}
            if labels is not None:
                row["label"] = r[labels.column]
            if cond_columns:
                for fname, cdata in _conditioning(sel, r, storage_config).items():
                    row[cond_columns[fname]] = {"bytes": cdata, "path": f"{r['item_id']}.{fname}"}
            row.update({k: v for k, v in pub.items() if k not in ours})
            out_rows.append(row)
        name = f"data/train-{shard:05d}-of-{n_files:05d}.parquet"
        tab = pa.Table.from_pylist(out_rows, schema=schema)
        dest.join(name).write_bytes(_parquet_bytes(tab, row_group_size=100))
        written.add(name)
        log.info("export: %s (%d rows)", name, len(chunk))
    counts = _counts("parquet", sel, provenance, labels, shard_size, files=n_files)
    dest.join("export.json").write_bytes(json.dumps(counts, indent=2, sort_keys=True).encode())
    _remove_stale(dest, existing, written | {"export.json"})
    _log_done(sel, n_files, t0)
    return counts


def _conditioning_columns(sel: Selection) -> dict[str, str]:
    """The Parquet export's conditioning image columns, by the file name
    :func:`batchgen.job.conditioning.conditioning_pngs` gives: ``conditioning_image`` (diffusers'
    ControlNet training scripts read that name; with several ControlNets ``conditioning_image_0``,
    ``conditioning_image_1`` ...) and ``mask`` — only those the job can have."""
    model = (((sel.output.job or {}).get("spec") or {}).get("model") or {})
    nets = len(model.get("controlnets") or [])
    columns = {"control.png": "conditioning_image"} if nets == 1 else {
        f"control.{j}.png": f"conditioning_image_{j}" for j in range(nets)}
    if "mask_image" in sel.rows.schema.names and sel.rows.column("mask_image").null_count < sel.rows.num_rows:
        columns["mask.png"] = "mask"
    return columns


def _check_shard_size(shard_size) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")


def export_output(output: str, fmt: str, to: str, shard_size: int = 1000, storage_config=None,
                  overwrite: bool = False, provenance: str = "keep", where: str | None = None,
                  min_score: float | None = None, label_column: str | None = "auto",
                  label_names_column: str | None = "auto", with_conditioning: bool = False) -> dict:
    """Export a job output in ``fmt`` ("webdataset" or "parquet") to ``to``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    fn = export_webdataset if fmt == "webdataset" else export_parquet
    return fn(output, to, shard_size=shard_size, storage_config=storage_config, overwrite=overwrite,
              provenance=provenance, where=where, min_score=min_score, label_column=label_column,
              label_names_column=label_names_column, with_conditioning=with_conditioning)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="job output to export (folder, file:// or s3:// URI)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                        help="webdataset: NNNNNN.tar shards; parquet: Hugging Face datasets Parquet")
    parser.add_argument("--to", required=True, metavar="URI", help="destination folder or s3:// prefix")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N",
                        help="samples per tar / rows per Parquet file (default 1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at --to")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default AWS_ENDPOINT_URL)")
    parser.add_argument("--provenance", choices=PROVENANCE, default="keep",
                        help="absolute paths and host:pid columns: keep them (default), make paths relative "
                             "to the job's input/output roots and blank worker, or drop those columns "
                             "(for exports meant for publishing)")
    parser.add_argument("--where", default=None, metavar="EXPR",
                        help="export only the ok items for which EXPR holds, e.g. \"clip_score >= 28 and "
                             "label != 3\" (comparisons of a manifest column with a number or quoted string, "
                             "and / or / not, parentheses); nothing is deleted")
    parser.add_argument("--min-score", type=float, default=None, metavar="X",
                        help="shorthand for --where \"clip_score >= X\" (combined with --where by 'and')")
    parser.add_argument("--label-column", default="auto", metavar="NAME",
                        help="integer class column: WebDataset .cls, HF 'label' (default auto: 'label', else "
                             "'class_id'; none: no labels)")
    parser.add_argument("--label-names-column", default="auto", metavar="NAME",
                        help="class-name column that makes the HF 'label' a ClassLabel (default auto: "
                             "'class_name'; none: a plain integer)")
    parser.add_argument("--with-conditioning", action="store_true",
                        help="add each conditioned sample's control image and mask as the model used them, at "
                             "the image's size: webdataset <key>.control.png / <key>.mask.png; parquet Image "
                             "columns conditioning_image (several ControlNets: conditioning_image_0, ...) and mask")


def run(args) -> int:
    from .storage import StorageConfig

    counts = export_output(args.output, args.fmt, args.to, shard_size=args.shard_size,
                           storage_config=StorageConfig(endpoint_url=args.endpoint_url),
                           overwrite=args.overwrite, provenance=args.provenance, where=args.where,
                           min_score=args.min_score, label_column=args.label_column,
                           label_names_column=args.label_names_column,
                           with_conditioning=getattr(args, "with_conditioning", False))
    print(json.dumps(counts, sort_keys=True))
    return 0


configure_export = configure
run_export = run
__all__ = ["export_output", "export_webdataset", "export_parquet", "sample_key", "hf_features",
           "resolve_labels", "Labels"]
