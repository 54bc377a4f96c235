"""``padding_mask_crop``: inpainting only the mask's region, against diffusers' inpainting pipelines
(``padding_mask_crop=`` with one PIL image and mask per call: each item against its own call), on
tiny random checkpoints (fp32 CPU, <= 1 level); the crop region against diffusers'
``get_crop_region`` on many masks; the output keeps the init image's size and its kept pixels;
the item is the same alone and among items without a crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from batchgen.mask_crop import crop_region
from tests.diffusers_reference import REFERENCE
from tests.test_inpaint_parity import models, sdxl_models, tiny_inpaint  # noqa: F401 - fixtures

diffusers = pytest.importorskip("diffusers")

SIZE, STEPS = 48, 4


def _photo(w=112, h=80, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    img = np.stack([(x + y) / 2 + 0 * y, np.abs(x - y) + 0 * x, rng.uniform(0, 255, (h, w))], axis=-1)
    return img.astype(np.uint8)


def _mask(w=112, h=80, box=(60, 20, 90, 44), soft=False):
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    if soft:
        m[y1:y2, x1:x1 + 6] = 128
    return m


def test_crop_region_equals_diffusers_on_many_masks():
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(rng.integers(8, 90)), int(rng.integers(8, 90))
        m = np.zeros((h, w), np.uint8)
        x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
        m[y1:int(rng.integers(y1 + 1, h + 1)), x1:int(rng.integers(x1 + 1, w + 1))] = int(rng.integers(1, 256))
        width, height, pad = int(rng.integers(8, 200)), int(rng.integers(8, 200)), int(rng.integers(0, 40))
        expected = VaeImageProcessor.get_crop_region(Image.fromarray(m), width, height, pad=pad)
        assert crop_region(m, width, height, pad) == tuple(int(v) for v in expected), (w, h, width, height, pad)


def _reference(ref, config, sampler, image, mask, pad, seed, prompt, negative, strength, blur=None):
    cls_name, options = REFERENCE[sampler]
    ref.scheduler = getattr(diffusers, cls_name).from_config(config, **options)
    pil_mask = Image.fromarray(mask)
    if blur:
        pil_mask = ref.mask_processor.blur(pil_mask, blur_factor=blur)
    out = ref(prompt, image=Image.fromarray(image), mask_image=pil_mask, negative_prompt=negative,
              strength=strength, num_inference_steps=STEPS, width=SIZE, height=SIZE, padding_mask_crop=pad,
              generator=torch.Generator().manual_seed(seed), output_type="pil").images[0]
    return np.asarray(out)


@pytest.mark.parametrize("kind, sampler, strength, pad, blur, soft", [
    ("concat", "ddim", 1.0, 8, None, False),
    ("blend", "euler_a", 0.7, 0, 3, True),
])
def test_padding_mask_crop_matches_diffusers(models, kind, sampler, strength, pad, blur, soft):  # noqa: F811
    pipe, ref, config = models[kind]
    photos = [_photo(seed=1), _photo(96, 96, seed=2)]
    masks = [_mask(soft=soft), _mask(96, 96, box=(10, 50, 30, 90))]
    seeds, prompts, negatives = [3, 4], ["a red door", "a cat"], ["blurry", ""]
    got = pipe.generate(prompts, seeds, negative_prompts=negatives, sampler=sampler, steps=STEPS, width=SIZE,
                        height=SIZE, init_images=photos, mask_images=masks, strength=strength,
                        padding_mask_crop=pad, mask_blur=blur)
    for i in range(2):
        expected = _reference(ref, config, sampler, photos[i], masks[i], pad, seeds[i], prompts[i], negatives[i],
                              strength, blur)
        assert got[i].shape == photos[i].shape  # the init image's size, not width x height
        diff = int(np.abs(got[i].astype(np.int16) - expected.astype(np.int16)).max())
        assert diff <= 1, f"item {i}: {diff} levels apart"
    if not blur:  # (a blurred mask reaches beyond its rectangle)
        keep = masks[1] == 0
        assert np.array_equal(got[1][keep], photos[1][keep])  # the kept pixels are the original's
        assert not np.array_equal(got[1][~keep], photos[1][~keep])


def test_sdxl_padding_mask_crop_matches_diffusers(sdxl_models):  # noqa: F811
    pipe, ref, config = sdxl_models["concat"]
    photo, mask = _photo(seed=5), _mask()
    got = pipe.generate(["a window"], [9], negative_prompts=["dark"], sampler="euler", steps=STEPS, width=SIZE,
                        height=SIZE, init_images=[photo], mask_images=[mask], padding_mask_crop=4,
                        guidance_scale=7.5)[0]  # (diffusers' SDXL inpainting default; ours is 5.0)
    expected = _reference(ref, config, "euler", photo, mask, 4, 9, "a window", "dark", 1.0)
    assert int(np.abs(got.astype(np.int16) - expected.astype(np.int16)).max()) <= 1


def test_a_cropped_item_is_the_same_alone_and_among_uncropped_items(models):  # noqa: F811
    pipe = models["concat"][0]
    photo, mask = _photo(seed=1), _mask()
    square, square_mask = _photo(64, 64, seed=3), _mask(64, 64, box=(8, 8, 40, 40))
    common = dict(steps=STEPS, width=SIZE, height=SIZE, micro_batch=2, sampler="ddim")
    mixed = pipe.generate(["a", "b", "c"], [1, 2, 3], init_images=[square, photo, square],
                          mask_images=[square_mask, mask, square_mask], padding_mask_crop=[None, 6, None], **common)
    alone = pipe.generate(["b"], [2], init_images=[photo], mask_images=[mask], padding_mask_crop=6, **common)[0]
    assert np.array_equal(alone, mixed[1]) and mixed[1].shape == photo.shape and mixed[0].shape == (SIZE, SIZE, 3)


def test_padding_mask_crop_refusals(models):  # noqa: F811
    pipe = models["concat"][0]
    photo = _photo()
    with pytest.raises(ValueError, match=r"mask_images\[0\]: the mask is all black"):
        pipe.generate(["a"], [0], init_images=[photo], mask_images=[np.zeros((80, 112), np.uint8)],
                      padding_mask_crop=4, steps=1, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match=r"mask_images\[0\]: padding_mask_crop needs the mask at its init image's"):
        pipe.generate(["a"], [0], init_images=[photo], mask_images=[_mask(56, 40, box=(10, 10, 20, 20))],
                      padding_mask_crop=4, steps=1, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="padding_mask_crop"):
        pipe.generate(["a"], [0], init_images=[photo], padding_mask_crop=4, steps=1, width=SIZE, height=SIZE)
