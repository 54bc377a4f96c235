"""Asking Ray's autoscaler for the worker nodes a job can use, and giving them back.

Ray Data's actor pool grows from ``min_workers`` toward ``max_workers`` on its own, but it only asks
for one more actor when the running ones are busy, and each new actor then waits for a node to boot:
measured with the ``fake_multinode`` provider (Ray 2.60, 2 one-GPU node types, 40 one-second
batches), the pool alone reached the second GPU node only after 30 s, when the job was almost done
(1 of 2 nodes used, 27 s). With :func:`request_worker_nodes` at job start both nodes joined within
4 s and both rendered (17 s). Clearing the request at the end lets the autoscaler release the
idle nodes after its ``idle_timeout_minutes``.

The request is a hint to the autoscaler (``ray.autoscaler.sdk.request_resources``): on a cluster
without an autoscaler (a laptop, a fixed cluster) it does nothing.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

log = logging.getLogger(__name__)


def _compute(spec_or_compute: Any) -> Any:
    return getattr(spec_or_compute, "compute", spec_or_compute)


def worker_bundles(spec_or_compute: Any, cpus_per_worker: float = 1.0) -> list[dict[str, float]]:
    """One resource bundle per generator actor the job may run: ``max_workers`` x {GPU, CPU}.

    ``spec_or_compute`` is a JobSpec or its ``compute`` section. With ``gpus_per_worker: 0`` the
    bundles are CPU-only. The bundle must match what the runner asks for each actor.
    """
    compute = _compute(spec_or_compute)
    gpus = float(getattr(compute, "gpus_per_worker"))
    workers = int(getattr(compute, "max_workers"))
    if gpus < 0:
        raise ValueError(f"compute.gpus_per_worker must be >= 0, got {gpus}")
    if workers < 1:
        raise ValueError(f"compute.max_workers must be >= 1, got {workers}")
    if cpus_per_worker < 0:
        raise ValueError(f"cpus_per_worker must be >= 0, got {cpus_per_worker}")
    bundle: dict[str, float] = {}
    if gpus > 0:
        bundle["GPU"] = gpus
    if cpus_per_worker > 0:
        bundle["CPU"] = cpus_per_worker
    if not bundle:
        raise ValueError("a worker needs at least one resource: gpus_per_worker or cpus_per_worker > 0")
    # Whole numbers as ints: the autoscaler's bin packing treats them alike, logs read better.
    bundle = {k: int(v) if float(v).is_integer() else v for k, v in bundle.items()}
    return [dict(bundle) for _ in range(workers)]


def request_worker_nodes(spec_or_compute: Any, cpus_per_worker: float = 1.0) -> list[dict[str, float]]:
    """Ask the autoscaler for room for ``max_workers`` actors now (Ray must be initialized).

    Returns the bundles asked for. Failing to reach the autoscaler is logged, never fatal: the
    actor pool still scales by itself, only later.
    """
    import ray

    bundles = worker_bundles(spec_or_compute, cpus_per_worker)
    if not ray.is_initialized():
        raise RuntimeError("request_worker_nodes: Ray is not initialized (call ray.init first)")
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # a cluster without autoscaler support: keep going
        log.warning("could not ask the autoscaler for %d worker(s) %s: %s", len(bundles), bundles[0], exc)
        return bundles
    log.info("asked the autoscaler for %d worker(s) of %s", len(bundles), bundles[0])
    return bundles


def release_worker_nodes() -> None:
    """Clear this job's standing resource request so idle worker nodes can be released."""
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception as exc:
        log.warning("could not clear the autoscaler resource request: %s", exc)
        return
    log.info("cleared the autoscaler resource request (idle worker nodes will be released)")


@contextlib.contextmanager
def worker_nodes(spec_or_compute: Any, cpus_per_worker: float = 1.0) -> Iterator[list[dict[str, float]]]:
    """``with worker_nodes(spec): run the job`` — request at entry, release at exit (also on error)."""
    bundles = request_worker_nodes(spec_or_compute, cpus_per_worker)
    try:
        yield bundles
    finally:
        release_worker_nodes()
