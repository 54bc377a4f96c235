"""SDXL through the family seam: parity with diffusers' SDXL pipelines, the refiner, per-item
micro-conditioning, batch invariance, and one generate() code path for SD 1.x and SDXL.

diffusers runs StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on the same tiny
folders with the scheduler each sampler name stands for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.errors import CheckpointError
from batchgen.sampling import FLOW_SAMPLER_NAMES, SAMPLER_NAMES
from tests.diffusers_reference import aligned
from tests.test_pipeline_parity import _init_images, _max_level_diff, _scheduler

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting", ""]
NEGATIVES = ["blurry", "low quality", "watermark"]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 48
STEPS = 5
NOISE_SAMPLERS = [n for n in SAMPLER_NAMES if n not in FLOW_SAMPLER_NAMES]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from batchgen.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "sdxl", variant="sdxl", seed=0)


@pytest.fixture(scope="module")
def tiny_refiner(tmp_path_factory):
    from batchgen.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "refiner", variant="sdxl-refiner", seed=0)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    txt = aligned(diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True))
    txt.set_progress_bar_config(disable=True)
    img = diffusers.StableDiffusionXLImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return load_pipeline(tiny_sdxl, device="cpu", dtype=torch.float32), txt, img, dict(txt.scheduler.config)


@pytest.fixture(scope="module")
def refiner(tiny_refiner):
    ref = aligned(diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner), local_files_only=True))
    ref.set_progress_bar_config(disable=True)
    return load_pipeline(tiny_refiner, device="cpu", dtype=torch.float32), ref, dict(ref.scheduler.config)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _uint8(images):
    return [(e * 255).round().astype(np.uint8) for e in images]


def _assert_close(ours, expected):
    assert all(o.shape == (SIZE, SIZE, 3) and o.dtype == np.uint8 for o in ours)
    assert all(len(np.unique(o)) > 32 for o in ours)  # real content, not a saturated image
    assert _max_level_diff(ours, _uint8(expected)) <= 1


@pytest.mark.parametrize("sampler", NOISE_SAMPLERS)
def test_txt2img_matches_diffusers(sdxl, sampler):
    ours, txt, _, config = sdxl
    txt.scheduler = _scheduler(sampler, config)
    expected = txt(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, width=SIZE, height=SIZE,
                   output_type="np", generator=_generators(SEEDS)).images
    _assert_close(ours.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler=sampler, steps=STEPS,
                                width=SIZE, height=SIZE), expected)


@pytest.mark.parametrize("sampler", NOISE_SAMPLERS)
def test_img2img_matches_diffusers(sdxl, sampler):
    from PIL import Image

    ours, _, img, config = sdxl
    img.scheduler = _scheduler(sampler, config)
    inits = _init_images()
    expected = img(PROMPTS, image=[Image.fromarray(a) for a in inits], strength=0.7, negative_prompt=NEGATIVES,
                   num_inference_steps=STEPS, output_type="np", generator=_generators(SEEDS)).images
    _assert_close(ours.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler=sampler, steps=STEPS,
                                width=SIZE, height=SIZE, init_images=inits, strength=0.7), expected)


def test_empty_negative_prompts_are_zero_embeddings_like_diffusers(sdxl):
    """force_zeros_for_empty_prompt: no negative prompt in diffusers = every negative empty here."""
    ours, txt, _, config = sdxl
    txt.scheduler = _scheduler("euler", config)
    expected = txt(PROMPTS, num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=5.0,
                   output_type="np", generator=_generators(SEEDS)).images
    _assert_close(ours.generate(PROMPTS, SEEDS, sampler="euler", steps=STEPS, width=SIZE, height=SIZE), expected)
    # Encoding "" instead of zeroing would change the image.
    encoded = txt(PROMPTS, negative_prompt=[""] * 3, num_inference_steps=STEPS, width=SIZE, height=SIZE,
                  output_type="np", generator=_generators(SEEDS)).images
    assert _max_level_diff(_uint8(encoded), _uint8(expected)) > 1


def test_micro_conditioning_per_item_matches_diffusers(sdxl):
    """original size, crop and target size are per-item settings; each item equals diffusers run
    with that item's values."""
    ours, txt, _, config = sdxl
    txt.scheduler = _scheduler("euler", config)
    cond = [dict(original_size=(1024, 768), crops_coords_top_left=(16, 32), target_size=(512, 512)),
            dict(original_size=(256, 512), crops_coords_top_left=(0, 0), target_size=(48, 48))]
    got = ours.generate(PROMPTS[:2], SEEDS[:2], negative_prompts=NEGATIVES[:2], sampler="euler", steps=STEPS,
                        width=SIZE, height=SIZE, original_height=[1024, 256], original_width=[768, 512],
                        crop_top=[16, 0], crop_left=[32, 0], target_height=[512, 48], target_width=[512, 48])
    for i, kwargs in enumerate(cond):
        expected = txt(PROMPTS[i], negative_prompt=NEGATIVES[i], num_inference_steps=STEPS, width=SIZE, height=SIZE,
                       output_type="np", generator=_generators(SEEDS[i:i + 1]), **kwargs).images
        _assert_close(got[i:i + 1], expected)
    default = ours.generate(PROMPTS[:1], SEEDS[:1], negative_prompts=NEGATIVES[:1], sampler="euler", steps=STEPS,
                            width=SIZE, height=SIZE)
    assert not np.array_equal(default[0], got[0])


@pytest.mark.parametrize("sampler", NOISE_SAMPLERS)
def test_refiner_img2img_matches_diffusers(refiner, sampler):
    from PIL import Image

    ours, ref, config = refiner
    ref.scheduler = _scheduler(sampler, config)
    inits = _init_images()
    expected = ref(PROMPTS, image=[Image.fromarray(a) for a in inits], strength=0.3, negative_prompt=NEGATIVES,
                   num_inference_steps=10, aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="np",
                   generator=_generators(SEEDS)).images
    got = ours.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, sampler=sampler, steps=10, width=SIZE,
                        height=SIZE, init_images=inits, strength=0.3, aesthetic_score=7.0,
                        negative_aesthetic_score=2.0)
    _assert_close(got, expected)
    assert ours.model_info["variant"] == "sdxl-refiner"


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde_karras"])
def test_batch_invariance(sdxl, sampler):
    """At micro_batch=4 an item's bytes are the same alone and among other items, at any position."""
    ours = sdxl[0]
    target, seed = "a lighthouse at dawn", 99
    others = [f"filler prompt {i}" for i in range(5)]
    kwargs = dict(sampler=sampler, steps=3, width=SIZE, height=SIZE, micro_batch=4)
    alone = ours.generate([target], [seed], negative_prompts=["fog"], original_width=640, **kwargs)[0]
    for position in (0, 3, 5):
        prompts = others[:position] + [target] + others[position:]
        seeds = list(range(position)) + [seed] + list(range(100, 100 + len(others) - position))
        negatives = [""] * position + ["fog"] + ["bad"] * (len(others) - position)
        widths = [512] * position + [640] + [1024] * (len(others) - position)
        images = ours.generate(prompts, seeds, negative_prompts=negatives, original_width=widths, **kwargs)
        assert images[position].tobytes() == alone.tobytes(), f"position {position}"


def test_sd1_and_sdxl_share_one_generate_code_path(sdxl, tiny_sd1, monkeypatch):
    """Both families render through Pipeline._render_batch and the same sampler loop."""
    import batchgen.pipeline as pipeline_module

    calls = []
    original = pipeline_module.Pipeline._render_batch

    def spy(self, req, indices, size, settings, texts):
        calls.append(self.family.name)
        return original(self, req, indices, size, settings, texts)

    monkeypatch.setattr(pipeline_module.Pipeline, "_render_batch", spy)
    sd1 = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)
    for pipe in (sd1, sdxl[0]):
        [image] = pipe.generate(["a cat"], [1], steps=2, width=SIZE, height=SIZE)
        assert image.shape == (SIZE, SIZE, 3)
    assert calls == ["sd", "sdxl"]
    assert sd1.model_info["family"] == "sd" and sdxl[0].model_info["family"] == "sdxl"


def test_family_defaults_and_settings(sdxl, tiny_sd1):
    ours = sdxl[0]
    assert ours.family.default_sampler == "euler" and ours.family.defaults()["guidance_scale"] == 5.0
    assert ours.default_size == (256, 256)  # tiny UNet sample_size 32 x VAE factor 8
    sd1 = load_pipeline(tiny_sd1, device="cpu")
    with pytest.raises(ValueError, match="original_width.*sdxl"):
        sd1.generate(["a"], [0], steps=1, width=SIZE, height=SIZE, original_width=512)
    with pytest.raises(ValueError, match=r"aesthetic_score\[1\]"):
        ours.generate(["a", "b"], [0, 1], steps=1, width=SIZE, height=SIZE, aesthetic_score=[5.0, 11.0])
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        ours.generate(["a"], [0], steps=1, width=SIZE, height=SIZE, nope=1)


def test_mismatched_aesthetics_flag_is_a_clear_error(tiny_sdxl, tmp_path):
    import shutil

    broken = tmp_path / "m"
    shutil.copytree(tiny_sdxl, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["requires_aesthetics_score"] = True
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="requires_aesthetics_score"):
        load_pipeline(broken, device="cpu")


def test_unknown_pipeline_class_names_the_known_families(tiny_sdxl, tmp_path):
    import shutil

    broken = tmp_path / "m"
    shutil.copytree(tiny_sdxl, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"KandinskyV22Pipeline.*sdxl: StableDiffusionXLPipeline"):
        load_pipeline(broken, device="cpu")


def test_fp16_keeps_the_vae_in_float32_when_it_asks(tiny_sdxl, tiny_sd1):
    """force_upcast: an fp16 SDXL run decodes with a float32 VAE (SD 1/2 pipelines ignore it)."""
    half = load_pipeline(tiny_sdxl, device="cpu", dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    sd1 = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float16)
    assert sd1.vae.dtype == torch.float16


@pytest.mark.gpu
def test_sdxl_fp16_on_cuda_has_no_nan(tiny_sdxl):
    pipe = load_pipeline(tiny_sdxl, device="cuda", dtype=torch.float16)
    images = pipe.generate(["a cat", "a dog"], [1, 2], steps=8, width=128, height=128, micro_batch=2)
    assert all(len(np.unique(i)) > 32 for i in images)
    assert pipe.vae.dtype == torch.float32
