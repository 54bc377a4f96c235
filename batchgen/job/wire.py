"""Manifest rows on their way from the encode stage to the driver, kept out of the object store.

Ray returns a task's small results inline (in the reply, into the owner's heap) and puts larger
ones in the node's shared-memory object store. The driver reads the latter through its mapping of
that store, and every page it touches stays in its resident set: with blocks of raw manifest rows
(~550 bytes a row, a few MB a block) the driver's RSS grew by ~385 MB per million rows and would
keep growing to the store's size (30% of RAM by default) however little the driver itself holds.

So the encode stage sends its rows as Parquet bytes (zstd, ~65 bytes a row: the sha256 column
barely compresses) in one-row blocks of at most :data:`MAX_BYTES` each, below Ray's inline limit
(100 KiB); the stage chain splits its output into blocks of one row (``repartition``, fused into the
encode task), and the driver decodes each block back into the same table. The driver's memory is
then what it decodes and buffers for the next manifest part, whatever the job's size.
"""

from __future__ import annotations

import io
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

COLUMN = "manifest_rows"  # the one column of a wire block: Parquet bytes of manifest rows
MAX_BYTES = 90_000  # below Ray's max_direct_call_object_size (100 KiB): returned inline
FIRST_ROWS = 1024  # rows in the first chunk; later chunks are sized from the bytes per row seen


def _encode(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def to_wire(table: pa.Table, max_bytes: int = MAX_BYTES) -> Iterator[pa.Table]:
    """``table`` as one-row tables whose single value is the Parquet bytes of a slice of its rows,
    each at most ``max_bytes`` (unless a single row is larger). An empty table gives one block."""
    start, rows = 0, FIRST_ROWS
    if table.num_rows == 0:
        yield pa.table({COLUMN: pa.array([_encode(table)], pa.binary())})
        return
    while start < table.num_rows:
        chunk = table.slice(start, rows)
        data = _encode(chunk)
        while len(data) > max_bytes and chunk.num_rows > 1:  # too big: halve until it fits
            chunk = chunk.slice(0, chunk.num_rows // 2)
            data = _encode(chunk)
        yield pa.table({COLUMN: pa.array([data], pa.binary())})
        start += chunk.num_rows
        rows = max(1, int(0.8 * max_bytes * chunk.num_rows / len(data)))


def from_wire(block: pa.Table) -> pa.Table:
    """A block of the stage chain's output -> the manifest rows it carries (all rows of a block of
    several wire rows, in order). A block that is not in wire form is returned as it is."""
    if COLUMN not in block.column_names:
        return block
    tables = [pq.read_table(io.BytesIO(value)) for value in block.column(COLUMN).to_pylist()]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


__all__ = ["to_wire", "from_wire", "COLUMN", "MAX_BYTES"]
