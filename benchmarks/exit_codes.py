"""Exit codes of many consecutive CLI runs against an S3 job output (moto server on loopback).

Why: nightly CI reads nothing but exit codes, and pyarrow's S3 filesystem used to abort some runs at
interpreter shutdown (``terminate called without an active exception``, SIGABRT, ~3% of ``export``
runs). This runs ``export`` / ``compare`` / ``status`` in rotation as separate processes, each of
which should exit 0, and prints how often each exit code came back per command.

    python benchmarks/exit_codes.py [--runs 200] [--json]

Exit code 0 only when every run exited 0.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("export", "compare", "status")
TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/batchgen-aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/batchgen-aws-credentials"}


def write_s3_job_output(endpoint: str, bucket: str, prefix: str, items: int = 4) -> None:
    """A finished job output in the runner's layout: images/, one manifest part, manifest.parquet,
    job.json, written straight to S3 with boto3."""
    import boto3
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from batchgen.manifest import MANIFEST_SCHEMA, to_manifest_table

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=TEST_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=TEST_ENV["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=bucket)
    rows = []
    for n in range(items):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(n).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        data = buf.getvalue()
        item_id = f"item-{n:02d}"
        key = f"{prefix}/images/{item_id}.png"
        client.put_object(Bucket=bucket, Key=key, Body=data)
        rows.append({"item_id": item_id, "prompt": f"prompt {n}", "seed": n, "status": "ok", "attempt": 1,
                     "image_uri": f"s3://{bucket}/{key}", "image_format": "png",
                     "image_sha256": hashlib.sha256(data).hexdigest(), "image_bytes": len(data),
                     "source_file": "prompts.parquet", "source_row": n})
    columns = {f.name: [r.get(f.name) for r in rows] for f in MANIFEST_SCHEMA}
    sink = io.BytesIO()
    pq.write_table(to_manifest_table(columns), sink)
    for key in ("manifest.parquet", "manifest/part-20250101T000000-00000000-000000.parquet"):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=sink.getvalue())
    job = {"name": "exit-codes", "total_items": items, "inputs": [],
           "counted_at_start": {"runs": [], "done": 0, "failed": 0}}
    client.put_object(Bucket=bucket, Key=f"{prefix}/job.json", Body=json.dumps(job).encode())


def argv_for(command: str, bucket: str, endpoint: str) -> list[str]:
    out = f"s3://{bucket}/out"
    if command == "export":
        return ["export", out, "--format", "webdataset", "--to", f"s3://{bucket}/export", "--overwrite",
                "--endpoint-url", endpoint]
    if command == "compare":
        return ["compare", out, out, "--endpoint-url", endpoint]
    return ["status", out, "--endpoint-url", endpoint]


def run(runs: int, progress=None) -> dict:
    """Start a moto server, write an output, run ``runs`` CLI commands; counts per command and code."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = "exit-codes"
        write_s3_job_output(endpoint, bucket, "out")
        env = {k: v for k, v in os.environ.items() if k not in (
            "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
        env.update(TEST_ENV, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        counts: dict[str, collections.Counter] = {c: collections.Counter() for c in COMMANDS}
        failures: list[dict] = []
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as cwd:
            for i in range(runs):
                command = COMMANDS[i % len(COMMANDS)]
                proc = subprocess.run([sys.executable, "-m", "batchgen.cli", *argv_for(command, bucket, endpoint)],
                                      cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
                counts[command][proc.returncode] += 1
                if proc.returncode != 0 and len(failures) < 5:
                    failures.append({"run": i, "command": command, "code": proc.returncode,
                                     "stderr": proc.stderr[-600:]})
                if progress is not None:
                    progress(i + 1, runs)
        return {"runs": runs, "seconds": round(time.monotonic() - t0, 1),
                "exit_codes": {c: {str(k): v for k, v in sorted(n.items())} for c, n in counts.items()},
                "failures": failures}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="CLI runs in all, rotating export/compare/status")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    def progress(done: int, total: int) -> None:
        if not args.json and (done % 20 == 0 or done == total):
            print(f"{done}/{total} runs", file=sys.stderr, flush=True)

    result = run(args.runs, progress)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['runs']} runs in {result['seconds']} s")
        for command, codes in result["exit_codes"].items():
            print(f"  {command:8s} " + ", ".join(f"exit {k}: {v}" for k, v in codes.items()))
        for f in result["failures"]:
            print(f"  run {f['run']} ({f['command']}) exited {f['code']}: {f['stderr'].strip()[-300:]}")
    ok = all(set(codes) == {"0"} for codes in result["exit_codes"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
