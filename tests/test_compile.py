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
