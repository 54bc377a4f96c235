"""Single-file inpainting checkpoints (A1111 / ComfyUI layout) load and render like their folders.

sd-v1-5-inpainting.safetensors, 512-inpainting-ema.safetensors and
sd_xl_base_1.0_inpainting_0.1.safetensors are text-to-image files whose UNet ``conv_in``
(``model.diffusion_model.input_blocks.0.0.weight``) takes 9 channels; flux1-fill-dev.safetensors
is a FLUX.1 file whose ``img_in`` takes 384. Tiny checkpoints are written in that layout by the
test (``write_single_file``, configs embedded since tiny sizes have no standard configs) and must
inpaint byte-identically to the folder they came from; the real sizes are checked from shapes
alone: detection, the standard configs (9-channel UNet, inpainting pipeline class), diffusers'
own detector and converters agreeing key for key.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.checkpoints import single_file as sf
from batchgen.checkpoints import write_single_file
from batchgen.tiny import make_tiny_model
from tests.test_inpaint_parity import init_images, masks
from tests.test_single_file import DM, _meta_module, _sub, assert_same_state, dsf


def _inpaint(pipe, size, **kwargs):
    return pipe.generate(["a red cat on a table", "a lighthouse at night"], [1, 2**40 + 3], steps=2, width=size,
                         height=size, init_images=init_images(2, size), mask_images=masks(2, size), **kwargs)


@pytest.mark.parametrize("variant, family, expected", [
    ("sd1-inpaint", "sd1", "sd1-inpaint"), ("sdxl-inpaint", "sdxl", "sdxl-inpaint"), ("flux-fill", "flux", "flux-fill"),
])
def test_inpainting_single_file_renders_like_the_folder(tmp_path, variant, family, expected):
    folder = make_tiny_model(tmp_path / variant, variant=variant, seed=0)
    single = write_single_file(folder, tmp_path / f"{variant}.safetensors")
    detected = sf.detect(sf.read_header(single))
    assert (detected.family, detected.variant) == (family, expected)
    a = load_pipeline(folder, device="cpu", dtype=torch.float32)
    b = load_pipeline(single, device="cpu", dtype=torch.float32)
    assert b.model_info["inpainting_model"] is True and b.model_info["single_file"]["variant"] == expected
    size, options = (64, dict(max_sequence_length=32)) if family == "flux" else (32, {})
    want = _inpaint(a, size, strength=0.8, **options)
    assert all(len(np.unique(x)) > 32 for x in want)
    assert all(np.array_equal(x, y) for x, y in zip(_inpaint(b, size, strength=0.8, **options), want, strict=True))


# variant -> (single-file family, what diffusers' infer_diffusers_model_type says, pipeline class)
REAL = {
    "sd1-inpaint": ("sd1", "inpainting", "StableDiffusionInpaintPipeline"),
    "sd2-inpaint": ("sd2", "inpainting_v2", "StableDiffusionInpaintPipeline"),
    "sdxl-inpaint": ("sdxl", "xl_inpaint", "StableDiffusionXLInpaintPipeline"),
    "flux-fill": ("flux", None, "FluxFillPipeline"),
}


@pytest.mark.parametrize("variant", list(REAL))
def test_real_inpainting_files_are_detected_with_standard_configs(variant):
    family, diffusers_type, pipeline_class = REAL[variant]
    configs = sf.standard_configs(sf.Detected(family, variant, DM))
    assert configs["pipeline_class"] == configs["model_index"]["_class_name"] == pipeline_class
    denoiser = "transformer" if family == "flux" else "unet"
    channels = {"unet": (9, 4), "transformer": (384, 64)}[denoiser]
    assert (configs[denoiser]["in_channels"], configs[denoiser]["out_channels"]) == channels
    components = {name: _meta_module(configs[name]).state_dict()
                  for name in sf.COMPONENT_KINDS[family] if configs.get(name)}
    state = components[denoiser]
    single = sf.to_single_file(components, family, variant)
    detected = sf.detect({k: tuple(v.shape) for k, v in single.items()})
    assert (detected.family, detected.variant, detected.prefix) == (family, variant, DM)
    assert set(detected.components) == set(components)
    # SD 2.x inpainting (512-inpainting-ema) is epsilon at 512 px, not SD 2.1's 768-v
    assert detected.prediction_type == ("flow_matching" if family == "flux" else "epsilon")
    if variant == "sd2-inpaint":
        assert configs["unet"]["sample_size"] == 64 and not configs["unet"]["upcast_attention"]
    if family == "flux":
        theirs = dsf.convert_flux_transformer_checkpoint_to_diffusers(_sub(single, DM))
    else:
        assert dsf.infer_diffusers_model_type(single) == diffusers_type
        theirs = dsf.convert_ldm_unet_checkpoint(single, configs["unet"])
    assert_same_state(theirs, dict(state), f"{variant} via diffusers")
    assert_same_state(sf.convert(single, detected)[denoiser], dict(state), f"{variant} via batchgen")
