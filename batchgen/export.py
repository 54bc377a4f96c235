"""`batchgen export OUTPUT --format webdataset|parquet --to URI`: training-ready copies of a job.

Only ``status == "ok"`` items are exported (the failed ones are counted and left out), in sorted
item-id order, so shard membership is deterministic and a re-export writes identical bytes.

webdataset
    ``000000.tar``, ``000001.tar``, ... with ``shard_size`` samples each. A sample is
    ``<key>.<png|jpg|webp>`` (the stored image bytes), ``<key>.txt`` (the prompt, UTF-8) and
    ``<key>.json`` (the manifest row). The key is the item id with ``.`` replaced by ``_`` (WebDataset
    splits file names at the first dot); two ids mapping to one key are an error. Tar headers are
    fixed (mtime 0, uid/gid 0, empty owner names, mode 0644, PAX format). Beside each tar,
    ``NNNNNN.parquet`` holds the shard's rows (``key`` + manifest columns), and ``sizes.json``
    maps each tar name to its sample count (as OpenCLIP reads it).
parquet
    ``data/train-NNNNN-of-MMMMM.parquet`` (Hugging Face datasets layout) with ``shard_size`` rows
    each: ``image`` struct<bytes: binary, path: string>, ``text`` (the prompt) and the manifest
    columns, with the ``huggingface`` schema metadata declaring ``image`` an ``Image`` feature.

Both write ``export.json`` (counts). One shard is held in memory at a time.

Provenance (``provenance=``): the manifest records where each item came from on the machine that
rendered it: ``source_file`` (an absolute input path), ``image_uri`` (an absolute output path),
``init_image``, a local ``model_uri`` and ``worker`` (``host:pid``). ``keep`` (the default) exports
them as they are; ``relative`` rewrites paths relative to the job's input / output roots (and a
local model or init image to its file name) and blanks ``worker``; ``drop`` leaves those columns
out. Use ``relative`` or ``drop`` for exports meant for publishing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import posixpath
import re
import tarfile
import time

from .errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "parquet")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}
_OUR_FILES = re.compile(r"^(\d{6}\.(tar|parquet)|sizes\.json|export\.json|data/train-\d{5}-of-\d{5}\.parquet)$")


def sample_key(item_id: str) -> str:
    """WebDataset key of an item: the id with every ``.`` replaced by ``_``."""
    return item_id.replace(".", "_")


PROVENANCE = ("keep", "relative", "drop")
PROVENANCE_COLUMNS = ("source_file", "image_uri", "init_image", "model_uri", "worker")


def _source_rows(output: str, shard_size, storage_config, provenance: str = "keep"):
    """The job output to export, its ok manifest rows as an Arrow table (in manifest order: sorted
    by item id) and the number of other rows. Rows become Python dicts one shard at a time."""
    import pyarrow.compute as pc

    from .compare import open_output, read_manifest

    _check_shard_size(shard_size)
    if provenance not in PROVENANCE:
        raise ValueError(f"provenance must be one of {', '.join(PROVENANCE)}, got {provenance!r}")
    root = open_output(output, storage_config)
    table = read_manifest(root)
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    return root, ok, table.num_rows - ok.num_rows


def _input_roots(root) -> dict[str, str]:
    """{input file uri: its path relative to the input root}, from the job's job.json."""
    try:
        job = json.loads(root.join("job.json").read_bytes().decode())
    except Exception:  # noqa: BLE001 - an output without job.json: fall back to file names
        return {}
    return {i["uri"]: i["rel"] for i in job.get("inputs") or [] if isinstance(i, dict) and "uri" in i and "rel" in i}


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
    for key in ("init_image", "model_uri"):
        if _is_local_path(row.get(key)):
            out[key] = posixpath.basename(row[key].rstrip("/"))
    out["worker"] = None
    return out


def _shards(ok, shard_size: int):
    """(shard index, rows of that shard as dicts) over the ok table."""
    for shard, start in enumerate(range(0, ok.num_rows, shard_size)):
        yield shard, ok.slice(start, shard_size).to_pylist()


def _image_bytes(root, row: dict, storage_config) -> tuple[bytes, str]:
    """The stored image of a row, checked against its manifest sha256; and its extension."""
    from .compare import image_location

    loc = image_location(root, row, storage_config)
    data = loc.read_bytes()
    want = row.get("image_sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise InputError(f"{loc.uri}: image bytes do not match the manifest sha256 of item {row['item_id']!r}")
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
    """Existing files at ``dest``: refuse a non-empty destination unless ``overwrite``."""
    dest.require_folder()
    existing = dest.list(recursive=True) if dest.is_dir_like() else []
    if existing and not overwrite:
        raise InputError(f"{dest.uri} is not empty ({len(existing)} files); pass --overwrite to replace an export")
    return existing


def _remove_stale(dest, existing: list, written: set[str]) -> None:
    """After an overwrite, delete our own file names that this export did not write again."""
    prefix = dest.uri.rstrip("/") + "/"
    for loc in existing:
        rel = loc.uri[len(prefix):] if loc.uri.startswith(prefix) else None
        if rel and rel not in written and _OUR_FILES.match(rel):
            loc.delete()


def export_webdataset(output: str, to: str, shard_size: int = 1000, storage_config=None,
                      overwrite: bool = False, provenance: str = "keep") -> dict:
    """Write WebDataset shards of a job output's ok items; returns the counts."""
    import pyarrow as pa

    from .storage import Location

    root, ok, failed = _source_rows(output, shard_size, storage_config, provenance)
    inputs = _input_roots(root) if provenance == "relative" else {}
    schema = pa.schema([("key", pa.string())] + [f for f in ok.schema if provenance != "drop"
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
                data, ext = _image_bytes(root, r, storage_config)
                _tar_add(tar, f"{key}.{ext}", data)
                _tar_add(tar, f"{key}.txt", (r.get("prompt") or "").encode("utf-8"))
                _tar_add(tar, f"{key}.json", _json_row(public_row(r, provenance, root.uri, inputs)))
        dest.join(f"{name}.tar").write_bytes(buf.getvalue())
        shard_rows = pa.Table.from_pylist(
            [{"key": sample_key(r["item_id"]), **public_row(r, provenance, root.uri, inputs)} for r in chunk],
            schema=schema)
        dest.join(f"{name}.parquet").write_bytes(_parquet_bytes(shard_rows))
        sizes[f"{name}.tar"] = len(chunk)
        written |= {f"{name}.tar", f"{name}.parquet"}
        done += len(chunk)
        log.info("export: shard %s (%d samples, %d/%d done)", name, len(chunk), done, ok.num_rows)
    dest.join("sizes.json").write_bytes(json.dumps(sizes, indent=2, sort_keys=True).encode())
    counts = {"format": "webdataset", "source": root.uri if provenance == "keep" else root.name,
              "exported": ok.num_rows, "failed_skipped": failed, "shards": len(sizes), "shard_size": shard_size,
              "provenance": provenance}
    dest.join("export.json").write_bytes(json.dumps(counts, indent=2, sort_keys=True).encode())
    _remove_stale(dest, existing, written | {"sizes.json", "export.json"})
    log.info("export: %d samples in %d shards in %.1f s (%d failed items left out)",
             ok.num_rows, len(sizes), time.monotonic() - t0, failed)
    return counts


def hf_features(schema) -> dict:
    """The ``huggingface`` metadata: ``image`` as an Image feature, other columns as Values."""
    import pyarrow as pa

    names = {pa.string(): "string", pa.large_string(): "large_string", pa.int64(): "int64",
             pa.int32(): "int32", pa.float64(): "float64", pa.float32(): "float32", pa.bool_(): "bool"}
    features = {"image": {"_type": "Image"}}
    for f in schema:
        if f.name == "image":
            continue
        if f.type not in names:
            raise InputError(f"manifest column {f.name!r} has type {f.type}, which the export cannot describe")
        features[f.name] = {"dtype": names[f.type], "_type": "Value"}
    return {"info": {"features": features}}


def export_parquet(output: str, to: str, shard_size: int = 1000, storage_config=None,
                   overwrite: bool = False, provenance: str = "keep") -> dict:
    """Write Hugging Face datasets Parquet files of a job output's ok items; returns the counts."""
    import pyarrow as pa

    from .storage import Location

    root, ok, failed = _source_rows(output, shard_size, storage_config, provenance)
    inputs = _input_roots(root) if provenance == "relative" else {}
    dest = Location.parse(str(to), storage_config)
    existing = _prepare_destination(dest, overwrite)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field("image", image_type), pa.field("text", pa.string())]
    fields += [f for f in ok.schema if f.name not in ("image", "text")
               and (provenance != "drop" or f.name not in PROVENANCE_COLUMNS)]
    schema = pa.schema(fields)
    schema = schema.with_metadata({"huggingface": json.dumps(hf_features(schema))})
    n_files = max(1, -(-ok.num_rows // shard_size))
    written: set[str] = set()
    for shard, chunk in _shards(ok, shard_size) if ok.num_rows else [(0, [])]:
        out_rows = []
        for r in chunk:
            data, ext = _image_bytes(root, r, storage_config)
            pub = public_row(r, provenance, root.uri, inputs)
            out_rows.append({"image": {"bytes": data, "path": f"{r['item_id']}.{ext}"},
                             "text": r.get("prompt"), **{k: v for k, v in pub.items() if k not in ("image", "text")}})
        name = f"data/train-{shard:05d}-of-{n_files:05d}.parquet"
        tab = pa.Table.from_pylist(out_rows, schema=schema)
        dest.join(name).write_bytes(_parquet_bytes(tab, row_group_size=100))
        written.add(name)
        log.info("export: %s (%d rows)", name, len(chunk))
    counts = {"format": "parquet", "source": root.uri if provenance == "keep" else root.name,
              "exported": ok.num_rows, "failed_skipped": failed, "files": n_files, "shard_size": shard_size,
              "provenance": provenance}
    dest.join("export.json").write_bytes(json.dumps(counts, indent=2, sort_keys=True).encode())
    _remove_stale(dest, existing, written | {"export.json"})
    return counts


def _check_shard_size(shard_size) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")


def export_output(output: str, fmt: str, to: str, shard_size: int = 1000, storage_config=None,
                  overwrite: bool = False, provenance: str = "keep") -> dict:
    """Export a job output in ``fmt`` ("webdataset" or "parquet") to ``to``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    fn = export_webdataset if fmt == "webdataset" else export_parquet
    return fn(output, to, shard_size=shard_size, storage_config=storage_config, overwrite=overwrite,
              provenance=provenance)


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


def run(args) -> int:
    from .storage import StorageConfig

    counts = export_output(args.output, args.fmt, args.to, shard_size=args.shard_size,
                           storage_config=StorageConfig(endpoint_url=args.endpoint_url),
                           overwrite=args.overwrite, provenance=args.provenance)
    print(json.dumps(counts, sort_keys=True))
    return 0


configure_export = configure
run_export = run
__all__ = ["export_output", "export_webdataset", "export_parquet", "sample_key", "hf_features"]
