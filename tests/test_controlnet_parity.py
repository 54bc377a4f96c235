"""ControlNet parity with diffusers on tiny random checkpoints (fp32 CPU, <= 1 uint8 level).

Ours vs ``StableDiffusionControlNetPipeline`` / ``StableDiffusionControlNetImg2ImgPipeline`` with one
ControlNet and with several (diffusers' ``MultiControlNetModel``: a list of ControlNets), the default
sampler and Heun (two model calls per step: the guidance window counts calls as diffusers does),
guidance windows and scales per item (each item against its own diffusers call), a single file
in the original layout against its folder, and fixed micro-batch invariance with control images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from tests.diffusers_reference import REFERENCE

diffusers = pytest.importorskip("diffusers")

SIZE = 48
STEPS = 4
PROMPTS = ["a red bicycle in the rain", "portrait of an old man", "a lighthouse at night"]
NEGATIVES = ["blurry", "", "low quality"]
SEEDS = [0, 12345, 2**63 - 1]


def control_images(count: int, seed: int = 0, size: int = 64) -> list[np.ndarray]:
    """Edge-map-like control images (sparse bright lines on black), at another size than the output."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = np.zeros((size, size, 3), dtype=np.uint8)
        for _ in range(6):
            r, c = rng.integers(0, size, 2)
            img[r, :] = 255
            img[:, c] = rng.integers(100, 255)
        out.append(img)
    return out


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from batchgen.tiny.controlnet import write_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return [write_controlnet(root / f"cn{seed}", "sd1", seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def ours(tiny_sd1, nets):
    return {"one": load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(nets[0])]),
            "two": load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(p) for p in nets])}


@pytest.fixture(scope="module")
def reference(tiny_sd1, nets):
    from tests.diffusers_reference import aligned

    cns = [aligned_module(diffusers.ControlNetModel.from_pretrained(str(p))) for p in nets]
    base = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_sd1), controlnet=cns[0], safety_checker=None, requires_safety_checker=False, local_files_only=True)
    aligned(base)
    parts = {k: v for k, v in base.components.items() if k != "controlnet"}
    pipes = {}
    for name, controlnet in (("one", cns[0]), ("two", cns)):
        for kind, cls in (("txt", diffusers.StableDiffusionControlNetPipeline),
                          ("img", diffusers.StableDiffusionControlNetImg2ImgPipeline)):
            pipe = cls(**parts, controlnet=controlnet)
            pipe.set_progress_bar_config(disable=True)
            pipes[name, kind] = pipe
    return pipes


def aligned_module(module):
    for param in module.parameters():
        param.data = param.data.clone()
    return module


def _levels(ours, ref) -> int:
    ref = [(e * 255).round().astype(np.uint8) for e in ref]
    assert all(len(np.unique(o)) > 32 for o in ours)
    return max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(ours, ref))


def _run_reference(pipe, sampler, prompts, negatives, seeds, images, **kwargs):
    from PIL import Image

    cls_name, options = REFERENCE[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **options)
    pil = ([Image.fromarray(i) for i in images] if not isinstance(images[0], list)
           else [[Image.fromarray(i) for i in item] for item in images])
    return pipe(prompts, negative_prompt=negatives, num_inference_steps=STEPS, output_type="np", width=SIZE,
                height=SIZE, generator=[torch.Generator().manual_seed(s) for s in seeds], image=pil, **kwargs).images


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_controlnet_txt2img_matches_diffusers(ours, reference, sampler):
    images = control_images(3)
    window = dict(control_guidance_start=0.2, control_guidance_end=0.7) if sampler == "heun" else {}
    expected = _run_reference(reference["one", "txt"], sampler, PROMPTS, NEGATIVES, SEEDS, images,
                              controlnet_conditioning_scale=0.8, **window)
    got = ours["one"].generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler=sampler, steps=STEPS, width=SIZE,
                               height=SIZE, control_images=images, controlnet_conditioning_scale=0.8, **window)
    assert _levels(got, expected) <= 1


def test_multi_controlnet_matches_diffusers(ours, reference):
    a, b = control_images(3, seed=1), control_images(3, seed=2)
    per_item = [[x, y] for x, y in zip(a, b)]
    expected = _run_reference(reference["two", "txt"], "euler_a", PROMPTS, NEGATIVES, SEEDS, per_item,
                              controlnet_conditioning_scale=[0.6, 1.2], control_guidance_start=[0.0, 0.25],
                              control_guidance_end=[0.75, 1.0])
    got = ours["two"].generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler="euler_a", steps=STEPS,
                               width=SIZE, height=SIZE, control_images=per_item,
                               controlnet_conditioning_scale=[0.6, 1.2], control_guidance_start=[0.0, 0.25],
                               control_guidance_end=[0.75, 1.0])
    assert _levels(got, expected) <= 1


def test_controlnet_img2img_matches_diffusers(ours, reference):
    from tests.test_pipeline_parity import _init_images

    inits = [np.ascontiguousarray(i) for i in _init_images()]
    images = control_images(3, seed=3)
    from PIL import Image

    pipe = reference["one", "img"]
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(PROMPTS, negative_prompt=NEGATIVES, image=[Image.fromarray(i) for i in inits],
                    control_image=[Image.fromarray(i) for i in images], strength=0.7, num_inference_steps=STEPS,
                    width=SIZE, height=SIZE, output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    got = ours["one"].generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler="ddim", steps=STEPS, width=SIZE,
                               height=SIZE, init_images=inits, strength=0.7, control_images=images)
    assert _levels(got, expected) <= 1


def test_per_item_scales_and_windows_match_one_diffusers_call_each(ours, reference):
    """Items with their own scale and window in one micro-batch == each item alone in diffusers."""
    images = control_images(3, seed=4)
    scales, starts, ends = [0.5, 1.5, 1.0], [0.0, 0.5, 0.25], [0.5, 1.0, 1.0]
    got = ours["one"].generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler="dpmpp_2m", steps=STEPS,
                               width=SIZE, height=SIZE, control_images=images, controlnet_conditioning_scale=scales,
                               control_guidance_start=starts, control_guidance_end=ends)
    worst = 0
    for i in range(3):
        expected = _run_reference(reference["one", "txt"], "dpmpp_2m", PROMPTS[i:i + 1], NEGATIVES[i:i + 1],
                                  SEEDS[i:i + 1], images[i:i + 1], controlnet_conditioning_scale=scales[i],
                                  control_guidance_start=starts[i], control_guidance_end=ends[i])
        worst = max(worst, _levels(got[i:i + 1], expected))
    assert worst <= 1


def test_item_alone_equals_item_among_conditioned_batch_mates(ours):
    """Fixed micro-batch invariance: an item's bytes alone == mixed with other control images,
    scales and windows (another ControlNet dropped for a batch-mate, another call skipped)."""
    pipe = ours["two"]
    a, b = control_images(4, seed=5), control_images(4, seed=6)
    per_item = [[x, y] for x, y in zip(a, b)]
    kwargs = dict(sampler="heun", steps=2, width=SIZE, height=SIZE, micro_batch=3)
    scales = [[1.0, 0.5], [0.0, 2.0], [1.5, 1.5], [0.7, 0.0]]
    starts = [[0.0, 0.3], [0.5, 0.0], [0.0, 0.0], [0.2, 0.0]]
    mixed = pipe.generate(["p0", "p1", "p2", "p3"], [10, 11, 12, 13], control_images=per_item,
                          controlnet_conditioning_scale=scales, control_guidance_start=starts, **kwargs)
    for i in (0, 3):
        alone = pipe.generate([f"p{i}"], [10 + i], control_images=[per_item[i]],
                              controlnet_conditioning_scale=[scales[i]], control_guidance_start=[starts[i]], **kwargs)
        assert np.array_equal(alone[0], mixed[i]), i


def test_single_file_renders_equal_to_its_folder(tiny_sd1, nets, ours, tmp_path):
    """The original-layout single file (control_model.* keys, input_hint_block, zero_convs) and a
    diffusers-key single file render the same bytes as the folder; the conversion agrees with
    diffusers' own converter."""
    from safetensors.torch import load_file, save_file

    from batchgen.checkpoints.controlnet import to_ldm_controlnet
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state = load_file(str(nets[0] / "diffusion_pytorch_model.safetensors"))
    ldm = {k: v.clone() for k, v in to_ldm_controlnet(state).items()}
    assert any(k.startswith("control_model.input_hint_block.") for k in ldm)
    assert any(k.startswith("control_model.zero_convs.") for k in ldm)
    theirs = convert_controlnet_checkpoint(ldm, {"layers_per_block": 1})
    assert sorted(theirs) == sorted(state) and all(torch.equal(theirs[k], state[k]) for k in state)
    save_file(ldm, str(tmp_path / "control_tiny_canny.safetensors"))
    save_file(state, str(tmp_path / "diffusers_keys.safetensors"))
    images = control_images(2, seed=7)
    kwargs = dict(steps=3, width=SIZE, height=SIZE, control_images=images)
    folder = ours["one"].generate(PROMPTS[:2], SEEDS[:2], **kwargs)
    for name, layout in (("control_tiny_canny.safetensors", "ldm-single-file"),
                         ("diffusers_keys.safetensors", "diffusers-single-file")):
        pipe = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[f"file://{tmp_path / name}"])
        info = pipe.model_info["controlnets"][0]
        assert info["format"] == layout and len(info["sha256"]) == 64
        got = pipe.generate(PROMPTS[:2], SEEDS[:2], **kwargs)
        assert all(np.array_equal(x, y) for x, y in zip(got, folder)), name


def test_sd2_controlnet_single_file_matches_diffusers(tiny_sd2, tmp_path):
    """SD 2.x (v-prediction, linear projections, upcast attention, per-block heads): a single file in
    the original layout, whose config is read off its shapes and the UNet, against diffusers'
    pipeline with the ControlNet folder."""
    from PIL import Image

    from batchgen.tiny.controlnet import write_controlnet, write_ldm_single_file

    folder = write_controlnet(tmp_path / "cn-sd2", "sd2", 3)
    single = write_ldm_single_file(folder, tmp_path / "control_sd21_tiny.safetensors")
    ours = load_pipeline(tiny_sd2, device="cpu", dtype=torch.float32, controlnets=[str(single)])
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_sd2), controlnet=aligned_module(diffusers.ControlNetModel.from_pretrained(str(folder))),
        safety_checker=None, requires_safety_checker=False, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    images = control_images(2, seed=8)
    expected = ref(PROMPTS[:2], negative_prompt=NEGATIVES[:2], image=[Image.fromarray(i) for i in images],
                   num_inference_steps=STEPS, width=SIZE, height=SIZE, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]]).images
    got = ours.generate(PROMPTS[:2], SEEDS[:2], negative_prompts=NEGATIVES[:2], sampler="ddim", steps=STEPS,
                        width=SIZE, height=SIZE, control_images=images)
    assert _levels(got, expected) <= 1
