"""Image encoding: deterministic bytes, parameters embedded and read back, pixels preserved."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from batchgen.images import EXTENSIONS, FORMATS, encode_image, parameters_text, read_generation_parameters

PARAMS = {
    "prompt": "a lighthouse at dawn, ünïcode ✓",
    "negative_prompt": "blurry",
    "steps": 30,
    "sampler": "ddim",
    "guidance_scale": 7.5,
    "seed": 2**63 - 1,
    "width": 48,
    "height": 32,
    "model_fingerprint": "0123456789abcdef" * 4,
    "batch_size": 4,
    "item_id": "row-7",
}


def smooth_image(height=32, width=48, seed=0) -> np.ndarray:
    """A smooth image with a little noise (what lossy codecs are made for)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic_and_parameters_round_trip(fmt):
    image = smooth_image()
    a = encode_image(image, fmt=fmt, quality=95, parameters=PARAMS)
    b = encode_image(image.copy(), fmt=fmt, quality=95, parameters=dict(reversed(list(PARAMS.items()))))
    assert a == b  # same pixels + same parameters (any key order) -> identical bytes
    assert read_generation_parameters(a) == PARAMS
    other = encode_image(image, fmt=fmt, quality=95, parameters={**PARAMS, "seed": 1})
    assert other != a and read_generation_parameters(other)["seed"] == 1
    with Image.open(io.BytesIO(a)) as im:
        assert im.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert im.size == (48, 32)


@pytest.mark.parametrize("fmt,quality", [("png", 95), ("webp", 100)])
def test_lossless_formats_keep_exact_pixels(fmt, quality):
    image = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    assert np.array_equal(decode(encode_image(image, fmt, quality, PARAMS)), image)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_decode_close(fmt):
    image = smooth_image()
    pixels = decode(encode_image(image, fmt, 95, PARAMS)).astype(int)
    diff = np.abs(pixels - image.astype(int))
    assert diff.mean() < 3.0, diff.mean()
    assert diff.max() < 40


def test_png_has_human_readable_parameters_text():
    data = encode_image(smooth_image(), "png", parameters=PARAMS)
    with Image.open(io.BytesIO(data)) as im:
        text = im.info["parameters"]
    assert text == parameters_text(PARAMS)
    assert text.splitlines() == [
        PARAMS["prompt"],
        "Negative prompt: blurry",
        "Steps: 30, Sampler: ddim, CFG scale: 7.5, Seed: 9223372036854775807, Size: 48x32, "
        "Model hash: 0123456789, Batch size: 4",
    ]


def test_numpy_scalars_in_parameters_and_empty_parameters():
    data = encode_image(smooth_image(), "webp", 90, {"seed": np.uint64(5), "guidance_scale": np.float32(2.5)})
    assert read_generation_parameters(data) == {"seed": 5, "guidance_scale": 2.5}
    assert read_generation_parameters(encode_image(smooth_image(), "jpeg")) == {}


def test_image_without_embedded_parameters_reads_empty():
    buf = io.BytesIO()
    Image.fromarray(smooth_image()).save(buf, format="PNG")
    assert read_generation_parameters(buf.getvalue()) == {}


def test_extensions_cover_formats():
    assert set(EXTENSIONS) == set(FORMATS)
    assert encode_image(smooth_image(), "JPG")[:2] == b"\xff\xd8"  # alias and case accepted


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fmt": "gif"}, "fmt must be one of png, jpeg, webp; got 'gif'"),
        ({"quality": 0}, "quality must be an int in 1..100"),
        ({"quality": 101}, "quality"),
        ({"parameters": {"x": object()}}, "parameters must be JSON-serializable"),
        ({"parameters": {"x": float("nan")}}, "parameters must be JSON-serializable"),
        ({"parameters": ["not", "a", "dict"]}, "parameters must be a dict"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_image(smooth_image(), **kwargs)


@pytest.mark.parametrize(
    "array",
    [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
     np.zeros((0, 4, 3), np.uint8)],
)
def test_bad_arrays_raise_value_error(array):
    with pytest.raises(ValueError, match="array must be an HxWx3 uint8 image"):
        encode_image(array)


def test_not_an_image():
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP image"):
        read_generation_parameters(b"hello")


def test_png_parameters_read_by_sd_parsers():
    """A real third-party reader (sd-parsers, as image browsers use) finds prompt, negative prompt,
    sampler, steps, CFG, seed, size and model hash in our PNG ``parameters`` chunk."""
    sd_parsers = pytest.importorskip("sd_parsers")
    params = {"prompt": "a red fox, detailed", "negative_prompt": "blurry", "steps": 20, "sampler": "euler_a",
              "guidance_scale": 7.5, "seed": 42, "width": 64, "height": 48,
              "model_fingerprint": "abcdef0123456789"}
    data = encode_image(np.zeros((48, 64, 3), np.uint8), "png", parameters=params)
    info = sd_parsers.ParserManager().parse(io.BytesIO(data))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "euler_a"
    assert sampler.parameters == {"cfg_scale": "7.5", "seed": "42", "steps": "20"}
    assert sampler.model.hash == "abcdef0123"
    assert [p.value for p in sampler.prompts] == ["a red fox, detailed"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry"]
    assert info.metadata == {"Size": "64x48"}
