"""Inpainting parity with diffusers' StableDiffusionInpaintPipeline on tiny random checkpoints.

A 9-channel inpainting UNet (``sd1-inpaint``: latents + mask + masked-image latents in every call)
and an ordinary 4-channel one (``sd1``: the kept region blended back after each step), at strength
1.0 (pure noise start) and below; same seeds -> same images within 1 uint8 level. Plus the
micro-batch contract (an inpainting item's bytes do not depend on its batch-mates).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.tiny import make_tiny_model
from tests.diffusers_reference import REFERENCE, aligned

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting", ""]
NEGATIVES = ["blurry", "", "low quality"]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 48
STEPS = 4


def init_images(n=3, size=SIZE):
    rng = np.random.default_rng(7)
    base = np.linspace(0, 255, size, dtype=np.float32)
    out = []
    for i in range(n):
        img = np.stack([np.add.outer(base, base * (i + 1)) % 256, rng.uniform(0, 255, (size, size)),
                        np.add.outer(base[::-1], base) / 2], axis=-1)
        out.append(img.astype(np.uint8))
    return out


def masks(n=3, size=SIZE):
    """White rectangles (repaint) of different places and sizes, one a soft-edged gray ramp."""
    out = []
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        a, b = 4 + 6 * i, size - 8 - 3 * i
        m[a:b, 2 + 5 * i:b] = 255
        if i == 2:
            m[:, : size // 3] = np.linspace(0, 255, size // 3, dtype=np.uint8)[None, :]
        out.append(m)
    return out


def _level_diff(ours, ref):
    return max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(ours, ref))


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "sd1-inpaint", variant="sd1-inpaint", seed=0)


@pytest.fixture(scope="module")
def models(tiny_sd1, tiny_inpaint):
    out = {}
    for kind, path in (("blend", tiny_sd1), ("concat", tiny_inpaint)):
        ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
            str(path), safety_checker=None, requires_safety_checker=False, local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        out[kind] = (load_pipeline(path, device="cpu", dtype=torch.float32), aligned(ref), dict(ref.scheduler.config))
    return out


def reference(ref, config, sampler, strength, mask_list, blur=None, n=3, guidance=7.5, negatives=NEGATIVES):
    from PIL import Image

    cls_name, options = REFERENCE[sampler]
    ref.scheduler = getattr(diffusers, cls_name).from_config(config, **options)
    pil_masks = [Image.fromarray(m) for m in mask_list[:n]]
    if blur:
        pil_masks = [ref.mask_processor.blur(m, blur_factor=blur) for m in pil_masks]
    images = ref(PROMPTS[:n], image=[Image.fromarray(a) for a in init_images(n)], mask_image=pil_masks,
                 negative_prompt=negatives[:n], strength=strength, num_inference_steps=STEPS, guidance_scale=guidance,
                 width=SIZE, height=SIZE, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in SEEDS[:n]]).images
    return [(e * 255).round().astype(np.uint8) for e in images]


def check(models, kind, sampler, strength, negatives=NEGATIVES, **kwargs):
    pipe, ref, config = models[kind]
    expected = reference(ref, config, sampler, strength, masks(), negatives=negatives, **kwargs)
    ours = pipe.generate(PROMPTS, SEEDS, negative_prompts=negatives, sampler=sampler, steps=STEPS, width=SIZE,
                         height=SIZE, init_images=init_images(), mask_images=masks(), strength=strength,
                         mask_blur=kwargs.get("blur"), guidance_scale=kwargs.get("guidance", 7.5))
    assert all(len(np.unique(o)) > 32 for o in ours)
    diff = _level_diff(ours, expected)
    assert diff <= 1, f"{kind} {sampler} strength {strength}: {diff} levels apart"
    return ours


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_inpainting_unet_matches_diffusers(models, sampler, strength):
    check(models, "concat", sampler, strength)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "euler_a"])
def test_ordinary_unet_blend_matches_diffusers(models, sampler, strength):
    check(models, "blend", sampler, strength)


@pytest.mark.parametrize("sampler", ["plms", "heun", "lms", "unipc"])
def test_blend_with_other_samplers_matches_diffusers(models, sampler):
    check(models, "blend", sampler, 0.75)


def test_mask_blur_matches_diffusers_mask_processor_blur(models):
    check(models, "concat", "ddim", 1.0, blur=3)


@pytest.mark.parametrize("kind", ["concat", "blend"])
def test_inpainting_item_is_the_same_alone_and_among_others(models, kind):
    """Fixed micro-batch shape: item 1 rendered alone (padded) == rendered with other inpainting
    items (other images, masks, seeds, prompts) in the same micro-batch, in another position."""
    pipe = models[kind][0]
    images, mask_list = init_images(), masks()
    common = dict(sampler="euler_a", steps=3, width=SIZE, height=SIZE, micro_batch=2, strength=0.9)
    alone = pipe.generate([PROMPTS[1]], [SEEDS[1]], negative_prompts=[NEGATIVES[1]], init_images=[images[1]],
                          mask_images=[mask_list[1]], **common)[0]
    mixed = pipe.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0]], [SEEDS[2], SEEDS[1], SEEDS[0]],
                          negative_prompts=[NEGATIVES[2], NEGATIVES[1], NEGATIVES[0]],
                          init_images=[images[2], images[1], images[0]],
                          mask_images=[mask_list[2], mask_list[1], mask_list[0]], **common)
    assert np.array_equal(alone, mixed[1])
    assert not np.array_equal(mixed[0], mixed[1])


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    out = {}
    for kind, variant in (("blend", "sdxl"), ("concat", "sdxl-inpaint")):
        path = make_tiny_model(tmp_path_factory.mktemp("tiny") / variant, variant=variant, seed=0)
        ref = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(str(path), local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        out[kind] = (load_pipeline(path, device="cpu", dtype=torch.float32), aligned(ref), dict(ref.scheduler.config))
    return out


@pytest.mark.parametrize("kind, sampler, strength", [("concat", "euler", 1.0), ("concat", "euler_a", 0.6),
                                                     ("blend", "euler", 1.0), ("blend", "dpmpp_2m", 0.6)])
def test_sdxl_inpainting_matches_diffusers(sdxl_models, kind, sampler, strength):
    """StableDiffusionXLInpaintPipeline with a 9-channel SDXL inpainting UNet and with the base.
    (Non-empty negative prompts: diffusers zeroes empty ones only when none is given at all.)"""
    check(sdxl_models, kind, sampler, strength, negatives=["blurry", "dark", "low quality"])
