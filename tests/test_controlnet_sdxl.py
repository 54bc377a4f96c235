"""SDXL ControlNet parity with diffusers' StableDiffusionXLControlNetPipeline (tiny random
checkpoints, fp32 CPU, <= 1 uint8 level): the ControlNet takes the pooled text embedding and the
time ids as the UNet does; a single file in diffusers' key layout (how SDXL ControlNets are shared,
no config) renders equal to its folder; an SDXL ControlNet is refused by an SD 1.x model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.errors import CheckpointError
from tests.diffusers_reference import REFERENCE, aligned
from tests.test_controlnet_parity import _levels, control_images

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man", "a lighthouse at night"]
NEGATIVES = ["blurry", "low quality", "watermark"]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 48
STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from batchgen.tiny import make_tiny_model
    from batchgen.tiny.controlnet import write_controlnet

    root = tmp_path_factory.mktemp("sdxl-cn")
    return make_tiny_model(root / "sdxl", variant="sdxl", seed=0), write_controlnet(root / "cn", "sdxl", 1)


@pytest.fixture(scope="module")
def pipes(folders):
    base, cn = folders
    controlnet = diffusers.ControlNetModel.from_pretrained(str(cn))
    ref = aligned(diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        str(base), controlnet=controlnet, local_files_only=True))
    ref.set_progress_bar_config(disable=True)
    return load_pipeline(base, device="cpu", dtype=torch.float32, controlnets=[str(cn)]), ref


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sdxl_controlnet_matches_diffusers(pipes, sampler):
    from PIL import Image

    ours, ref = pipes
    images = control_images(3, seed=11)
    cls_name, options = REFERENCE[sampler]
    ref.scheduler = getattr(diffusers, cls_name).from_config(ref.scheduler.config, **options)
    window = {"control_guidance_start": 0.25} if sampler == "heun" else {}
    expected = ref(PROMPTS, negative_prompt=NEGATIVES, image=[Image.fromarray(i) for i in images],
                   controlnet_conditioning_scale=0.9, num_inference_steps=STEPS, width=SIZE, height=SIZE,
                   output_type="np", generator=[torch.Generator().manual_seed(s) for s in SEEDS], **window).images
    got = ours.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler=sampler, steps=STEPS, width=SIZE,
                        height=SIZE, control_images=images, controlnet_conditioning_scale=0.9, **window)
    assert _levels(got, expected) <= 1


def test_sdxl_diffusers_key_single_file_renders_equal_to_its_folder(folders, pipes, tmp_path):
    from safetensors.torch import load_file, save_file

    base, cn = folders
    save_file(load_file(str(cn / "diffusion_pytorch_model.safetensors")), str(tmp_path / "cn_xl.safetensors"))
    single = load_pipeline(base, device="cpu", dtype=torch.float32, controlnets=[str(tmp_path / "cn_xl.safetensors")])
    assert single.model_info["controlnets"][0]["format"] == "diffusers-single-file"
    assert single.model_info["controlnets"][0]["base"] == "SDXL"
    images = control_images(2, seed=12)
    kwargs = dict(negative_prompts=NEGATIVES[:2], steps=3, width=SIZE, height=SIZE, control_images=images)
    a = single.generate(PROMPTS[:2], SEEDS[:2], **kwargs)
    b = pipes[0].generate(PROMPTS[:2], SEEDS[:2], **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sdxl_controlnet_on_an_sd1_model_is_refused(folders, tiny_sd1):
    with pytest.raises(CheckpointError, match=r"ControlNet \(SDXL\) does not fit the model.*addition_embed_type"):
        load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(folders[1])])


def test_sdxl_controlnet_img2img_matches_diffusers(pipes):
    """StableDiffusionXLControlNetImg2ImgPipeline: init and control images together, its default
    conditioning scale (0.8) and strength cut."""
    from PIL import Image

    from tests.test_pipeline_parity import _init_images

    ours, txt = pipes
    ref = diffusers.StableDiffusionXLControlNetImg2ImgPipeline(**txt.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(txt.scheduler.config)
    inits, images = _init_images(), control_images(3, seed=13)
    expected = ref(PROMPTS, negative_prompt=NEGATIVES, image=[Image.fromarray(i) for i in inits],
                   control_image=[Image.fromarray(i) for i in images], strength=0.7, num_inference_steps=STEPS,
                   width=SIZE, height=SIZE, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    got = ours.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler="euler", steps=STEPS, width=SIZE,
                        height=SIZE, init_images=inits, strength=0.7, control_images=images)
    assert _levels(got, expected) <= 1
