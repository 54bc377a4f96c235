"""Job-system overhead, in one run:

1. images/s of a full job (Ray Data, one CPU actor, encode + store + manifest) vs a bare
   ``pipe.generate`` loop over the same items and micro-batch, tiny model (target: job >= 0.9x bare).
   The job figure is taken over its render stream, which includes the actor's start-up.
2. control plane with ``builtin:null`` (seeded noise, no weights) over N input rows (default
   1,000,000): rows/s and the driver's peak RSS (target < 1 GB). By default (``--store skip``)
   images are not encoded or stored: this benchmark replaces the job's EncodeAndStore stage with a
   subclass whose ``encode_and_put`` returns the raw pixels (batchgen itself has no such switch),
   so it measures read, validation, resume filter, actor pool, manifest parts and consolidation;
   ``--store write`` keeps the real stage. ``--part-rows`` sets the rows per manifest part
   (patched into the job's module constant; default: the product's, ``PART_MAX_ROWS``).
3. batch invariance: the same items rendered at micro-batch 1, 2, 4, 8: how many stay identical.

    python benchmarks/job_overhead.py [--items 48] [--rows 1000000] [--skip-control-plane]
        [--store skip|write] [--part-rows N]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bare_vs_job(tmp: Path, items: int, size: int, steps: int, batch: int, per_call: int) -> None:
    import ray
    import torch

    from batchgen import load_pipeline
    from batchgen.job.run import run_job
    from batchgen.spec import spec_from_dict

    prompts = [f"a lighthouse number {i}" for i in range(items)]
    pq.write_table(pa.table({"prompt": prompts, "seed": pa.array(range(items), pa.int64())}), tmp / "p.parquet")
    torch.set_num_threads(1)  # the job's CPU actors render with one thread each
    pipe = load_pipeline("builtin:tiny")
    pipe.generate(prompts[:batch], list(range(batch)), steps=steps, width=size, height=size, micro_batch=batch)
    start = time.perf_counter()
    for i in range(0, items, batch * per_call):
        chunk = slice(i, i + batch * per_call)
        pipe.generate(prompts[chunk], list(range(items))[chunk], steps=steps, width=size, height=size,
                      micro_batch=batch)
    bare = items / (time.perf_counter() - start)
    spec = spec_from_dict({
        "input": {"uri": str(tmp / "p.parquet")}, "model": {"uri": "builtin:tiny"},
        "sampling": {"steps": steps, "width": size, "height": size},
        "output": {"uri": str(tmp / "job")},
        "compute": {"batch_size": batch, "batches_per_call": per_call, "gpus_per_worker": 0,
                    "min_workers": 1, "max_workers": 1},
    })
    summary = run_job(spec, overwrite=True).summary
    job = summary["images_per_s"]
    steady = summary["steady_images_per_s"]
    warm = (f"{steady:.2f} img/s ({steady / bare:.2f}x bare)" if steady is not None
            else "n/a (every result arrived in the first batch: use more --items)")
    print(f"[1] {items} items {size}x{size}, {steps} steps, micro-batch {batch}: bare generate loop "
          f"{bare:.2f} img/s; full job {job:.2f} img/s ({job / bare:.2f}x bare, actor start-up included); "
          f"job after its first result (warm actor) {warm}; job timings {summary['timings_s']}")
    del ray


def _no_store_stage():
    """EncodeAndStore that keeps the raw pixels in memory instead of encoding and writing them.
    Defined in a function so that Ray's workers receive the class by value."""
    from batchgen.job.stages import EncodeAndStore

    class EncodeAndStore(EncodeAndStore):  # noqa: F811 - same name in Ray's stage labels
        def encode_and_put(self, arr, row, loc) -> bytes:
            return arr.tobytes()

    return EncodeAndStore


def control_plane(tmp: Path, rows: int, store: str = "skip", part_rows: int | None = None) -> None:
    import batchgen.job.commit
    import batchgen.job.stages
    from batchgen.job.run import run_job
    from batchgen.spec import spec_from_dict

    if part_rows:
        batchgen.job.commit.PART_MAX_ROWS = part_rows
    part_rows = batchgen.job.commit.PART_MAX_ROWS
    if store == "skip":
        batchgen.job.stages.EncodeAndStore = _no_store_stage()

    inp = tmp / "million"
    inp.mkdir(exist_ok=True)
    per_file = 250_000
    for f in range(0, rows, per_file):
        n = min(per_file, rows - f)
        pq.write_table(pa.table({"prompt": [f"prompt number {i} of the control plane run" for i in range(f, f + n)]}),
                       inp / f"part-{f // per_file:03d}.parquet", row_group_size=32_768)
    rss_before = peak_rss_mb()
    spec = spec_from_dict({
        "input": {"uri": str(inp)}, "model": {"uri": "builtin:null"}, "sampling": {"width": 8, "height": 8, "steps": 1},
        "output": {"uri": str(tmp / "cp")},
        "compute": {"batch_size": 256, "batches_per_call": 16, "gpus_per_worker": 0, "min_workers": 1,
                    "max_workers": 2},
    })
    start = time.perf_counter()
    result = run_job(spec, overwrite=True)
    wall = time.perf_counter() - start
    print(f"[2] control plane, builtin:null, store {store}, parts of {part_rows} rows, {rows} rows: {rows / wall:,.0f} rows/s end to end "
          f"({wall:.1f} s; {result.ok} ok); driver peak RSS {peak_rss_mb():.0f} MB "
          f"(before the job {rss_before:.0f} MB); timings {result.summary['timings_s']}")


def batch_invariance(items: int = 8, size: int = 64, steps: int = 4) -> None:
    import hashlib

    import torch

    from batchgen import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline("builtin:tiny")
    prompts = [f"a red bicycle {i}" for i in range(items)]
    digests = {}
    for b in (1, 2, 4, 8):
        out = pipe.generate(prompts, list(range(items)), steps=steps, width=size, height=size, micro_batch=b)
        digests[b] = [hashlib.sha256(a.tobytes()).hexdigest() for a in out]
    for b in (1, 2, 4):
        same = sum(x == y for x, y in zip(digests[b], digests[8]))
        print(f"[3] micro-batch {b} vs 8: {same}/{items} items identical (pixels)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--skip-control-plane", action="store_true")
    parser.add_argument("--store", choices=["skip", "write"], default="skip",
                        help="control plane: skip encoding and storing images (default) or write them")
    parser.add_argument("--part-rows", type=int, default=0,
                        help="control plane: rows per manifest part (default: the product's)")
    parser.add_argument("--part", choices=["job", "control", "invariance"], default=None,
                        help="run one part in this process (default: each part in its own process)")
    args = parser.parse_args()
    if args.part is None:  # fresh processes, so the control plane's peak RSS is its own
        import subprocess
        import sys

        parts = ["job", "invariance"] + ([] if args.skip_control_plane else ["control"])
        for part in parts:
            subprocess.run([sys.executable, __file__, "--part", part, "--items", str(args.items),
                            "--size", str(args.size), "--steps", str(args.steps), "--batch", str(args.batch),
                            "--rows", str(args.rows), "--store", args.store, "--part-rows", str(args.part_rows)],
                           check=True)
        return
    logging.basicConfig(level=logging.WARNING)
    if args.part == "invariance":
        batch_invariance()
        return
    with tempfile.TemporaryDirectory(prefix="batchgen-bench-") as tmp:
        if args.part == "job":
            os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
            import ray

            ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
            bare_vs_job(Path(tmp), args.items, args.size, args.steps, args.batch, per_call=2)
            ray.shutdown()
        else:  # the job starts (and stops) its private local Ray, as a user's run does
            control_plane(Path(tmp), args.rows, args.store, args.part_rows)


if __name__ == "__main__":
    main()
