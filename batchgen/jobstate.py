"""Driver-side helpers of the job runner: pre-flight checks (output location, model, sampler,
inputs against the previous run), job.json (resume vs different spec, what --overwrite removes),
resources for the stages, read-task planning, progress, and the final consolidation + summary."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .errors import BatchgenError, CheckpointError, InputError, StorageError
from .manifest import JOB_FILE, MANIFEST_FILE, PARTS_DIR, SUMMARY_FILE, read_json, write_json

log = logging.getLogger(__name__)

# CPU the non-generator stages ask for. Ray Data's streaming repartition between them asks for one
# whole CPU (its default), so one CPU always stays free of generator actors: then every stage can
# be scheduled, one at a time at worst, and the job always makes progress.
READ_CPUS = 0.5
ENCODE_CPUS = 0.5
RESERVED_CPUS = 1.0
OUR_ENTRIES = ("images", PARTS_DIR, MANIFEST_FILE, SUMMARY_FILE)  # what --overwrite may remove


class SchedulingError(BatchgenError):
    """The cluster cannot run the job's stages (no GPU for GPU workers, actors never start)."""

    exit_code = 1


# ----------------------------------------------------------------------------- pre-flight


def check_model(spec, cfg):
    """Validate the model block (weight headers, every key and shape, via a skeleton built on the
    meta device; see modelcheck); None for ``builtin:null`` (no weights, no family). Raises before
    anything is written."""
    from .nullmodel import is_null_model

    if is_null_model(spec.model.uri):
        return None
    from .modelcheck import validate_model

    return validate_model(spec.model, cfg)


GENERIC_DEFAULTS = {"sampler": "ddim", "width": 512, "height": 512, "steps": 30, "guidance_scale": 7.5}


def resolve(spec, model) -> dict[str, Any]:
    """The job's settings with the model family's defaults filled in where the spec leaves them
    to the model (None, sampler "auto"). Recorded in job.json; every manifest row holds the values
    its item was rendered with."""
    from .settings import SPEC_SETTINGS

    family = model.family if model is not None else None
    if family is not None:
        values = spec.sampling.family_values(family)
        defaults = model.defaults()
    else:  # builtin:null: no family
        values = {s.name: getattr(spec.sampling, s.name) for s in SPEC_SETTINGS if s.families is None}
        defaults = GENERIC_DEFAULTS
    for key in ("width", "height", "steps", "guidance_scale"):
        if values.get(key) is None:
            values[key] = defaults[key]
    sampler = spec.sampling.sampler if spec.sampling.sampler != "auto" else defaults["sampler"]
    return {"family": family, "sampler": sampler, "settings": values}


def check_sampler(spec) -> None:
    """Fail before rendering on an unknown sampler name (with the closest names)."""
    from .samplernames import unknown_sampler_message
    from .sampling import SAMPLER_NAMES

    if spec.sampling.sampler != "auto" and spec.sampling.sampler not in SAMPLER_NAMES:
        raise InputError(f"sampling.sampler: {unknown_sampler_message(spec.sampling.sampler, SAMPLER_NAMES)}")


def check_sampling(spec, model, scan, resolved: dict) -> dict[str, str]:
    """Validate every settings group of the input with the model's skeleton pipeline, exactly as
    the actors will call it (sizes, family settings, the sampler and its schedule, img2img cuts),
    and every LoRA set against the model: a mistake fails here, naming the first row that has it,
    not in every actor. Returns the sha256 of every LoRA file the job uses, by URI."""
    if model is None:
        return {}
    import numpy as np

    from .stages import generate_kwargs

    pipe = model.pipeline
    sampler = resolved["sampler"]
    loras = {spec.model.loras and _lora_key(spec) or "[]"}
    for _group, (file_uri, row, values) in sorted(scan.group_cases.items(), key=lambda kv: kv[1][:2]):
        kwargs = generate_kwargs([values], model.family)
        init = [np.zeros((8, 8, 3), np.uint8)] if values.get("init_image") is not None else None
        try:
            pipe.validate([values["prompt"]], [values["seed"]], sampler=sampler,
                          sampler_options=spec.sampling.sampler_options or None, init_images=init, **kwargs)
        except ValueError as exc:
            raise InputError(f"input file {file_uri}, row {row}: the model ({model.family}) cannot render it: {exc}"
                             ) from None
        loras.add(values.get("loras") or "[]")
    return _check_loras(model, loras, spec)


def _lora_key(spec) -> str:
    from .dataset import canonical_loras

    return canonical_loras([lora.model_dump() for lora in spec.model.loras])


def _check_loras(model, sets: set[str], spec) -> dict[str, str]:
    """Each LoRA the job uses must match the model (unmatched keys are an error naming them).
    Returns {uri: sha256 of the file}."""
    import json

    from .checkpoints.lora import check_lora, lora_components, read_lora

    uris = sorted({item["uri"] for text in sets for item in json.loads(text)})
    if not uris:
        return {}
    modules = lora_components(model.pipeline.family.parts)
    hashes = {}
    for uri in uris:
        try:
            lora = read_lora(uri, model.storage_config)
            check_lora(lora, modules, model.storage_config)
        except (CheckpointError, StorageError) as exc:  # name the file once: read_lora's errors already do
            raise CheckpointError(str(exc) if str(exc).startswith(f"LoRA {uri}") else f"LoRA {uri}: {exc}") from None
        hashes[uri] = lora.sha256
    return hashes


def check_lora_files(out, previous: dict | None, hashes: dict[str, str]) -> None:
    """A resumed job must fuse the same LoRA bytes as the run that started it: a LoRA file
    replaced under the same URI would mix images of the old and the new file in one output
    (the digest holds only URIs and scales). Refused, naming the file."""
    recorded = (previous or {}).get("lora_sha256") or {}
    changed = [uri for uri, sha in hashes.items() if uri in recorded and recorded[uri] != sha]
    if changed:
        uri = changed[0]
        raise InputError(
            f"output {out.uri}: LoRA {uri} changed since this job started (sha256 {recorded[uri][:12]} -> "
            f"{hashes[uri][:12]}{f'; {len(changed) - 1} more changed' if len(changed) > 1 else ''}); resuming would "
            f"mix images of both versions: restore the file, write to another output.uri, or --overwrite")


def input_root(uri: str, cfg):
    """(Location of the input's root, True when the input is a folder or glob)."""
    from .dataset import _is_glob
    from .storage import Location

    if _is_glob(uri):
        cut = min(uri.index(ch) for ch in "*?[" if ch in uri)
        slash = uri.rfind("/", 0, cut)
        return Location.parse(uri[:slash] if slash >= 0 else ".", cfg), True
    loc = Location.parse(uri, cfg)
    return loc, not (loc.scheme == "local" and os.path.isfile(loc.path)) and not (
        loc.scheme == "s3" and loc.key.endswith(".parquet"))


def _within(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or below it (normalized '/'-paths)."""
    parent = parent.rstrip("/")
    return child == parent or child.startswith(parent + "/") or parent == ""


def check_output_location(out, spec, cfg) -> None:
    """Refuse outputs batchgen must never write to or clean: the filesystem root, the home folder,
    the input or a folder above it, a folder inside a folder input (its manifests would be read
    back as prompts), and outputs whose own entries are symbolic links (never followed)."""
    from .lease import LEASE_FILE

    root, is_folder = input_root(spec.input.uri, cfg)
    what = f"output.uri {spec.output.uri!r}"
    if out.scheme == "local":
        real = os.path.realpath(out.path)
        if real == os.path.realpath(os.sep):
            raise InputError(f"{what}: the filesystem root cannot be a job output; use a folder of its own")
        home = os.path.expanduser("~")
        if home not in ("~", "") and real == os.path.realpath(home):
            raise InputError(f"{what}: your home folder cannot be a job output; use a folder of its own")
        if root.scheme == "local":
            inp = os.path.realpath(root.path)
            if _within(inp, real):
                raise InputError(f"{what} is the input ({spec.input.uri}) or a folder above it; "
                                 "use a folder of its own for the output")
            if is_folder and _within(real, inp):
                raise InputError(f"{what} is inside the input folder {root.uri}: its manifest files would be "
                                 "read back as prompts; put the output outside the input folder")
        for name in (*OUR_ENTRIES, JOB_FILE, LEASE_FILE):
            path = os.path.join(out.path, name)
            if os.path.islink(path):
                raise InputError(f"{what}: {path} is a symbolic link (to {os.readlink(path)}); batchgen does "
                                 "not write or delete through links: replace it with a real folder or file")
    elif root.scheme == "s3" and root.bucket == out.bucket:
        if _within(root.key, out.key):
            raise InputError(f"{what} is the input ({spec.input.uri}) or a prefix above it; "
                             "use a prefix of its own for the output")
        if is_folder and _within(out.key, root.key):
            raise InputError(f"{what} is inside the input prefix {root.uri}: its manifest files would be read "
                             "back as prompts; put the output outside the input prefix")


def is_job_file(job: Any) -> bool:
    """True for a job.json batchgen wrote (the proof --overwrite needs before deleting anything)."""
    return isinstance(job, dict) and isinstance(job.get("digest"), str) and isinstance(job.get("spec"), dict) \
        and isinstance(job.get("digest_fields"), dict)


def read_previous(out) -> dict | None:
    """The output's job.json, None when there is none; refuses folders holding our entry names
    without a job.json (not a batchgen output: nothing there is ours to resume or delete)."""
    job_loc = out.join(JOB_FILE)
    if job_loc.exists():
        try:
            job = read_json(job_loc)
        except (ValueError, StorageError) as exc:
            job = None
            why = f"unreadable ({exc})"
        else:
            why = "not written by batchgen"
        if is_job_file(job):
            return job
        raise InputError(f"{job_loc.uri}: {why}; batchgen only resumes or replaces its own outputs: choose "
                         "another output.uri, or remove that folder yourself")
    present = [name for name in OUR_ENTRIES if out.join(name).exists()]
    if present:
        raise InputError(f"output {out.uri} holds {', '.join(present)} but no job.json, so it is not a batchgen "
                         "job output; batchgen never deletes or mixes files it did not write: choose an empty "
                         "or new output.uri")
    others = _entries(out, limit=4)
    if others:
        listed = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise InputError(f"output {out.uri} is not empty ({listed}) and holds no job.json: a job writes only into "
                         "a new or empty folder, or resumes / replaces its own output; choose another output.uri")
    return None


def _entries(out, limit: int) -> list[str]:
    """Up to ``limit`` names in the output other than its lease (and a lease set aside)."""
    from .lease import LEASE_FILE

    return [n for n in out.first_names(limit + 2) if not n.startswith(LEASE_FILE)][:limit]


def check_previous(out, spec, previous: dict | None, overwrite: bool) -> list[str]:
    """Same spec: resume. Different spec: refuse unless ``overwrite``. Returns the entries
    ``overwrite`` will remove (only ever ours: ``previous`` is a batchgen job.json)."""
    from .spec import diff_keys

    if previous is None:
        return []
    differing = diff_keys(previous.get("digest_fields", {}), spec.digest_fields())
    if differing and not overwrite:
        from . import __version__

        written_by = (previous.get("versions") or {}).get("batchgen")
        why = (f" (it was written by batchgen {written_by}, whose spec had other keys and defaults; "
               f"this is {__version__}, which cannot resume it)") if written_by and written_by != __version__ else ""
        raise InputError(
            f"output {out.uri} holds a different job (keys differ: {', '.join(differing)}){why}; "
            f"use the same spec to resume, another output.uri, or --overwrite to replace it")
    if overwrite:
        return [name for name in OUR_ENTRIES if out.join(name).exists()]
    return []


def check_images(out, spec, committed, verify: bool):
    """The committed items a resume renders again because their image is gone (or, with
    ``verify``, differs from what the manifest recorded); see :func:`batchgen.manifest.check_images`."""
    from .images import EXTENSIONS
    from .manifest import check_images as _check

    check = _check(out, committed.done, EXTENSIONS[spec.output.format], verify)
    if len(check.ids):
        log.warning("%s: %d finished items will be rendered again: %d images missing, %d not as recorded (%s)",
                    out.uri, len(check.ids), check.missing, check.wrong, "; ".join(check.first[:3]))
    return check


def _identity_changes(old: dict, new: dict) -> list[str]:
    out = []
    if old.get("size") != new.get("size"):
        out.append(f"size {old.get('size')} -> {new.get('size')} bytes")
    if old.get("rows") != new.get("rows"):
        out.append(f"{old.get('rows')} -> {new.get('rows')} rows")
    for key in ("sha256", "etag"):
        if old.get(key) and new.get(key) and old[key] != new[key]:
            out.append(f"content {key} differs")
    return out


def check_inputs(out, spec, previous: dict | None, scan, committed) -> dict[str, list]:
    """Compare the input files with every file job.json recorded, including files that left the
    input in an earlier run: a file that comes back is checked against the identity it had then.
    A changed file whose ids are row positions (no ``input.id_column``) and that has committed
    items is an error: its items would be matched to other prompts. Removed files are reported
    (their items are kept, not counted)."""
    from .dataset import derived_id_prefix

    notes: dict[str, list] = {"changed": [], "removed": []}
    if previous is None or not isinstance(previous.get("inputs"), list):
        return notes
    before = {i.get("rel"): i for i in previous["inputs"] if isinstance(i, dict)}
    now = {i["rel"]: i for i in scan.identities}
    for rel, cur in now.items():
        old = before.get(rel)
        changes = _identity_changes(old, cur) if old else []
        if not changes:
            if old and old.get("removed"):
                log.info("input file %s is part of the input again, unchanged", cur["uri"])
            continue
        notes["changed"].append({"file": cur["uri"], "changes": changes})
        since = ("since it left the input in an earlier run" if old.get("removed") else "since the last run")
        if spec.input.id_column:
            log.info("input file %s changed %s (%s); ids come from column %r, so finished items stay finished",
                     cur["uri"], since, ", ".join(changes), spec.input.id_column)
            continue
        prefix = derived_id_prefix(rel) + "-"
        ids = committed.done if len(committed.done) else pa.array([], pa.string())
        touched = int(pc.sum(pc.cast(pc.starts_with(ids, prefix), pa.int64())).as_py() or 0) + sum(
            1 for i in committed.attempts if i.startswith(prefix))
        if touched:
            raise InputError(
                f"input file {cur['uri']} changed {since} on {out.uri} ({', '.join(changes)}) and "
                f"{touched} of its items are already committed; without input.id_column its item ids are row "
                "numbers, so resuming would render some prompts twice and others never. Restore the file and "
                "put new prompts in a new file, set input.id_column, or start over with --overwrite")
    for rel, old in before.items():
        if rel not in now:
            notes["removed"].append({"file": old.get("uri"), "rows": old.get("rows")})
            log.warning("input file %s (%s rows) is no longer part of the input: its items stay in the manifest "
                        "but are not counted", old.get("uri"), old.get("rows"))
    return notes


def merge_inputs(previous: dict | None, identities: list[dict]) -> list[dict]:
    """The input files job.json records: the current ones, plus every file an earlier run of this
    job recorded that is no longer there, marked ``removed`` (with the time it was first seen
    missing). Never dropped: a file that comes back must be checked against the identity its
    committed row-number ids were made from (see :func:`check_inputs`)."""
    now = {i["rel"]: i for i in identities}
    merged = dict(now)
    if previous is not None and isinstance(previous.get("inputs"), list):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for old in previous["inputs"]:
            if isinstance(old, dict) and isinstance(old.get("rel"), str) and old["rel"] not in now:
                merged[old["rel"]] = {**old, "removed": old.get("removed") or stamp}
    return [merged[rel] for rel in sorted(merged)]


def counted_at_start(out, scan, images=None) -> dict[str, Any]:
    """What ``status`` needs to count the items of the current input exactly while this run
    writes: the runs whose manifest parts exist now (part files are named ``part-RUN-SEQ``) and
    how many of the current input's items those parts hold as done / failed. Every part written
    later comes from this input, so status adds them without having to read the input. Items
    rendered again for a lost image (``images``) count as the parts say: done."""
    from .manifest import part_locations

    runs = sorted({part_run(loc.name) for loc in part_locations(out)})
    again = images.in_files([i["uri"] for i in scan.identities]) if images is not None else 0
    return {"runs": runs, "done": scan.done_in_input + again, "failed": max(0, scan.failed_in_input - again)}


def part_run(name: str) -> str:
    """The run a manifest part file belongs to: ``part-RUN-SEQ.parquet`` -> ``part-RUN``."""
    return name.rsplit("-", 1)[0]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    from . import __version__

    out = {"batchgen": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "pyarrow", "safetensors", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "missing"
    return out


def _remove_ours(out, remove: list[str]) -> tuple[list[str], list[str]]:
    """``--overwrite``: delete what the earlier job wrote and nothing else. ``manifest.parquet``
    and ``summary.json`` are ours by name (job.json proved the folder is a batchgen output); in
    ``manifest/`` the part files; in ``images/`` the images of items its manifest names
    (``<item_id>.<ext>``); in both, temp files of an interrupted write. Returns (what was removed,
    described; the files left because the job did not write them)."""
    import re

    from .images import EXTENSIONS
    from .storage import is_temp_name

    ids = _written_ids(out) if "images" in remove else None
    exts = set(EXTENSIONS.values())
    part = re.compile(r"^part-.+\.parquet$")
    removed, kept = [], []
    for name in remove:
        loc = out.join(name)
        if name not in ("images", PARTS_DIR):
            removed.append(name)
            loc.delete()
            continue
        prefix = loc.uri.rstrip("/") + "/"
        rels = [f.uri[len(prefix):] for f in loc.list(recursive=True)]
        if name == "images":
            stems = pa.array([r.rsplit(".", 1)[0] for r in rels], pa.string())
            known = pc.is_in(stems, value_set=ids).to_pylist() if len(ids) else [False] * len(rels)
            ours = [r for r, k in zip(rels, known) if "/" not in r and (
                is_temp_name(r) or (k and r.rsplit(".", 1)[-1] in exts))]
        else:
            ours = [r for r in rels if "/" not in r and (part.match(r) or is_temp_name(r))]
        loc.delete_files(ours)
        kept += [f"{name}/{r}" for r in rels if r not in set(ours)]
        if ours:
            removed.append(f"{name}/ ({len(ours)} files)")
        if loc.scheme == "local" and not [r for r in rels if r not in set(ours)]:
            with contextlib.suppress(OSError):
                os.rmdir(loc.path)
    return removed, kept


def _written_ids(out) -> pa.Array:
    """Every item id the output's manifest parts and consolidated manifest hold."""
    from .manifest import iter_parts, read_manifest

    chunks = [t.column("item_id").combine_chunks() for _, t in iter_parts(out, ["item_id"])]
    try:
        manifest = read_manifest(out)
    except Exception:  # noqa: BLE001 - an unreadable manifest names no items; the parts still do
        manifest = None
    if manifest is not None and "item_id" in manifest.column_names:
        chunks.append(manifest.column("item_id").combine_chunks().cast(pa.string()))
    return pc.unique(pa.concat_arrays(chunks)) if chunks else pa.array([], pa.string())


def prepare_output(out, spec, scan, previous: dict | None, remove: list[str],
                   resolved: dict | None = None, lora_sha256: dict[str, str] | None = None,
                   images=None) -> list[str]:
    """Remove what ``--overwrite`` replaces (only what the earlier job wrote, never through links;
    anything else is left and named, in one warning), write job.json, and return what was
    removed, described. ``images``: the resume's :class:`~batchgen.manifest.ImageCheck`."""
    removed, kept = _remove_ours(out, remove)
    if removed or kept:
        left = (f"; left {len(kept)} files it did not write: {', '.join(kept[:5])}"
                f"{' ...' if len(kept) > 5 else ''}") if kept else ""
        log.warning("--overwrite: removed from %s: %s%s", out.uri, ", ".join(removed) or "nothing", left)
    keep = previous if previous is not None and not remove else None
    job = {
        "name": spec.name,
        "spec": spec.model_dump(mode="json"),
        "digest": spec.digest(),
        "digest_fields": spec.digest_fields(),
        "versions": versions(),
        "model_fingerprint": (keep or {}).get("model_fingerprint"),
        "render_env": (keep or {}).get("render_env", []),
        "torch_threads": spec.compute.torch_threads,
        "resolved": resolved,
        "lora_sha256": {**((keep or {}).get("lora_sha256") or {}), **(lora_sha256 or {})},
        "passthrough": scan.settings.get("passthrough", {}),
        # spec settings the input's own columns replace: {"sampling.steps": {"column", "rows", "of"}}
        "overridden_by_input": getattr(scan, "overridden_by_input", {}),
        "total_items": scan.total_rows,
        "inputs": merge_inputs(keep, scan.identities),
        "counted_at_start": counted_at_start(out, scan, images),
        "created": (keep or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out.join(JOB_FILE), job)
    return removed


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


# ----------------------------------------------------------------------------- streaming


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


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


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


def finish(out, spec, fingerprint: str | None, envs: list[str], failures=None) -> dict[str, int]:
    """Consolidate the manifest; record the model fingerprint and the render environments in job.json."""
    import json

    from .manifest import consolidate

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


def max_failures_for(total: int, max_failures: int | None) -> int:
    return max_failures if max_failures is not None else max(1, math.ceil(0.01 * total))


__all__ = ["check_model", "check_sampler", "check_sampling", "check_output_location", "read_previous",
           "check_previous", "check_inputs", "prepare_output", "actor_plan", "Progress", "SchedulingError"]
