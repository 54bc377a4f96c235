"""Items that repeat a prompt share its text encoding (many seeds / images per prompt), and sharing
changes no byte: each item renders exactly as it does alone at the same micro-batch size."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from batchgen import load_pipeline
from batchgen.tiny import make_tiny_model

SIZE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("sharing")
    pipes = {"sd": load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)}
    for variant in ("sdxl", "flux-dev", "dit"):
        pipes[variant] = load_pipeline(make_tiny_model(root / variant, variant=variant, seed=0), device="cpu",
                                       dtype=torch.float32)
    return pipes


@contextmanager
def count_calls(module: torch.nn.Module):
    """Batch sizes of every forward call of ``module`` inside the block."""
    calls: list[int] = []

    def hook(_module, args, kwargs, _out):
        first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        calls.append(first.shape[0])

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def assert_each_like_alone(pipe, prompts, seeds, images, **kwargs):
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        extra = {k: v[i] if isinstance(v, list) else v for k, v in kwargs.items()}
        (alone,) = pipe.generate([prompt], [seed], **extra)
        assert alone.tobytes() == images[i].tobytes(), f"item {i} ({prompt!r}) differs from its render alone"


def test_repeated_prompts_are_encoded_once_and_render_like_alone(models):
    pipe = models["sd"]
    prompts = ["a cat"] * 5 + ["a dog"] * 2 + ["a cat", "a bird", "a dog", "a fish"]  # 11 items, 4 distinct
    seeds = list(range(len(prompts)))
    common = dict(steps=2, width=SIZE, height=SIZE, micro_batch=4)
    with count_calls(pipe.text_encoder) as calls:
        images = pipe.generate(prompts, seeds, **common)
    # 3 micro-batches of 4; the 4 distinct prompts fit one encoder batch: one call for the prompts and
    # one for the negatives (guided), each at the micro-batch shape. Without sharing: 6 calls.
    assert calls == [4, 4]
    assert_each_like_alone(pipe, prompts, seeds, images, **common)


def test_no_repeats_encode_each_micro_batch_as_before(models):
    pipe = models["sd"]
    prompts = [f"prompt {i}" for i in range(7)]
    with count_calls(pipe.text_encoder) as calls:
        pipe.generate(prompts, list(range(7)), steps=1, width=SIZE, height=SIZE, micro_batch=4, guidance_scale=1.0)
    assert calls == [4, 4]  # unguided: one call per micro-batch, no more than without sharing


def test_same_prompt_with_other_item_settings_is_not_shared(models):
    """SDXL's micro-conditioning is part of an item's conditioning: equal prompts with different
    original sizes are encoded separately (and render differently)."""
    pipe = models["sdxl"]
    prompts, seeds = ["a cat"] * 4, [7] * 4
    widths = [SIZE, 4 * SIZE, SIZE, 4 * SIZE]
    common = dict(steps=2, width=SIZE, height=SIZE, micro_batch=2)
    images = pipe.generate(prompts, seeds, original_width=widths, **common)
    assert images[0].tobytes() == images[2].tobytes()
    assert images[0].tobytes() != images[1].tobytes()
    assert_each_like_alone(pipe, prompts, seeds, images, original_width=widths, **common)


@pytest.mark.parametrize("variant, prompts", [
    ("flux-dev", ["a cat", "a dog", "a cat", "a cat", "a dog"]),
    ("dit", ["tabby", "goldfish", "tabby", "tabby", "goldfish"]),
])
def test_other_families_share_without_changing_bytes(models, variant, prompts):
    """FLUX (shared position ids, true CFG halves) and DiT (class rows before null rows)."""
    pipe = models[variant]
    seeds = list(range(len(prompts)))
    common = dict(steps=2, micro_batch=2)
    if variant == "flux-dev":
        common.update(width=32, height=32, true_cfg_scale=2.0, negative_prompts="ugly")
    images = pipe.generate(prompts, seeds, **common)
    negatives = common.pop("negative_prompts", None)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        (alone,) = pipe.generate([prompt], [seed], negative_prompts=negatives, **common)
        assert alone.tobytes() == images[i].tobytes(), f"item {i}"
