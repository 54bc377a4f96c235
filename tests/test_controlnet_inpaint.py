"""ControlNet together with inpainting, against diffusers' StableDiffusionControlNetInpaintPipeline
and StableDiffusionXLControlNetInpaintPipeline on tiny random checkpoints (fp32 CPU, <= 1 level).

A 9-channel inpainting UNet (the ControlNet sees the latents only, not the mask and masked-image
channels) and an ordinary UNet (the kept region blended back each step), at strength 1.0 and
below, default and explicit scales (the SD pipeline's default is 0.5, the SDXL one's 1.0), a
guidance window, and the micro-batch contract with conditioned batch-mates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.tiny import make_tiny_model
from tests.diffusers_reference import REFERENCE, aligned
from tests.test_controlnet_parity import aligned_module, control_images
from tests.test_inpaint_parity import NEGATIVES, PROMPTS, SEEDS, SIZE, STEPS, _level_diff, init_images, masks

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd_models(tmp_path_factory, tiny_sd1):
    from batchgen.tiny.controlnet import write_controlnet

    root = tmp_path_factory.mktemp("cn-inpaint")
    net = write_controlnet(root / "cn", "sd1", 1)
    concat = make_tiny_model(root / "sd1-inpaint", variant="sd1-inpaint", seed=0)
    out = {}
    for kind, path in (("blend", tiny_sd1), ("concat", concat)):
        ref = diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
            str(path), controlnet=aligned_module(diffusers.ControlNetModel.from_pretrained(str(net))),
            safety_checker=None, requires_safety_checker=False, local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        ours = load_pipeline(path, device="cpu", dtype=torch.float32, controlnets=[str(net)])
        out[kind] = (ours, aligned(ref), dict(ref.scheduler.config))
    return out


def _check(models, kind, sampler, strength, negatives=NEGATIVES, **control):
    from PIL import Image

    pipe, ref, config = models[kind]
    cls_name, options = REFERENCE[sampler]
    ref.scheduler = getattr(diffusers, cls_name).from_config(config, **options)
    controls = control_images(3, seed=5)
    expected = ref(PROMPTS, image=[Image.fromarray(a) for a in init_images()],
                   mask_image=[Image.fromarray(m) for m in masks()],
                   control_image=[Image.fromarray(c) for c in controls], negative_prompt=negatives,
                   strength=strength, num_inference_steps=STEPS, width=SIZE, height=SIZE, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS], **control).images
    expected = [(e * 255).round().astype(np.uint8) for e in expected]
    got = pipe.generate(PROMPTS, SEEDS, negative_prompts=negatives, sampler=sampler, steps=STEPS, width=SIZE,
                        height=SIZE, init_images=init_images(), mask_images=masks(), strength=strength,
                        control_images=controls, **control)
    assert all(len(np.unique(o)) > 32 for o in got)
    diff = _level_diff(got, expected)
    assert diff <= 1, f"{kind} {sampler} strength {strength} {control}: {diff} levels apart"
    return got


@pytest.mark.parametrize("kind, sampler, strength, control", [
    ("concat", "ddim", 1.0, {}),
    ("concat", "euler_a", 0.6, {"controlnet_conditioning_scale": 1.3, "control_guidance_end": 0.6}),
    ("blend", "euler", 1.0, {"controlnet_conditioning_scale": 0.9}),
    ("blend", "ddim", 0.6, {}),
])
def test_sd_controlnet_inpainting_matches_diffusers(sd_models, kind, sampler, strength, control):
    _check(sd_models, kind, sampler, strength, **control)


def test_the_controlnet_changes_an_inpainted_item_and_batch_mates_do_not(sd_models):
    pipe = sd_models["concat"][0]
    controls, images, mask_list = control_images(3, seed=5), init_images(), masks()
    common = dict(steps=STEPS, width=SIZE, height=SIZE, micro_batch=3, sampler="ddim")
    mixed = pipe.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, init_images=images, mask_images=mask_list,
                          control_images=controls, controlnet_conditioning_scale=[0.5, 1.5, 0.0], **common)
    alone = pipe.generate(PROMPTS[1:2], SEEDS[1:2], negative_prompts=NEGATIVES[1:2], init_images=images[1:2],
                          mask_images=mask_list[1:2], control_images=controls[1:2],
                          controlnet_conditioning_scale=1.5, **common)[0]
    assert np.array_equal(alone, mixed[1])
    plain = pipe.generate(PROMPTS[1:2], SEEDS[1:2], negative_prompts=NEGATIVES[1:2], init_images=images[1:2],
                          mask_images=mask_list[1:2], control_images=controls[1:2],
                          controlnet_conditioning_scale=0.0, **common)[0]
    assert not np.array_equal(plain, alone)  # the ControlNet acted on the inpainted item


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    from batchgen.tiny.controlnet import write_controlnet

    root = tmp_path_factory.mktemp("cn-inpaint-xl")
    net = write_controlnet(root / "cn", "sdxl", 1)
    path = make_tiny_model(root / "sdxl-inpaint", variant="sdxl-inpaint", seed=0)
    ref = diffusers.StableDiffusionXLControlNetInpaintPipeline.from_pretrained(
        str(path), controlnet=aligned_module(diffusers.ControlNetModel.from_pretrained(str(net))),
        local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = load_pipeline(path, device="cpu", dtype=torch.float32, controlnets=[str(net)])
    return {"concat": (ours, aligned(ref), dict(ref.scheduler.config))}


def test_sdxl_controlnet_inpainting_matches_diffusers(sdxl_models):
    _check(sdxl_models, "concat", "euler", 0.8, negatives=["blurry", "dark", "low quality"])
