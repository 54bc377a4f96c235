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
                   help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output written by a different spec")
    p.add_argument("--max-failures", type=int, default=None, metavar="N",
                   help="abort after more than N failed items (default: 1%% of the items, at least 1)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")


def run_run(args) -> int:
    import ray

    from .runner import TEST_HOOKS_ENV, ensure_ray, run_job
    from .spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.max_failures is not None and args.max_failures < 0:
        raise ValueError(f"--max-failures: expected N >= 0, got {args.max_failures}")
    hooks = json.loads(os.environ[TEST_HOOKS_ENV]) if os.environ.get(TEST_HOOKS_ENV) else None
    started = ensure_ray(args.address, args.num_cpus)
    try:
        result = run_job(spec, overwrite=args.overwrite, max_failures=args.max_failures, hooks=hooks)
    finally:
        if started:
            ray.shutdown()
    print(f"{result.ok}/{result.total} items ok, {result.failed} failed "
          f"({result.rendered_this_run} rendered now, {result.skipped} already done)")
    print(f"images:   {result.output_uri}/images/")
    print(f"manifest: {result.output_uri}/manifest.parquet")
    print(f"summary:  {result.output_uri}/summary.json")
    return 0 if result.all_ok else 1


def configure_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT|JOB_ID",
                   help="a job's output folder or s3:// prefix, or a submission id (with --address)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.add_argument("--address", default=None,
                   help="Ray dashboard URL (http://HEAD:8265): show the state of a submitted job id")


def job_status(output: str, endpoint_url: str | None = None) -> dict:
    """Counts for an output: total (from job.json), done, failed, remaining, parts."""
    from .errors import InputError
    from .manifest import JOB_FILE, committed_state, read_json
    from .storage import Location, StorageConfig

    out = Location.parse(output, StorageConfig(endpoint_url=endpoint_url))
    job_loc = out.join(JOB_FILE)
    if not job_loc.exists():
        raise InputError(f"{out.uri}: no job.json, not a batchgen job output")
    job = read_json(job_loc)
    state = committed_state(out)
    total = int(job.get("total_items", 0))
    return {"output": out.uri, "name": job.get("name"), "total": total, "done": state.done_count,
            "failed": state.failed, "remaining": max(0, total - state.done_count - state.failed),
            "manifest_parts": state.parts, "consolidated": out.join("manifest.parquet").exists()}


def run_status(args) -> int:
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = args.address or (ray_address if ray_address.startswith("http") else None)
    if address and "://" not in args.output and not os.path.exists(args.output):
        from .submit import status_submission

        return status_submission(args.output, address)
    status = job_status(args.output, args.endpoint_url)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"{status['output']} ({status['name']}): {status['done']}/{status['total']} done, "
              f"{status['failed']} failed, {status['remaining']} remaining "
              f"({status['manifest_parts']} manifest parts; consolidated: {status['consolidated']})")
    return 0 if status["done"] == status["total"] else 1


def configure_rerender(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="a job's output folder or s3:// prefix")
    p.add_argument("item_id", metavar="ITEM_ID", help="the item to re-render")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the re-rendered image")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")


def rerender_item(output: str, item_id: str, endpoint_url: str | None = None) -> tuple[bytes, dict]:
    """Render one item alone from its manifest row; returns (image bytes, manifest row)."""
    import hashlib

    import pyarrow.compute as pc

    from .errors import InputError
    from .images import encode_image
    from .manifest import JOB_FILE, image_parameters, iter_parts, read_json, read_manifest
    from .stages import _load_renderer, _read_init_image
    from .storage import Location, StorageConfig

    cfg = StorageConfig(endpoint_url=endpoint_url)
    out = Location.parse(output, cfg)
    if not out.join(JOB_FILE).exists():
        raise InputError(f"{out.uri}: no job.json, not a batchgen job output")
    job = read_json(out.join(JOB_FILE))
    row = None
    table = read_manifest(out)
    tables = [table] if table is not None else [t for _, t in iter_parts(out)]
    for t in tables:
        hit = t.filter(pc.and_(pc.equal(t.column("item_id"), item_id), pc.equal(t.column("status"), "ok")))
        if hit.num_rows:
            row = hit.slice(hit.num_rows - 1, 1).to_pylist()[0]
    if row is None:
        raise InputError(f"{out.uri}: item {item_id!r} has no ok row in the manifest")
    spec = job["spec"]
    hooks = json.loads(os.environ["BATCHGEN_TEST_HOOKS"]) if os.environ.get("BATCHGEN_TEST_HOOKS") else {}
    renderer = _load_renderer(row["model_uri"], spec["model"]["dtype"], cfg, hooks)
    fp = renderer.model_info["fingerprint"]
    if fp != row["model_fingerprint"]:
        print(f"warning: model fingerprint {fp[:12]} differs from the manifest's "
              f"{row['model_fingerprint'][:12]}", file=sys.stderr)
    init = [_read_init_image(row["init_image"], cfg)] if row["init_image"] else None
    arrays = renderer.generate(
        [row["prompt"]], [row["seed"]], negative_prompts=[row["negative_prompt"]], sampler=row["sampler"],
        steps=row["steps"], guidance_scale=row["guidance_scale"], width=row["width"], height=row["height"],
        init_images=init, strength=row["strength"] if row["strength"] is not None else 0.8,
        micro_batch=row["batch_size"], sampler_options=json.loads(row["sampler_options"] or "{}") or None)
    data = encode_image(arrays[0], row["image_format"], spec["output"]["quality"], image_parameters(row))
    row["rerender_sha256"] = hashlib.sha256(data).hexdigest()
    return data, row


def run_rerender(args) -> int:
    import hashlib

    from .storage import Location, StorageConfig

    data, row = rerender_item(args.output, args.item_id, args.endpoint_url)
    Location.parse(args.out).write_bytes(data)
    stored = Location.parse(row["image_uri"], StorageConfig(endpoint_url=args.endpoint_url)).read_bytes()
    same = stored == data and hashlib.sha256(stored).hexdigest() == row["image_sha256"]
    print(f"{args.item_id}: wrote {args.out} ({len(data)} bytes, batch_size {row['batch_size']}); "
          f"{'identical to' if same else 'DIFFERS from'} the stored image {row['image_uri']}")
    return 0 if same else 1
