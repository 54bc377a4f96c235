"""Sorting more rows than fit in memory and keeping the first row per key: sorted runs on local
disk, then a k-way merge.

Consolidating a job's manifest means sorting every part's rows by item id and keeping the best
row of each item. A million rows sort in memory; ten or thirty million do not fit a driver that
must stay under a gigabyte. So :func:`sorted_unique` reads its input a table at a time, sorts
chunks of ``run_rows`` rows (keeping the first row per key of each) into run files in a temporary
folder, and merges the runs ``fan_in`` at a time, each run read ``batch_rows`` rows at a time.
Memory is about ``run_rows`` rows while the runs are written and ``fan_in x batch_rows`` rows
while they merge, whatever the number of rows.

The merge works a round at a time: the smallest of the runs' current last keys is a bound below
which every run has shown all its rows, so the rows up to it are sorted together and deduplicated,
and at least one run moves on to its next batch. Within a run every key is unique, so all rows of
a key meet in one round.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401 - pa.ipc

RUN_ROWS = 32_768  # a run is sorted in memory: ~3 copies of this many rows at the peak
FAN_IN = 256  # runs merged at once (more: one more pass over the rows, 8M+ rows at the defaults)
BATCH_ROWS = 512  # rows held per run while merging: FAN_IN x BATCH_ROWS rows in memory
OUT_ROWS = 16_384  # rows per row group of the merged output


def first_per_key(table: pa.Table, key: str, carry=None) -> tuple[pa.Table, object]:
    """The rows of a table sorted by ``key`` that start a new key (a row whose key equals
    ``carry``, the previous table's last key, continues it and is dropped); and the last key."""
    if table.num_rows == 0:
        return table, carry
    keys = table.column(key).combine_chunks()
    prev = pa.concat_arrays([pa.array([carry], keys.type), keys.slice(0, len(keys) - 1)])
    keep = pc.fill_null(pc.not_equal(keys, prev), True)
    return table.filter(keep), keys[len(keys) - 1].as_py()


def _concat(tables: Sequence[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


def sorted_unique(tables: Iterable[pa.Table], key: str, order: list[tuple[str, str]], *, run_rows: int | None = None,
                  fan_in: int | None = None, batch_rows: int | None = None, out_rows: int | None = None,
                  tmp_dir: str | None = None) -> Iterator[pa.Table]:
    """The rows of ``tables`` sorted by ``order`` (whose first key is ``key``), keeping the first
    row of each key, as tables of about ``out_rows`` rows, in bounded memory (module docstring).
    Sizes left None take the module's constants (:data:`RUN_ROWS` ...)."""
    run_rows = run_rows or RUN_ROWS
    fan_in = max(2, fan_in or FAN_IN)
    batch_rows = batch_rows or BATCH_ROWS
    out_rows = out_rows or OUT_ROWS
    work = tempfile.mkdtemp(prefix="batchgen-merge-", dir=tmp_dir)
    try:
        runs: list[str] = []
        buffer: list[pa.Table] = []
        buffered = 0

        def spill() -> None:
            nonlocal buffer, buffered
            table, _ = first_per_key(_concat(buffer).sort_by(order), key)
            runs.append(_write_run([table], work, len(runs), batch_rows))
            buffer, buffered = [], 0
            del table
            pa.default_memory_pool().release_unused()  # the sort's copies, back to the system now

        for table in tables:
            if table.num_rows:
                buffer.append(table)
                buffered += table.num_rows
                if buffered >= run_rows:
                    spill()
        if len(runs) == 0:  # everything fits in memory: no run files
            if buffer:
                table, _ = first_per_key(_concat(buffer).sort_by(order), key)
                for start in range(0, table.num_rows, out_rows):
                    yield table.slice(start, out_rows)
            return
        if buffer:
            spill()
        generation = len(runs)
        while len(runs) > fan_in:  # merge passes until one merge can take every run
            merged = []
            for i in range(0, len(runs), fan_in):
                group = runs[i:i + fan_in]
                merged.append(_write_run(_merge(group, key, order, batch_rows), work, generation, batch_rows))
                generation += 1
                for path in group:
                    os.remove(path)
            runs = merged
        yield from _rebatch(_merge(runs, key, order, batch_rows), out_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_run(tables: Iterable[pa.Table], folder: str, index: int, batch_rows: int) -> str:
    """Write sorted tables as one run file: an Arrow IPC stream of ``batch_rows``-row record
    batches (zstd), which the merge reads back one batch at a time. Not Parquet: a Parquet reader
    keeps its file's footer decoded, and with small row groups that is megabytes per run (150
    open runs took 640 MB outside Arrow's memory pool)."""
    path = os.path.join(folder, f"run-{index:06d}.arrows")
    writer = schema = None
    with pa.OSFile(path, "wb") as sink:
        try:
            for table in tables:
                if writer is None:
                    schema = table.schema
                    writer = pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))
                if table.schema != schema:
                    table = table.cast(schema)
                for batch in table.to_batches(max_chunksize=batch_rows):
                    writer.write_batch(batch)
        finally:
            if writer is not None:
                writer.close()
    return path


def _batches(path: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A run file's record batches, one at a time (each at most ``batch_rows`` rows)."""
    with pa.OSFile(path, "rb") as source:
        reader = pa.ipc.open_stream(source)
        for batch in reader:
            for start in range(0, batch.num_rows, batch_rows):
                yield batch.slice(start, batch_rows)


def _merge(paths: list[str], key: str, order, batch_rows: int) -> Iterator[pa.Table]:
    """k-way merge of run files (each sorted, each key once): sorted tables, first row per key."""
    readers = [_batches(p, batch_rows) for p in paths]

    def pull(i: int) -> pa.Table | None:
        batch = next(readers[i], None)
        return None if batch is None else pa.Table.from_batches([batch])

    current = [pull(i) for i in range(len(paths))]
    while True:
        live = [i for i, t in enumerate(current) if t is not None]
        if not live:
            return
        lasts = {i: current[i].column(key)[-1].as_py() for i in live}
        bound = min(lasts.values())
        pieces = []
        for i in live:
            table = current[i]
            if lasts[i] <= bound:  # all of it (the run that sets the bound, or ties)
                pieces.append(table)
                current[i] = pull(i)
                continue
            if table.column(key)[0].as_py() > bound:
                continue
            take = int(pc.sum(pc.less_equal(table.column(key), bound)).as_py())
            pieces.append(table.slice(0, take))
            current[i] = table.slice(take)
        table, _ = first_per_key(_concat(pieces).sort_by(order), key)
        yield table


def _rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of about ``rows`` rows (at least, but the last) from smaller ones."""
    buffer: list[pa.Table] = []
    buffered = 0
    for table in tables:
        if table.num_rows:
            buffer.append(table)
            buffered += table.num_rows
            if buffered >= rows:
                yield _concat(buffer)
                buffer, buffered = [], 0
    if buffer:
        yield _concat(buffer)


__all__ = ["sorted_unique", "first_per_key"]
