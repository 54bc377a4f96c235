"""Committing results as they arrive: the driver's stream loop.

The driver iterates the stages' output in its main thread and commits manifest parts atomically
(:class:`~batchgen.manifest.PartWriter`): every ``PART_MAX_ROWS`` rows or every
``PART_MAX_SECONDS``, also while nothing arrives (a helper thread). It counts ok / failed items
against the failure budget (``max_failures``), checks the model fingerprint never changes within a
job, logs progress, and on SIGINT/SIGTERM commits what has arrived and ends the run with
:class:`JobInterrupted` (exit 130). A lost lease stops the loop the same way.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import BatchgenError
from ..quiet import _isatty
from .plan import Plan
from .wire import from_wire

log = logging.getLogger(__name__)

PART_MAX_ROWS = 65536  # a part is committed when this many rows have arrived (~4 MB of Parquet)
PART_MAX_SECONDS = 5.0  # a part is committed at least this often while results arrive or wait


class JobInterrupted(BatchgenError):
    """SIGINT/SIGTERM: what had arrived is committed; run again to resume."""

    exit_code = 130


class JobFailed(BatchgenError):
    """The render pipeline itself failed (not one item: e.g. the workers could not load the model)."""

    exit_code = 1


class Progress:
    """Progress of the render stream: one bar on a terminal (done/total, img/s, ETA, failures),
    else a log line every ``every_s`` seconds with the same numbers."""

    def __init__(self, total: int, every_s: float, bar: bool | None = None, file=None):
        self.total, self.every_s = total, every_s
        self.done = 0
        self.failed = 0
        self.start = self.last = time.perf_counter()
        self.last_at = self.start
        self.first_at: float | None = None  # when the first results arrived (actors warm)
        self.first_rows = 0
        file = file or sys.stderr
        use_bar = _isatty(file) if bar is None else bar
        self.bar = None
        if use_bar and total > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=file, smoothing=0.1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def steady_rate(self) -> float | None:
        """img/s after the first results (excludes actor start-up and model load); None when every
        result came in the first batch, so there is no steady phase to measure."""
        if self.first_at is None or self.done <= self.first_rows:
            return None
        return (self.done - self.first_rows) / max(self.last_at - self.first_at, 1e-9)

    def line(self) -> str:
        now = time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)
        steady = self.steady_rate() or rate
        left = self.total - self.done
        eta = f", ETA {_duration(left / steady)}" if steady > 0 and left > 0 and self.done else ""
        return f"rendered {self.done}/{self.total} items, {rate:.2f} img/s{eta} ({self.failed} failed)"

    def update(self, n: int, failed: int) -> None:
        self.done += n
        self.failed = failed
        now = time.perf_counter()
        self.last_at = now
        if self.first_at is None:
            self.first_at, self.first_rows = now, n
        if self.bar is not None:
            self.bar.set_postfix_str(f"{failed} failed", refresh=False)
            self.bar.update(n)
            return
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            log.info("%s", self.line())

    def tick(self) -> None:
        """Called while waiting: a log line when nothing arrived for ``every_s`` (not silent)."""
        if self.bar is not None:
            self.bar.refresh()
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s", self.line() if self.done else
                     f"waiting for the first results ({_duration(now - self.start)}: starting workers, loading "
                     "the model)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def count_failed(batch: pa.Table) -> int:
    return int(pc.sum(pc.cast(pc.not_equal(batch.column("status"), "ok"), pa.int64())).as_py() or 0)


def count_retried(batch: pa.Table) -> int:
    return int(pc.sum(pc.cast(pc.greater(batch.column("attempt"), 1), pa.int64())).as_py() or 0)


def check_fingerprint(batch: pa.Table, expected: str | None, out, spec) -> str | None:
    """The model fingerprint must not change within a job (also across resumed runs)."""
    values = [v for v in pc.unique(batch.column("model_fingerprint")).to_pylist() if v]
    for value in values:
        if expected is None:
            expected = value
        elif value != expected:
            raise BatchgenError(
                f"model.uri {spec.model.uri!r}: the checkpoint changed (fingerprint {value[:12]} vs "
                f"{expected[:12]} recorded in {out.uri}/job.json); use --overwrite or another output.uri")
    return expected


def render_envs(batch: pa.Table, seen: list[str]) -> list[str]:
    """Add the batch's distinct render_env JSON strings to ``seen`` (in order of appearance)."""
    for value in pc.unique(batch.column("render_env")).to_pylist():
        if value and value not in seen:
            seen.append(value)
    return seen


@dataclass
class _StreamState:
    expected_fp: str | None = None
    failed_now: int = 0
    ok_now: int = 0
    retried_now: int = 0
    render_ms: float = 0.0
    encode_ms: float = 0.0
    warmup_ms: list = field(default_factory=list)  # compile warm-ups (one per actor and shape)
    envs: list = field(default_factory=list)


class _Stop(BaseException):
    """Raised in the main thread by the signal handler (not an Exception: Ray's and our
    ``except Exception`` clauses let it through to the stream loop)."""


class _Critical:
    """A region a stop must not cut: a signal in it is recorded and raised at its end (``raise_at_end``)
    or only recorded (the stream's clean-up: the caller checks the flag afterwards)."""

    def __init__(self, guard: "_Guard", raise_at_end: bool = True):
        self.guard = guard
        self.raise_at_end = raise_at_end

    def __enter__(self) -> None:
        self.guard.depth += 1

    def __exit__(self, *exc) -> None:
        self.guard.depth -= 1
        if self.raise_at_end and self.guard.pending and not self.guard.depth and exc[0] is None:
            self.guard.pending = False
            raise _Stop()


class _Guard:
    """SIGINT/SIGTERM handling for the stream loop (main thread only).

    The first signal records its name and raises :class:`_Stop` where the main thread is, which is
    almost always waiting inside Ray Data's iterator (whose cleanup then shuts its executor down).
    While the loop records a batch (``critical()``), the stop waits until the batch is recorded;
    while the stream cleans up (``deferred()``) and while the guard is being removed, a signal is
    only recorded, so the clean-up always completes and the caller sees the flag. Further signals
    while the run commits are logged and ignored. The commit thread stops the loop the same way
    (``stop_from_thread``) when the lease is lost.
    """

    def __init__(self, flag: dict):
        self.flag = flag
        self.depth = 0
        self.pending = False
        self.saved: dict = {}
        self.active = False

    def _handler(self, signum, frame) -> None:
        if self.flag.get("reason"):  # our own interrupt_main() from the commit thread
            self._raise()
            return
        if self.flag:
            log.warning("still committing the results that have arrived; exiting in a moment")
            return
        self.flag.update(signum=signum, name=signal.Signals(signum).name)
        log.warning("%s received: committing the results that have arrived, then stopping", self.flag["name"])
        self._raise()

    def _raise(self) -> None:
        if self.depth or not self.active:
            self.pending = True
            return
        raise _Stop()

    def stop_from_thread(self, reason: str) -> None:
        if self.active and not self.flag:
            import _thread

            self.flag.update(reason=reason, name=reason)
            _thread.interrupt_main(signal.SIGINT)

    def critical(self) -> _Critical:
        return _Critical(self)

    def deferred(self) -> _Critical:
        return _Critical(self, raise_at_end=False)

    def __enter__(self) -> "_Guard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handler)
            self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        for sig, old in self.saved.items():
            signal.signal(sig, old)
        self.saved.clear()


def _stream(ds, plan: Plan, parts, progress, state: _StreamState, interrupted: dict, actors) -> bool:
    """Iterate the dataset in the main thread; commit, count, and stop cleanly on a signal.
    A helper thread commits buffered rows on the time bound and logs progress while nothing
    arrives. Returns True when ``max_failures`` aborted the job.

    A signal ends as the interrupted path wherever it lands while the guard is installed: in the
    loop (the loop's own handler), while the iterator closes or the guard is removed (recorded,
    checked at the end), or anywhere else in the guarded region (the outer handler)."""
    guard = _Guard(interrupted)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.25):
            try:
                parts.flush_if_due()
                progress.tick()
            except Exception as exc:  # noqa: BLE001 - the main thread's final flush retries
                log.warning("could not commit a manifest part yet: %s", exc)
            if plan.lease.lost.is_set():
                guard.stop_from_thread("lease lost")
                return

    timer = threading.Thread(target=tick, name="batchgen-commit", daemon=True)
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
    closed: list[bool] = []

    def clean_up() -> None:  # idempotent: runs again when a signal cut it short
        with guard.deferred():  # a signal now is recorded, not raised: the clean-up completes
            done.set()
            if timer.ident is not None:
                timer.join(timeout=10)
            close = getattr(batches, "close", None)
            if close is not None and not closed:
                closed.append(True)
                close()  # stops Ray Data's executor when we leave early

    try:
        with guard:
            try:
                timer.start()
                aborted = _consume(batches, guard, plan, parts, progress, state, interrupted, actors)
            finally:
                clean_up()
        if interrupted:  # a signal landed while the stream closed or the guard was removed
            return _stopped(plan, interrupted)
        return aborted
    except _Stop:  # a signal anywhere else in the guarded region
        clean_up()
        return _stopped(plan, interrupted)


def _consume(batches, guard: _Guard, plan: Plan, parts, progress, state: _StreamState, interrupted: dict,
             actors) -> bool:
    """The stream loop of :func:`_stream` (True when ``max_failures`` aborted the job)."""
    try:
        for block in batches:
            with guard.critical():
                batch = from_wire(block)
                if "warmup_ms" in batch.column_names:
                    state.warmup_ms += [w for w in batch.column("warmup_ms").to_pylist() if w]
                    batch = batch.drop_columns(["warmup_ms"])
                state.expected_fp = check_fingerprint(batch, state.expected_fp, plan.out, plan.spec)
                render_envs(batch, state.envs)
                parts.add(batch)
                failed = count_failed(batch)
                state.failed_now += failed
                state.ok_now += batch.num_rows - failed
                state.retried_now += count_retried(batch)
                state.render_ms += _sum(batch, "render_ms")
                state.encode_ms += _sum(batch, "encode_ms")
                progress.update(batch.num_rows, state.failed_now)
            if state.failed_now > plan.limit:
                return True
        return False
    except _Stop:
        return _stopped(plan, interrupted)
    except BatchgenError:
        raise
    except Exception as exc:  # noqa: BLE001 - a Ray Data failure, told in a few words
        raise _translate(exc, plan, actors) from None


def _stopped(plan: Plan, interrupted: dict) -> bool:
    """The stream stopped on a signal (``interrupted`` names it: the caller commits and raises
    :class:`JobInterrupted`) or because the lease was lost (:class:`~batchgen.lease.LeaseLost`)."""
    if interrupted.get("reason") == "lease lost":
        interrupted.clear()
        plan.lease.check()
    return False


def _translate(exc: BaseException, plan: Plan, actors) -> BaseException:
    """A Ray Data failure as a short message: what failed, where to look."""
    import ray

    from .plan import SchedulingError

    if isinstance(exc, BatchgenError):
        return exc
    text = str(exc)
    if isinstance(exc, ray.exceptions.GetTimeoutError) or "Timed out while starting actors" in text:
        try:
            have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        except Exception:  # noqa: BLE001
            have = {}
        return SchedulingError(
            f"the generator actors did not start within compute.start_timeout_s={plan.spec.compute.start_timeout_s:g} s: "
            f"the job needs {actors.min_workers} actor(s) with {actors.resources} and the cluster has {have}; "
            "add nodes or GPUs, lower compute.min_workers / compute.gpus_per_worker, or raise "
            "compute.start_timeout_s when the model takes long to download or load")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith((" ", "Traceback", "File "))]
    log.debug("render pipeline failure", exc_info=exc)
    cause = "; ".join(lines[-3:])[:2000] or type(exc).__name__
    return JobFailed(f"the render pipeline failed ({type(exc).__name__}): {cause}; committed results are kept "
                     "(run again to resume; -v shows the full error)")


def _sum(batch, column: str) -> float:
    import pyarrow.compute as pc

    value = pc.sum(batch.column(column)).as_py()
    return float(value or 0.0)


__all__ = ["PART_MAX_ROWS", "PART_MAX_SECONDS", "JobInterrupted", "JobFailed", "Progress", "check_fingerprint"]
