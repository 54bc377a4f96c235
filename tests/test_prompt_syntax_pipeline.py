"""`prompt_syntax="a1111"` in the SD and SDXL families: weights change the image, plain prompts give
the same bytes either way, long prompts take 75-token chunks, and an item's bytes never depend on
the chunk counts of its batch-mates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import load_pipeline

KW = dict(steps=3, width=48, height=48, sampler="euler", micro_batch=2)
LONG = ", ".join(f"detailed word{i}" for i in range(60))  # well over 75 tokens


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from batchgen.tiny import make_tiny_model

    return load_pipeline(make_tiny_model(tmp_path_factory.mktemp("t") / "sdxl", variant="sdxl"), device="cpu",
                         dtype=torch.float32)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_plain_prompts_give_the_same_bytes_in_both_syntaxes(name, request):
    pipe = request.getfixturevalue(name)
    prompts, negatives = ["a red bicycle in the rain", "a lighthouse"], ["blurry", ""]
    plain = pipe.generate(prompts, [1, 2], negative_prompts=negatives, **KW)
    a1111 = pipe.generate(prompts, [1, 2], negative_prompts=negatives, prompt_syntax="a1111", **KW)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(plain, a1111))


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_weights_change_the_image(name, request):
    pipe = request.getfixturevalue(name)
    base = pipe.generate(["a red bicycle in the rain"], [1], prompt_syntax="a1111", **KW)[0]
    heavy = pipe.generate(["a (red bicycle:1.6) in the rain"], [1], prompt_syntax="a1111", **KW)[0]
    light = pipe.generate(["a [red bicycle] in the rain"], [1], prompt_syntax="a1111", **KW)[0]
    assert not np.array_equal(base, heavy) and not np.array_equal(base, light)
    assert len(np.unique(heavy)) > 32


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_long_prompts_are_chunked_and_batch_mates_do_not_matter(name, request):
    pipe = request.getfixturevalue(name)
    assert pipe.family.prompt_chunks(LONG, "", {"prompt_syntax": "a1111"}) >= 2
    assert pipe.family.prompt_chunks(LONG, "", {"prompt_syntax": "plain"}) is None
    short_alone = pipe.generate(["a lighthouse at dawn"], [5], prompt_syntax="a1111", **KW)[0]
    long_alone = pipe.generate([LONG], [6], prompt_syntax="a1111", **KW)[0]
    mixed = pipe.generate(["x", "a lighthouse at dawn", LONG, "y BREAK z"], [9, 5, 6, 3], prompt_syntax="a1111", **KW)
    assert mixed[1].tobytes() == short_alone.tobytes()
    assert mixed[2].tobytes() == long_alone.tobytes()
    # Beyond 75 tokens plain truncates; A1111 syntax keeps the rest in a second chunk.
    truncated = pipe.generate([LONG], [6], **KW)[0]
    assert not np.array_equal(truncated, long_alone)


def test_prompt_syntax_is_validated(sd1, tmp_path):
    with pytest.raises(ValueError, match="prompt_syntax: expected one of plain, a1111"):
        sd1.generate(["a"], [0], prompt_syntax="comfy", **KW)
    from batchgen.tiny import make_tiny_model

    sd3 = load_pipeline(make_tiny_model(tmp_path / "sd3", variant="sd3"), device="cpu")
    with pytest.raises(ValueError, match="prompt_syntax.*sd, sdxl"):
        sd3.generate(["a"], [0], prompt_syntax="a1111", steps=1, width=32, height=32)
