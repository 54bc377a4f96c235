"""compile="default": torch.compile of the denoiser and VAE decoder, checked on the CPU.

One compiled pipeline at one micro-batch shape serves every test (compiling is the slow part):
compiled images are within 1 level of eager, two compiled runs are bitwise identical, and an
item's bytes do not depend on its batch-mates with compilation on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import load_pipeline

KW = dict(sampler="euler_a", steps=3, width=64, height=64, micro_batch=2)
PROMPTS = ["a lighthouse at dawn", "a red bicycle", "portrait of a cat"]
SEEDS = [7, 8, 9]


@pytest.fixture(scope="module")
def pipes(tiny_sd1):
    eager = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)
    compiled = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, compile="default")
    return eager, compiled


def test_compiled_images_within_one_level_of_eager_and_repeatable(pipes):
    eager, compiled = pipes
    assert compiled.model_info["compile"] == "default" and compiled.family.compiled == "default"
    ref = eager.generate(PROMPTS, SEEDS, **KW)
    first = compiled.generate(PROMPTS, SEEDS, **KW)
    second = compiled.generate(PROMPTS, SEEDS, **KW)
    assert all(len(np.unique(img)) > 32 for img in first)
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(first, ref)) <= 1
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second))


def test_compiled_batch_invariance(pipes):
    compiled = pipes[1]
    alone = compiled.generate(PROMPTS[:1], SEEDS[:1], **KW)[0]
    mixed = compiled.generate(["filler", PROMPTS[0], "other"], [1, SEEDS[0], 2], **KW)[1]
    assert alone.tobytes() == mixed.tobytes()


def test_compiled_weights_keep_their_names(pipes):
    names = list(pipes[1].unet.state_dict())
    assert names == list(pipes[0].unet.state_dict()) and not any("_orig_mod" in n for n in names)


def test_bad_compile_mode_is_refused(tiny_sd1):
    with pytest.raises(ValueError, match="compile: expected one of none, default, max"):
        load_pipeline(tiny_sd1, device="cpu", compile="fast")


def test_compiled_deterministic_job_records_warmup_and_rerenders_identically(tmp_path, ray_local, builtin_tiny):
    """A job with compute.compile and compute.deterministic: one timed warm-up per actor and
    settings group in summary.json, the deterministic switch in every row's render_env, images
    within 1 level of an eager job's, and rerender (which compiles the same way) gives the same bytes."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq
    from PIL import Image

    from batchgen.jobcli import rerender_item
    from batchgen.runner import run_job
    from batchgen.spec import spec_from_dict
    from tests.fixtures_jobs import job_dict, write_prompts

    inp = write_prompts(tmp_path / "p.parquet", 4, id=["a", "b", "c", "d"])
    outs = {}
    for name, compute in (("eager", {}), ("compiled", {"compile": "default", "deterministic": True})):
        outs[name] = tmp_path / name
        data = job_dict(inp, outs[name], input={"id_column": "id"}, compute=compute)
        assert run_job(spec_from_dict(data)).all_ok
    summary = json.loads((outs["compiled"] / "summary.json").read_text())
    warmups = summary["timings_s"]["compile_warmups"]
    assert len(warmups) == 1 and warmups[0] > 0
    assert json.loads((outs["eager"] / "summary.json").read_text())["timings_s"]["compile_warmups"] == []
    rows = {r["item_id"]: r for r in pq.read_table(outs["compiled"] / "manifest.parquet").to_pylist()}
    assert all(json.loads(r["render_env"])["deterministic_algorithms"] for r in rows.values())
    for item in rows:
        pixels = [np.asarray(Image.open(outs[n] / "images" / f"{item}.png")).astype(int) for n in ("eager", "compiled")]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1, item
    data, row = rerender_item(str(outs["compiled"]), "c")
    assert data == Path(row["image_uri"]).read_bytes()
    assert not torch.are_deterministic_algorithms_enabled()  # rerender restored the caller's switches
