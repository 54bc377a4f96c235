"""The job: pre-flight -> plan -> stream the Ray Data stages -> commit -> finish.

``run_job(spec)`` = :func:`~batchgen.job.preflight.prepare` (no Ray: output, lease, inputs, model,
settings, job.json) then :func:`execute`: start or join Ray, fit the actor pool
(:mod:`~batchgen.job.plan`), stream read tasks through the stages (:mod:`~batchgen.job.stages`:
ReadRows -> GeneratorActor -> EncodeAndStore), commit parts as results arrive
(:mod:`~batchgen.job.commit`), then consolidate and summarize (:mod:`~batchgen.job.finish`).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any

from ..ray_session import RayUnreachable, check_address, ensure_ray, private_ray, shutdown_ray  # noqa: F401
from . import commit, stages
from .commit import JobFailed, JobInterrupted, Progress, _stream, _StreamState  # noqa: F401
from .finish import JobResult, TooManyFailures, finish
from .plan import ENCODE_CPUS, READ_CPUS, Plan, actor_plan, read_tasks
from .preflight import prepare

log = logging.getLogger(__name__)


def execute(plan: Plan, *, progress_every_s: float = 10.0, progress_bar: bool | None = False,
            verbose: bool = True) -> JobResult:
    """Run a prepared job on the current Ray (a private local one is started when none is)."""
    import ray

    from ..cluster import release_worker_nodes, request_worker_nodes
    from ..manifest import PartWriter
    from ..quiet import RayMessageFilter, StderrFilter, quiet_libraries

    spec, out, scan, committed = plan.spec, plan.out, plan.scan, plan.committed
    t0 = time.perf_counter()
    todo = plan.todo
    started = ensure_ray(verbose=verbose) if todo > 0 and not ray.is_initialized() else False
    try:
        log.info("job %s: %d items, %d already done, %d to render -> %s",
                 spec.name, scan.total_rows, scan.done_in_input, todo, out.uri)
        c = spec.compute
        parts = PartWriter(out, max_rows=commit.PART_MAX_ROWS, max_seconds=commit.PART_MAX_SECONDS)
        progress = Progress(todo, progress_every_s, bar=False)
        state = _StreamState(expected_fp=(plan.previous or {}).get("model_fingerprint"))
        interrupted: dict[str, Any] = {}
        aborted = False
        if todo > 0:
            actors = actor_plan(c, ray.cluster_resources(), fixed=private_ray())
            for note in actors.notes:
                log.info("%s", note)
            ctx = ray.data.DataContext.get_current()
            saved = {k: getattr(ctx, k) for k in ("wait_for_min_actors_s", "enable_progress_bars",
                                                   "print_on_execution_start")}
            ctx.wait_for_min_actors_s = int(max(1, round(c.start_timeout_s)))
            ctx.enable_progress_bars = False  # our own progress line / bar instead of Ray's blocks
            ctx.print_on_execution_start = verbose
            ds = _stages(plan, actors, ray.put((committed.done, committed.attempts)), verbose)
            if not verbose:
                quiet_libraries()  # again: Ray Data sets its loggers' levels when first imported
            if not private_ray():  # a private local Ray has no autoscaler to ask
                request_worker_nodes(spec)  # GPU nodes up front (the pool alone scales late)
            try:
                with (StderrFilter() if not verbose else nullcontext()) as err, \
                        (RayMessageFilter() if not verbose else nullcontext()):
                    progress = Progress(todo, progress_every_s, bar=progress_bar,
                                                 file=getattr(err, "console", None))
                    try:
                        aborted = _stream(ds, plan, parts, progress, state, interrupted, actors)
                    finally:
                        progress.close()
            finally:
                for key, value in saved.items():
                    setattr(ctx, key, value)
                parts.flush()
                if not private_ray():
                    release_worker_nodes()
        if interrupted:
            raise JobInterrupted(
                f"{interrupted['name']}: stopped; {parts.committed_rows} items of this run are committed "
                f"({scan.done_in_input + state.ok_now} of {scan.total_rows} done); run the same command again "
                "to resume")
        return finish(plan, parts, progress, state, aborted, t0)
    finally:
        if started:
            shutdown_ray()


def _stages(plan: Plan, actors, committed_ref, verbose: bool):
    """The Ray Data chain: read tasks -> ReadRows -> GeneratorActor pool -> EncodeAndStore."""
    import ray

    spec, out, scan, c = plan.spec, plan.out, plan.scan, plan.spec.compute
    rows_per_call = c.batch_size * c.batches_per_call
    tasks = read_tasks(scan)
    return (
        ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
        .map_batches(stages.ReadRows(scan.settings, plan.cfg, committed_ref), batch_size=1,
                     batch_format="pyarrow", num_cpus=READ_CPUS)
        .repartition(target_num_rows_per_block=rows_per_call)  # one actor call = one small block
        .map_batches(
            stages.GeneratorActor,
            fn_constructor_kwargs=dict(
                model=spec.model.model_dump(mode="json"), storage_cfg=plan.cfg,
                batch_size=c.batch_size, sampler=plan.resolved["sampler"],
                sampler_options=spec.sampling.sampler_options,
                torch_threads=c.torch_threads, max_init_pixels=spec.input.max_init_image_pixels,
                quiet=not verbose, compile=c.compile, deterministic=c.deterministic,
                scoring=spec.scoring.clip.model_dump() if spec.scoring.clip else None,
                lora_sha256=plan.lora_sha256, controlnet_sha256=plan.controlnet_sha256,
                condition_sha256=plan.condition_sha256,
                model_fingerprint=(plan.previous or {}).get("model_fingerprint")),
            batch_size=rows_per_call, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=actors.min_workers, max_size=actors.max_workers),
            **actors.resources,
        )
        .map_batches(
            stages.EncodeAndStore(out.uri, plan.cfg, spec.output.format, spec.output.quality, spec.model.uri,
                                  plan.resolved["sampler"], spec.sampling.sampler_options, c.batch_size,
                                  scan.settings.get("passthrough")),
            batch_size=rows_per_call, batch_format="pyarrow", num_cpus=ENCODE_CPUS,
        )
        .repartition(target_num_rows_per_block=1)  # one wire row per block: each returned inline (wire.py)
    )


def run_job(spec, *, overwrite: bool = False, max_failures: int | None = None,
            progress_every_s: float = 10.0, progress_bar: bool | None = False,
            verbose: bool = True, verify: bool = False) -> JobResult:
    """Validate and prepare ``spec`` (no Ray), then run it on the current Ray, starting a private
    local one (shut down at the end) when Ray is not initialized."""
    plan = prepare(spec, overwrite=overwrite, max_failures=max_failures, verify=verify)  # pre-flight -> plan
    try:  # stream the stages, commit as results arrive, finish
        return execute(plan, progress_every_s=progress_every_s, progress_bar=progress_bar, verbose=verbose)
    finally:
        plan.release()


__all__ = ["run_job", "prepare", "execute", "JobResult", "Plan", "TooManyFailures", "JobInterrupted", "JobFailed",
           "ensure_ray", "check_address", "RayUnreachable"]
