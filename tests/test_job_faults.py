"""Fault tolerance and batch invariance on a local Ray with the tiny model.

(a) a generator actor dies mid-job -> the job completes, exactly once, same bytes;
(b) the driver is SIGKILLed mid-job, run again -> exactly once, every image equal to a clean run;
(c) same batch_size, 1 vs 2 workers and shuffled input order -> identical bytes.
"""

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.spec import spec_from_dict

from .faults import run_and_kill_driver, run_job
from .fixtures_jobs import image_digests, job_dict, write_prompts
from .fixtures_ray import subprocess_env

N = 12
IDS = [f"item-{i:02d}" for i in range(N)]


def _job(inp, out, **compute):
    return job_dict(inp, out, input={"id_column": "id"}, compute={"batches_per_call": 1, **compute})


def _exactly_once(out: Path) -> None:
    t = pq.read_table(out / "manifest.parquet")
    assert t.column("item_id").to_pylist() == IDS
    assert set(t.column("status").to_pylist()) == {"ok"}
    assert sorted(p.stem for p in (out / "images").iterdir()) == IDS


@pytest.fixture(scope="module")
def clean(tmp_path_factory, ray_local, builtin_tiny):
    """A clean reference run: its input file and image digests."""
    root = tmp_path_factory.mktemp("clean")
    inp = write_prompts(root / "in.parquet", N, id=IDS)
    run_job(spec_from_dict(_job(inp, root / "out")))
    _exactly_once(root / "out")
    return inp, image_digests(root / "out")


def test_two_workers_and_shuffled_order_give_identical_bytes(tmp_path, clean, ray_local):
    inp, reference = clean
    table = pq.read_table(inp)
    order = list(range(N))
    random.Random(3).shuffle(order)
    shuffled = tmp_path / "shuffled.parquet"
    pq.write_table(table.take(order), shuffled)
    out = tmp_path / "out"
    # two actors on logical GPUs (the renderer falls back to CPU without CUDA); start rendering only
    # once both are up, so both render items
    ctx = ray_local.data.DataContext.get_current()
    saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 120
    try:
        run_job(spec_from_dict(_job(shuffled, out, gpus_per_worker=1, min_workers=2, max_workers=2)),
                faults={"sleep_per_call_s": 0.3})
    finally:
        ctx.wait_for_min_actors_s = saved
    _exactly_once(out)
    workers = set(pq.read_table(out / "manifest.parquet").column("worker").to_pylist())
    assert len(workers) == 2
    assert image_digests(out) == reference


def test_generator_actor_dies_mid_job(tmp_path, clean):
    inp, reference = clean
    flag = tmp_path / "died.flag"
    out = tmp_path / "out"
    result = run_job(spec_from_dict(_job(inp, out)), faults={"die_once": {"flag": str(flag), "on_call": 3}})
    assert flag.exists()  # the actor really exited once
    assert result.all_ok
    _exactly_once(out)
    assert image_digests(out) == reference


def test_driver_sigkill_then_resume(tmp_path, clean, ray_tmpdir):
    inp, reference = clean
    out = tmp_path / "out"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(_job(inp, out)))
    env = subprocess_env(ray_tmpdir, BATCHGEN_TEST_FAULTS=json.dumps({"sleep_per_call_s": 1.0, "part_max_rows": 2}))
    done_before = run_and_kill_driver(spec_path, out, env, parts=2, timeout_s=120)
    assert 0 < done_before < N
    result = run_job(spec_from_dict(_job(inp, out)))
    assert result.skipped >= done_before and result.rendered_this_run == N - result.skipped
    _exactly_once(out)
    assert image_digests(out) == reference
