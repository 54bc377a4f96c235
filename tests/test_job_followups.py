"""Issue 9 follow-ups from the audit: input files that leave and come back edited, status counts
after ids left an id_column file, the stale-lease take-over race, signals while the stream
closes, what `status` prints for failed items and removed files, and bad specs / rows refused by
`batchgen run` before Ray starts. Each test names the issue item it covers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen import lease as lease_module
from batchgen.cli import main
from batchgen.errors import InputError
from batchgen.jobcli import job_status
from batchgen.lease import LEASE_FILE, Lease, LeaseBusy
from batchgen.spec import spec_from_dict

from .faults import prepare, run_job
from .fixtures_jobs import job_dict, write_prompts
from .fixtures_ray import subprocess_env

NULL = {"renderer": "null"}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- item 6: edited inputs


def test_a_removed_input_file_that_comes_back_edited_is_checked_against_its_old_identity(tmp_path, ray_local):
    """Item 6: job.json keeps every input file ever recorded (removed ones marked), so a file
    without id_column that comes back with a row inserted is refused instead of silently matching
    its committed row ids to other prompts; one that comes back unchanged resumes."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_prompts(inp / "a.parquet", 4)
    write_prompts(inp / "b.parquet", 3, start=4)
    original_b = (inp / "b.parquet").read_bytes()
    spec = spec_from_dict(job_dict(inp, out))
    run_job(spec, faults=NULL)
    (inp / "b.parquet").unlink()
    result = run_job(spec, faults=NULL)
    assert (result.total, result.ok, result.rendered_this_run) == (4, 4, 0)
    job = json.loads((out / "job.json").read_text())
    recorded = {i["rel"]: i for i in job["inputs"]}
    assert sorted(recorded) == ["a.parquet", "b.parquet"]
    assert recorded["b.parquet"]["removed"] and recorded["b.parquet"]["rows"] == 3
    assert not recorded["a.parquet"].get("removed")

    # b comes back with a row inserted at the top
    pq.write_table(pa.concat_tables([pa.table({"prompt": ["inserted"]}), pq.read_table(
        pa.BufferReader(original_b))]), inp / "b.parquet")
    before = _tree(out)
    with pytest.raises(InputError) as err:
        run_job(spec, faults=NULL)
    msg = str(err.value)
    assert f"input file {inp / 'b.parquet'}" in msg and "3 -> 4 rows" in msg and "3 of its items" in msg
    assert "input.id_column" in msg
    assert _tree(out) == before  # refused before anything was written

    (inp / "b.parquet").write_bytes(original_b)  # back as it was: resumes, nothing to render
    result = run_job(spec, faults=NULL)
    assert (result.total, result.ok, result.rendered_this_run) == (7, 7, 0)
    job = json.loads((out / "job.json").read_text())
    assert [(i["rel"], bool(i.get("removed"))) for i in job["inputs"]] == [("a.parquet", False), ("b.parquet", False)]


def test_status_counts_items_of_the_input_after_ids_left_an_id_column_file(tmp_path, ray_local):
    """Item 6: ids removed from an id_column file stay in the manifest; `status` counts only the
    items of the current input (never done > total), and a new item is remaining, not done."""
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    write_prompts(inp, 3, id=["x", "y", "z"])
    spec = spec_from_dict(job_dict(inp, out, input={"id_column": "id"}))
    run_job(spec, faults=NULL)

    write_prompts(inp, 3, id=["x", "z", "w"])  # y left, w is new: the next run is starting
    plan = prepare(spec, faults=NULL)
    try:
        status = job_status(str(out))
    finally:
        plan.release()
    assert (status["total"], status["done"], status["failed"], status["remaining"], status["not_in_input"]) == \
        (3, 2, 0, 1, 1)

    write_prompts(inp, 2, id=["x", "z"])  # y left, nothing new
    plan = prepare(spec, faults=NULL)
    try:
        status = job_status(str(out))
    finally:
        plan.release()
    assert (status["total"], status["done"], status["remaining"], status["not_in_input"]) == (2, 2, 0, 1)
    assert main(["status", str(out)]) == 0

    # A job.json without the counts of its run's start (an older batchgen): capped at the total.
    job = json.loads((out / "job.json").read_text())
    job.pop("counted_at_start", None)
    (out / "job.json").write_text(json.dumps(job))
    status = job_status(str(out))
    assert status["done"] <= status["total"] == 2 and status["remaining"] == 0


def test_status_lists_removed_input_files_by_name(tmp_path, ray_local, capsys):
    """Item 6: `status` names the input files of earlier runs that are gone."""
    inp, out = tmp_path / "in", tmp_path / "out"
    write_prompts(inp / "a.parquet", 2)
    write_prompts(inp / "gone.parquet", 2, start=2)
    spec = spec_from_dict(job_dict(inp, out))
    run_job(spec, faults=NULL)
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "removed input" not in capsys.readouterr().out
    (inp / "gone.parquet").unlink()
    run_job(spec, faults=NULL)
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2/2 done, 0 failed, 0 remaining, 2 no longer in the input" in printed
    assert f"removed input files (their items stay in the manifest, not counted): {inp / 'gone.parquet'}" in printed
    status = job_status(str(out))
    assert status["removed_inputs"] == [str(inp / "gone.parquet")]


# ----------------------------------------------------------------------------- item 16: status prints failures


def test_status_prints_failed_items_by_kind_and_the_first_ones(tmp_path, ray_local, capsys):
    """Item 16: `batchgen status OUTPUT` lists the failures: a count per kind, the first ten items
    with their errors, and how many more there are; it exits 1 while items are not done."""
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    ids = ["good"] + [f"bad-{i:02d}" for i in range(12)]
    write_prompts(inp, 13, id=ids, init_image=[None] + [str(tmp_path / f"missing-{i}.png") for i in range(12)],
                  strength=[None] + [0.5] * 12)
    spec = spec_from_dict(job_dict(inp, out, input={"id_column": "id"}))
    result = run_job(spec, faults=NULL, max_failures=20)
    assert (result.ok, result.failed) == (1, 12)
    capsys.readouterr()
    assert main(["status", str(out)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{out} (test): 1/13 done, 12 failed, 0 remaining")
    assert printed[1] == "failed items by kind: 12 StorageError"
    listed = printed[2:12]
    assert [line.split(":", 1)[0] for line in listed] == [f"  bad-{i:02d}" for i in range(10)]
    assert all(f"StorageError: no such file: {tmp_path / 'missing-'}" in line for line in listed)
    assert printed[12] == "  ... 2 more (status='failed' in the manifest)"
    assert len(printed) == 13


# ----------------------------------------------------------------------------- item 8: the lease race


def test_stale_lease_take_over_race_leaves_one_holder(tmp_path, monkeypatch):
    """Item 8: two runs judge the same dead holder's lease stale; A takes it over first, then B
    moves A's fresh lease aside. B must see that it moved a lease other than the one it judged,
    put it back and report the output busy: A keeps its lease, B holds none."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_FILE).write_text(json.dumps({"run_id": "dead", "host": socket.gethostname(), "pid": 2**22 + 7}))
    a, b = Lease(out, heartbeat_s=3600), Lease(out, heartbeat_s=3600)
    real_rename = os.rename
    raced = []

    def rename(src, dst):
        if not raced and str(src).endswith(LEASE_FILE):  # B, after judging the dead lease stale
            raced.append(dst)
            a.acquire()  # A wins the race: moves the dead lease away and creates its own
        return real_rename(src, dst)

    monkeypatch.setattr(lease_module.os, "rename", rename)
    try:
        with pytest.raises(LeaseBusy, match=f"in use by another batchgen run .*pid {os.getpid()}"):
            b.acquire()
        assert raced and a.took_over["run_id"] == "dead" and b.took_over is None
        assert json.loads((out / LEASE_FILE).read_text())["run_id"] == a.run_id
        assert sorted(os.listdir(out)) == [LEASE_FILE]  # nothing left aside
        a.check()
    finally:
        a.release()
    assert not (out / LEASE_FILE).exists()


def test_stale_lease_whose_holder_beats_again_is_not_taken_over(tmp_path, monkeypatch):
    """Item 8: a lease judged stale by its age whose holder renews it before the take-over
    (a paused process that resumed) is put back, and the output is reported busy."""
    out = tmp_path / "out"
    out.mkdir()
    holder = json.dumps({"run_id": "slow", "host": "elsewhere", "pid": 1})
    (out / LEASE_FILE).write_text(holder)
    old = time.time() - 3600
    os.utime(out / LEASE_FILE, (old, old))
    real_rename = os.rename
    raced = []

    def rename(src, dst):
        if not raced and str(src).endswith(LEASE_FILE):
            raced.append(dst)
            os.utime(src)  # the holder's heartbeat lands between the judgment and the take-over
        return real_rename(src, dst)

    monkeypatch.setattr(lease_module.os, "rename", rename)
    with pytest.raises(LeaseBusy, match="host elsewhere, pid 1"):
        Lease(out, heartbeat_s=3600).acquire()
    assert raced and (out / LEASE_FILE).read_text() == holder
    assert time.time() - (out / LEASE_FILE).stat().st_mtime < 60
    assert sorted(os.listdir(out)) == [LEASE_FILE]


# ----------------------------------------------------------------------------- item 7: signals


class _ClosingBatches:
    """An empty batch iterator whose close() receives a signal (Ray Data's executor shutting down
    when Ctrl-C lands)."""

    def __init__(self, sig):
        self.sig = sig
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        raise StopIteration

    def close(self):
        signal.raise_signal(self.sig)  # the handler runs here, inside close()
        self.closed = True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_the_stream_closes_is_a_clean_stop(sig):
    """Item 7: a signal that lands after the stream loop returned, while the iterator closes and
    the guard is still installed, ends as the interrupted path (no _Stop escapes), the close
    completes, and the previous handlers are back."""
    from batchgen import runner

    assert threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    batches = _ClosingBatches(sig)
    ds = SimpleNamespace(iter_batches=lambda **kw: batches)
    plan = SimpleNamespace(lease=SimpleNamespace(lost=threading.Event(), check=lambda: None), limit=0,
                           out=None, spec=None)
    parts = SimpleNamespace(flush_if_due=lambda: None)
    progress = SimpleNamespace(tick=lambda: None)
    interrupted: dict = {}
    aborted = runner._stream(ds, plan, parts, progress, runner._StreamState(), interrupted, actors=None)
    assert aborted is False and interrupted["name"] == sig.name
    assert batches.closed
    assert {s: signal.getsignal(s) for s in before} == before


class _FailingBatches(_ClosingBatches):
    """A batch iterator whose first batch fails (a Ray Data error); close() is quiet."""

    def __next__(self):
        raise RuntimeError("the render pipeline broke")

    def close(self):
        self.closed = True


def test_signal_while_a_stream_failure_is_reported_is_a_clean_stop(monkeypatch):
    """Item 7: a signal that lands outside the loop's own handler (here: while a Ray Data failure
    is being turned into a short message) still ends as the interrupted path, with the iterator
    closed."""
    from batchgen.job import commit as runner  # the stream loop and its _translate live there

    def translate(exc, plan, actors):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the failure is being described
        return exc

    monkeypatch.setattr(runner, "_translate", translate)
    batches = _FailingBatches(signal.SIGINT)
    ds = SimpleNamespace(iter_batches=lambda **kw: batches)
    plan = SimpleNamespace(lease=SimpleNamespace(lost=threading.Event(), check=lambda: None), limit=0,
                           out=None, spec=None)
    interrupted: dict = {}
    aborted = runner._stream(ds, plan, SimpleNamespace(flush_if_due=lambda: None), SimpleNamespace(tick=lambda: None),
                             runner._StreamState(), interrupted, actors=None)
    assert aborted is False and interrupted["name"] == "SIGINT" and batches.closed


# ----------------------------------------------------------------------------- item 15: errors before Ray


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchgen.cli", *args]


@pytest.mark.parametrize("case", ["unknown_key", "null_prompt"])
def test_bad_spec_or_row_exits_2_before_ray_starts(tmp_path, ray_tmpdir, builtin_tiny, case):
    """Item 15: an unknown spec key and an invalid input row fail `batchgen run` with exit 2 and a
    message naming the key / file, row and column; Ray never started (no session in RAY_TMPDIR)
    and nothing was written."""
    inp, out = tmp_path / "p.parquet", tmp_path / "out"
    data = job_dict(inp, out)
    if case == "unknown_key":
        write_prompts(inp, 2)
        data["sampling"]["stepz"] = 3
        expected = "unknown key 'sampling.stepz' (did you mean 'sampling.steps'?)"
    else:
        pq.write_table(pa.table({"prompt": ["a cat", None, "a dog"]}), inp)
        expected = f"input file {inp}, row 1, column 'prompt': prompt is null"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(data))
    start = time.monotonic()
    proc = subprocess.run(_cli("run", str(spec)), env=subprocess_env(ray_tmpdir), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (Path(ray_tmpdir) / "ray").exists()  # Ray was never started
    assert not out.exists()
    assert time.monotonic() - start < 60
