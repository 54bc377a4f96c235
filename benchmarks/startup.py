"""Start-up cost of `batchgen run`, as a user meets it (issue 19, item 14). Three figures:

1. bad input reported: a demo-like job whose input has one bad row (steps -1 in row 5), from the
   command's start to its exit with code 2 (target < 2 s). Nothing but pre-flight runs.
2. demo's first image: `batchgen run jobs/demo.yaml` into a new output, from the command's start
   until the first image file appears in ``images/`` (target < 10 s); its total wall time too.
3. nightly example: jobs/nightly.yaml once per sampler (ddim, euler_a, dpmpp_2m: 3 x 24 images,
   as jobs/nightly.sh renders them), total wall time of the three runs (target < 45 s on 2 cores).

Each command runs as its own process (the installed ``batchgen`` entry point of this Python), with
a private RAY_TMPDIR and outputs in a temp folder removed afterwards. The built-in tiny models are
built once into the user cache (``BATCHGEN_CACHE``) before timing, as after a first run.

    python benchmarks/startup.py [--skip-nightly] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = ("ddim", "euler_a", "dpmpp_2m")


def batchgen(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from batchgen.cli import main; sys.exit(main())", *args]


def env(ray_tmp: str) -> dict[str, str]:
    out = dict(os.environ)
    out.pop("RAY_ADDRESS", None)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH")) if p)
    out.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    return out


def bad_input(tmp: Path, ray_tmp: str) -> float:
    table = pq.read_table(REPO / "jobs/prompts/demo.parquet")
    steps = pa.array([10] * 5 + [-1] + [10] * (table.num_rows - 6), pa.int32())
    pq.write_table(table.append_column("steps", steps), tmp / "bad.parquet")
    spec = yaml.safe_load((REPO / "jobs/demo.yaml").read_text())
    spec["input"]["uri"] = str(tmp / "bad.parquet")
    spec["output"]["uri"] = str(tmp / "bad-out")
    (tmp / "bad.yaml").write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    proc = subprocess.run(batchgen("run", str(tmp / "bad.yaml")), cwd=REPO, env=env(ray_tmp),
                          capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 2 or "row 5" not in proc.stderr:
        raise SystemExit(f"bad input: expected exit 2 naming row 5, got {proc.returncode}: {proc.stderr[-2000:]}")
    return took


def first_image(tmp: Path, ray_tmp: str) -> tuple[float, float]:
    out = tmp / "demo"
    start = time.perf_counter()
    proc = subprocess.Popen(batchgen("run", "jobs/demo.yaml", "--set", f"output.uri={out}"), cwd=REPO,
                            env=env(ray_tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and (out / "images").is_dir() and any((out / "images").iterdir()):
            first = time.perf_counter() - start
        time.sleep(0.02)
    total = time.perf_counter() - start
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"demo: exit {proc.returncode}: {err[-2000:]}")
    return (first if first is not None else total), total


def nightly(tmp: Path, ray_tmp: str) -> tuple[float, list[float]]:
    each = []
    for sampler in SAMPLERS:
        start = time.perf_counter()
        proc = subprocess.run(batchgen("run", "jobs/nightly.yaml", "--overwrite", "--set", f"sampling.sampler={sampler}",
                                       "--set", f"output.uri={tmp / 'nightly' / sampler}"),
                              cwd=REPO, env=env(ray_tmp), capture_output=True, text=True)
        each.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"nightly {sampler}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return sum(each), each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-nightly", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="repeat each measurement, report the best")
    args = parser.parse_args()
    try:
        from batchgen.builtin import builtin_model_path
    except ImportError:  # batchgen before the builtin module (to measure an older checkout)
        from batchgen.tiny import builtin_model_path

    builtin_model_path("tiny")  # a cached build, as after the first run on a machine
    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}")
    tmp = Path(tempfile.mkdtemp(prefix="bg-startup-"))
    ray_tmp = tempfile.mkdtemp(prefix="bgr-")
    try:
        bad = min(bad_input(tmp, ray_tmp) for _ in range(args.repeat))
        print(f"bad input reported (exit 2):  {bad:6.2f} s   (target < 2 s)")
        demo = []
        for _ in range(args.repeat):
            shutil.rmtree(tmp / "demo", ignore_errors=True)
            demo.append(first_image(tmp, ray_tmp))
        first, total = min(demo)
        print(f"demo: first image:            {first:6.2f} s   (target < 10 s; whole run {total:.2f} s)")
        if not args.skip_nightly:
            total, each = min(nightly(tmp, ray_tmp) for _ in range(args.repeat))
            print(f"nightly (3 x 24 images):      {total:6.2f} s   (target < 45 s; "
                  + ", ".join(f"{s} {t:.1f} s" for s, t in zip(SAMPLERS, each)) + ")")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
