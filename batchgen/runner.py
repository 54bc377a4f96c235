"""The Ray Data job: read prompts -> skip committed -> render (actor pool) -> encode + store ->
manifest parts -> consolidated manifest and summary.

:func:`run_job` reads like the sentence above. Before anything renders, a streaming pre-flight
pass validates every input row and the output location, so bad input never touches earlier
results. Manifest parts are committed by the driver as batches of results stream back (small rows,
no pixels), which is also where progress is logged and ``max_failures`` is enforced.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import BatchgenError

log = logging.getLogger(__name__)

TEST_HOOKS_ENV = "BATCHGEN_TEST_HOOKS"  # internal: JSON test hooks (renderer, die_once, sleep_per_call_s, part_max_rows, store)


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

    @property
    def all_ok(self) -> bool:
        return self.ok == self.total and not self.aborted


class TooManyFailures(BatchgenError):
    """The job failed more items than ``max_failures`` allows."""


def run_job(spec, *, overwrite: bool = False, max_failures: int | None = None,
            hooks: dict | None = None, progress_every_s: float = 10.0) -> JobResult:
    """Run ``spec`` on the current Ray cluster (``ray.init`` first; the CLI does it)."""
    import ray

    from . import jobstate
    from .cluster import release_worker_nodes, request_worker_nodes
    from .dataset import row_settings, scan_inputs
    from .manifest import PartWriter, committed_state
    from .stages import EncodeAndStore, GeneratorActor, ReadRows
    from .storage import Location, StorageConfig

    hooks = dict(hooks or {})
    t0 = time.perf_counter()
    cfg = StorageConfig(endpoint_url=spec.storage.endpoint_url)
    out = Location.parse(spec.output.uri, cfg)
    out.require_folder()
    jobstate.check_model(spec, cfg, hooks)
    jobstate.check_sampler(spec)
    scan = scan_inputs(spec, cfg)
    t_scan = time.perf_counter() - t0
    previous = jobstate.prepare_output(out, spec, scan.total_rows, overwrite)
    committed = committed_state(out)
    todo = scan.total_rows - committed.done_count
    limit = max_failures if max_failures is not None else max(1, math.ceil(0.01 * scan.total_rows))
    log.info("job %s: %d items, %d already done, %d to render -> %s",
             spec.name, scan.total_rows, committed.done_count, todo, out.uri)

    c = spec.compute
    rows_per_call = c.batch_size * c.batches_per_call
    committed_ref = ray.put((committed.done, committed.attempts))
    tasks = jobstate.read_tasks(scan)
    ds = (
        ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
        .map_batches(ReadRows(row_settings(spec), cfg, committed_ref), batch_size=1, batch_format="pyarrow",
                     num_cpus=jobstate.READ_CPUS)
        .repartition(target_num_rows_per_block=rows_per_call)  # one actor call = one small block
        .map_batches(
            GeneratorActor,
            fn_constructor_kwargs=dict(
                model_uri=spec.model.uri, dtype=spec.model.dtype, storage_cfg=cfg, batch_size=c.batch_size,
                sampler=spec.sampling.sampler, sampler_options=spec.sampling.sampler_options, hooks=hooks),
            batch_size=rows_per_call, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=c.min_workers, max_size=c.max_workers),
            **jobstate.actor_resources(c),
        )
        .map_batches(
            EncodeAndStore(out.uri, cfg, spec.output.format, spec.output.quality, spec.model.uri,
                           spec.sampling.sampler, spec.sampling.sampler_options, c.batch_size, hooks),
            batch_size=rows_per_call, batch_format="pyarrow",
        )
    )
    parts = PartWriter(out, max_rows=int(hooks.get("part_max_rows", 2048)))
    progress = jobstate.Progress(todo, progress_every_s)
    failed_now = 0
    aborted = False
    expected_fp = previous.get("model_fingerprint") if previous else None
    render_ms = encode_ms = 0.0
    if todo > 0:
        request_worker_nodes(spec)  # ask the autoscaler for GPU nodes up front (the pool alone scales late)
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) if todo > 0 else []:
            expected_fp = jobstate.check_fingerprint(batch, expected_fp, out, spec)
            parts.add(batch)
            failed_now += jobstate.count_failed(batch)
            render_ms += _sum(batch, "render_ms")
            encode_ms += _sum(batch, "encode_ms")
            progress.update(batch.num_rows, failed_now)
            if failed_now > limit:
                aborted = True
                break
    finally:
        parts.flush()
        release_worker_nodes()
    rendered = progress.done
    wall_render = progress.elapsed()
    t_cons = time.perf_counter()
    counts = jobstate.finish(out, spec, scan.total_rows, expected_fp)
    summary = {
        "name": spec.name,
        "total_items": scan.total_rows,
        "ok": counts.get("ok", 0),
        "failed": counts.get("failed", 0),
        "remaining": scan.total_rows - counts.get("ok", 0) - counts.get("failed", 0),
        "skipped_already_done": committed.done_count,
        "rendered_this_run": rendered,
        "failed_this_run": failed_now,
        "aborted": aborted,
        "max_failures": limit,
        "images_per_s": rendered / wall_render if wall_render > 0 else 0.0,
        "steady_images_per_s": progress.steady_rate(),
        "timings_s": {
            "preflight_scan": round(t_scan, 3),
            "render_stream": round(wall_render, 3),
            "first_result": round((progress.first_at or progress.start) - progress.start, 3),
            "consolidate": round(time.perf_counter() - t_cons, 3),
            "total": round(time.perf_counter() - t0, 3),
            "render_sum_over_items": round(render_ms / 1000, 3),
            "encode_store_sum_over_items": round(encode_ms / 1000, 3),
        },
        "manifest_parts_written": parts.parts_written,
    }
    jobstate.write_summary(out, summary)
    result = JobResult(out.uri, scan.total_rows, summary["ok"], summary["failed"], rendered,
                       committed.done_count, aborted, summary)
    log.info("job %s: %d ok, %d failed of %d (%.2f img/s this run) -> %s/manifest.parquet",
             spec.name, result.ok, result.failed, result.total, summary["images_per_s"], out.uri)
    if aborted:
        raise TooManyFailures(
            f"job {spec.name}: aborted after {failed_now} failed items (more than --max-failures {limit}); "
            f"first errors are in {out.uri}/manifest.parquet (status='failed'); "
            f"fix the cause and run again to resume")
    return result


def _sum(batch, column: str) -> float:
    import pyarrow.compute as pc

    value = pc.sum(batch.column(column)).as_py()
    return float(value or 0.0)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: keep an existing session, join ``address``/RAY_ADDRESS, else start local.
    Returns True when this call started (and so should shut down) Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


__all__ = ["run_job", "JobResult", "TooManyFailures", "ensure_ray"]
