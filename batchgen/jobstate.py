"""Driver-side helpers of the job runner: pre-flight checks, job.json (resume vs different
spec), read-task planning, progress, and the final consolidation + summary."""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .errors import BatchgenError, CheckpointError, InputError, StorageError
from .manifest import JOB_FILE, MANIFEST_FILE, PARTS_DIR, SUMMARY_FILE, consolidate, read_json, write_json

log = logging.getLogger(__name__)

READ_CPUS = 0.5  # read tasks are light; a distinct request also keeps them out of the GPU actors


# ----------------------------------------------------------------------------- pre-flight


def check_model(spec, cfg, hooks: dict) -> None:
    """Fail before rendering when the model URI cannot be a checkpoint."""
    if hooks.get("renderer") == "null":
        return
    uri = spec.model.uri
    if uri.startswith("builtin:"):
        from .tiny import BUILTINS

        name = uri[len("builtin:"):]
        if name not in BUILTINS:
            raise CheckpointError(f"model.uri {uri!r}: unknown built-in model; known: "
                                  + ", ".join(f"builtin:{n}" for n in BUILTINS))
        return
    from .storage import Location

    loc = Location.parse(uri, cfg)
    if not loc.exists():
        raise CheckpointError(f"model.uri {uri!r}: no such model folder ({loc.uri})")
    if not loc.join("model_index.json").exists():
        raise CheckpointError(f"model.uri {uri!r}: not a diffusers folder (no model_index.json in {loc.uri})")


def check_sampler(spec) -> None:
    """Fail before rendering on an unknown sampler name."""
    try:
        from .sampling import SAMPLER_NAMES
    except ImportError:  # pragma: no cover - sampler registry not present in this build
        return
    if spec.sampling.sampler not in SAMPLER_NAMES:
        raise InputError(f"sampling.sampler: unknown sampler {spec.sampling.sampler!r}; "
                         f"choose one of: {', '.join(sorted(SAMPLER_NAMES))}")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    from . import __version__

    out = {"batchgen": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "missing"
    return out


def prepare_output(out, spec, total: int, overwrite: bool) -> dict | None:
    """Check ``job.json`` (same spec: resume; different: refuse unless overwrite) and write it.

    Returns the previous job.json (None for a fresh or overwritten output)."""
    from .spec import diff_keys

    job_loc = out.join(JOB_FILE)
    previous = None
    if job_loc.exists():
        try:
            previous = read_json(job_loc)
        except (ValueError, StorageError) as exc:
            raise InputError(f"{job_loc.uri}: unreadable job.json ({exc}); use --overwrite to start over") from None
        differing = diff_keys(previous.get("digest_fields", {}), spec.digest_fields())
        if differing and not overwrite:
            raise InputError(
                f"output {out.uri} holds a different job (keys differ: {', '.join(differing)}); "
                f"use the same spec to resume, another output.uri, or --overwrite to replace it")
        if differing or overwrite:
            log.warning("overwriting job output %s", out.uri)
            for name in ("images", PARTS_DIR, MANIFEST_FILE, SUMMARY_FILE):
                out.join(name).delete()
            previous = None
    elif overwrite:
        for name in ("images", PARTS_DIR, MANIFEST_FILE, SUMMARY_FILE):
            out.join(name).delete()
    job = {
        "name": spec.name,
        "spec": spec.model_dump(mode="json"),
        "digest": spec.digest(),
        "digest_fields": spec.digest_fields(),
        "versions": versions(),
        "model_fingerprint": (previous or {}).get("model_fingerprint"),
        "total_items": total,
        "created": (previous or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(job_loc, job)
    return previous


# ----------------------------------------------------------------------------- planning


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


def actor_resources(compute) -> dict[str, float]:
    """Generator actors: ``num_gpus`` when gpus_per_worker > 0, else one CPU each."""
    if compute.gpus_per_worker > 0:
        return {"num_gpus": compute.gpus_per_worker}
    return {"num_cpus": 1}


# ----------------------------------------------------------------------------- streaming


class Progress:
    """A periodic log line: rendered N/M items, X img/s."""

    def __init__(self, total: int, every_s: float):
        self.total, self.every_s = total, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.first_at: float | None = None  # when the first results arrived (actors warm)
        self.first_rows = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def steady_rate(self) -> float | None:
        """img/s after the first results (excludes actor start-up and model load); None when every
        result came in the first batch, so there is no steady phase to measure."""
        if self.first_at is None or self.done <= self.first_rows:
            return None
        return (self.done - self.first_rows) / max(self.last_at - self.first_at, 1e-9)

    def update(self, n: int, failed: int) -> None:
        self.done += n
        now = time.perf_counter()
        self.last_at = now
        if self.first_at is None:
            self.first_at, self.first_rows = now, n
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("rendered %d/%d items, %.2f img/s (%d failed)", self.done, self.total, rate, failed)


def count_failed(batch: pa.Table) -> int:
    return int(pc.sum(pc.cast(pc.not_equal(batch.column("status"), "ok"), pa.int64())).as_py() or 0)


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


def finish(out, spec, total: int, fingerprint: str | None) -> dict[str, int]:
    """Consolidate the manifest and record the model fingerprint in job.json."""
    counts = consolidate(out)
    job_loc = out.join(JOB_FILE)
    job = read_json(job_loc)
    if fingerprint and job.get("model_fingerprint") != fingerprint:
        job["model_fingerprint"] = fingerprint
        write_json(job_loc, job)
    return counts


def write_summary(out, summary: dict) -> None:
    write_json(out.join(SUMMARY_FILE), summary)
