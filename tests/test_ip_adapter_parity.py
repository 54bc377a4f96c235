"""IP-Adapter parity with diffusers on tiny random checkpoints (fp32 CPU, <= 1 uint8 level).

Ours vs diffusers' ``pipe.load_ip_adapter(...)`` + ``ip_adapter_image=`` on tiny IP-Adapters this
test writes in the h94/IP-Adapter layout (``models/ip-adapter_sd15.safetensors`` +
``models/image_encoder/``, ``sdxl_models/...``): SD 1.x plain and Plus, SDXL plain and Plus (the
``*_vit-h`` file, whose encoder is found in ``models/image_encoder``), with classifier-free
guidance, per-item scales (each item against diffusers run alone with ``set_ip_adapter_scale`` of
its scale), txt2img, img2img, inpainting and ControlNet; fixed micro-batch invariance with other reference
images and scales among the batch-mates.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from tests.diffusers_reference import REFERENCE, aligned

diffusers = pytest.importorskip("diffusers")

SIZE = 32
STEPS = 3
PROMPTS = ["a red bicycle in the rain", "portrait of an old man", "a lighthouse at night"]
NEGATIVES = ["blurry", "", "low quality"]
SEEDS = [0, 12345, 2**63 - 1]
SCALES = [0.6, 1.0, 1.4]


def references(count: int, seed: int = 0) -> list[np.ndarray]:
    """Reference images of several sizes and aspect ratios (the processor resizes and crops)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = 40 + 8 * i, 56 - 4 * i
        base = np.linspace(0, 255, w, dtype=np.float32)
        img = np.stack([np.add.outer(np.linspace(0, 80, h), base * (i + 1)) % 256, rng.uniform(0, 255, (h, w)),
                        np.tile(base[::-1], (h, 1))], axis=-1)
        out.append(img.astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def h94(tmp_path_factory):
    """A tiny h94/IP-Adapter tree: models/ (SD 1.5 files + the 'ViT-H' encoder), sdxl_models/
    (ip-adapter_sdxl + its own encoder, whose hidden size does not fit the Plus vit-h file)."""
    from batchgen.tiny.ip_adapter import ENCODER_CONFIG, write_image_encoder, write_ip_adapter

    root = tmp_path_factory.mktemp("h94")
    write_ip_adapter(root / "models", "sd1", "plain", 1)
    write_ip_adapter(root / "models", "sd1", "plus", 2)
    write_ip_adapter(root / "sdxl_models", "sdxl", "plain", 3, encoder=False)
    write_ip_adapter(root / "sdxl_models", "sdxl", "plus", 4, encoder=False)
    other = write_image_encoder(root / "sdxl_models" / "image_encoder", 5)  # 'bigG': other hidden size
    config = {**ENCODER_CONFIG, "hidden_size": 48, "intermediate_size": 96}
    (other / "config.json").write_text(json.dumps(config), encoding="utf-8")
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from batchgen.tiny.common import random_state_dict

    module = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    save_file({k: v.contiguous() for k, v in random_state_dict(module, 5).items()}, str(other / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from batchgen.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("sdxl") / "sdxl", variant="sdxl", seed=0)


FILES = {"sd1-plain": ("models", "ip-adapter_sd15.safetensors", None),
         "sd1-plus": ("models", "ip-adapter-plus_sd15.safetensors", None),
         "sdxl-plain": ("sdxl_models", "ip-adapter_sdxl.safetensors", None),
         "sdxl-plus": ("sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder")}


def _ours(base, h94, name, **kwargs):
    sub, weight, _ = FILES[name]
    return load_pipeline(base, device="cpu", dtype=torch.float32, ip_adapter=str(h94 / sub / weight), **kwargs)


def _reference(cls, base, h94, name, **parts):
    sub, weight, encoder = FILES[name]
    pipe = cls.from_pretrained(str(base), local_files_only=True, **parts)
    extra = {"image_encoder_folder": encoder} if encoder else {}
    pipe.load_ip_adapter(str(h94), subfolder=sub, weight_name=weight, **extra)
    pipe.set_progress_bar_config(disable=True)
    return aligned(pipe)


def _sd1(cls, base, h94, name, **parts):
    return _reference(cls, base, h94, name, safety_checker=None, requires_safety_checker=False, **parts)


def _levels(ours, ref) -> int:
    ref = [(e * 255).round().astype(np.uint8) for e in ref]
    assert all(len(np.unique(o)) > 32 for o in ours)
    return max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(ours, ref))


def _each_item(pipe, sampler, items, scales, **kwargs):
    """diffusers run once per item, with that item's scale (its scale is one value per call); an empty
    negative prompt is None there (SDXL zeroes the unconditional embeddings only for None)."""
    from PIL import Image

    cls_name, options = REFERENCE[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **options)
    out = []
    for i, scale in zip(items, scales):
        pipe.set_ip_adapter_scale(scale)
        extra = {k: [v[i]] if isinstance(v, list) else v for k, v in kwargs.items()}
        extra = {k: Image.fromarray(v[0]) if k in ("image", "control_image", "mask_image") else v
                 for k, v in extra.items()}
        out.append(pipe(PROMPTS[i], negative_prompt=NEGATIVES[i] or None, num_inference_steps=STEPS, output_type="np",
                        width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(SEEDS[i]),
                        ip_adapter_image=Image.fromarray(REFS[i]), **extra).images[0])
    return out


REFS = references(3)


@pytest.mark.parametrize("name", ["sd1-plain", "sd1-plus"])
def test_sd1_txt2img_per_item_scales_match_diffusers(tiny_sd1, h94, name):
    count = 3 if name == "sd1-plain" else 2
    ours = _ours(tiny_sd1, h94, name)
    got = ours.generate(PROMPTS[:count], SEEDS[:count], negative_prompts=NEGATIVES[:count], sampler="ddim",
                        steps=STEPS, width=SIZE, height=SIZE, ip_adapter_images=REFS[:count],
                        ip_adapter_scale=SCALES[:count])
    ref = _sd1(diffusers.StableDiffusionPipeline, tiny_sd1, h94, name)
    expected = _each_item(ref, "ddim", range(count), SCALES[:count])
    assert _levels(got, expected) <= 1
    # the reference image steers: scale 0 is another image
    plain = ours.generate(PROMPTS[:1], SEEDS[:1], negative_prompts=NEGATIVES[:1], sampler="ddim", steps=STEPS,
                          width=SIZE, height=SIZE, ip_adapter_images=REFS[:1], ip_adapter_scale=0.0)
    assert np.abs(plain[0].astype(int) - got[0]).max() > 8


def test_sd1_img2img_matches_diffusers(tiny_sd1, h94):
    inits = references(3, seed=9)
    inits = [np.ascontiguousarray(np.resize(i, (SIZE, SIZE, 3))) for i in inits]
    ours = _ours(tiny_sd1, h94, "sd1-plain")
    got = ours.generate(PROMPTS[:2], SEEDS[:2], negative_prompts=NEGATIVES[:2], sampler="euler_a", steps=STEPS,
                        width=SIZE, height=SIZE, init_images=inits[:2], strength=0.7, ip_adapter_images=REFS[:2],
                        ip_adapter_scale=[1.2, 0.5])
    ref = _sd1(diffusers.StableDiffusionImg2ImgPipeline, tiny_sd1, h94, "sd1-plain")
    expected = _each_item(ref, "euler_a", range(2), [1.2, 0.5], image=inits, strength=0.7)
    assert _levels(got, expected) <= 1


def test_sd1_inpainting_with_ip_adapter_matches_diffusers(tiny_sd1, h94):
    """An ordinary UNet inpainting (the kept region blended back each step) with reference images."""
    inits = [np.ascontiguousarray(np.resize(i, (SIZE, SIZE, 3))) for i in references(2, seed=5)]
    masks = []
    for i in range(2):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[4 + 4 * i:SIZE - 6, 6:SIZE - 4 * i] = 255
        masks.append(mask)
    ours = _ours(tiny_sd1, h94, "sd1-plain")
    got = ours.generate(PROMPTS[:2], SEEDS[:2], negative_prompts=NEGATIVES[:2], sampler="ddim", steps=STEPS,
                        width=SIZE, height=SIZE, init_images=inits, mask_images=masks, ip_adapter_images=REFS[:2],
                        ip_adapter_scale=[1.0, 0.6])
    ref = _sd1(diffusers.StableDiffusionInpaintPipeline, tiny_sd1, h94, "sd1-plain")
    expected = _each_item(ref, "ddim", range(2), [1.0, 0.6], image=inits, mask_image=masks, strength=1.0)
    assert _levels(got, expected) <= 1


def test_sd1_controlnet_with_ip_adapter_matches_diffusers(tiny_sd1, h94, tmp_path):
    from batchgen.tiny.controlnet import write_controlnet

    net = write_controlnet(tmp_path / "cn", "sd1", 1)
    controls = [np.where(references(1, seed=s)[0][:SIZE, :SIZE] > 128, 255, 0).astype(np.uint8) for s in (3, 4)]
    ours = _ours(tiny_sd1, h94, "sd1-plus", controlnets=[str(net)])
    got = ours.generate(PROMPTS[:2], SEEDS[:2], negative_prompts=NEGATIVES[:2], sampler="ddim", steps=STEPS,
                        width=SIZE, height=SIZE, control_images=controls, ip_adapter_images=REFS[:2],
                        ip_adapter_scale=[0.8, 1.5])
    ref = _sd1(diffusers.StableDiffusionControlNetPipeline, tiny_sd1, h94, "sd1-plus",
               controlnet=diffusers.ControlNetModel.from_pretrained(str(net)))
    expected = _each_item(ref, "ddim", range(2), [0.8, 1.5], image=controls)
    assert _levels(got, expected) <= 1


@pytest.mark.parametrize("name", ["sdxl-plain", "sdxl-plus"])
def test_sdxl_matches_diffusers(tiny_sdxl, h94, name):
    ours = _ours(tiny_sdxl, h94, name)
    info = ours.model_info["ip_adapter"]
    encoder = "sdxl_models/image_encoder" if name == "sdxl-plain" else "models/image_encoder"
    assert info["image_encoder"]["uri"].endswith(encoder)  # the vit-h file's encoder found in models/
    got = ours.generate(PROMPTS[:2], SEEDS[:2], negative_prompts=NEGATIVES[:2], sampler="euler", steps=STEPS,
                        width=SIZE, height=SIZE, ip_adapter_images=REFS[:2], ip_adapter_scale=[0.7, 1.3])
    ref = _reference(diffusers.StableDiffusionXLPipeline, tiny_sdxl, h94, name)
    expected = _each_item(ref, "euler", range(2), [0.7, 1.3])
    assert _levels(got, expected) <= 1


def test_item_alone_equals_item_among_other_reference_images(tiny_sd1, h94):
    """Fixed micro-batch invariance: an item's bytes alone (padded) == mixed with batch-mates that
    have other reference images and scales (one of them 0), at another position."""
    pipe = _ours(tiny_sd1, h94, "sd1-plus")
    refs = references(4, seed=11)
    scales = [1.0, 0.0, 1.7, 0.4]
    kwargs = dict(sampler="euler_a", steps=2, width=SIZE, height=SIZE, micro_batch=3)
    mixed = pipe.generate(["p0", "p1", "p2", "p3"], [10, 11, 12, 13], ip_adapter_images=refs,
                          ip_adapter_scale=scales, **kwargs)
    for i in (0, 3):
        alone = pipe.generate([f"p{i}"], [10 + i], ip_adapter_images=[refs[i]], ip_adapter_scale=scales[i], **kwargs)
        assert np.array_equal(alone[0], mixed[i]), i
    moved = pipe.generate(["p3", "p0", "p2"], [13, 10, 12], ip_adapter_images=[refs[3], refs[0], refs[2]],
                          ip_adapter_scale=[0.4, 1.0, 1.7], **kwargs)
    assert np.array_equal(moved[1], mixed[0]) and np.array_equal(moved[0], mixed[3])
