"""Sorted runs + k-way merge (batchgen.sorted_runs): the same rows as an in-memory sort that keeps
the first row per key, whatever the run, fan-in and batch sizes; the temporary files are removed."""

from __future__ import annotations

import os
import random

import pyarrow as pa
import pytest

from batchgen.sorted_runs import first_per_key, sorted_unique

ORDER = [("k", "ascending"), ("rank", "descending")]


def _tables(seed: int, n_tables: int, rows: int, keys: int) -> list[pa.Table]:
    rnd = random.Random(seed)
    out = []
    for t in range(n_tables):
        ks = [f"id{rnd.randrange(keys):05d}" for _ in range(rows)]
        out.append(pa.table({"k": ks, "rank": [rnd.randrange(1000) * 100 + t for _ in range(rows)],
                             "payload": [f"t{t}r{i}" for i in range(rows)]}))
    return out


def _expected(tables: list[pa.Table]) -> pa.Table:
    table, _ = first_per_key(pa.concat_tables(tables).sort_by(ORDER), "k")
    return table


@pytest.mark.parametrize("run_rows,fan_in,batch_rows", [(10_000, 128, 1024), (50, 2, 7), (333, 3, 64), (1, 2, 1)])
def test_sorted_unique_equals_an_in_memory_sort(tmp_path, run_rows, fan_in, batch_rows):
    tables = _tables(seed=run_rows, n_tables=9, rows=120, keys=400)  # many keys repeat within and across tables
    got = list(sorted_unique(iter(tables), "k", ORDER, run_rows=run_rows, fan_in=fan_in, batch_rows=batch_rows,
                             out_rows=100, tmp_dir=str(tmp_path)))
    assert pa.concat_tables(got).equals(_expected(tables))
    assert all(t.num_rows >= 100 for t in got[:-1])  # rebatched for the writer's row groups
    assert os.listdir(tmp_path) == []  # the run files are gone


def test_sorted_unique_empty_and_disjoint(tmp_path):
    assert list(sorted_unique(iter([]), "k", ORDER, tmp_dir=str(tmp_path))) == []
    # runs with disjoint key ranges (parts in arrival order): most rounds take from one run
    tables = [pa.table({"k": [f"{c}{i:03d}" for i in range(200)], "rank": [1] * 200, "payload": ["x"] * 200})
              for c in "dcba"]
    got = pa.concat_tables(list(sorted_unique(iter(tables), "k", ORDER, run_rows=150, fan_in=3, batch_rows=16,
                                              tmp_dir=str(tmp_path))))
    assert got.equals(_expected(tables)) and got.num_rows == 800


def test_sorted_unique_removes_its_files_when_the_reader_stops_early(tmp_path):
    tables = _tables(seed=1, n_tables=4, rows=100, keys=1000)
    stream = sorted_unique(iter(tables), "k", ORDER, run_rows=50, fan_in=2, batch_rows=8, out_rows=10,
                           tmp_dir=str(tmp_path))
    next(stream)
    assert os.listdir(tmp_path)  # runs on disk while merging
    stream.close()
    assert os.listdir(tmp_path) == []
