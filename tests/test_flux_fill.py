"""FLUX.1 Fill against diffusers' FluxFillPipeline on a tiny random checkpoint (``flux-fill``).

Same seeds through per-item generators, fp32 CPU: within 1 uint8 level at strength 1.0 (where
diffusers still encodes the init image and draws its posterior sample) and below 1. Plus the
fixed micro-batch contract, how a Fill checkpoint is recognised (FluxFillPipeline class name,
transformer in_channels) and what is refused.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.errors import CheckpointError
from batchgen.inspect import skeleton
from batchgen.tiny import make_tiny_model
from tests.diffusers_reference import aligned
from tests.test_inpaint_parity import init_images, masks

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting", ""]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 64
STEPS = 4
LENGTH = 128  # T5 tokens: diffusers' default is 512, a quarter of the time here


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-fill")
    return {v: make_tiny_model(root / v, variant=v, seed=0) for v in ("flux-fill", "flux-dev")}


@pytest.fixture(scope="module")
def fill(folders):
    return load_pipeline(folders["flux-fill"], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ref(folders):
    pipe = diffusers.FluxFillPipeline.from_pretrained(str(folders["flux-fill"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return aligned(pipe)


def _level_diff(ours, ref):
    return max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(ours, ref))


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_flux_fill_matches_diffusers(fill, ref, strength):
    from PIL import Image

    images, mask_list = init_images(size=SIZE), masks(size=SIZE)
    expected = ref(PROMPTS, image=[Image.fromarray(a) for a in images],
                   mask_image=[Image.fromarray(m) for m in mask_list], strength=strength, num_inference_steps=STEPS,
                   guidance_scale=30.0, width=SIZE, height=SIZE, max_sequence_length=LENGTH, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    expected = [(e * 255).round().astype(np.uint8) for e in expected]
    # guidance_scale: the Fill default (30), as diffusers'
    ours = fill.generate(PROMPTS, SEEDS, init_images=images, mask_images=mask_list, strength=strength, steps=STEPS,
                         width=SIZE, height=SIZE, max_sequence_length=LENGTH)
    assert all(len(np.unique(o)) > 32 for o in ours)
    diff = _level_diff(ours, expected)
    assert diff <= 1, f"strength {strength}: {diff} levels apart"


def test_flux_fill_item_is_the_same_alone_and_among_others(fill):
    """Fixed micro-batch shape: item 1 alone (padded; its masked image goes through the VAE in a
    batch with a padding row) == among other inpainting items, in another position."""
    images, mask_list = init_images(size=SIZE), masks(size=SIZE)
    common = dict(steps=2, width=SIZE, height=SIZE, micro_batch=2, strength=1.0, max_sequence_length=LENGTH)
    alone = fill.generate([PROMPTS[1]], [SEEDS[1]], init_images=[images[1]], mask_images=[mask_list[1]],
                          **common)[0]
    mixed = fill.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0]], [SEEDS[2], SEEDS[1], SEEDS[0]],
                          init_images=[images[2], images[1], images[0]],
                          mask_images=[mask_list[2], mask_list[1], mask_list[0]], **common)
    assert np.array_equal(alone, mixed[1])
    assert not np.array_equal(mixed[0], mixed[1])


def test_flux_fill_is_recognised_and_described(fill, folders, tmp_path):
    info = fill.model_info
    assert (info["family"], info["variant"], info["pipeline_class"]) == ("flux", "flux-fill", "FluxFillPipeline")
    assert info["inpainting_model"] is True
    request = fill.validate(["x"], [0], init_images=init_images(1, SIZE), mask_images=masks(1, SIZE))
    assert (request.settings["steps"], request.settings["guidance_scale"]) == (50, 30.0)  # FluxFillPipeline's
    assert request.settings["max_sequence_length"] == 512 and request.settings["strength"] == 1.0
    # The transformer decides: a Fill transformer under a FluxPipeline model_index is a Fill model.
    renamed = _with_class(folders["flux-fill"], tmp_path / "renamed", "FluxPipeline")
    assert skeleton(renamed)[0].model_info["variant"] == "flux-fill"


def _with_class(folder, target, pipeline_class=None, weights=None, **transformer):
    """A copy of ``folder`` with another model_index class, transformer config values and (zero)
    transformer weights of other shapes (``weights``: key -> shape)."""
    from safetensors.torch import load_file, save_file

    out = shutil.copytree(folder, target)
    if pipeline_class:
        index = json.loads((out / "model_index.json").read_text())
        (out / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    if transformer:
        config = json.loads((out / "transformer" / "config.json").read_text())
        (out / "transformer" / "config.json").write_text(json.dumps({**config, **transformer}))
    if weights:
        file = out / "transformer" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(file))
        state.update({k: torch.zeros(shape) for k, shape in weights.items()})
        save_file(state, str(file))
    return out


def test_wrong_fill_checkpoints_are_refused(folders, tmp_path):
    ordinary = _with_class(folders["flux-dev"], tmp_path / "a", "FluxFillPipeline")
    with pytest.raises(CheckpointError, match=r"names FluxFillPipeline but the transformer takes 64 input channels"):
        skeleton(ordinary)
    depth = _with_class(folders["flux-dev"], tmp_path / "b", in_channels=128, out_channels=64,
                        weights={"x_embedder.weight": (32, 128)})
    with pytest.raises(CheckpointError, match=r"takes 128 input channels: neither FLUX.1 \(64.*Fill \(384"):
        skeleton(depth)
    wide = _with_class(folders["flux-fill"], tmp_path / "c", out_channels=None,
                       weights={"proj_out.weight": (384, 32), "proj_out.bias": (384,)})
    with pytest.raises(CheckpointError, match=r"out_channels 384; a FLUX.1 Fill transformer predicts the 64"):
        skeleton(wide)


def test_wrong_requests_are_refused(fill, folders):
    images, mask_list = init_images(1, SIZE), masks(1, SIZE)
    with pytest.raises(ValueError, match=r"^mask_images: this is an inpainting model"):
        fill.validate(["x"], [0], width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match=r"^mask_images: this is an inpainting model"):
        fill.validate(["x"], [0], width=SIZE, height=SIZE, init_images=images)
    with pytest.raises(ValueError, match=r"^true_cfg_scale: 4.0 asks for true CFG, which FLUX.1 Fill"):
        fill.validate(["x"], [0], width=SIZE, height=SIZE, init_images=images, mask_images=mask_list,
                      negative_prompts="blurry", true_cfg_scale=4.0)
    dev = skeleton(folders["flux-dev"])[0]
    with pytest.raises(ValueError, match=r"^mask_images: this flux model cannot inpaint .*FLUX.1 Fill"):
        dev.validate(["x"], [0], width=SIZE, height=SIZE, init_images=images, mask_images=mask_list)


def test_builtin_tiny_flux_fill_outpaints():
    """builtin:tiny-flux-fill with the outpaint_* settings (the mask made for the caller)."""
    pipe = load_pipeline("builtin:tiny-flux-fill", device="cpu", dtype=torch.float32)
    source = init_images(1, 48)[0]
    image = pipe.generate(["a wider view"], [3], init_images=[source], outpaint_left=16, width=64, height=48,
                          steps=2, max_sequence_length=32)[0]
    assert image.shape == (48, 64, 3) and len(np.unique(image)) > 32
