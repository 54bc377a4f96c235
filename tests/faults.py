"""Fault injection for the job tests, from the tests' side: nothing in batchgen reads these.

A test describes a run with a small dict (JSON for a subprocess):

- ``"renderer": "null"``: the job's model becomes ``builtin:null`` (seeded noise, no weights);
- ``"die_once": {"flag": PATH, "on_call": N}``: a generator actor exits on its Nth call, once
  (the flag file, created atomically, says it happened);
- ``"sleep_per_call_s"``: seconds per actor call, or a list per call (the last one repeats);
- ``"part_max_rows"``: the driver commits a manifest part every this many rows.

:func:`injected` applies it by monkeypatching: the job's ``GeneratorActor`` is replaced by a
subclass built here (cloudpickle sends a class defined in a function by value, so Ray's workers
run it without importing this module) and the part size constant is patched. :func:`run_job` and
:func:`prepare` are batchgen's, run under :func:`injected`. A ``batchgen`` subprocess runs as
``python -m tests.faults ARGS`` (:func:`cli`) with the description in ``BATCHGEN_TEST_FAULTS``:
this module patches, then calls :func:`batchgen.cli.main`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import pytest

FAULTS_ENV = "BATCHGEN_TEST_FAULTS"  # read here only (the subprocess wrapper below)
NULL_URI = "builtin:null"


def cli(*args: str) -> list[str]:
    """The command line of a ``batchgen`` subprocess that runs with the faults of ``FAULTS_ENV``."""
    return [sys.executable, "-m", "tests.faults", *args]


def run_and_kill_driver(spec_path, out, env: dict, parts: int = 1, timeout_s: float = 180) -> int:
    """``batchgen run spec_path`` in a subprocess (``env``: its environment, with the faults that
    slow it down), SIGKILLed with the local Ray it started once ``out/manifest`` holds ``parts``
    committed parts. Returns how many rows those parts hold (asserting the job did not finish)."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    import pyarrow.parquet as pq

    proc = subprocess.Popen(cli("run", str(spec_path), "--num-cpus", "2"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    folder = Path(out) / "manifest"

    def committed() -> list[Path]:
        return [p for p in folder.iterdir() if p.name.startswith("part-")] if folder.is_dir() else []

    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and len(committed()) < parts:
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert not (Path(out) / "manifest.parquet").exists()
    return sum(pq.read_table(p).num_rows for p in committed())


def null_model(spec):
    """``spec`` with its model replaced by ``builtin:null`` (the rest of the model block kept, and
    which keys the spec set explicitly: a copy, not a re-validated dump)."""
    return spec.model_copy(update={"model": spec.model.model_copy(update={"uri": NULL_URI})})


def faulty_actor(die_once: dict | None = None, sleep_per_call_s=None) -> type:
    """A ``GeneratorActor`` that exits once on a given call and/or sleeps before each call."""
    import logging
    import time

    from batchgen.job.stages import GeneratorActor

    log = logging.getLogger("batchgen.test_faults")

    def __call__(self, batch):
        calls = self.calls + 1  # GeneratorActor.__call__ counts this call
        if die_once and calls == int(die_once.get("on_call", 1)):
            try:
                fd = os.open(die_once["flag"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                log.warning("fault hook: generator actor %d exits now", os.getpid())
                os._exit(1)
        sleep = sleep_per_call_s
        if isinstance(sleep, list):  # per call: [call 1, call 2, ...], the last one repeats
            sleep = sleep[min(calls, len(sleep)) - 1] if sleep else 0
        if sleep:
            time.sleep(float(sleep))
        return GeneratorActor.__call__(self, batch)

    return type("GeneratorActor", (GeneratorActor,), {"__call__": __call__, "__module__": __name__,
                                                        "__qualname__": "faulty_actor.<locals>.GeneratorActor"})


@contextlib.contextmanager
def injected(faults: dict | None):
    """Apply a fault description (see the module docstring) while the block runs."""
    faults = dict(faults or {})
    with pytest.MonkeyPatch.context() as mp:
        if faults.get("renderer") == "null":
            import batchgen.spec

            load_spec = batchgen.spec.load_spec
            mp.setattr(batchgen.spec, "load_spec", lambda *a, **k: null_model(load_spec(*a, **k)))
        if faults.get("die_once") or faults.get("sleep_per_call_s"):
            import batchgen.job.stages

            mp.setattr(batchgen.job.stages, "GeneratorActor",
                       faulty_actor(faults.get("die_once"), faults.get("sleep_per_call_s")))
        if faults.get("part_max_rows"):
            import batchgen.job.commit

            mp.setattr(batchgen.job.commit, "PART_MAX_ROWS", int(faults["part_max_rows"]))
        yield


def _null(spec, faults: dict | None):
    return null_model(spec) if (faults or {}).get("renderer") == "null" else spec


def run_job(spec, *, faults: dict | None = None, **kwargs):
    """:func:`batchgen.job.run.run_job` with ``faults`` injected."""
    from batchgen.job.run import run_job as run

    with injected(faults):
        return run(_null(spec, faults), **kwargs)


def prepare(spec, *, faults: dict | None = None, **kwargs):
    """:func:`batchgen.job.preflight.prepare` (pre-flight, no Ray) with ``faults`` injected."""
    from batchgen.job.preflight import prepare as prep

    with injected(faults):
        return prep(_null(spec, faults), **kwargs)


if __name__ == "__main__":
    from batchgen.cli import main

    with injected(json.loads(os.environ.get(FAULTS_ENV) or "{}")):
        code = main(sys.argv[1:])
    sys.exit(code)
