"""Planning a prepared job: the Plan the pre-flight returns, the read tasks (one per settings
group x file x row group, so actor batches are homogeneous) and the generator actor pool fitted
to the cluster so that the read and encode stages always have room."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import BatchgenError

# CPU the non-generator stages ask for. Ray Data's streaming repartitions ask for one whole CPU
# (their default), so one CPU always stays free of generator actors: then every stage can be
# scheduled, one at a time at worst, and the job always makes progress. The encode stage asks for
# a whole CPU so that the repartition after it (one wire block per row, wire.py) fuses into its
# tasks (Ray Data fuses only equal resource requests); reading asks for as much, so that it does
# not hold half the free CPU while an encode task waits for all of it (the first results would
# wait behind every read task otherwise).
READ_CPUS = 1.0
ENCODE_CPUS = 1.0
RESERVED_CPUS = 1.0


class SchedulingError(BatchgenError):
    """The cluster cannot run the job's stages (no GPU for GPU workers, actors never start)."""

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
    resolved: dict = field(default_factory=dict)  # family defaults filled in (preflight.resolve)
    rendered_again: dict = field(default_factory=dict)  # finished items whose image was missing / wrong
    lora_sha256: dict = field(default_factory=dict)  # uri -> sha256 the pre-flight read; workers verify theirs
    controlnet_sha256: dict = field(default_factory=dict)  # model.controlnets: uri -> sha256, as for LoRAs
    condition_sha256: dict = field(default_factory=dict)  # control images, masks (+ their init images) likewise
    ip_adapter_sha256: dict = field(default_factory=dict)  # model.ip_adapter: its file and image encoder folder

    @property
    def todo(self) -> int:
        return self.scan.total_rows - self.scan.done_in_input

    def release(self) -> None:
        self.lease.release()


def max_failures_for(total: int, max_failures: int | None) -> int:
    return max_failures if max_failures is not None else max(1, math.ceil(0.01 * total))


def read_tasks(scan) -> list[dict[str, Any]]:
    """One read task per (settings group, file, row group), group-major, so actor batches are
    homogeneous except at the few group boundaries. One group -> no filtering."""
    groups = sorted(scan.groups) if len(scan.groups) > 1 else [None]
    tasks = []
    for group in groups:
        for f in scan.files:
            first = 0
            for index, rows in enumerate(f.row_groups):
                if rows:
                    tasks.append({"file": f.uri, "rel": f.rel, "row_group": index, "first_row": first,
                                  "group": group})
                first += rows
    return tasks


@dataclass
class ActorPlan:
    """Resources and pool size of the generator actors on this cluster, and why they differ from
    the spec when they do."""

    resources: dict[str, float]
    min_workers: int
    max_workers: int
    notes: list[str] = field(default_factory=list)


def actor_plan(compute, cluster: dict, fixed: bool) -> ActorPlan:
    """Fit the generator pool to the cluster so that the read and encode stages always have room.

    ``cluster`` is ``ray.cluster_resources()``; ``fixed`` is True for a local Ray this process
    started (no autoscaler: what it has now is all it will ever have).

    - CPU workers (``gpus_per_worker: 0``) take one CPU each, and at most ``CPUs - 1`` of them
      run, so one CPU stays free for reading and encoding (with a single CPU the actor is
      scheduled with a share of it: all stages then share the core).
    - GPU workers: on a fixed local Ray without enough GPUs the job fails at once; on a joined
      cluster the autoscaler may add GPU nodes, so the job waits up to ``start_timeout_s``.
    """
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    lo, hi = compute.min_workers, compute.max_workers
    notes: list[str] = []
    if cpus < ENCODE_CPUS and (fixed or cpus > 0):
        raise SchedulingError(f"the Ray cluster has {cpus:g} CPUs; reading prompts and encoding images need at "
                              f"least {ENCODE_CPUS:g} (start Ray with more CPUs)")
    if compute.gpus_per_worker > 0:
        g = compute.gpus_per_worker
        if fixed:
            fit = int(gpus // g + 1e-9)
            if fit < 1:
                raise SchedulingError(
                    f"compute.gpus_per_worker is {g:g} but the local Ray has {gpus:g} GPUs: set "
                    "compute.gpus_per_worker: 0 to render with CPU workers, or run on a cluster with GPUs "
                    "(--address)")
            if hi > fit:
                notes.append(f"generator pool capped at {fit} GPU workers (compute.max_workers {hi}): the local Ray has "
                             f"{gpus:g} GPUs and each worker takes {g:g}")
                hi, lo = fit, min(lo, fit)
        return ActorPlan({"num_gpus": g}, lo, hi, notes)
    free = cpus - RESERVED_CPUS
    if free < 1 and not fixed and cpus < 1:
        # A joined cluster with no CPUs yet (workers still to come from an autoscaler): ask normally.
        return ActorPlan({"num_cpus": 1.0}, lo, hi, notes)
    per = 1.0 if free >= 1 else max(0.0, round(free, 3))
    fit = max(1, int(free // per + 1e-9)) if per > 0 else 1
    if per < 1:
        notes.append(f"the Ray cluster has {cpus:g} CPUs: the CPU generator actor is scheduled with {per:g} CPU "
                     f"so that {RESERVED_CPUS:g} CPU stays free for reading prompts and encoding images "
                     "(all stages share the cores)")
    if hi > fit:
        notes.append(f"generator pool capped at {fit} CPU workers (compute.max_workers {hi}): the Ray cluster "
                     f"has {cpus:g} CPUs and {RESERVED_CPUS:g} stays free for reading and encoding")
        hi = fit
    if lo > hi:
        notes.append(f"compute.min_workers {lo} lowered to {hi} for the same reason")
        lo = hi
    return ActorPlan({"num_cpus": per}, lo, hi, notes)


__all__ = ["Plan", "ActorPlan", "actor_plan", "read_tasks", "max_failures_for", "SchedulingError",
           "READ_CPUS", "ENCODE_CPUS", "RESERVED_CPUS"]
