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
import logging
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError, StorageError
from .columns import CONDITION_ROW, LABEL_COLUMNS, ROW_HEAD, reserved_name_error, setting_type  # noqa: F401
from .noise import SEED_LIMIT, derive_seed

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
SCAN_BATCH_ROWS = 65536
MAX_GROUPS_TO_SPLIT = 8

_FAMILY_TYPE = {"string": pa.string(), "int": pa.int64(), "float": pa.float64()}
_TABLE_FAMILY = {"str": "string", "int": "int", "float": "float"}
MAX_IMAGES_PER_ROW = 10000


def row_schema(passthrough: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """Normalized rows: head, one column per row setting, loras, group, then passthrough columns."""
    from .settings import ROW_SETTINGS

    fields = ROW_HEAD + [(s.name, setting_type(s)) for s in ROW_SETTINGS] + CONDITION_ROW
    fields += [("loras", pa.string()), ("group", pa.string())]
    fields += list((passthrough or {}).items())
    return pa.schema(fields)


@dataclass(frozen=True)
class InputFile:
    """One input Parquet file: its URI and its path relative to the input root (for ids)."""

    uri: str
    rel: str
    row_groups: tuple[int, ...] = ()  # rows per row group


MAX_GROUP_CASES = 1000


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
    # settings group key -> (file uri, row, the row): each group's first row, checked in pre-flight
    group_cases: dict[str, tuple[str, int, dict]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the row settings the scan used (for the readers)
    input_rows: int = 0  # rows of the input files (before images per prompt)
    # spec setting -> {"column", "rows", "of"}: the input rows whose own value replaces the spec's
    overridden_by_input: dict[str, dict] = field(default_factory=dict)


def row_settings(spec, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain dict the row normalizer needs (picklable, small): ids, prompt column, the job's
    value of every row setting (``resolved`` from the pre-flight: family defaults filled in), the
    model family, the job's LoRA set, images per prompt and the passthrough columns."""
    from .settings import ROW_SETTINGS

    resolved = resolved or {}
    values = resolved.get("settings") or {}
    return {
        "id_column": spec.input.id_column,
        "prompt_column": spec.input.prompt_column,
        "seed": spec.sampling.seed,
        "images_per_prompt": spec.sampling.images_per_prompt,
        "family": resolved.get("family"),
        "loras": canonical_loras([lora.model_dump() for lora in spec.model.loras]),
        "controlnets": len(spec.model.controlnets),
        "ip_adapter": spec.model.ip_adapter is not None,
        "strength_set": "strength" in spec.sampling.model_fields_set,
        "values": {s.name: values.get(s.name, getattr(spec.sampling, s.name) if s.spec else None)
                   for s in ROW_SETTINGS},
        "passthrough": {name: str(typ) for name, typ in (resolved.get("passthrough") or {}).items()},
    }


def canonical_loras(loras: list[dict] | None) -> str:
    """A LoRA set as canonical JSON text (the group key and manifest value): [{"uri", "scale"}, ...]."""
    import json

    if not loras:
        return "[]"
    return json.dumps([{"uri": str(item["uri"]), "scale": float(item.get("scale", 1.0))} for item in loras],
                      separators=(",", ":"))


def parse_loras(text: str, where: str) -> str:
    """A row's ``loras`` value -> canonical JSON: a JSON list of {uri, scale} (or of URIs), or one URI."""
    import json
    import math

    text = text.strip()
    try:
        value = json.loads(text) if text.startswith("[") else [text]
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not a JSON list of LoRAs ({exc.msg} at character {exc.pos})") from None
    items = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"uri": item}
        if not isinstance(item, dict) or not isinstance(item.get("uri"), str) or not item["uri"]:
            raise InputError(f"{where}: entry {i} must be a URI or {{\"uri\": ..., \"scale\": ...}}, got {item!r}")
        unknown = set(item) - {"uri", "scale"}
        if unknown:
            raise InputError(f"{where}: entry {i} has unknown key(s) {sorted(unknown)} (uri, scale)")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or abs(scale) > 10:
            raise InputError(f"{where}: entry {i} scale must be a finite number in [-10, 10], got {scale!r}")
        items.append({"uri": item["uri"], "scale": float(scale)})
    return canonical_loras(items)


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
    if family == "int" and pa.types.is_floating(col.type):
        col = _integral(col, name, file_uri, first_row)  # pandas' nullable integers, written as floats
    elif not family_ok[family]:
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


FLOAT_EXACT_LIMIT = 2**53  # float64 holds every integer up to here exactly
INT64_HINT = "df[{name!r}].astype(\"Int64\")"


def _integral(col, name: str, file_uri: str, first_row: int) -> pa.Array:
    """A float column of an integer setting as int64: pandas writes a nullable integer column (one
    with a missing value) as float64. NaN is a missing value (null: the spec's or the derived
    value); a value that is not a whole number, or too large for a float to hold exactly, is an
    error naming file, row and column and how to write the column."""
    col = col.cast(pa.float64())
    nan = pc.is_nan(col).fill_null(False)
    if pc.any(nan).as_py():
        col = pc.if_else(nan, pa.scalar(None, pa.float64()), col)
    hint = INT64_HINT.format(name=name)
    not_whole = pc.or_(pc.invert(pc.is_finite(col)), pc.not_equal(pc.floor(col), col)).fill_null(False)
    if pc.any(not_whole).as_py():
        i = _first_true(not_whole)
        raise _fail(file_uri, first_row + i, name,
                    f"{col[i].as_py()!r} is not a whole number (the column holds {col.type} values; {name} takes "
                    f"integers). Round the values, or, when pandas turned an integer column with missing values "
                    f"into floats, write it as {hint} before to_parquet")
    too_big = pc.greater(pc.abs(col), pa.scalar(float(FLOAT_EXACT_LIMIT))).fill_null(False)
    if pc.any(too_big).as_py():
        i = _first_true(too_big)
        raise _fail(file_uri, first_row + i, name,
                    f"{col[i].as_py()!r} is a float beyond 2**53, where a float cannot hold every integer "
                    f"exactly (the value may already be rounded): keep the column integral, e.g. {hint} "
                    f"before the values become floats")
    return col.cast(pa.int64())


def int_columns() -> list[str]:
    """The input columns read as integers: integer settings and ``n``."""
    from .settings import ROW_SETTINGS

    return [s.name for s in ROW_SETTINGS if s.type == "int"] + ["canny_low", "canny_high", "n"]


def normalize_batch(
    table: pa.Table, file_uri: str, rel: str, first_row: int, settings: dict[str, Any]
) -> pa.Table:
    """Validate and resolve one slice of an input file (rows ``first_row...``) into
    :func:`row_schema` rows: every row setting resolved (a column overrides the job's value), the
    settings-group key, and one row per image when a row asks for several (``n``).

    Raises InputError naming the file, row and column of the first bad value.
    """
    from .settings import ROW_SETTINGS

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
    ids = _ids(table, file_uri, rel, first_row, settings)

    family = settings.get("family")
    values = settings["values"]
    cols: dict[str, pa.Array] = {}
    for setting in ROW_SETTINGS:
        kind = _TABLE_FAMILY[setting.type]
        allowed = "[0, 2**63)" if setting.name == "seed" else setting.range_text()
        col = _column(table, setting.name, kind, file_uri, first_row, allowed)
        other_family = family is not None and setting.families is not None and family not in setting.families
        if col is not None and other_family and col.null_count < len(col):
            i = _first_true(pc.is_valid(col))
            raise _fail(file_uri, first_row + i, setting.name,
                        f"applies to {', '.join(setting.families)} models; this model is {family}")
        default = None if other_family else values.get(setting.name)
        target = _FAMILY_TYPE[kind]
        if col is None:
            col = pa.nulls(n, target) if default is None else pa.array([default] * n, target)
        elif default is not None:
            col = col.fill_null(pa.scalar(default, target))
        _check_setting(col, setting, file_uri, first_row)
        cols[setting.name] = col

    if cols["seed"].null_count:
        seeds = [s if s is not None else derive_seed(settings["seed"], i)
                 for s, i in zip(cols["seed"].to_pylist(), ids.to_pylist())]
        cols["seed"] = pa.array(seeds, pa.int64())
    img2img = pc.is_valid(cols["init_image"])
    cond, kinds = _conditioning(table, file_uri, first_row, settings, cols)
    cols["strength"] = pc.if_else(img2img, cols["strength"], pa.scalar(None, pa.float64()))
    loras = _loras(table, file_uri, first_row, settings, n)
    group_parts = [_key_text(cols[s.name]) for s in ROW_SETTINGS if s.group and not s.img2img]
    group_parts.append(pc.if_else(img2img, _key_text(cols["strength"]), pa.scalar("txt2img")))
    group_parts.append(kinds)
    group_parts.append(loras)
    group = pc.binary_join_element_wise(*group_parts, "|")

    columns = {"item_id": ids, "source_file": pa.array([file_uri] * n, pa.string()), "source_row": rows,
               "image_index": pa.array([0] * n, pa.int32()), "prompt": prompt}
    columns.update({s.name: cols[s.name] for s in ROW_SETTINGS})
    columns.update(cond)
    columns.update(loras=loras, group=group)
    passthrough = {name: pa.type_for_alias(typ) if isinstance(typ, str) else typ
                   for name, typ in settings.get("passthrough", {}).items()}
    for name, typ in passthrough.items():
        columns[name] = _passthrough(table, name, typ, file_uri)
    schema = row_schema(passthrough)
    out = pa.table({f.name: _cast(columns[f.name], f.type) for f in schema}, schema=schema)
    return _expand(out, table, file_uri, first_row, settings)


def _conditioning(table: pa.Table, file_uri: str, first_row: int, settings: dict,
                  cols: dict[str, pa.Array]) -> tuple[dict[str, pa.Array], pa.Array]:
    """The conditioning columns of a slice (``control_image`` canonical: one URI, or a compact JSON
    list with several ControlNets) and each row's model-call kind for the group key (mask,
    outpaint, control), checked against the spec's ControlNets; errors name file, row and column.
    Inpainting rows (mask or outpaint_*) without a strength of their own start from pure noise
    (strength 1.0, diffusers' inpainting default) unless the spec sets sampling.strength."""
    import json

    from .canny import DEFAULT_HIGH, DEFAULT_LOW, MAX_THRESHOLD, PREPROCESSORS
    from .outpaint import OUTPAINT_SETTINGS

    n = table.num_rows
    nets = int(settings.get("controlnets") or 0)
    raw = {name: _column(table, name, "int" if typ == pa.int32() else "string", file_uri, first_row)
           for name, typ in CONDITION_ROW}
    raw = {name: (col.to_pylist() if col is not None else [None] * n) for name, col in raw.items()}
    init = cols["init_image"].to_pylist()
    outpaint = [any(v is not None for v in vals) for vals in zip(*(cols[k].to_pylist() for k in OUTPAINT_SETTINGS))]
    strength_col = _column(table, "strength", "float", file_uri, first_row)
    own_strength = strength_col.to_pylist() if strength_col is not None else [None] * n
    strength = cols["strength"].to_pylist()
    control, kinds = [], []
    for i in range(n):
        row = first_row + i

        def fail(column: str, message: str) -> InputError:
            return _fail(file_uri, row, column, message)

        value, mask, pre = raw["control_image"][i], raw["mask_image"][i], raw["control_preprocess"][i]
        low, high = raw["canny_low"][i], raw["canny_high"][i]
        if value is not None:
            text = value.strip()
            if text.startswith("["):
                try:
                    uris = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise fail("control_image", f"not a JSON list of URIs ({exc.msg} at character {exc.pos})") from None
            else:
                uris = [text]
            if not isinstance(uris, list) or not uris or not all(isinstance(u, str) and u.strip() for u in uris):
                raise fail("control_image", f"expected a URI or a JSON list of URIs, got {value!r}")
            if nets == 0:
                raise fail("control_image", "the row has a control image but the spec's model has no controlnets: "
                                            "add model.controlnets, or leave the column empty")
            if len(uris) != nets:
                raise fail("control_image", f"{len(uris)} control image(s) for {nets} ControlNet(s) in "
                                            f"model.controlnets: give one per ControlNet"
                                            + (" as a JSON list" if nets > 1 else ""))
            value = uris[0] if nets == 1 else json.dumps(uris, separators=(",", ":"))
        elif nets:
            raise fail("control_image", f"model.controlnets has {nets} ControlNet(s): every row needs a control "
                                        f"image (a URI{', or a JSON list of one per ControlNet' if nets > 1 else ''})")
        if pre is not None:
            if pre not in PREPROCESSORS:
                raise fail("control_preprocess", f"{pre!r} is not one of {', '.join(PREPROCESSORS)}")
            if value is None:
                raise fail("control_preprocess", "needs a control_image (the source image the control image is "
                                                 "derived from)")
            low = DEFAULT_LOW if low is None else low
            high = DEFAULT_HIGH if high is None else high
            for name, t in (("canny_low", low), ("canny_high", high)):
                if not 0 <= t <= MAX_THRESHOLD:
                    raise fail(name, f"{t} must be in [0, {MAX_THRESHOLD}]")
            if low > high:
                raise fail("canny_low", f"{low} is above canny_high {high}")
        elif low is not None or high is not None:
            raise fail("canny_low" if low is not None else "canny_high",
                       "a Canny threshold needs control_preprocess: canny in the same row")
        if mask is not None and init[i] is None:
            raise fail("mask_image", "a mask needs an init_image in the same row (the image to repaint)")
        reference = raw["ip_adapter_image"][i]
        if reference is not None and not settings.get("ip_adapter"):
            raise fail("ip_adapter_image", "the row has a reference image but the spec's model has no ip_adapter: "
                                           "add model.ip_adapter, or leave the column empty")
        if reference is None and settings.get("ip_adapter"):
            raise fail("ip_adapter_image", "model.ip_adapter is set: every row needs a reference image (a URI; "
                                           "ip_adapter_scale 0 makes it not steer the row)")
        inpaint = mask is not None or outpaint[i]
        if inpaint and init[i] is not None and own_strength[i] is None and not settings.get("strength_set"):
            strength[i] = 1.0
        control.append(value)
        raw["canny_low"][i], raw["canny_high"][i] = low, high
        kinds.append("+".join(k for k, on in (("mask", mask is not None), ("outpaint", outpaint[i]),
                                               ("control", value is not None)) if on) or "plain")
    cols["strength"] = pa.array(strength, pa.float64())
    out = {name: pa.array(raw[name], typ) for name, typ in CONDITION_ROW}
    out["control_image"] = pa.array(control, pa.string())
    return out, pa.array(kinds, pa.string())


def _ids(table: pa.Table, file_uri: str, rel: str, first_row: int, settings: dict) -> pa.Array:
    n = table.num_rows
    idcol = settings["id_column"]
    if not idcol:
        prefix = derived_id_prefix(rel)
        return pa.array([f"{prefix}-{r:08d}" for r in range(first_row, first_row + n)], pa.string())
    if idcol not in table.column_names:
        raise InputError(f"input file {file_uri}: no id column {idcol!r} (columns: {table.column_names})")
    ids = table.column(idcol).combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
            or pa.types.is_integer(ids.type)):
        hint = ""
        if pa.types.is_floating(ids.type):
            hint = (f" (pandas writes an integer column with missing values as floats: give every row an id and "
                    f"write the column as {INT64_HINT.format(name=idcol)})")
        raise InputError(f"input file {file_uri}, column {idcol!r}: ids must be strings or integers, "
                         f"got {ids.type}{hint}")
    ids = ids.cast(pa.string())
    bad = pc.invert(pc.match_substring_regex(ids, ID_PATTERN).fill_null(False))
    bad = pc.or_(bad, pc.match_substring_regex(ids, r"^\.+$").fill_null(False))
    if pc.any(bad).as_py():
        i = _first_true(bad)
        raise _fail(file_uri, first_row + i, idcol,
                    f"unsafe item id {ids[i].as_py()!r}: ids must be 1..128 characters of "
                    f"[A-Za-z0-9._-] and not only dots")
    return ids


def _check_setting(col, setting, file_uri: str, first_row: int) -> None:
    """A settings column against its table entry: range (NaN included), multiple, choices."""
    if setting.type == "str":
        if setting.choices and len(col) and col.null_count < len(col):
            bad = pc.invert(pc.is_in(col, value_set=pa.array(setting.choices))).fill_null(False)
            if pc.any(bad).as_py():
                i = _first_true(bad)
                raise _fail(file_uri, first_row + i, setting.name,
                            f"{col[i].as_py()!r} is not one of {', '.join(setting.choices)}")
        return
    if setting.name == "seed":
        _check_range(col, 0, SEED_LIMIT - 1, file_uri, first_row, "seed", "is outside [0, 2**63)")
        return
    lo = setting.lo if setting.lo is not None else float("-inf")
    hi = setting.hi if setting.hi is not None else float("inf")
    message = f"must be in {setting.range_text()}"
    _check_range(col, lo, hi, file_uri, first_row, setting.name, message)
    if setting.lo_open and len(col) and col.null_count < len(col):
        bad = pc.less_equal(col, pa.scalar(setting.lo, col.type)).fill_null(False)
        if pc.any(bad).as_py():
            i = _first_true(bad)
            raise _fail(file_uri, first_row + i, setting.name, f"{col[i].as_py()} {message}")
    if setting.multiple_of:
        odd = pc.not_equal(pc.bit_wise_and(col, pa.scalar(setting.multiple_of - 1, col.type)), 0)
        if setting.multiple_of & (setting.multiple_of - 1):  # not a power of two
            odd = pc.not_equal(pc.subtract(col, pc.multiply(pc.divide(col, setting.multiple_of),
                                                            setting.multiple_of)), 0)
        if pc.any(odd.fill_null(False)).as_py():
            i = _first_true(odd)
            raise _fail(file_uri, first_row + i, setting.name,
                        f"{col[i].as_py()} is not a multiple of {setting.multiple_of}")


def _key_text(col) -> pa.Array:
    return col.cast(pa.string()).fill_null("-")


def _cast(col, typ: pa.DataType):
    return col if col.type == typ else col.cast(typ)


def _loras(table: pa.Table, file_uri: str, first_row: int, settings: dict, n: int) -> pa.Array:
    """Each row's LoRA set as canonical JSON: the row's ``loras`` column, else the job's."""
    job = settings.get("loras") or "[]"
    col = _column(table, "loras", "string", file_uri, first_row)
    if col is None:
        return pa.array([job] * n, pa.string())
    out = []
    for i, value in enumerate(col.to_pylist()):
        out.append(job if value is None else parse_loras(value, f"input file {file_uri}, row {first_row + i}, "
                                                                 f"column 'loras'"))
    return pa.array(out, pa.string())


def _passthrough(table: pa.Table, name: str, typ: pa.DataType, file_uri: str) -> pa.Array:
    if name not in table.column_names:
        raise InputError(f"input file {file_uri}: no column {name!r} named in input.passthrough "
                         f"(columns: {table.column_names})")
    col = table.column(name).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    try:
        return col.cast(typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"input file {file_uri}, column {name!r}: {col.type} values do not fit the column's type "
                         f"{typ} in the first input file ({exc})") from None


def check_passthrough_names(names) -> None:
    """input.passthrough may not name a column batchgen uses itself (manifest columns, stage and
    export fields: :data:`batchgen.manifest.RESERVED_NAMES`), nor one column twice."""

    seen = set()
    for name in names:
        message = reserved_name_error(name)
        if message:
            raise InputError(f"input.passthrough: {message}")
        if name in seen:
            raise InputError(f"input.passthrough: {name!r} is listed twice")
        seen.add(name)


def passthrough_types(table_schema: pa.Schema, names: list[str], file_uri: str) -> dict[str, pa.DataType]:
    """The Arrow types of the passthrough columns, from the first input file: plain values only."""

    check_passthrough_names(names)
    out = {}
    for name in names:
        if name not in table_schema.names:
            raise InputError(f"input file {file_uri}: no column {name!r} named in input.passthrough "
                             f"(columns: {table_schema.names})")
        typ = table_schema.field(name).type
        if pa.types.is_dictionary(typ):
            typ = typ.value_type
        if pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
            typ = pa.string()
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_string(typ)
                or pa.types.is_boolean(typ)):
            raise InputError(f"input file {file_uri}, column {name!r}: input.passthrough takes numbers, strings "
                             f"and booleans, not {typ}")
        if name in LABEL_COLUMNS:  # fills the manifest's own label column: its type
            want = LABEL_COLUMNS[name]
            if (pa.types.is_integer(want) and not pa.types.is_integer(typ)) or (
                    pa.types.is_string(want) and not pa.types.is_string(typ)):
                hint = (f" (pandas writes an integer column with missing values as floats: write it as "
                        f"{INT64_HINT.format(name=name)})" if pa.types.is_integer(want) and pa.types.is_floating(typ)
                        else "")
                raise InputError(f"input file {file_uri}, column {name!r}: a passed-through {name} must hold "
                                 f"{'integers' if pa.types.is_integer(want) else 'strings'}, not {typ}{hint}")
            typ = want
        out[name] = typ
    return out


def _expand(rows: pa.Table, table: pa.Table, file_uri: str, first_row: int, settings: dict) -> pa.Table:
    """Images per prompt: a row with ``n`` > 1 (its ``n`` column, else sampling.images_per_prompt)
    becomes items ``<id>-0`` .. ``<id>-<n-1>`` with seeds seed + k (the A1111 convention). Without an
    ``n`` column and with images_per_prompt 1, ids stay as they are."""
    job_n = int(settings.get("images_per_prompt") or 1)
    col = _column(table, "n", "int", file_uri, first_row, f"[1, {MAX_IMAGES_PER_ROW}]")
    if col is None and job_n == 1:
        return rows
    if col is None:
        counts = pa.array([job_n] * rows.num_rows, pa.int64())
    else:
        counts = col.fill_null(pa.scalar(job_n, pa.int64()))
        _check_range(counts, 1, MAX_IMAGES_PER_ROW, file_uri, first_row, "n", f"must be in [1, {MAX_IMAGES_PER_ROW}]")
    counts = counts.to_pylist()
    index = [i for i, c in enumerate(counts) for _ in range(c)]
    ks = [k for c in counts for k in range(c)]
    out = rows.take(pa.array(index, pa.int64()))
    ids = [f"{i}-{k}" for i, k in zip(out.column("item_id").to_pylist(), ks)]
    for pos, item in enumerate(ids):
        if len(item) > 128:
            raise _fail(file_uri, first_row + index[pos], settings["id_column"] or "n",
                        f"item id {item!r} (with its image number) is longer than 128 characters")
    seeds = [s + k for s, k in zip(out.column("seed").to_pylist(), ks)]
    for pos, seed in enumerate(seeds):
        if seed >= SEED_LIMIT:
            raise _fail(file_uri, first_row + index[pos], "seed",
                        f"seed + image number {ks[pos]} = {seed} is outside [0, 2**63)")
    out = out.set_column(out.schema.get_field_index("item_id"), "item_id", pa.array(ids, pa.string()))
    out = out.set_column(out.schema.get_field_index("seed"), "seed", pa.array(seeds, pa.int64()))
    return out.set_column(out.schema.get_field_index("image_index"), "image_index", pa.array(ks, pa.int32()))


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
    """Bounded-memory duplicate id check over the final item ids (after ``-<k>`` image numbers and
    positional ids) and over the input ids they come from: entries are spilled to hash buckets on
    local disk and each bucket is checked on its own.

    An entry is ``key  kind  file  row  base  k  n``: kind ``b`` is a row's id that is also its
    item's id (one image), ``i`` an item id ``<base>-<k>`` of a row with ``n`` images, ``r`` the
    input id of such a row. Two entries collide when both are items (``b``/``i``) or both are
    input ids (``b``/``r``) with the same key.
    """

    def __init__(self, buckets: int = 64):
        self.dir = tempfile.mkdtemp(prefix="batchgen-ids-")
        self.buckets = buckets
        self.handles = [open(os.path.join(self.dir, f"{b}.tsv"), "w") for b in range(buckets)]
        self.expanded = False  # some rows were numbered <id>-<k>

    def _spill(self, keys: list[str], lines: list[str]) -> None:
        """Append ``lines`` to their keys' buckets (one write per bucket)."""
        per: list[list[str]] = [[] for _ in range(self.buckets)]
        crc, buckets = zlib.crc32, self.buckets
        for key, line in zip(keys, lines):
            per[crc(key.encode()) % buckets].append(line)
        for handle, chunk in zip(self.handles, per):
            if chunk:
                handle.write("".join(chunk))

    def add_rows(self, rows: pa.Table, file_index: int, expanded: bool) -> None:
        """Normalized rows of one file (``expanded``: its rows were numbered ``<id>-<k>``)."""
        ids = rows.column("item_id").to_pylist()
        src = rows.column("source_row").to_pylist()
        if not expanded:
            self._spill(ids, [f"{i}\tb\t{file_index}\t{row}\t\t\t\n" for i, row in zip(ids, src)])
            return
        self.expanded = True
        ks = rows.column("image_index").to_pylist()
        counts: dict[int, int] = {}
        for row in src:
            counts[row] = counts.get(row, 0) + 1
        keys, lines = [], []
        for item_id, row, k in zip(ids, src, ks):
            base = item_id[: -len(f"-{k}")]
            n = counts[row]
            keys.append(item_id)
            lines.append(f"{item_id}\ti\t{file_index}\t{row}\t{base}\t{k}\t{n}\n")
            if k == 0:
                keys.append(base)
                lines.append(f"{base}\tr\t{file_index}\t{row}\t\t\t{n}\n")
        self._spill(keys, lines)

    def check(self, files: list[InputFile], id_column: str | None) -> None:
        try:
            for h in self.handles:
                h.close()
            for b in range(self.buckets):
                items: dict[str, str] = {}
                inputs: dict[str, str] = {}
                mixed = self.expanded  # without numbered rows every input id is its item's id
                with open(os.path.join(self.dir, f"{b}.tsv")) as fh:
                    for line in fh:
                        key, kind, entry = line.rstrip("\n").split("\t", 2)
                        if kind != "r":
                            first = items.get(key)
                            if first is not None:
                                raise InputError(_duplicate_message(key, first, entry, files, id_column, False))
                            items[key] = entry
                        if mixed and kind != "i":
                            first = inputs.get(key)
                            if first is not None:
                                raise InputError(_duplicate_message(key, first, entry, files, id_column, True))
                            inputs[key] = entry
        finally:
            self.close()

    def close(self) -> None:
        import shutil

        for h in self.handles:
            h.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _duplicate_message(key: str, first: str, second: str, files: list[InputFile],
                       id_column: str | None, input_id: bool) -> str:
    """The duplicate-id error: the id, and both rows with how each made it."""

    def where(entry: str) -> str:
        fi, row, base, k, n = entry.split("\t")
        text = f"input file {files[int(fi)].uri}, row {row}"
        if id_column is None:
            text += f" (no input.id_column: ids come from the file path {files[int(fi)].rel!r} and the row number)"
        if k and not input_id:
            text += f" (id {base!r}, {n} images per prompt: image {k})"
        return text

    column = f", column {id_column!r}" if id_column else ""
    what = "input id" if input_id else "item id"
    return (f"{where(second)}{column}: duplicate {what} {key!r} (first seen in {where(first)}); item ids must be "
            f"unique across all input files, also after the image number '-<k>' of a row with several images "
            f"per prompt is added: give one of the rows another id")


def scan_inputs(spec, storage_cfg, committed=None, resolved: dict | None = None, check_prompt=None,
                notes: bool = True, on_rows=None) -> ScanResult:
    """Streaming pre-flight pass: every file readable, every row valid, item ids unique (the final
    ids: after ``-<k>`` image numbers and positional ids, across files), integer columns written as
    floats named once, the spec settings the input overrides named and counted.

    Memory stays flat: one batch of one file at a time, ids spilled to disk buckets. With
    ``committed`` (a :class:`~batchgen.manifest.CommittedState`) it also counts how many items of
    this input are already done or failed. ``resolved`` carries the pre-flight's model facts
    (family, family defaults); ``check_prompt(prompt) -> message | None`` vets every prompt
    (a DiT model: class names). ``notes=False``: no log lines about the input (a first pass that
    another pass repeats: the notes come once, with that pass). ``on_rows(rows, file_uri)`` sees
    every normalized slice (the pre-flight collects the conditioning files there).
    """
    from .storage import Location

    settings = row_settings(spec, resolved)
    check_passthrough_names(spec.input.passthrough)  # before any file is listed or read
    files = list_input_files(spec.input.uri, storage_cfg)
    dupes = _DuplicateFinder()
    overrides = _override_columns(spec, settings)
    overridden: dict[str, int] = {}
    float_ints: dict[str, list[str]] = {}  # column -> files where an integer column is float
    input_rows = 0
    groups: dict[str, int] = {}
    cases: dict[str, tuple[str, int, dict]] = {}
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
            if fi == 0 and spec.input.passthrough:
                settings["passthrough"] = {k: str(v) for k, v in passthrough_types(
                    pf.schema_arrow, list(spec.input.passthrough), f.uri).items()}
            schema = pf.schema_arrow
            for name in int_columns():
                if name in schema.names and pa.types.is_floating(_value_type(schema.field(name).type)):
                    float_ints.setdefault(name, []).append(f.uri)
            expanded = "n" in schema.names or int(settings.get("images_per_prompt") or 1) > 1
            row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            planned.append(InputFile(f.uri, f.rel, row_groups))
            identities.append({"uri": f.uri, "rel": f.rel, "rows": meta.num_rows,
                               **Location.parse(f.uri, storage_cfg).identity()})
            try:
                for first, table in iter_file_batches(pf):
                    rows = normalize_batch(table, f.uri, f.rel, first, settings)
                    if check_prompt is not None:
                        _check_prompts(rows, check_prompt, f.uri, settings["prompt_column"])
                    if on_rows is not None:
                        on_rows(rows, f.uri)
                    ids = rows.column("item_id")
                    dupes.add_rows(rows, fi, expanded)
                    input_rows += table.num_rows
                    for column in overrides:
                        if column in table.column_names:
                            overridden[column] = overridden.get(column, 0) + _given(table.column(column))
                    if not too_many:
                        for g, c in zip(*_value_counts(rows.column("group"))):
                            groups[g] = groups.get(g, 0) + c
                        too_many = len(groups) > MAX_GROUPS_TO_SPLIT
                    if len(cases) < MAX_GROUP_CASES:
                        _group_cases(rows, f.uri, cases)
                    if done_ids is not None:
                        done += _count_in(ids, done_ids)
                    if failed_ids is not None:
                        failed += _count_in(ids, failed_ids)
                    total += rows.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"input file {f.uri}: cannot read as Parquet: {exc}") from None
        dupes.check(planned, settings["id_column"])
        dupes = None
    finally:
        if dupes is not None:
            dupes.close()
    if total == 0:
        raise InputError(f"input.uri {spec.input.uri!r}: the input has no rows")
    named = {overrides[c]: {"column": c, "rows": k, "of": input_rows} for c, k in overridden.items() if k}
    if notes:
        _warn_float_ints(float_ints)
        _log_overrides(spec, named)
    return ScanResult(planned, total, {} if too_many else groups, too_many, identities, done, failed, cases, settings,
                      input_rows, dict(sorted(named.items())))


def _value_type(typ: pa.DataType) -> pa.DataType:
    return typ.value_type if pa.types.is_dictionary(typ) else typ


def _override_columns(spec, settings: dict) -> dict[str, str]:
    """{input column: the spec setting a value in it replaces} for this job."""
    from .settings import ROW_SETTINGS

    out = {}
    family = settings.get("family")
    for s in ROW_SETTINGS:
        if family is not None and s.families is not None and family not in s.families:
            continue  # a value there is an error, found by the row check
        if s.spec:
            out[s.name] = f"sampling.{s.name}"
        elif s.name == "seed":
            out[s.name] = "sampling.seed"  # a row's seed replaces the one derived from the job's seed
    out["n"] = "sampling.images_per_prompt"
    out["loras"] = "model.loras"
    return out


def _given(col: pa.ChunkedArray) -> int:
    """Rows with a value in ``col`` (null, and NaN in a float column, are no value: the spec's applies)."""
    given = len(col) - col.null_count
    if given and pa.types.is_floating(col.type):
        given -= int(pc.sum(pc.cast(pc.is_nan(col).fill_null(False), pa.int64())).as_py() or 0)
    return given


def _log_overrides(spec, named: dict[str, dict]) -> None:
    """One line per spec setting the input replaces, in how many rows; a warning when the spec sets
    it explicitly and no row uses the spec's value."""
    for key, o in sorted(named.items()):
        section, name = key.split(".", 1)
        block = getattr(spec, section)
        line = f"{key}: input column {o['column']!r} overrides it in {o['rows']} of {o['of']} rows"
        if name in block.model_fields_set and o["rows"] == o["of"]:
            value = getattr(block, name)
            if name == "loras":
                value = [lora.model_dump(mode="json") for lora in value]
            log.warning("%s: the spec's value %r is used by no row", line, value)
        else:
            log.info("%s", line)


def _warn_float_ints(float_ints: dict[str, list[str]]) -> None:
    """One warning for every integer column an input holds as floats (pandas' nullable integers)."""
    if not float_ints:
        return
    parts = []
    for name, uris in float_ints.items():
        more = f" and {len(uris) - 1} more files" if len(uris) > 1 else ""
        parts.append(f"{name!r} in {uris[0]}{more}")
    fix = (INT64_HINT.format(name=next(iter(float_ints))) if len(float_ints) == 1
           else "df[col].astype(\"Int64\") for each")
    log.warning("input columns of integers hold floats: %s; their whole-number values are used as integers and "
                "NaN/null as no value (pandas writes an integer column with missing values as float64; write it "
                "as %s to keep integers)", "; ".join(parts), fix)


def _check_prompts(rows: pa.Table, check_prompt, file_uri: str, column: str) -> None:
    seen: set[str] = set()
    for prompt, row in zip(rows.column("prompt").to_pylist(), rows.column("source_row").to_pylist()):
        if prompt in seen:
            continue
        message = check_prompt(prompt)
        if message:
            raise _fail(file_uri, row, column, message)
        seen.add(prompt)


def _count_in(ids, value_set: pa.Array) -> int:
    return int(pc.sum(pc.cast(pc.is_in(ids, value_set=value_set), pa.int64())).as_py() or 0)


def _group_cases(rows: pa.Table, file_uri: str, cases: dict) -> None:
    """Record each new settings group of ``rows`` with the first row it appears on."""
    groups = rows.column("group")
    for g in pc.unique(groups).to_pylist():
        if g not in cases:
            i = _first_true(pc.equal(groups, g))
            row = rows.slice(i, 1).to_pylist()[0]
            cases[g] = (file_uri, row["source_row"], row)


def _value_counts(col: pa.ChunkedArray):
    vc = pc.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
