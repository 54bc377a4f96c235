"""`batchgen run | status | rerender`: the job subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys


def configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="JOB.yaml", help="job spec (see the README's jobs section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set sampling.steps=20 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, HOST:PORT (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing batchgen output (only what its job.json proves is ours)")
    p.add_argument("--max-failures", type=int, default=None, metavar="N",
                   help="abort after more than N failed items (default: 1%% of the items, at least 1)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--verify", action="store_true",
                   help="resuming, also check every finished image's size and sha256 against the manifest and "
                        "render again what differs (without it only missing images are rendered again)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (default: the spec's storage.endpoint_url, else AWS_ENDPOINT_URL)")


def spec_overrides(args) -> list[str]:
    """The command line's spec overrides (kept here for callers; see :func:`batchgen.spec.spec_overrides`)."""
    from .spec import spec_overrides as overrides

    return overrides(args)


def run_run(args) -> int:
    from .job.run import execute, prepare
    from .ray_session import check_address, ensure_ray, shutdown_ray
    from .spec import load_spec

    verbose = bool(getattr(args, "verbose", False))
    if args.max_failures is not None and args.max_failures < 0:
        raise ValueError(f"--max-failures: expected N >= 0, got {args.max_failures}")
    spec = load_spec(args.spec, spec_overrides(args))
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address)  # an unreachable cluster fails now, not after a long retry
    plan = prepare(spec, overwrite=args.overwrite, max_failures=args.max_failures,
                   verify=args.verify)  # what --overwrite removed is logged there, once
    started = False
    try:
        if plan.todo > 0:
            started = ensure_ray(address, args.num_cpus, verbose=verbose)
        result = execute(plan, progress_bar=None if not verbose else False, verbose=verbose)
    finally:
        plan.release()
        if started:
            shutdown_ray()
    print(f"{result.ok}/{result.total} items ok, {result.failed} failed "
          f"({result.rendered_this_run} rendered now, {result.skipped} already done)")
    _print_failures(result.summary.get("failures") or {}, result.failed)
    removed = result.summary.get("removed_inputs") or []
    if removed:
        print(f"note: {len(removed)} input file(s) of earlier runs are gone; their "
              f"{result.summary.get('not_in_input', 0)} items stay in the manifest but are not counted")
    print(f"images:   {result.output_uri}/images/")
    print(f"manifest: {result.output_uri}/manifest.parquet")
    print(f"summary:  {result.output_uri}/summary.json")
    return 0 if result.all_ok else 1


def _print_failures(failures: dict, failed: int, out=None) -> None:
    out = out or sys.stdout
    if not failed or not failures.get("count"):
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in failures.get("by_kind", {}).items())
    print(f"failed items by kind: {kinds}", file=out)
    first = failures.get("first") or []
    for f in first[:10]:
        err = f.get("error") or ""
        print(f"  {f.get('item_id')}: {err if len(err) <= 200 else err[:197] + '...'}", file=out)
    if failures["count"] > min(10, len(first)):
        print(f"  ... {failures['count'] - min(10, len(first))} more (status='failed' in the manifest)", file=out)


def configure_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT|JOB_ID",
                   help="a job's output folder or s3:// prefix, or a submission id (with --address)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.add_argument("--address", default=None,
                   help="Ray dashboard URL (http://HEAD:8265): show the state of a submitted job id")
    p.add_argument("--verify", action="store_true",
                   help="check every finished item's image: present, and its size and sha256 as the manifest "
                        "records (exit 1 when any is missing or wrong; `batchgen run --verify` renders them again)")


def job_status(output: str, endpoint_url: str | None = None, verify: bool = False) -> dict:
    """Counts for an output, from job.json and the manifest parts: total, done, failed, remaining
    (items of the current input only, never more than the total), items the manifest holds that
    are no longer in the input, the input files that are gone, the failures by kind with the
    first ones, parts.

    The counts are exact without reading the input: job.json records, at the start of the last
    run, which runs' parts existed and how many of the input's items they hold as done / failed
    (``counted_at_start``); every part written since comes from that input. An older job.json
    without that record is counted by source file, capped at the total. The failure listing
    covers the recorded input files that are still there. With ``verify``, ``images`` says how
    many finished items' images are missing or differ from the manifest (size, sha256)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .errors import InputError
    from .job.preflight import part_run
    from .manifest import JOB_FILE, FailureSummary, part_locations, read_json, read_part
    from .storage import Location, StorageConfig

    out = Location.parse(output, StorageConfig(endpoint_url=endpoint_url))
    job_loc = out.join(JOB_FILE)
    if not job_loc.exists():
        raise InputError(f"{out.uri}: no job.json, not a batchgen job output")
    job = read_json(job_loc)
    recorded = [i for i in job.get("inputs") or [] if isinstance(i, dict)]
    inputs = [i.get("uri") for i in recorded if not i.get("removed")]
    removed = [i.get("uri") for i in recorded if i.get("removed")]
    at_start = job.get("counted_at_start")
    earlier_runs = set(at_start.get("runs") or []) if isinstance(at_start, dict) else None
    columns = ["item_id", "status", "attempt", "source_file", "error"]
    before, since = [], []  # parts of the runs counted at the start, parts written after
    for loc in part_locations(out):
        table = read_part(loc, columns)
        if table is not None:
            (before if earlier_runs is not None and part_run(loc.name) in earlier_runs else since).append(table)
    parts = len(before) + len(since)
    total = int(job.get("total_items", 0))
    empty = pa.table({c: pa.array([], pa.int32() if c == "attempt" else pa.string()) for c in columns})
    old = pa.concat_tables(before) if before else empty
    new = pa.concat_tables(since) if since else empty
    if earlier_runs is not None:
        done, failed, outside = _count_since_start(old, new, int(at_start.get("done", 0)),
                                                   int(at_start.get("failed", 0)))
    else:
        done, failed, outside = _count_by_source_file(new, inputs)
    done = min(done, total)
    failed = min(failed, total - done)
    failures = FailureSummary()
    table = pa.concat_tables([old, new])
    if table.num_rows:  # the latest attempt of each item of a current input file that never succeeded
        if inputs:
            table = table.filter(pc.is_in(table.column("source_file"), value_set=pa.array(inputs, pa.string())))
        ok_ids = pc.unique(table.filter(pc.equal(table.column("status"), "ok")).column("item_id"))
        bad = table.filter(pc.invert(pc.is_in(table.column("item_id"), value_set=ok_ids)))
        if bad.num_rows:
            latest = bad.sort_by([("item_id", "ascending"), ("attempt", "descending")])
            ids = latest.column("item_id").to_pylist()
            failures.add(latest.filter(pa.array([i == 0 or ids[i] != ids[i - 1] for i in range(len(ids))])))
    status = {"output": out.uri, "name": job.get("name"), "total": total, "done": done,
              "failed": failed, "remaining": max(0, total - done - failed), "not_in_input": outside,
              "removed_inputs": removed, "failures": failures.as_dict(), "manifest_parts": parts,
              "consolidated": out.join("manifest.parquet").exists()}
    if verify:
        from .images import EXTENSIONS
        from .manifest import check_images

        fmt = ((job.get("spec") or {}).get("output") or {}).get("format") or "png"
        ok_ids = _ids(table, True) if table.num_rows else pa.array([], pa.string())
        status["images"] = check_images(out, ok_ids, EXTENSIONS.get(fmt, fmt), verify=True).as_dict()
    return status


def _ids(table, ok: bool | None = None):
    import pyarrow.compute as pc

    if ok is not None:
        is_ok = pc.equal(table.column("status"), "ok")
        table = table.filter(is_ok if ok else pc.invert(is_ok))
    return pc.unique(table.column("item_id"))


def _count_since_start(old, new, done_at_start: int, failed_at_start: int) -> tuple[int, int, int]:
    """(done, failed, not in the input) from the counts at the run's start (``old``: the parts
    then) and the parts written since (``new``: only items of the input)."""
    import pyarrow.compute as pc

    def size(values, keep_mask=None) -> int:
        return len(values) if keep_mask is None else int(pc.sum(pc.cast(keep_mask, "int64")).as_py() or 0)

    ok_old, ok_new, ids_old, ids_new = _ids(old, True), _ids(new, True), _ids(old), _ids(new)
    failed_only_old = ids_old.filter(pc.invert(pc.is_in(ids_old, value_set=ok_old)))
    done = done_at_start + size(ok_new, pc.invert(pc.is_in(ok_new, value_set=ok_old)))
    recovered = size(failed_only_old, pc.is_in(failed_only_old, value_set=ok_new))
    failing_new = ids_new.filter(pc.invert(pc.is_in(ids_new, value_set=ok_new)))
    newly_failed = size(failing_new, pc.invert(pc.is_in(failing_new, value_set=ids_old)))
    failed = failed_at_start - recovered + newly_failed
    outside = max(0, len(ids_old) - done_at_start - failed_at_start)
    return done, failed, outside


def _count_by_source_file(table, inputs: list) -> tuple[int, int, int]:
    """(done, failed, not in the input) counting the rows of the recorded input files (a job.json
    of an older batchgen: ids that left an id_column file are still counted; the caller caps)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    outside = 0
    if inputs and table.num_rows:
        inside = pc.is_in(table.column("source_file"), value_set=pa.array(inputs, pa.string()))
        outside = len(_ids(table.filter(pc.invert(inside))))
        table = table.filter(inside)
    ok = _ids(table, True)
    ids = _ids(table)
    return len(ok), int(pc.sum(pc.cast(pc.invert(pc.is_in(ids, value_set=ok)), "int64")).as_py() or 0), outside


def run_status(args) -> int:
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = args.address or (ray_address if ray_address.startswith("http") else None)
    if address and "://" not in args.output and not os.path.exists(args.output):
        from .submit import status_submission

        return status_submission(args.output, address)
    status = job_status(args.output, args.endpoint_url, verify=args.verify)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        extra = f", {status['not_in_input']} no longer in the input" if status["not_in_input"] else ""
        print(f"{status['output']} ({status['name']}): {status['done']}/{status['total']} done, "
              f"{status['failed']} failed, {status['remaining']} remaining{extra} "
              f"({status['manifest_parts']} manifest parts; consolidated: {status['consolidated']})")
        if status["removed_inputs"]:
            print("removed input files (their items stay in the manifest, not counted): "
                  + ", ".join(str(uri) for uri in status["removed_inputs"]))
        _print_failures(status["failures"], status["failed"])
        images = status.get("images")
        if images is not None:
            print(f"images: {images['missing']} missing, {images['wrong']} not as the manifest records"
                  + "".join(f"\n  {line}" for line in images["first"])
                  + ("\n  (`batchgen run --verify` with the job's spec renders them again)"
                     if images["missing"] or images["wrong"] else ""))
    bad_images = bool(status.get("images") and (status["images"]["missing"] or status["images"]["wrong"]))
    return 0 if status["done"] == status["total"] and not bad_images else 1


def configure_rerender(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="a job's output folder or s3:// prefix")
    p.add_argument("item_id", metavar="ITEM_ID", help="the item to re-render")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the re-rendered image")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")


def rerender_item(output: str, item_id: str, endpoint_url: str | None = None) -> tuple[bytes, dict]:
    """Render one item alone from its manifest row; returns (image bytes, manifest row)."""
    import hashlib

    from .images import encode_image
    from .manifest import image_parameters
    from .outputs import Output
    from .job.conditioning import condition_kwargs, load_conditions, recorded_digests
    from .job.stages import apply_render_env, env_differences, generate_kwargs, load_renderer, render_env
    from .storage import StorageConfig

    cfg = StorageConfig(endpoint_url=endpoint_url)
    out = Output.at(output, cfg)
    job = out.job  # InputError when the folder is not a batchgen output
    row = out.find_row(item_id)  # the item's ok row: manifest.parquet, else the committed parts
    import torch


    spec = job["spec"]
    # Reproduce the item's numeric environment: its device, dtype, torch thread count and switches.
    recorded = json.loads(row.get("render_env") or "null") or {}
    threads = recorded.get("torch_threads") or spec.get("compute", {}).get("torch_threads") or 1
    device, dtype = None, spec["model"]["dtype"]
    if recorded.get("device") == "cpu" or (recorded.get("device") == "cuda" and torch.cuda.is_available()):
        device, dtype = recorded["device"], recorded.get("dtype") or dtype
    elif recorded.get("device") == "cuda":  # a GPU job re-rendered without a GPU: float32 on the CPU
        device, dtype = "cpu", "float32"  # (named below as differences; the bytes will differ)
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.get_float32_matmul_precision())
    try:
        apply_render_env({**recorded, "torch_threads": threads})
        model = {**spec["model"], "uri": row["model_uri"]}
        model["loras"] = [{"uri": x["uri"], "scale": x["scale"]} for x in json.loads(row.get("loras") or "[]")]
        compute = spec.get("compute", {})
        renderer = load_renderer(model, dtype, cfg, threads, device=device,
                                 compile=compute.get("compile", "none"),
                                 deterministic=bool(compute.get("deterministic")))
        differences = env_differences(recorded, render_env(renderer)) if recorded else {}
        row["render_env_differences"] = differences
        if differences:
            what = ", ".join(f"{k} {a!r} (job) vs {b!r} (here)" for k, a, b in
                             ((k, v[0], v[1]) for k, v in differences.items()))
            print(f"warning: cannot reproduce the item's render environment exactly: {what}; the bytes may differ",
                  file=sys.stderr)
        fp = renderer.model_info["fingerprint"]
        if fp != row["model_fingerprint"]:
            print(f"warning: model fingerprint {fp[:12]} differs from the manifest's "
                  f"{row['model_fingerprint'][:12]}", file=sys.stderr)
        limit = spec.get("input", {}).get("max_init_image_pixels")
        # the item's conditioning files, read and prepared as the worker did; bytes other than the
        # manifest's sha256 are refused, naming the file
        nets = len(renderer.model_info.get("controlnets") or [])
        got = load_conditions(row, cfg, limit, recorded_digests(row), nets)
        kwargs = {**generate_kwargs([row], row.get("model_family")), **condition_kwargs(row, [got])}
        arrays = renderer.generate(
            [row["prompt"]], [row["seed"]], sampler=row["sampler"], micro_batch=row["batch_size"],
            sampler_options=json.loads(row["sampler_options"] or "{}") or None, item_ids=[row["item_id"]],
            progress=False, **kwargs)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.set_float32_matmul_precision(saved[2])
    data = encode_image(arrays[0], row["image_format"], spec["output"]["quality"], image_parameters(row))
    row["rerender_sha256"] = hashlib.sha256(data).hexdigest()
    return data, row


def run_rerender(args) -> int:
    import hashlib

    from .outputs import Output
    from .storage import Location, StorageConfig

    data, row = rerender_item(args.output, args.item_id, args.endpoint_url)
    Location.parse(args.out).write_bytes(data)
    cfg = StorageConfig(endpoint_url=args.endpoint_url)
    stored = Output.at(args.output, cfg).read_image_bytes(row, verify=False)  # its own images/ (a copied output too)
    same = stored == data and hashlib.sha256(stored).hexdigest() == row["image_sha256"]
    print(f"{args.item_id}: wrote {args.out} ({len(data)} bytes, batch_size {row['batch_size']}); "
          f"{'identical to' if same else 'DIFFERS from'} the stored image {row['image_uri']}")
    return 0 if same else 1
