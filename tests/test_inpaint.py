"""Inpainting and outpainting requests: masks prepared as diffusers prepares them, outpainting
canvases, and the errors that name the argument and item."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from batchgen import load_pipeline
from batchgen.inpaint import prepare_mask
from batchgen.outpaint import outpaint_image

SIZE = 48


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def inpaint_model():
    return load_pipeline("builtin:tiny-sd1-inpaint", device="cpu", dtype=torch.float32)


def _image(w=SIZE, h=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(w=SIZE, h=SIZE):
    m = np.zeros((h, w), np.uint8)
    m[h // 4: h // 2, w // 4: w // 2] = 255
    return m


def test_mask_is_prepared_like_diffusers_mask_processor():
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    rng = np.random.default_rng(3)
    for mode, array in (("L", rng.integers(0, 256, (30, 50), dtype=np.uint8)),
                        ("RGB", rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))):
        pil = Image.fromarray(array, mode)
        for blur in (None, 2):
            given = processor.blur(pil, blur) if blur else pil
            expected = processor.preprocess(given, height=40, width=64)[0, 0].numpy()
            assert np.array_equal(prepare_mask(array, 64, 40, blur), expected), (mode, blur)


def test_outpaint_image_pads_with_edge_pixels_and_masks_the_border():
    img = _image(10, 6)
    canvas, mask = outpaint_image(img, left=3, top=1, right=2, bottom=4)
    canvas, mask = np.asarray(canvas), np.asarray(mask)
    assert canvas.shape == (11, 15, 3) and mask.shape == (11, 15)
    assert np.array_equal(canvas[1:7, 3:13], img)
    assert np.array_equal(canvas[0, 3:13], img[0]) and np.array_equal(canvas[1:7, 0], img[:, 0])
    assert (mask[1:7, 3:13] == 0).all() and mask.sum() == 255 * (11 * 15 - 60)


def test_outpaint_settings_equal_passing_the_helpers_canvas_and_mask(sd1):
    img = _image(32, 24)
    canvas, mask = outpaint_image(img, left=8, right=8, top=0, bottom=8)
    common = dict(steps=2, width=SIZE, height=32, sampler="euler")
    by_settings = sd1.generate(["a house"], [5], init_images=[img], outpaint_left=8, outpaint_right=8,
                               outpaint_bottom=[8], **common)[0]
    by_hand = sd1.generate(["a house"], [5], init_images=[canvas], mask_images=[mask], **common)[0]
    assert by_settings.shape == (32, SIZE, 3)
    assert np.array_equal(by_settings, by_hand)


def test_strength_defaults_to_one_for_inpainting(inpaint_model):
    common = dict(steps=2, width=SIZE, height=SIZE, init_images=[_image()], mask_images=[_mask()])
    assert np.array_equal(inpaint_model.generate(["x"], [1], **common)[0],
                          inpaint_model.generate(["x"], [1], strength=1.0, **common)[0])
    assert inpaint_model.model_info["inpainting_model"] is True
    assert inpaint_model.model_info["pipeline_class"] == "StableDiffusionInpaintPipeline"


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_images=[_mask()]), "mask_images: inpainting needs init_images"),
    (dict(init_images=[_image()], mask_images=[_mask(), _mask()]), "mask_images: expected 1 masks"),
    (dict(init_images=[_image()], mask_images=[_mask(SIZE, SIZE // 2)]),
     r"mask_images\[0\]: the mask is 48x24 but init_images\[0\] is 48x48"),
    (dict(init_images=[_image()], mask_images=[np.zeros((SIZE, SIZE), np.float32)]),
     r"mask_images\[0\]: expected an HxW .*uint8"),
    (dict(init_images=[_image()], mask_images=[_mask()], outpaint_left=8), "outpaint_left: outpainting makes its own"),
    (dict(init_images=[_image()], mask_blur=3), "mask_blur: applies to inpainting items only"),
    (dict(init_images=[_image()], mask_images=[_mask()], mask_blur=-1), r"mask_blur: -1 is outside"),
    (dict(outpaint_top=8), "outpaint_top: inpainting needs init_images"),
])
def test_bad_inpainting_requests_name_the_argument(sd1, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd1.validate(["a cat"], [1], width=SIZE, height=SIZE, **kwargs)


def test_mask_of_the_same_aspect_but_another_size_is_accepted(sd1):
    sd1.validate(["a cat"], [1], width=SIZE, height=SIZE, init_images=[_image()],
                 mask_images=[_mask(SIZE // 2, SIZE // 2)])


def test_inpainting_model_without_a_mask_is_refused(inpaint_model):
    with pytest.raises(ValueError, match="mask_images: this is an inpainting model"):
        inpaint_model.validate(["a cat"], [1], width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="mask_images: this is an inpainting model"):
        inpaint_model.validate(["a cat"], [1], width=SIZE, height=SIZE, init_images=[_image()])


def test_family_without_inpainting_refuses_masks():
    pipe = load_pipeline("builtin:tiny-dit", device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="mask_images: this dit model cannot inpaint"):
        pipe.validate(["golden retriever"], [1], init_images=[_image(32, 32)], mask_images=[_mask(32, 32)],
                      width=32, height=32)


def test_img2img_item_is_the_same_alone_and_among_others(sd1):
    """The VAE hands back channels-last latents; padding rows laid out the same way keep a padded
    micro-batch's convolutions in the layout of a full one (this failed by 1 level before)."""
    images = [_image(seed=i) for i in range(3)]
    common = dict(sampler="euler_a", steps=3, width=SIZE, height=SIZE, micro_batch=2, strength=0.9)
    alone = sd1.generate(["b"], [2], init_images=[images[1]], **common)[0]
    mixed = sd1.generate(["c", "b", "a"], [3, 2, 1], init_images=[images[2], images[1], images[0]], **common)
    assert np.array_equal(alone, mixed[1])


def test_items_with_and_without_outpainting_cannot_share_a_call(sd1):
    with pytest.raises(ValueError, match=r"outpaint_left\[1\]: no outpaint_\* value for this item"):
        sd1.validate(["a", "b"], [1, 2], width=SIZE, height=SIZE, init_images=[_image(), _image()],
                     outpaint_left=[8, None])
