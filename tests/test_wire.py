"""Manifest rows on the wire from the encode stage to the driver (batchgen.job.wire): every block
below Ray's inline limit, the rows back unchanged and in order."""

from __future__ import annotations

import os

import pyarrow as pa

from batchgen.job.wire import COLUMN, MAX_BYTES, from_wire, to_wire


def _rows(n: int, width: int = 40) -> pa.Table:
    return pa.table({"item_id": [f"id{i:06d}" for i in range(n)],
                     "image_sha256": [os.urandom(32).hex() for _ in range(n)],  # incompressible, like the real one
                     "prompt": ["x" * width] * n, "warmup_ms": pa.array([None] * n, pa.float64())})


def test_blocks_stay_below_the_inline_limit_and_round_trip():
    table = _rows(5000)
    blocks = list(to_wire(table))
    assert len(blocks) > 1 and all(b.column_names == [COLUMN] and b.num_rows == 1 for b in blocks)
    assert all(len(b.column(COLUMN)[0].as_py()) <= MAX_BYTES for b in blocks)
    assert pa.concat_tables([from_wire(b) for b in blocks]).equals(table)
    # several wire rows in one block (Ray Data may coalesce): all rows, in order
    assert from_wire(pa.concat_tables(blocks)).equals(table)


def test_wide_rows_are_halved_until_they_fit_and_an_empty_table_travels():
    table = _rows(1500).append_column("note", pa.array([os.urandom(100).hex() for _ in range(1500)]))
    blocks = list(to_wire(table, max_bytes=30_000))  # the first 1024-row chunk is ~300 KB: halved until it fits
    assert all(len(b.column(COLUMN)[0].as_py()) <= 30_000 for b in blocks)
    assert pa.concat_tables([from_wire(b) for b in blocks]).equals(table)
    empty = _rows(0)
    (block,) = list(to_wire(empty))
    assert from_wire(block).equals(empty)


def test_a_plain_table_passes_through():
    table = _rows(3)
    assert from_wire(table) is table
