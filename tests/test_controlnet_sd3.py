"""SD3 / SD3.5 ControlNet parity with diffusers' StableDiffusion3ControlNetPipeline (tiny random
checkpoints, fp32 CPU, <= 1 uint8 level), item by item.

diffusers VAE-encodes the control image with ``latent_dist.sample()`` from the global torch RNG;
batchgen draws that sample per item from a generator seeded with the item's seed
(batchgen.control_dit). So each item is compared with a one-item diffusers call preceded by
``torch.manual_seed(seed)``, and ours renders at micro-batch 1 to run the same shapes (a model
call's rounding depends on its batch size; that items do not depend on their batch-mates at a
fixed micro-batch is the invariance test's job). Covered: with and without classifier-free guidance, SD3.5's QK-norm
and dual attention, multi-ControlNet (SD3MultiControlNetModel) with a ControlNet that is not
InstantX-style (``force_zeros_for_pooled_projection: false``: pooled text, shifted latents) and has
fewer layers than the transformer, a guidance window and per-item scales; a diffusers-key single
file == its folder; fixed micro-batch invariance; the refusals.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.errors import CheckpointError
from tests.test_controlnet_parity import aligned_module, control_images

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man"]
NEGATIVES = ["blurry", ""]
SEEDS = [0, 2**63 - 1]
SIZE = 64
STEPS = 3
MSL = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from batchgen.tiny import make_tiny_model
    from batchgen.tiny.controlnet import write_controlnet

    root = tmp_path_factory.mktemp("sd3-cn")
    return {
        "sd3": make_tiny_model(root / "sd3", variant="sd3", seed=0),
        "sd35": make_tiny_model(root / "sd35", variant="sd35", seed=0),
        "cn": write_controlnet(root / "cn", "sd3", 1),
        "cn35": write_controlnet(root / "cn35", "sd35", 2),
        # not InstantX-style, one layer (the transformer's blocks share its residual)
        "cn-plain": write_controlnet(root / "cn-plain", "sd3", 3,
                                     {"force_zeros_for_pooled_projection": False, "num_layers": 1}),
    }


@pytest.fixture(scope="module")
def pipes(folders):
    out = {}

    def get(base, nets):
        key = (base, tuple(nets))
        if key not in out:
            cns = [aligned_module(diffusers.SD3ControlNetModel.from_pretrained(str(folders[n]))) for n in nets]
            controlnet = cns[0] if len(cns) == 1 else diffusers.SD3MultiControlNetModel(cns)
            ref = diffusers.StableDiffusion3ControlNetPipeline.from_pretrained(
                str(folders[base]), controlnet=controlnet, local_files_only=True)
            for module in ref.components.values():
                if isinstance(module, torch.nn.Module) and module is not controlnet:
                    aligned_module(module)
            ref.set_progress_bar_config(disable=True)
            ours = load_pipeline(folders[base], device="cpu", dtype=torch.float32,
                                 controlnets=[str(folders[n]) for n in nets])
            out[key] = ours, ref
        return out[key]

    return get


def _reference_item(ref, prompt, negative, seed, image, guidance, **kwargs):
    """One item in diffusers: the control image's posterior sample from the global RNG seeded with
    the item's seed (batchgen's per-item control generator), the noise from the item's generator."""
    from PIL import Image

    pil = Image.fromarray(image) if not isinstance(image, list) else [Image.fromarray(i) for i in image]
    torch.manual_seed(seed)
    out = ref([prompt], negative_prompt=[negative], control_image=pil, num_inference_steps=STEPS,
              guidance_scale=guidance, width=SIZE, height=SIZE, max_sequence_length=MSL, output_type="np",
              generator=[torch.Generator().manual_seed(seed)], **kwargs).images[0]
    return (out * 255).round().astype(np.uint8)


def _levels(a: np.ndarray, b: np.ndarray) -> int:
    assert len(np.unique(a)) > 32
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# SD3 with classifier-free guidance; SD3.5 (QK-norm, dual attention) without
@pytest.mark.parametrize("base, guidance", [("sd3", 7.0), ("sd35", 1.0)])
def test_sd3_controlnet_matches_diffusers(pipes, base, guidance):
    ours, ref = pipes(base, ["cn" if base == "sd3" else "cn35"])
    images = control_images(2, seed=21)
    got = ours.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, steps=STEPS, guidance_scale=guidance, width=SIZE,
                        height=SIZE, max_sequence_length=MSL, control_images=images,
                        controlnet_conditioning_scale=0.8, micro_batch=1)
    worst = max(_levels(got[i], _reference_item(ref, PROMPTS[i], NEGATIVES[i], SEEDS[i], images[i], guidance,
                                                controlnet_conditioning_scale=0.8)) for i in range(2))
    assert worst <= 1


def test_multi_controlnet_window_and_per_item_scales_match_diffusers(pipes):
    """Two ControlNets, the first not InstantX-style (pooled text, shifted latents: diffusers takes
    that from the first for all) with one layer, per-item scales per ControlNet and a guidance
    window on the second: each item == its own diffusers call."""
    ours, ref = pipes("sd3", ["cn-plain", "cn"])
    a, b = control_images(2, seed=22), control_images(2, seed=23)
    per_item = [[x, y] for x, y in zip(a, b)]
    scales = [[1.0, 0.5], [0.6, 1.5]]
    got = ours.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, steps=STEPS, guidance_scale=6.0, width=SIZE,
                        height=SIZE, max_sequence_length=MSL, control_images=per_item,
                        controlnet_conditioning_scale=scales, control_guidance_start=[0.0, 0.34],
                        control_guidance_end=[1.0, 1.0], micro_batch=1)
    worst = max(_levels(got[i], _reference_item(ref, PROMPTS[i], NEGATIVES[i], SEEDS[i], per_item[i], 6.0,
                                                controlnet_conditioning_scale=scales[i],
                                                control_guidance_start=[0.0, 0.34], control_guidance_end=[1.0, 1.0]))
                for i in range(2))
    assert worst <= 1


def test_item_alone_equals_item_among_conditioned_batch_mates(pipes):
    ours, _ = pipes("sd3", ["cn-plain", "cn"])
    a, b = control_images(3, seed=24), control_images(3, seed=25)
    per_item = [[x, y] for x, y in zip(a, b)]
    scales = [[1.0, 0.5], [0.0, 2.0], [0.7, 0.0]]
    starts = [[0.0, 0.3], [0.5, 0.0], [0.2, 0.0]]
    kwargs = dict(steps=2, width=SIZE, height=SIZE, max_sequence_length=MSL, micro_batch=2)
    mixed = ours.generate(["p0", "p1", "p2"], [10, 11, 12], control_images=per_item,
                          controlnet_conditioning_scale=scales, control_guidance_start=starts, **kwargs)
    for i in (0, 1):  # alone: padding as batch-mate; item 1 alone: its zero-scale ControlNet is not run
        alone = ours.generate([f"p{i}"], [10 + i], control_images=[per_item[i]],
                              controlnet_conditioning_scale=[scales[i]], control_guidance_start=[starts[i]], **kwargs)
        assert np.array_equal(alone[0], mixed[i]), i


def test_diffusers_key_single_file_renders_equal_to_its_folder(folders, pipes, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(folders["cn35"] / "diffusion_pytorch_model.safetensors")), str(tmp_path / "cn.safetensors"))
    single = load_pipeline(folders["sd35"], device="cpu", dtype=torch.float32,
                           controlnets=[str(tmp_path / "cn.safetensors")])
    info = single.model_info["controlnets"][0]
    assert (info["format"], info["base"]) == ("diffusers-single-file", "SD3/SD3.5")
    images = control_images(2, seed=26)
    kwargs = dict(negative_prompts=NEGATIVES, steps=2, width=SIZE, height=SIZE, max_sequence_length=MSL,
                  control_images=images)
    a = single.generate(PROMPTS, SEEDS, **kwargs)
    b = pipes("sd35", ["cn35"])[0].generate(PROMPTS, SEEDS, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_refusals(folders, tiny_sd1, tmp_path):
    from batchgen.tiny.controlnet import write_controlnet

    sd1_cn = write_controlnet(tmp_path / "sd1cn", "sd1", 1)
    with pytest.raises(CheckpointError, match=r"sd1cn: this is a SD 1.x/2.x or SDXL ControlNet.*model is SD3"):
        load_pipeline(folders["sd3"], device="cpu", dtype=torch.float32, controlnets=[str(sd1_cn)])
    with pytest.raises(CheckpointError, match=r"cn: this is a SD3/SD3.5 ControlNet \(SD3ControlNetModel\); the model is"):
        load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, controlnets=[str(folders["cn"])])
    for key, value, word in (("extra_conditioning_channels", 1, "inpainting"), ("use_pos_embed", False, "borrows"),
                             ("joint_attention_dim", None, "single-stream")):
        bad = tmp_path / f"bad-{key}"
        bad.mkdir()
        config = json.loads((folders["cn"] / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, key: value}))
        (bad / "diffusion_pytorch_model.safetensors").write_bytes(
            (folders["cn"] / "diffusion_pytorch_model.safetensors").read_bytes())
        with pytest.raises(CheckpointError, match=rf"bad-{key}.*config key '{key}'.*{word}"):
            load_pipeline(folders["sd3"], device="cpu", dtype=torch.float32, controlnets=[str(bad)])
    wide = write_controlnet(tmp_path / "wide", "sd3", 1, {"num_attention_heads": 4, "caption_projection_dim": 64})
    with pytest.raises(CheckpointError, match=r"wide: this SD3/SD3.5 ControlNet does not fit.*caption_projection_dim"):
        load_pipeline(folders["sd3"], device="cpu", dtype=torch.float32, controlnets=[str(wide)])


def test_img2img_with_controlnet_is_refused(pipes):
    ours, _ = pipes("sd3", ["cn"])
    image = control_images(1)[0]
    with pytest.raises(ValueError, match="control_images: ControlNet with init_images .* sd3 models"):
        ours.generate(["x"], [1], steps=2, width=SIZE, height=SIZE, control_images=[image], init_images=[image])
