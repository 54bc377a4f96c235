"""The Ray Data job: read prompts -> skip committed -> render (actor pool) -> encode + store ->
manifest parts -> consolidated manifest and summary.

A run has two halves:

- :func:`prepare` needs no Ray. Cheapest first, one log line per phase: it validates the spec's
  output location, takes the output's lease (one run per output), compares with the previous
  run's job.json, scans every input row (no model needed: a bad row fails before torch is even
  imported), then checks the model (metadata and weight headers), scans the rows again with the
  model family's defaults, builds every sampler schedule the rows need, and only then writes
  job.json (after removing what ``--overwrite`` replaces). Every mistake fails here in seconds,
  before Ray starts and before anything else is written.
- :func:`execute` starts (or joins) Ray and streams the job. The driver commits manifest parts as
  results arrive: every ``PART_MAX_ROWS`` rows or every few seconds, also while nothing arrives.
  SIGINT/SIGTERM commit what has arrived and end the run with :class:`JobInterrupted` (exit 130).

:func:`run_job` does both. Without an address it always starts a private local Ray (never one
found through ``/tmp/ray``); with one, an unreachable address fails at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from .errors import BatchgenError

log = logging.getLogger(__name__)

PART_MAX_ROWS = 2048  # a part is committed when this many rows have arrived
PART_MAX_SECONDS = 5.0  # a part is committed at least this often while results arrive or wait
_PRIVATE_RAY = False  # True while Ray is a local instance ensure_ray started (no autoscaler)


@dataclass
class JobResult:
    """Outcome of one ``run_job`` call."""

    output_uri: str
    total: int
    ok: int
    failed: int
    rendered_this_run: int
    skipped: int
    aborted: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    @property
    def all_ok(self) -> bool:
        return self.ok == self.total and not self.aborted


class TooManyFailures(BatchgenError):
    """The job failed more items than ``max_failures`` allows."""

    exit_code = 1


class JobInterrupted(BatchgenError):
    """SIGINT/SIGTERM: what had arrived is committed; run again to resume."""

    exit_code = 130


class JobFailed(BatchgenError):
    """The render pipeline itself failed (not one item: e.g. the workers could not load the model)."""

    exit_code = 1


@dataclass
class Plan:
    """A validated job, its output prepared and leased: what :func:`execute` runs."""

    spec: Any
    cfg: Any
    out: Any
    scan: Any
    committed: Any
    lease: Any
    limit: int
    previous: dict | None
    removed: list[str]
    inputs: dict
    timings: dict[str, float]
    resolved: dict = field(default_factory=dict)  # family defaults filled in (jobstate.resolve)
    rendered_again: dict = field(default_factory=dict)  # finished items whose image was missing / wrong
    lora_sha256: dict = field(default_factory=dict)  # uri -> sha256 the pre-flight read; workers verify theirs

    @property
    def todo(self) -> int:
        return self.scan.total_rows - self.scan.done_in_input

    def release(self) -> None:
        self.lease.release()


# ----------------------------------------------------------------------------- prepare (no Ray)


def prepare(spec, *, overwrite: bool = False, max_failures: int | None = None, verify: bool = False) -> Plan:
    """Validate everything and write job.json; no Ray. Raises before writing on any bad input.
    A resume renders again the committed items whose image is missing (one listing of images/);
    with ``verify`` also those whose stored bytes differ from the manifest's size or sha256."""
    from . import jobstate
    from .dataset import scan_inputs
    from .lease import Lease
    from .manifest import committed_state, empty_state
    from .storage import Location, StorageConfig

    t0 = time.perf_counter()
    log.info("pre-flight: job %s (spec ok)", spec.name)
    try:
        cfg = StorageConfig(endpoint_url=spec.storage.endpoint_url).resolved()
    except ValueError as exc:
        raise BatchgenError(str(exc)) from None
    out = Location.parse(spec.output.uri, cfg)
    out.require_folder()
    jobstate.check_output_location(out, spec, cfg)
    created = out.scheme == "local" and not os.path.exists(out.path)
    lease = Lease(out).acquire()
    try:
        previous = jobstate.read_previous(out)
        remove = jobstate.check_previous(out, spec, previous, overwrite)
        resume = previous is not None and not overwrite
        committed = committed_state(out) if resume else empty_state()
        images = jobstate.check_images(out, spec, committed, verify)
        committed = committed.render_again(images)
        t_output = _phase(t0, f"output {out.uri} ok ({'resume' if resume else 'new job'})")
        # Cheapest first: every row of the input, before the model (seconds of imports and a
        # skeleton build). This pass knows no model family, so it checks what holds for any
        # model; the pass below, with the family's defaults, adds what depends on the model.
        first = scan_inputs(spec, cfg, committed, notes=False)  # the notes (overridden settings): second pass
        t_inputs = _phase(t_output, f"inputs: {len(first.files)} files, {first.total_rows} items")
        jobstate.check_sampler(spec)
        model = jobstate.check_model(spec, cfg)
        t_model = _phase(t_inputs, f"model {spec.model.uri}: " + (model.family if model is not None else "seeded noise, no weights"))
        resolved = jobstate.resolve(spec, model)
        scan = scan_inputs(spec, cfg, committed, resolved, model.check_prompt if model is not None else None)
        inputs = jobstate.check_inputs(out, spec, previous if resume else None, scan, committed)
        loras = jobstate.check_sampling(spec, model, scan, resolved)
        jobstate.check_lora_files(out, previous if resume else None, loras)
        removed = jobstate.prepare_output(out, spec, scan, previous if resume else None, remove, resolved,
                                          loras, images)
    except BaseException:
        lease.release()
        if created:
            _remove_if_empty(out.path)
        raise
    limit = jobstate.max_failures_for(scan.total_rows, max_failures)
    _phase(t_model, f"settings and LoRAs checked, job.json written; {scan.total_rows - scan.done_in_input} items to render")
    timings = {"preflight_output": round(t_output - t0, 3), "preflight_inputs": round(t_inputs - t_output, 3),
               "preflight_model": round(t_model - t_inputs, 3), "preflight_scan": round(time.perf_counter() - t_model, 3)}
    return Plan(spec, cfg, out, scan, committed, lease, limit, previous if resume else None, removed,
                inputs, timings, resolved, images.as_dict(), lora_sha256=loras)


def _phase(since: float, what: str) -> float:
    """Log one finished pre-flight phase with its duration; returns now (the next phase's start)."""
    now = time.perf_counter()
    log.info("pre-flight: %s (%.1f s)", what, now - since)
    return now


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- execute (Ray)


def execute(plan: Plan, *, progress_every_s: float = 10.0, progress_bar: bool | None = False,
            verbose: bool = True) -> JobResult:
    """Run a prepared job on the current Ray (a private local one is started when none is)."""
    import ray

    from . import jobstate
    from .cluster import release_worker_nodes, request_worker_nodes
    from .manifest import PartWriter
    from .quiet import RayMessageFilter, StderrFilter, quiet_libraries
    from .stages import EncodeAndStore, GeneratorActor, ReadRows

    spec, out, scan, committed = plan.spec, plan.out, plan.scan, plan.committed
    t0 = time.perf_counter()
    todo = plan.todo
    started = ensure_ray(verbose=verbose) if todo > 0 and not ray.is_initialized() else False
    try:
        log.info("job %s: %d items, %d already done, %d to render -> %s",
                 spec.name, scan.total_rows, scan.done_in_input, todo, out.uri)
        c = spec.compute
        rows_per_call = c.batch_size * c.batches_per_call
        parts = PartWriter(out, max_rows=PART_MAX_ROWS, max_seconds=PART_MAX_SECONDS)
        progress = jobstate.Progress(todo, progress_every_s, bar=False)
        state = _StreamState(expected_fp=(plan.previous or {}).get("model_fingerprint"))
        interrupted: dict[str, Any] = {}
        aborted = False
        if todo > 0:
            actors = jobstate.actor_plan(c, ray.cluster_resources(), fixed=_PRIVATE_RAY)
            for note in actors.notes:
                log.info("%s", note)
            ctx = ray.data.DataContext.get_current()
            saved = {k: getattr(ctx, k) for k in ("wait_for_min_actors_s", "enable_progress_bars",
                                                   "print_on_execution_start")}
            ctx.wait_for_min_actors_s = int(max(1, round(c.start_timeout_s)))
            ctx.enable_progress_bars = False  # our own progress line / bar instead of Ray's blocks
            ctx.print_on_execution_start = verbose
            committed_ref = ray.put((committed.done, committed.attempts))
            tasks = jobstate.read_tasks(scan)
            ds = (
                ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
                .map_batches(ReadRows(scan.settings, plan.cfg, committed_ref), batch_size=1,
                             batch_format="pyarrow", num_cpus=jobstate.READ_CPUS)
                .repartition(target_num_rows_per_block=rows_per_call)  # one actor call = one small block
                .map_batches(
                    GeneratorActor,
                    fn_constructor_kwargs=dict(
                        model=spec.model.model_dump(mode="json"), storage_cfg=plan.cfg,
                        batch_size=c.batch_size, sampler=plan.resolved["sampler"],
                        sampler_options=spec.sampling.sampler_options,
                        torch_threads=c.torch_threads, max_init_pixels=spec.input.max_init_image_pixels,
                        quiet=not verbose, compile=c.compile, deterministic=c.deterministic,
                        scoring=spec.scoring.clip.model_dump() if spec.scoring.clip else None,
                        lora_sha256=plan.lora_sha256),
                    batch_size=rows_per_call, batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(min_size=actors.min_workers, max_size=actors.max_workers),
                    **actors.resources,
                )
                .map_batches(
                    EncodeAndStore(out.uri, plan.cfg, spec.output.format, spec.output.quality, spec.model.uri,
                                   plan.resolved["sampler"], spec.sampling.sampler_options, c.batch_size,
                                   scan.settings.get("passthrough")),
                    batch_size=rows_per_call, batch_format="pyarrow", num_cpus=jobstate.ENCODE_CPUS,
                )
            )
            if not verbose:
                quiet_libraries()  # again: Ray Data sets its loggers' levels when first imported
            if not _PRIVATE_RAY:  # a private local Ray has no autoscaler to ask
                request_worker_nodes(spec)  # GPU nodes up front (the pool alone scales late)
            try:
                with (StderrFilter() if not verbose else nullcontext()) as err, \
                        (RayMessageFilter() if not verbose else nullcontext()):
                    progress = jobstate.Progress(todo, progress_every_s, bar=progress_bar,
                                                 file=getattr(err, "console", None))
                    try:
                        aborted = _stream(ds, plan, parts, progress, state, interrupted, actors)
                    finally:
                        progress.close()
            finally:
                for key, value in saved.items():
                    setattr(ctx, key, value)
                parts.flush()
                if not _PRIVATE_RAY:
                    release_worker_nodes()
        if interrupted:
            raise JobInterrupted(
                f"{interrupted['name']}: stopped; {parts.committed_rows} items of this run are committed "
                f"({scan.done_in_input + state.ok_now} of {scan.total_rows} done); run the same command again "
                "to resume")
        return _finish(plan, parts, progress, state, aborted, t0)
    finally:
        if started:
            shutdown_ray()


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
    from . import jobstate

    try:
        for batch in batches:
            with guard.critical():
                if "warmup_ms" in batch.column_names:
                    state.warmup_ms += [w for w in batch.column("warmup_ms").to_pylist() if w]
                    batch = batch.drop_columns(["warmup_ms"])
                state.expected_fp = jobstate.check_fingerprint(batch, state.expected_fp, plan.out, plan.spec)
                jobstate.render_envs(batch, state.envs)
                parts.add(batch)
                failed = jobstate.count_failed(batch)
                state.failed_now += failed
                state.ok_now += batch.num_rows - failed
                state.retried_now += jobstate.count_retried(batch)
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

    from .jobstate import SchedulingError

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


def _finish(plan: Plan, parts, progress, state: _StreamState, aborted: bool, t0: float) -> JobResult:
    from . import jobstate
    from .manifest import FailureSummary

    spec, out, scan = plan.spec, plan.out, plan.scan
    wall_render = progress.elapsed()
    t_cons = time.perf_counter()
    failures = FailureSummary()
    counts = jobstate.finish(out, spec, state.expected_fp, state.envs, failures)
    # In-input counts: what was done before this run plus this run's results (a row Ray delivered
    # twice after a retry is counted once at most: the totals are capped by the input's size).
    ok = min(scan.total_rows, scan.done_in_input + state.ok_now)
    failed = min(scan.total_rows - ok, state.failed_now + max(0, scan.failed_in_input - state.retried_now))
    rendered = progress.done
    summary = {
        "name": spec.name,
        "total_items": scan.total_rows,
        "ok": ok,
        "failed": failed,
        "remaining": max(0, scan.total_rows - ok - failed),
        "not_in_input": max(0, counts.get("ok", 0) + counts.get("failed", 0) - ok - failed),
        "skipped_already_done": scan.done_in_input,
        "rendered_this_run": rendered,
        "failed_this_run": state.failed_now,
        "aborted": aborted,
        "max_failures": plan.limit,
        "failures": failures.as_dict(),
        "removed_inputs": plan.inputs.get("removed", []),
        "changed_inputs": plan.inputs.get("changed", []),
        "images_per_s": rendered / wall_render if wall_render > 0 and rendered else 0.0,
        "steady_images_per_s": progress.steady_rate(),
        "timings_s": {
            **plan.timings,
            "render_stream": round(wall_render, 3),
            "first_result": round((progress.first_at or progress.start) - progress.start, 3),
            "consolidate": round(time.perf_counter() - t_cons, 3),
            "total": round(time.perf_counter() - t0 + sum(plan.timings.values()), 3),
            "render_sum_over_items": round(state.render_ms / 1000, 3),
            "compile_warmups": [round(w / 1000, 3) for w in state.warmup_ms],
            "encode_store_sum_over_items": round(state.encode_ms / 1000, 3),
        },
        "manifest_parts_written": parts.parts_written,
        "rendered_again": plan.rendered_again,
    }
    summary = jobstate.write_summary(out, summary)  # adds this run to the summary's "runs"
    result = JobResult(out.uri, scan.total_rows, ok, failed, rendered, scan.done_in_input, aborted, summary,
                       plan.removed)
    log.info("job %s: %d ok, %d failed of %d (%.2f img/s this run) -> %s/manifest.parquet",
             spec.name, ok, failed, scan.total_rows, summary["images_per_s"], out.uri)
    if aborted:
        listed = summary["failures"]
        kinds = ", ".join(f"{n} {kind}" for kind, n in listed["by_kind"].items())
        first = "; ".join(f"{f['item_id']}: {(f['error'] or '')[:160]}" for f in listed["first"][:3])
        raise TooManyFailures(
            f"job {spec.name}: aborted after {state.failed_now} failed items (more than --max-failures "
            f"{plan.limit}): {kinds}; first: {first}. All are listed in {out.uri}/summary.json and by "
            f"`batchgen status {out.uri}`. "
            "If the cause was outside the spec (unreadable init images, storage), fix it and run the same "
            "command again: finished items are kept and the failed ones are retried. A changed spec is a "
            "different job: run it with --overwrite or another output.uri")
    return result


def _sum(batch, column: str) -> float:
    import pyarrow.compute as pc

    value = pc.sum(batch.column(column)).as_py()
    return float(value or 0.0)


# ----------------------------------------------------------------------------- the whole job


def run_job(spec, *, overwrite: bool = False, max_failures: int | None = None,
            progress_every_s: float = 10.0, progress_bar: bool | None = False,
            verbose: bool = True, verify: bool = False) -> JobResult:
    """Validate and prepare ``spec`` (no Ray), then run it on the current Ray, starting a private
    local one (shut down at the end) when Ray is not initialized."""
    plan = prepare(spec, overwrite=overwrite, max_failures=max_failures, verify=verify)
    try:
        return execute(plan, progress_every_s=progress_every_s, progress_bar=progress_bar, verbose=verbose)
    finally:
        plan.release()


# ----------------------------------------------------------------------------- Ray


class RayUnreachable(BatchgenError):
    """``--address`` / ``RAY_ADDRESS`` names a cluster that does not answer."""


def _host_port(address: str) -> tuple[str, int] | None:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str, timeout_s: float = 5.0) -> str:
    """Fail fast and clearly when the Ray cluster at ``address`` cannot be reached; returns the
    HOST:PORT it checked (``auto`` resolved as Ray resolves it). Join with the address as given,
    not with this result: Ray treats ``auto`` differently from an explicit address (token auth)."""
    where = f"Ray address {address!r}" + (" (from RAY_ADDRESS)" if address == os.environ.get("RAY_ADDRESS") else "")
    if address.startswith(("http://", "https://")):
        raise RayUnreachable(f"{where} is a dashboard (Jobs API) URL: use `batchgen submit --address {address}` "
                             "to run the job on that cluster, or give the cluster's GCS address (HEAD:6379) to "
                             "join it from here")
    if address in ("auto", "local"):
        if address == "local":
            return address
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address("auto")
        if resolved is None:
            raise RayUnreachable(f"{where}: no running Ray cluster was found on this machine")
        address = resolved
    hp = _host_port(address)
    if hp is None:
        raise RayUnreachable(f"{where}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001")
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayUnreachable(f"{where}: nothing answers at {hp[0]}:{hp[1]} ({exc.strerror or exc}); is the "
                             "cluster up? Leave out --address (and RAY_ADDRESS) to run on a private local Ray") from None
    return address


def ensure_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = True) -> bool:
    """Connect to Ray: keep an existing session; join ``address`` / RAY_ADDRESS (checked first:
    an unreachable cluster fails at once; then joined exactly as ``ray.init(address)`` would,
    ``auto`` included, with Ray's token when the cluster needs one); else start a private local Ray
    that never attaches to a cluster found through /tmp/ray. The workers' log lines reach this
    process without colour codes unless stderr is a terminal. Returns
    True when this call started (and so should shut down) Ray."""
    global _PRIVATE_RAY
    import ray

    from .jobstate import _isatty

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not _isatty(sys.stderr):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(Actor pid=...)" prefixes: no ANSI colours in logs
    address = address or os.environ.get("RAY_ADDRESS") or None
    level = logging.INFO if verbose else logging.WARNING
    # The workers' lines ("(GeneratorActor pid=...) ...") come through: batchgen's own warnings on the
    # workers (a truncated prompt) travel that way; the libraries there are quiet unless -v.
    if address and address != "local":
        # Checked (fails fast), but given to ray.init as written: "auto" must stay "auto", which is
        # what makes Ray join a local cluster with its token (~/.ray/auth_token) when it has one;
        # a resolved HOST:PORT is an explicit address, for which Ray never turns token auth on.
        check_address(address)
        ray.init(address=address, log_to_driver=True, logging_level=level)
        _PRIVATE_RAY = False
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 logging_level=level)
        _PRIVATE_RAY = True
    return True


def shutdown_ray() -> None:
    global _PRIVATE_RAY
    import ray

    ray.shutdown()
    _PRIVATE_RAY = False


__all__ = ["run_job", "prepare", "execute", "JobResult", "Plan", "TooManyFailures", "JobInterrupted", "JobFailed",
           "ensure_ray", "check_address", "RayUnreachable"]
