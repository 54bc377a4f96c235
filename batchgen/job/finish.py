"""Finishing a run: consolidation (one manifest row per item, parts merged), job.json's model
fingerprint and render environments, summary.json (this run's figures and the job's totals, every
run listed) and the run's :class:`JobResult`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import BatchgenError, StorageError
from ..manifest import JOB_FILE, SUMMARY_FILE, read_json, write_json
from .plan import Plan

log = logging.getLogger(__name__)


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


def finish(plan: Plan, parts, progress, state, aborted: bool, t0: float) -> JobResult:
    """Consolidate the manifest, record the fingerprint and render environments in job.json, write
    summary.json (this run added to its ``runs``) and return the result; past the failure budget,
    raise :class:`TooManyFailures` naming the first failures."""
    from ..manifest import FailureSummary

    spec, out, scan = plan.spec, plan.out, plan.scan
    wall_render = progress.elapsed()
    t_cons = time.perf_counter()
    failures = FailureSummary()
    counts = consolidate_and_record(out, spec, state.expected_fp, state.envs, failures)
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
    summary = write_summary(out, summary)  # adds this run to the summary's "runs"
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


def consolidate_and_record(out, spec, fingerprint: str | None, envs: list[str], failures=None) -> dict[str, int]:
    """Consolidate the manifest; record the model fingerprint and the render environments in job.json."""
    import json

    from ..manifest import consolidate

    counts = consolidate(out, failures=failures)
    job_loc = out.join(JOB_FILE)
    job = read_json(job_loc)
    recorded = list(job.get("render_env") or [])
    merged = recorded + [json.loads(e) for e in envs if json.loads(e) not in recorded]
    if (fingerprint and job.get("model_fingerprint") != fingerprint) or merged != recorded:
        job["model_fingerprint"] = fingerprint or job.get("model_fingerprint")
        job["render_env"] = merged
        write_json(job_loc, job)
    return counts


RUN_FIGURES = ("finished", "rendered_this_run", "failed_this_run", "skipped_already_done", "aborted", "ok", "failed",
               "remaining", "images_per_s", "steady_images_per_s", "timings_s", "manifest_parts_written",
               "rendered_again")


def write_summary(out, summary: dict) -> dict:
    """Write summary.json: the top level is this run's figures and the job's totals (as before),
    ``runs`` lists every run's own figures, oldest first, so a resume keeps the first run's.
    A summary of an older batchgen (no ``runs``) becomes the first entry. Returns what was written."""
    loc = out.join(SUMMARY_FILE)
    runs: list = []
    if loc.exists():
        try:
            earlier = read_json(loc)
        except (ValueError, StorageError):
            earlier = {}
        if isinstance(earlier, dict):
            runs = earlier.get("runs") if isinstance(earlier.get("runs"), list) else \
                [{k: earlier[k] for k in RUN_FIGURES if k in earlier}] if earlier else []
    summary = {**summary, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    summary["runs"] = runs + [{k: summary[k] for k in RUN_FIGURES if k in summary}]
    write_json(loc, summary)
    return summary


__all__ = ["finish", "JobResult", "TooManyFailures", "consolidate_and_record", "write_summary"]
