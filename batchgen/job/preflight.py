"""Pre-flight: everything about a job that can be checked without Ray, cheapest first, one log
line per phase. It validates the spec's output location, takes the output's lease (one run per
output), compares with the previous run's job.json, scans every input row (no model needed: a bad
row fails before torch is even imported), then checks the model (metadata and weight headers),
scans the rows again with the model family's defaults (naming the settings the input's columns
override), builds every sampler schedule the rows need, and only then writes job.json (after
removing what ``--overwrite`` replaces). Every mistake fails here in seconds, before Ray starts
and before anything else is written. :func:`prepare` returns the :class:`~batchgen.job.plan.Plan`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import BatchgenError, CheckpointError, InputError, StorageError
from ..manifest import JOB_FILE, MANIFEST_FILE, PARTS_DIR, SUMMARY_FILE, read_json, write_json
from .conditioning import ConditionFiles, check_changed, check_controlnets, check_ip_adapter
from .plan import Plan, max_failures_for

log = logging.getLogger(__name__)

OUR_ENTRIES = ("images", PARTS_DIR, MANIFEST_FILE, SUMMARY_FILE)  # what --overwrite may remove


def prepare(spec, *, overwrite: bool = False, max_failures: int | None = None, verify: bool = False) -> Plan:
    """Validate everything and write job.json; no Ray. Raises before writing on any bad input.
    A resume renders again the committed items whose image is missing (one listing of images/);
    with ``verify`` also those whose stored bytes differ from the manifest's size or sha256."""
    from ..dataset import scan_inputs
    from ..lease import Lease
    from ..manifest import committed_state, empty_state
    from ..storage import Location, StorageConfig

    t0 = time.perf_counter()
    log.info("pre-flight: job %s (spec ok)", spec.name)
    try:
        cfg = StorageConfig(endpoint_url=spec.storage.endpoint_url).resolved()
    except ValueError as exc:
        raise BatchgenError(str(exc)) from None
    out = Location.parse(spec.output.uri, cfg)
    out.require_folder()
    check_output_location(out, spec, cfg)
    created = out.scheme == "local" and not os.path.exists(out.path)
    lease = Lease(out).acquire()
    try:
        previous = read_previous(out)
        remove = check_previous(out, spec, previous, overwrite)
        resume = previous is not None and not overwrite
        committed = committed_state(out) if resume else empty_state()
        images = check_images(out, spec, committed, verify)
        committed = committed.render_again(images)
        t_output = _phase(t0, f"output {out.uri} ok ({'resume' if resume else 'new job'})")
        # Cheapest first: every row of the input, before the model (seconds of imports and a
        # skeleton build). This pass knows no model family, so it checks what holds for any
        # model; the pass below, with the family's defaults, adds what depends on the model.
        first = scan_inputs(spec, cfg, committed, notes=False)  # the notes (overridden settings): second pass
        t_inputs = _phase(t_output, f"inputs: {len(first.files)} files, {first.total_rows} items")
        check_sampler(spec)
        model = check_model(spec, cfg)
        controlnets = check_controlnets(spec, model, cfg)
        ip_adapter = check_ip_adapter(spec, model, cfg)
        t_model = _phase(t_inputs, f"model {spec.model.uri}: " + (model.family if model is not None else "seeded noise, no weights"))
        resolved = resolve(spec, model)
        files = ConditionFiles()
        scan = scan_inputs(spec, cfg, committed, resolved, model.check_prompt if model is not None else None,
                           on_rows=files.add)
        inputs = check_inputs(out, spec, previous if resume else None, scan, committed)
        conditions = files.check(cfg, spec.input.max_init_image_pixels) if len(files) else {}
        if len(files):
            _phase(t_model, f"conditioning files: {len(conditions)} read and digested")
        loras = check_sampling(spec, model, scan, resolved)
        check_lora_files(out, previous if resume else None, loras)
        check_changed(out, (previous or {}).get("controlnet_sha256") if resume else None, controlnets, "ControlNet")
        check_changed(out, (previous or {}).get("ip_adapter_sha256") if resume else None, ip_adapter,
                      "IP-Adapter file")
        check_changed(out, (previous or {}).get("condition_sha256") if resume else None, conditions,
                      "conditioning file")
        removed = prepare_output(out, spec, scan, previous if resume else None, remove, resolved,
                                          loras, images, controlnets, conditions, ip_adapter)
    except BaseException:
        lease.release()
        if created:
            _remove_if_empty(out.path)
        raise
    limit = max_failures_for(scan.total_rows, max_failures)
    _phase(t_model, f"settings and LoRAs checked, job.json written; {scan.total_rows - scan.done_in_input} items to render")
    timings = {"preflight_output": round(t_output - t0, 3), "preflight_inputs": round(t_inputs - t_output, 3),
               "preflight_model": round(t_model - t_inputs, 3), "preflight_scan": round(time.perf_counter() - t_model, 3)}
    return Plan(spec, cfg, out, scan, committed, lease, limit, previous if resume else None, removed,
                inputs, timings, resolved, images.as_dict(), lora_sha256=loras, controlnet_sha256=controlnets,
                condition_sha256=conditions, ip_adapter_sha256=ip_adapter)


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


def check_model(spec, cfg):
    """Validate the model block (weight headers, every key and shape, via a skeleton built on the
    meta device; see modelcheck); None for ``builtin:null`` (no weights, no family). Raises before
    anything is written."""
    from ..nullmodel import is_null_model

    if is_null_model(spec.model.uri):
        return None
    from ..modelcheck import validate_model

    return validate_model(spec.model, cfg)


GENERIC_DEFAULTS = {"sampler": "ddim", "width": 512, "height": 512, "steps": 30, "guidance_scale": 7.5}


def resolve(spec, model) -> dict[str, Any]:
    """The job's settings with the model family's defaults filled in where the spec leaves them
    to the model (None, sampler "auto"). Recorded in job.json; every manifest row holds the values
    its item was rendered with."""
    from ..settings import SPEC_SETTINGS

    family = model.family if model is not None else None
    if family is not None:
        values = spec.sampling.family_values(family)
        defaults = model.defaults()
    else:  # builtin:null: no family
        values = {s.name: getattr(spec.sampling, s.name) for s in SPEC_SETTINGS if s.families is None}
        defaults = GENERIC_DEFAULTS
    timesteps = (spec.sampling.sampler_options or {}).get("timesteps")
    if values.get("steps") is None and isinstance(timesteps, list) and timesteps:
        values["steps"] = len(timesteps)  # explicit timesteps: as generate() infers it
    for key in ("width", "height", "steps", "guidance_scale"):
        if values.get(key) is None:
            values[key] = defaults[key]
    sampler = spec.sampling.sampler if spec.sampling.sampler != "auto" else defaults["sampler"]
    return {"family": family, "sampler": sampler, "settings": values}


def check_sampler(spec) -> None:
    """Fail before rendering on an unknown sampler name (with the closest names)."""
    from ..samplernames import unknown_sampler_message
    from ..sampling import SAMPLER_NAMES

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
        if values.get("mask_image") is not None:  # the files themselves are checked by ConditionFiles
            kwargs["mask_images"] = [np.zeros((8, 8), np.uint8)]
        if values.get("control_image") is not None:
            nets = len(spec.model.controlnets)
            gray = np.zeros((8, 8, 3), np.uint8)
            kwargs["control_images"] = [[gray] * nets if nets > 1 else gray]
        if values.get("ip_adapter_image") is not None:
            kwargs["ip_adapter_images"] = [np.zeros((8, 8, 3), np.uint8)]
        try:
            pipe.validate([values["prompt"]], [values["seed"]], sampler=sampler,
                          sampler_options=spec.sampling.sampler_options or None, init_images=init, **kwargs)
        except ValueError as exc:
            raise InputError(f"input file {file_uri}, row {row}: the model ({model.family}) cannot render it: {exc}"
                             ) from None
        loras.add(values.get("loras") or "[]")
    return _check_loras(model, loras, spec)


def _lora_key(spec) -> str:
    from ..dataset import canonical_loras

    return canonical_loras([lora.model_dump() for lora in spec.model.loras])


def _check_loras(model, sets: set[str], spec) -> dict[str, str]:
    """Each LoRA the job uses must match the model (unmatched keys are an error naming them).
    Returns {uri: sha256 of the file}."""
    import json

    from ..checkpoints.lora import check_lora, lora_components, read_lora

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
    from ..dataset import _is_glob
    from ..storage import Location

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
    from ..lease import LEASE_FILE

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
    from ..lease import LEASE_FILE

    return [n for n in out.first_names(limit + 2) if not n.startswith(LEASE_FILE)][:limit]


def check_previous(out, spec, previous: dict | None, overwrite: bool) -> list[str]:
    """Same spec: resume. Different spec: refuse unless ``overwrite``. Returns the entries
    ``overwrite`` will remove (only ever ours: ``previous`` is a batchgen job.json)."""
    from ..spec import diff_keys

    if previous is None:
        return []
    differing = diff_keys(previous.get("digest_fields", {}), spec.digest_fields())
    if differing and not overwrite:
        from .. import __version__

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
    from ..images import EXTENSIONS
    from ..manifest import check_images as _check

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
    from ..dataset import derived_id_prefix

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
    from ..manifest import part_locations

    runs = sorted({part_run(loc.name) for loc in part_locations(out)})
    again = images.in_files([i["uri"] for i in scan.identities]) if images is not None else 0
    return {"runs": runs, "done": scan.done_in_input + again, "failed": max(0, scan.failed_in_input - again)}


def part_run(name: str) -> str:
    """The run a manifest part file belongs to: ``part-RUN-SEQ.parquet`` -> ``part-RUN``."""
    return name.rsplit("-", 1)[0]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    from .. import __version__

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

    from ..images import EXTENSIONS
    from ..storage import is_temp_name

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
    from ..manifest import iter_parts, read_manifest

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
                   images=None, controlnet_sha256: dict[str, str] | None = None,
                   condition_sha256: dict[str, str] | None = None,
                   ip_adapter_sha256: dict[str, str] | None = None) -> list[str]:
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
        "controlnet_sha256": {**((keep or {}).get("controlnet_sha256") or {}), **(controlnet_sha256 or {})},
        "condition_sha256": {**((keep or {}).get("condition_sha256") or {}), **(condition_sha256 or {})},
        "ip_adapter_sha256": {**((keep or {}).get("ip_adapter_sha256") or {}), **(ip_adapter_sha256 or {})},
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


__all__ = ["prepare", "check_model", "check_sampler", "check_sampling", "check_output_location", "read_previous",
           "check_previous", "check_inputs", "prepare_output", "resolve", "part_run"]
