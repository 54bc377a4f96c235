"""`batchgen submit JOB.yaml --address http://HEAD:8265 [--wait]`: run a job on a remote Ray cluster.

Submits through the Ray Jobs API (``JobSubmissionClient``). The entrypoint on the cluster is
``python -m batchgen.cli run job.yaml``; the driver runs on the head and joins the cluster through
the ``RAY_ADDRESS`` the Jobs API sets.

What travels with the job (the runtime_env's ``working_dir``, a staging folder built here):

- ``job.yaml``: the spec with ``--set`` overrides applied, validated here first.
- ``inputs/``: the prompt Parquet files when ``input.uri`` is local (same relative paths, so the
  item ids are the same as a local run). ``--no-ship-inputs`` keeps the path as is (shared disk).
  s3:// inputs are read by the cluster directly.
- Nothing else. A local ``model.uri`` is not uploaded (weights are GBs): it must exist at that
  absolute path on every node (shared disk or baked into the image) — or use s3:// / builtin:tiny.
  A local ``output.uri`` is made absolute; on a multi-node cluster each node would write to its own
  disk, so use s3:// there. Init images named in the input rows must be reachable from the cluster.
- This checkout's ``batchgen`` package (``py_modules``) when the cluster cannot import the same
  one: before submitting, a probe job (a second of ``python -c``) reports the batchgen version and
  a digest of its source files as the cluster's Python sees them, and the torch / ray versions.
  Without batchgen, or with different sources, the package ships automatically (a note says so);
  without torch or ray the submit fails with exit 2 instead of a job that dies on the cluster.
  ``--ship-code`` always ships, ``--no-ship-code`` never does (the probe then only warns) and
  ``--no-check`` skips the probe.
- Environment: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` / ``AWS_DEFAULT_REGION``
  when set here (not secrets; both endpoint variables, so the cluster resolves the endpoint as this
  machine does). Credentials are never sent: cluster nodes use their own AWS chain (instance role,
  Kubernetes secret). ``--env KEY=VALUE`` adds variables explicitly (they are visible in the
  dashboard), so it refuses AWS credential variables and any value holding a URL with
  ``user:password@``; an endpoint variable must be a plain ``http(s)://host[:port]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BatchgenError, InputError

FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_USERINFO_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s]*@")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(BatchgenError):
    """The cluster's job server cannot be reached, or refused or lost the job."""


@dataclass
class Submission:
    """Everything needed to submit one job: staging folder, entrypoint, runtime_env."""

    staging_dir: Path
    entrypoint: str
    runtime_env: dict
    spec: object
    shipped_inputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- preparing


def _is_local(uri: str) -> bool:
    return not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().resolve()


def dashboard_address(address: str | None) -> str:
    """Normalize ``--address`` (or ``RAY_ADDRESS``) to the dashboard's http(s) URL."""
    address = address or os.environ.get("RAY_ADDRESS") or ""
    address = address.strip()
    if not address:
        raise ValueError("--address is required: the Ray dashboard URL, e.g. http://HEAD:8265")
    if address.startswith("ray://"):
        raise ValueError(f"--address {address!r}: the Jobs API needs the dashboard URL (http://HEAD:8265), "
                         "not a ray:// client address")
    if not re.match(r"^https?://", address):
        address = "http://" + address
    return address.rstrip("/")


def _parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for i, item in enumerate(items or []):
        key, sep, value = item.partition("=")
        if not sep:  # the argument is not echoed: it may be a pasted secret
            raise ValueError(f"--env argument {i + 1}: expected KEY=VALUE, got no '='")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ValueError(f"--env {key[:60]!r}=...: expected KEY=VALUE with KEY a variable name "
                             "(letters, digits, '_')")
        env[key] = value
    return env


def _job_env(extra_env: dict[str, str] | None) -> dict[str, str]:
    """The job's env_vars: the endpoint / region variables set here, then ``--env``; refuses
    anything that would put a credential in the job's environment (shown by the dashboard and
    ``ray job`` commands). Messages name the variable, never its value."""
    from .storage import ENDPOINT_ENV, check_endpoint_url, redact_userinfo

    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    extra = dict(extra_env or {})
    hint = ("credentials are never sent with a job (its environment is visible in the Ray dashboard): "
            "provide them on the cluster nodes (for AWS: an instance role, a Kubernetes secret, ~/.aws)")
    for key, value in extra.items():
        if key in CREDENTIAL_ENV:
            raise InputError(f"--env {key}: {hint}")
        if key not in ENDPOINT_ENV and _USERINFO_URL.search(value):
            raise InputError(f"--env {key}: the value holds a URL with user:password@; {hint}")
    env = {**forwarded, **extra}
    for key in ENDPOINT_ENV:
        value = env.get(key)
        if not value:
            continue
        source = f"--env {key}" if key in extra else key
        if "@" in value:
            raise InputError(f"{source} contains user:password@ (got {redact_userinfo(value)!r}); it would be sent "
                             "to the cluster in the job's environment (visible in the dashboard): put credentials "
                             "in the AWS chain instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, "
                             "roles on the nodes)")
        try:
            check_endpoint_url(value, source)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    return env


def _ship_inputs(uri: str, staging: Path, storage_cfg) -> tuple[str, list[str]]:
    """Copy the local input Parquet files under ``staging/inputs`` keeping their relative paths."""
    from .dataset import list_input_files

    files = list_input_files(uri, storage_cfg)
    dest_root = staging / "inputs"
    for f in files:
        dest = dest_root / f.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_local_path(f.uri), dest)
    pattern = None
    if any(ch in uri for ch in "*?["):
        cut = min(uri.index(ch) for ch in "*?[" if ch in uri)
        pattern = uri[uri.rfind("/", 0, cut) + 1:]
    local = _local_path(uri) if pattern is None else None
    if pattern is not None:
        new_uri = f"inputs/{pattern}"
    elif local is not None and local.is_file():
        new_uri = f"inputs/{files[0].rel}"
    else:
        new_uri = "inputs"
    return new_uri, [f.rel for f in files]


def prepare_submission(spec_path: str | Path, overrides: list[str] | None = None, *,
                       ship_inputs: bool = True, ship_code: bool = False,
                       extra_env: dict[str, str] | None = None, run_args: list[str] | None = None,
                       max_upload_mb: float = 100.0, staging_dir: str | Path | None = None) -> Submission:
    """Validate the spec and build the staging folder and runtime_env for the Jobs API."""
    import yaml

    from .spec import apply_overrides, read_spec_file, spec_from_dict
    from .storage import StorageConfig

    spec_path = Path(spec_path)
    raw = read_spec_file(spec_path)
    if not isinstance(raw, dict):
        raise InputError(f"{spec_path}: a job spec must be a YAML mapping")
    origins: dict[str, str] = {}
    raw = apply_overrides(raw, overrides or [], origins)
    spec = spec_from_dict(raw, str(spec_path), origins)  # fail here, not on the cluster
    env = _job_env(extra_env)

    staging = Path(staging_dir) if staging_dir else Path(tempfile.mkdtemp(prefix="batchgen-submit-"))
    staging.mkdir(parents=True, exist_ok=True)
    data = spec.model_dump(mode="json")
    warnings: list[str] = []
    shipped: list[str] = []
    storage_cfg = StorageConfig(endpoint_url=spec.storage.endpoint_url)

    if _is_local(spec.input.uri):
        if ship_inputs:
            data["input"]["uri"], shipped = _ship_inputs(spec.input.uri, staging, storage_cfg)
        else:
            data["input"]["uri"] = str(_local_path(spec.input.uri))
    if _is_local(spec.model.uri) and not spec.model.uri.startswith("builtin:"):
        data["model"]["uri"] = str(_local_path(spec.model.uri))
        warnings.append(f"model.uri {data['model']['uri']} is a local path: it is not uploaded and must "
                        "exist at that path on every node of the cluster")
    if _is_local(spec.output.uri):
        data["output"]["uri"] = str(_local_path(spec.output.uri))
        warnings.append(f"output.uri {data['output']['uri']} is a local path: on a multi-node cluster "
                        "each node writes to its own disk; use s3:// for real clusters")

    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    if size > max_upload_mb * 2**20:
        raise InputError(f"input.uri {spec.input.uri!r}: {size / 2**20:.0f} MiB of input files is too much "
                         f"to upload with the job (limit {max_upload_mb:g} MiB); put them in s3:// or pass "
                         "--no-ship-inputs if the path exists on the cluster")
    (staging / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    runtime_env: dict = {"working_dir": str(staging)}
    if env:
        runtime_env["env_vars"] = env
    if ship_code:
        runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]
    entry = ["python", "-m", "batchgen.cli", "run", "job.yaml", *(run_args or [])]
    return Submission(staging, shlex.join(entry), runtime_env, spec, shipped, warnings)


# ----------------------------------------------------------------------------- talking to the cluster


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise SubmitError(f"cannot reach the Ray job server at {address}: {exc} "
                          "(is the cluster up and the dashboard port reachable?)") from None


def _submission_id(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"batchgen-{safe}-{uuid.uuid4().hex[:8]}"


def submit(sub: Submission, address: str, submission_id: str | None = None) -> str:
    """Submit a prepared job; returns the submission id."""
    client = _client(address)
    try:
        return client.submit_job(
            entrypoint=sub.entrypoint,
            runtime_env=sub.runtime_env,
            submission_id=submission_id or _submission_id(sub.spec.name),
            metadata={"batchgen_job": sub.spec.name},
        )
    except Exception as exc:
        raise SubmitError(f"the Ray job server at {address} refused the job: {exc}") from None


PROBE_MARK = "BATCHGEN_PROBE "
_PROBE_CODE = r"""
import hashlib, json, sys
out = {"python": sys.version.split()[0]}
for name in ("torch", "ray"):
    try:
        out[name] = __import__(name).__version__
    except Exception as exc:
        out[name + "_error"] = f"{type(exc).__name__}: {exc}"
try:
    import batchgen, pathlib
    root = pathlib.Path(batchgen.__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    out.update(batchgen=batchgen.__version__, batchgen_digest=h.hexdigest(), batchgen_path=str(root))
except Exception as exc:
    out["batchgen_error"] = f"{type(exc).__name__}: {exc}"
print("BATCHGEN_PROBE " + json.dumps(out, sort_keys=True))
"""


def local_code_info() -> dict:
    """This checkout's batchgen version and source digest (what the probe compares with)."""
    import hashlib

    from . import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return {"batchgen": __version__, "batchgen_digest": h.hexdigest()}


def probe_cluster(address: str, env_vars: dict[str, str] | None = None, timeout_s: float = 120.0) -> dict:
    """Run a tiny probe job on the cluster; returns what its Python can import (see ``_PROBE_CODE``)."""
    client = _client(address)
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    job_id = f"batchgen-probe-{uuid.uuid4().hex[:8]}"
    try:
        client.submit_job(entrypoint=shlex.join(["python", "-c", _PROBE_CODE]), submission_id=job_id,
                          runtime_env=runtime_env, metadata={"batchgen_probe": "1"})
    except Exception as exc:
        raise SubmitError(f"the Ray job server at {address} refused the probe job: {exc}") from None
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(getattr(client.get_job_status(job_id), "value", client.get_job_status(job_id)))
        if status in TERMINAL:
            break
        if time.monotonic() > deadline:
            raise SubmitError(f"the probe job {job_id} did not finish within {timeout_s:.0f} s on {address}; "
                              "pass --no-check to submit without checking the cluster's batchgen")
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    for line in reversed(logs.splitlines()):
        if line.startswith(PROBE_MARK):
            import json

            return json.loads(line[len(PROBE_MARK):])
    raise SubmitError(f"the probe job {job_id} on {address} ended {status} without a report; its log ends: "
                      f"{logs[-500:]}")


def shipping_decision(local: dict, remote: dict, ship_code: bool | None) -> tuple[bool, str | None]:
    """(ship the package?, note for the user) from the probe's report; raises when the cluster's
    Python lacks what shipping cannot fix (torch, ray)."""
    for dep in ("torch", "ray"):
        if remote.get(f"{dep}_error"):
            raise SubmitError(f"the cluster's Python cannot import {dep} ({remote[f'{dep}_error']}): install "
                              "batchgen's dependencies in the cluster image (see infra/Dockerfile)")
    if remote.get("batchgen_error"):
        why = f"the cluster cannot import batchgen ({remote['batchgen_error']})"
    elif remote.get("batchgen") != local["batchgen"]:
        why = f"the cluster has batchgen {remote.get('batchgen')}, this checkout is {local['batchgen']}"
    elif remote.get("batchgen_digest") != local["batchgen_digest"]:
        why = f"the cluster's batchgen {remote.get('batchgen')} ({remote.get('batchgen_path')}) has other sources"
    else:
        return bool(ship_code), None
    if ship_code is False:
        return False, f"{why}; not shipping this checkout (--no-ship-code): the job may fail or differ"
    return True, f"{why}: shipping this checkout's batchgen package with the job"


def _exit_code(info) -> int:
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    return int(info.driver_exit_code) if info.driver_exit_code else 1


def follow(address: str, job_id: str, out=None, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; return its exit code (0 only when it succeeded)."""
    import asyncio

    out = out or sys.stdout
    client = _client(address)

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # log streaming is best effort; the status below is what counts
        print(f"batchgen submit: log stream ended: {exc}", file=sys.stderr)
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    code = _exit_code(info)
    print(f"batchgen submit: job {job_id} {status}" + (f": {info.message}" if info.message else ""),
          file=sys.stderr)
    return code


def status_submission(job_id: str, address: str | None) -> int:
    """Print a submitted job's state; exit code 1 when it failed or was stopped, else 0."""
    address = dashboard_address(address)
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise SubmitError(f"job {job_id!r} not found on {address}: {exc}") from None
    status = str(getattr(info.status, "value", info.status))
    print(f"job:        {job_id}")
    print(f"status:     {status}")
    if info.message:
        print(f"message:    {info.message}")
    print(f"entrypoint: {info.entrypoint}")
    for label, ts in (("started", info.start_time), ("ended", info.end_time)):
        if ts:
            print(f"{label + ':':<11} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts / 1000))}")
    if info.driver_exit_code is not None:
        print(f"exit code:  {info.driver_exit_code}")
    return 1 if status in ("FAILED", "STOPPED") else 0


# ----------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML")
    parser.add_argument("--address", default=None,
                        help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's result")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set compute.max_workers=8 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="passed to `batchgen run` on the cluster")
    parser.add_argument("--max-failures", type=int, default=None, metavar="N",
                        help="passed to `batchgen run` on the cluster")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint (default: the spec's storage.endpoint_url, else AWS_ENDPOINT_URL)")
    parser.add_argument("--no-ship-inputs", action="store_true",
                        help="do not upload local input files (the path exists on the cluster)")
    parser.add_argument("--ship-code", action="store_true", default=None,
                        help="always upload this batchgen package with the job (py_modules); by default it "
                             "is uploaded when the cluster cannot import the same batchgen")
    parser.add_argument("--no-ship-code", dest="ship_code", action="store_false",
                        help="never upload this batchgen package")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the probe job that checks the cluster's batchgen, torch and ray")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for the job (visible in the dashboard)")
    parser.add_argument("--submission-id", default=None, help="submission id (default batchgen-<name>-<random>)")


def run(args: argparse.Namespace) -> int:
    address = dashboard_address(args.address)
    run_args = (["--overwrite"] if args.overwrite else []) + (
        ["--max-failures", str(args.max_failures)] if args.max_failures is not None else [])
    extra_env = _parse_env(args.env)
    ship = args.ship_code
    from .spec import spec_overrides

    sub = prepare_submission(args.spec, spec_overrides(args), ship_inputs=not args.no_ship_inputs,
                             ship_code=bool(ship), extra_env=extra_env, run_args=run_args)
    if not args.no_check:
        try:
            ship, note = shipping_decision(local_code_info(), probe_cluster(address, sub.runtime_env.get("env_vars")),
                                           args.ship_code)
        except BaseException:
            shutil.rmtree(sub.staging_dir, ignore_errors=True)
            raise
        if note:
            sub.warnings.append(note)
        if ship:
            sub.runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]
    for w in sub.warnings:
        print(f"batchgen submit: note: {w}", file=sys.stderr)
    try:
        job_id = submit(sub, address, args.submission_id)
    finally:
        shutil.rmtree(sub.staging_dir, ignore_errors=True)  # uploaded (or not needed) by now
    print(job_id, flush=True)
    if not args.wait:
        print(f"batchgen submit: follow with `batchgen status {job_id} --address {address}` "
              f"or `ray job logs --address {address} -f {job_id}`", file=sys.stderr)
        return 0
    try:
        return follow(address, job_id)
    except KeyboardInterrupt:
        print(f"batchgen submit: stopped following; job {job_id} keeps running "
              f"(stop it with `ray job stop --address {address} {job_id}`)", file=sys.stderr)
        return 130


configure_submit = configure
run_submit = run
