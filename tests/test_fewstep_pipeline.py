"""Few-step samplers through generate(): explicit timesteps, micro-batch invariance, and the
step-distilled recipes (SDXL-Turbo, SDXL-Lightning, Hyper-SD, DMD2, LCM-LoRA) against diffusers'
pipelines with the same scheduler, spacing, steps, guidance and timesteps, on tiny random models
(the weights are random: what is checked is the schedule and the guidance path, <= 1 level).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from tests.diffusers_reference import aligned
from tests.test_pipeline_parity import _init_images, _max_level_diff, _scheduler

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting", ""]
NEGATIVES = ["blurry", "", "low quality"]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 48
DMD2 = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    txt = diffusers.StableDiffusionPipeline.from_pretrained(
        str(tiny_sd1), safety_checker=None, requires_safety_checker=False, local_files_only=True)
    txt.set_progress_bar_config(disable=True)
    img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32), txt, img, dict(txt.scheduler.config)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from batchgen.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "sdxl", variant="sdxl", seed=0)
    txt = aligned(diffusers.StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True))
    txt.set_progress_bar_config(disable=True)
    img = diffusers.StableDiffusionXLImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return load_pipeline(path, device="cpu", dtype=torch.float32), txt, img, dict(txt.scheduler.config)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _uint8(images):
    return [(e * 255).round().astype(np.uint8) for e in images]


def render_both(models, sampler, *, steps=None, guidance, config=None, sampler_options=None, eta=None,
                img2img=False, strength=0.7, prompts=PROMPTS, negatives=NEGATIVES, seeds=SEEDS):
    """(ours, diffusers') images of one recipe: our sampler name + options, diffusers' scheduler
    (from_config of ``config`` overrides) with the same steps/timesteps, guidance and eta."""
    from PIL import Image

    ours_pipe, txt, img, base = models
    options = dict(sampler_options or {})
    ref = img if img2img else txt
    ref.scheduler = _scheduler(sampler, {**base, **(config or {})}, **({"eta": eta} if eta is not None else {}))
    common = dict(negative_prompt=negatives, guidance_scale=guidance, output_type="np",
                  generator=_generators(seeds))
    if "timesteps" in options:
        common["timesteps"] = list(options["timesteps"])
    else:
        common["num_inference_steps"] = steps
    if sampler == "tcd" and eta is not None:
        options["eta"] = eta
    kwargs = dict(negative_prompts=negatives, sampler=sampler, steps=steps, guidance_scale=guidance, width=SIZE,
                  height=SIZE, sampler_options=options)
    ours_pipe.family.scheduler_config = {**base, **(config or {})}
    try:
        if img2img:
            inits = _init_images()[: len(prompts)]
            expected = ref(prompts, image=[Image.fromarray(a) for a in inits], strength=strength, **common).images
            ours = ours_pipe.generate(prompts, seeds, init_images=inits, strength=strength, **kwargs)
        else:
            expected = ref(prompts, width=SIZE, height=SIZE, **common).images
            ours = ours_pipe.generate(prompts, seeds, **kwargs)
    finally:
        ours_pipe.family.scheduler_config = base
    return ours, _uint8(expected)


def assert_match(ours, expected):
    assert all(o.shape == (SIZE, SIZE, 3) and o.dtype == np.uint8 for o in ours)
    assert all(len(np.unique(o)) > 32 for o in ours)  # real content, not a saturated image
    diff = _max_level_diff(ours, expected)
    assert diff <= 1, f"{diff} levels apart"
    return diff


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_explicit_timesteps_match_diffusers(sd1, sampler, img2img):
    """sampler_options.timesteps = the pipeline's timesteps=...; steps left unset = the list's length."""
    assert_match(*render_both(sd1, sampler, guidance=1.0, sampler_options={"timesteps": DMD2}, img2img=img2img,
                              negatives=None))


def test_steps_must_agree_with_timesteps(sd1):
    with pytest.raises(ValueError, match="4 timesteps for steps=3; set steps=4"):
        sd1[0].generate(["x"], [1], sampler="lcm", steps=3, sampler_options={"timesteps": DMD2}, width=SIZE,
                        height=SIZE)
    with pytest.raises(ValueError, match="not accepted by sampler 'ddim'"):
        sd1[0].generate(["x"], [1], sampler="ddim", sampler_options={"timesteps": DMD2}, width=SIZE, height=SIZE)


@pytest.mark.parametrize("sampler,options", [("lcm", {}), ("tcd", {"eta": 0.6})])
def test_item_alone_equals_item_among_others(sd1, sampler, options):
    """Per-step noise comes from each item's generator: an item rendered alone equals the same item
    rendered among other conditioned items at the same micro-batch size."""
    pipe = sd1[0]
    kwargs = dict(sampler=sampler, steps=4, guidance_scale=3.0, width=SIZE, height=SIZE, sampler_options=options,
                  micro_batch=2)
    mixed = pipe.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, **kwargs)
    for i in range(len(PROMPTS)):
        alone = pipe.generate([PROMPTS[i]], [SEEDS[i]], negative_prompts=[NEGATIVES[i]], **kwargs)
        assert np.array_equal(alone[0], mixed[i]), f"item {i} changes with its batch-mates"
