"""Reading a finished (or in-progress) job output: job.json, the manifest, the stored images.

Why one module: ``compare``, ``report``, ``export`` and ``rerender`` all read job outputs, and each
used to carry its own idea of where an item's image is, how the manifest is validated and what an
unreadable image means. The rules live here once:

- a *finished* output has a ``manifest.parquet`` (one row per item, sorted by ``item_id``, at
  least the columns in :data:`REQUIRED_COLUMNS`, no duplicate or null ids); an output that only
  has part files was not consolidated (:func:`open_output` says so);
- an item's image is ``images/<file name of image_uri>`` under the output's own root when that
  exists (so a copied output, such as a blessed baseline, finds its own images), else the
  manifest's ``image_uri`` as written;
- stored bytes are checked against the manifest's ``image_sha256`` before they are used;
- an item's row for ``rerender`` comes from ``manifest.parquet`` when the job consolidated, else
  from the committed part files (newest ok row wins), so a crashed job's items can be re-rendered.

Everything takes local paths, ``file://`` or ``s3://`` URIs (through :mod:`batchgen.storage`);
manifests are Arrow tables, rows are plain dicts, images are HxWx3 uint8 RGB arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import Iterator

from .errors import InputError, StorageError

REQUIRED_COLUMNS = ("item_id", "status", "image_uri", "image_sha256")
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "summary.json"


# --- functions on a root Location ----------------------------------------------------------


def open_output(uri, storage_config=None):
    """The :class:`~batchgen.storage.Location` of a job output that has a ``manifest.parquet``."""
    from .storage import Location

    root = Location.parse(str(uri), storage_config)
    if not root.join(MANIFEST_FILE).exists():
        hint = " (the job has part files but was not consolidated: re-run it)" if root.join(
            "manifest").is_dir_like() else ""
        raise InputError(f"{root.uri}: no manifest.parquet; is this a finished batchgen job output?{hint}")
    return root


def read_manifest(root):
    """The consolidated manifest of a job output as an Arrow table sorted by item_id."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    loc = root.join(MANIFEST_FILE)
    try:
        table = pq.read_table(pa.BufferReader(loc.read_bytes()))
    except StorageError:
        raise
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(f"{loc.uri}: not a readable Parquet manifest ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{loc.uri}: manifest has no column(s) {', '.join(missing)}")
    if table.column("item_id").null_count:
        raise InputError(f"{loc.uri}: column item_id has null values")
    table = table.sort_by("item_id")
    ids = table.column("item_id")
    if len(ids) > 1:
        dup = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
        if pc.any(dup).as_py():
            first = pc.index(dup, True).as_py()
            raise InputError(f"{loc.uri}: item_id {ids[first + 1].as_py()!r} appears more than once")
    return table


def iter_rows(table, chunk: int = 1024) -> Iterator[dict]:
    """Rows of an Arrow table as dicts, converting ``chunk`` rows at a time."""
    for start in range(0, table.num_rows, chunk):
        yield from table.slice(start, chunk).to_pylist()


def image_location(root, row: dict, storage_config=None):
    """Where an item's image is: ``images/<file name>`` under ``root`` (so a copied output, such as
    a blessed baseline, finds its own images), else the manifest's ``image_uri`` as written."""
    from .storage import Location

    uri = row.get("image_uri")
    if not uri:
        raise InputError(f"{root.uri}: item {row['item_id']!r} has no image_uri in the manifest")
    local = root.join("images", posixpath.basename(str(uri).rstrip("/")))
    if local.exists():
        return local
    return Location.parse(str(uri), storage_config)


def decode_image(data: bytes, where: str):
    """PNG/JPEG/WebP bytes -> HxWx3 uint8 array (RGB)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise InputError(f"{where}: not a readable image ({exc})") from exc


def load_image(uri, storage_config=None):
    """The image at ``uri`` (a path, URI or Location) as an HxWx3 uint8 array."""
    from .storage import Location

    loc = Location.parse(uri, storage_config)
    return decode_image(loc.read_bytes(), loc.uri)


def check_sha256(data: bytes, row: dict, where: str) -> None:
    """Raise :class:`InputError` when ``data`` does not match the row's ``image_sha256`` (if any)."""
    want = row.get("image_sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise InputError(f"{where}: image bytes do not match the manifest sha256 of item {row['item_id']!r}")


def read_json_file(loc, what: str) -> dict:
    """A JSON object file, or :class:`InputError` naming it when it is missing or unreadable."""
    if not loc.exists():
        raise InputError(f"{loc.uri}: no {what}")
    try:
        data = json.loads(loc.read_bytes().decode("utf-8"))
    except StorageError:
        raise
    except Exception as exc:
        raise InputError(f"{loc.uri}: not a readable {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{loc.uri}: {what} is not a JSON object")
    return data


# --- an output as an object ---------------------------------------------------------------


class Output:
    """One job output. Nothing is read until asked for; job.json, the manifest and summary.json
    are read once and kept.

    ``Output.open(uri)`` is for finished outputs (it requires ``manifest.parquet``, as compare and
    export do); ``Output.at(uri)`` accepts any output, finished or not (as ``rerender`` does).
    """

    def __init__(self, root, storage_config=None):
        self.root = root
        self.storage_config = storage_config
        self._job: dict | None = None
        self._manifest = None
        self._summary: dict | None = None

    @classmethod
    def open(cls, uri, storage_config=None) -> "Output":
        return cls(open_output(uri, storage_config), storage_config)

    @classmethod
    def at(cls, uri, storage_config=None) -> "Output":
        from .storage import Location

        return cls(Location.parse(uri, storage_config), storage_config)

    @property
    def uri(self) -> str:
        return self.root.uri

    def __repr__(self) -> str:
        return f"Output({self.uri!r})"

    # job.json / summary.json

    def has_job(self) -> bool:
        return self._job is not None or self.root.join(JOB_FILE).exists()

    @property
    def job(self) -> dict:
        """job.json; :class:`InputError` when the folder has none (not a batchgen job output)."""
        if self._job is None:
            loc = self.root.join(JOB_FILE)
            if not loc.exists():
                raise InputError(f"{self.uri}: no job.json, not a batchgen job output")
            self._job = read_json_file(loc, "job.json")
        return self._job

    @property
    def spec(self) -> dict:
        """The resolved job spec recorded in job.json (``{}`` for an output without one)."""
        spec = self.job.get("spec") if self.has_job() else None
        return spec if isinstance(spec, dict) else {}

    @property
    def passthrough(self) -> list[str]:
        """The input columns the job copied into the manifest (``input.passthrough``)."""
        value = (self.spec.get("input") or {}).get("passthrough") or []
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else []

    @property
    def summary(self) -> dict | None:
        """summary.json, or None while the job has not finished a run."""
        if self._summary is None:
            loc = self.root.join(SUMMARY_FILE)
            if not loc.exists():
                return None
            self._summary = read_json_file(loc, "summary.json")
        return self._summary

    # the manifest

    @property
    def manifest(self):
        """The consolidated manifest (Arrow table, sorted by item_id, validated)."""
        if self._manifest is None:
            if not self.root.join(MANIFEST_FILE).exists():
                open_output(self.uri, self.storage_config)  # raises with the not-consolidated hint
            self._manifest = read_manifest(self.root)
        return self._manifest

    @property
    def column_names(self) -> list[str]:
        return list(self.manifest.column_names)

    def rows(self, chunk: int = 1024) -> Iterator[dict]:
        """Manifest rows as dicts, in item_id order, ``chunk`` rows converted at a time."""
        return iter_rows(self.manifest, chunk)

    def ok_table(self):
        """The manifest's ``status == "ok"`` rows."""
        import pyarrow.compute as pc

        table = self.manifest
        return table.filter(pc.equal(table.column("status"), "ok"))

    def find_row(self, item_id: str, status: str = "ok") -> dict:
        """The manifest row of ``item_id`` with that ``status``: from manifest.parquet when the job
        consolidated, else from the committed part files (the newest matching row wins).
        :class:`InputError` when there is none."""
        row = _find_row(self.root, item_id, status)
        if row is None:
            raise InputError(f"{self.uri}: item {item_id!r} has no {status} row in the manifest")
        return row

    # images

    def image_location(self, row: dict):
        return image_location(self.root, row, self.storage_config)

    def read_image_bytes(self, row: dict, verify: bool = True) -> bytes:
        """The stored image file of a row; with ``verify`` its sha256 must match the manifest."""
        loc = self.image_location(row)
        data = loc.read_bytes()
        if verify:
            check_sha256(data, row, loc.uri)
        return data

    def read_image(self, row: dict, verify: bool = True):
        """The stored image of a row as an HxWx3 uint8 RGB array."""
        loc = self.image_location(row)
        data = loc.read_bytes()
        if verify:
            check_sha256(data, row, loc.uri)
        return decode_image(data, loc.uri)


def find_row(output, item_id: str, storage_config=None, status: str = "ok") -> dict:
    """The manifest row of ``item_id`` (see :meth:`Output.find_row`); ``output`` is a path, URI,
    Location or :class:`Output`."""
    out = output if isinstance(output, Output) else Output.at(output, storage_config)
    return out.find_row(item_id, status)


def _find_row(root, item_id: str, status: str) -> dict | None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .manifest import iter_parts

    def match(table) -> dict | None:
        if "item_id" not in table.column_names or "status" not in table.column_names:
            return None
        hit = table.filter(pc.and_(pc.equal(table.column("item_id"), item_id),
                                   pc.equal(table.column("status"), status)))
        return hit.slice(hit.num_rows - 1, 1).to_pylist()[0] if hit.num_rows else None

    loc = root.join(MANIFEST_FILE)
    if loc.exists():
        try:  # the manifest is sorted by item_id: row-group statistics skip most of a large one
            table = pq.read_table(pa.BufferReader(loc.read_bytes()), filters=[("item_id", "==", item_id)])
        except StorageError:
            raise
        except Exception as exc:
            raise InputError(f"{loc.uri}: not a readable Parquet manifest ({exc})") from exc
        return match(table)
    row = None
    for _, table in iter_parts(root):  # oldest part first: a later ok row replaces an earlier one
        row = match(table) or row
    return row


__all__ = ["Output", "open_output", "read_manifest", "iter_rows", "image_location", "decode_image",
           "load_image", "check_sha256", "find_row", "REQUIRED_COLUMNS"]
