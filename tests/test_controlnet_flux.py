"""FLUX.1 ControlNet parity with diffusers' FluxControlNetPipeline (tiny random checkpoints, fp32
CPU, <= 1 uint8 level).

FluxControlNetPipeline VAE-encodes the control image with the items' own generators, before the
initial noise: ours draws the same samples from the same generators, so items are compared with
a diffusers call of the same items. Covered: one ControlNet (InstantX layout, guidance-distilled
like FLUX.1-dev), true CFG (the ControlNet runs on the positive prompt only and its residuals
serve both halves), multi-ControlNet (FluxMultiControlNetModel) with a ControlNet of fewer layers
than the transformer, per-item scales and a guidance window (each item against its own call);
a diffusers-key single file == its folder; fixed micro-batch invariance; the refusals.
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
NEGATIVES = ["blurry", "low quality"]
SEEDS = [0, 2**63 - 1]
SIZE = 64
STEPS = 3
MSL = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from batchgen.tiny import make_tiny_model
    from batchgen.tiny.controlnet import write_controlnet

    root = tmp_path_factory.mktemp("flux-cn")
    return {
        "dev": make_tiny_model(root / "dev", variant="flux-dev", seed=0),
        "cn": write_controlnet(root / "cn", "flux-dev", 1),
        # one double and one single block: each residual serves several transformer blocks
        "cn-small": write_controlnet(root / "cn-small", "flux-dev", 2, {"num_layers": 1, "num_single_layers": 1}),
    }


@pytest.fixture(scope="module")
def pipes(folders):
    out = {}

    def get(nets):
        key = tuple(nets)
        if key not in out:
            cns = [aligned_module(diffusers.FluxControlNetModel.from_pretrained(str(folders[n]))) for n in nets]
            controlnet = cns[0] if len(cns) == 1 else diffusers.FluxMultiControlNetModel(cns)
            ref = diffusers.FluxControlNetPipeline.from_pretrained(str(folders["dev"]), controlnet=controlnet,
                                                                   local_files_only=True)
            for module in ref.components.values():
                if isinstance(module, torch.nn.Module) and module is not controlnet:
                    aligned_module(module)
            ref.set_progress_bar_config(disable=True)
            ours = load_pipeline(folders["dev"], device="cpu", dtype=torch.float32,
                                 controlnets=[str(folders[n]) for n in nets])
            out[key] = ours, ref
        return out[key]

    return get


def _reference(ref, prompts, seeds, images, **kwargs):
    from PIL import Image

    pil = ([Image.fromarray(i) for i in images] if not isinstance(images[0], list)
           else [[Image.fromarray(i) for i in item] for item in images])
    if isinstance(images[0], list):  # diffusers' multi layout: one list per ControlNet
        pil = [list(column) for column in zip(*pil)]
    out = ref(prompts, control_image=pil, num_inference_steps=STEPS, width=SIZE, height=SIZE,
              max_sequence_length=MSL, output_type="np", generator=[torch.Generator().manual_seed(s) for s in seeds],
              **kwargs).images
    return [(o * 255).round().astype(np.uint8) for o in out]


def _levels(ours, expected) -> int:
    assert all(len(np.unique(o)) > 32 for o in ours)
    return max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(ours, expected))


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_flux_controlnet_matches_diffusers(pipes, true_cfg):
    ours, ref = pipes(["cn"])
    images = control_images(2, seed=31)
    negatives = {"negative_prompt": NEGATIVES, "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    expected = _reference(ref, PROMPTS, SEEDS, images, guidance_scale=3.5, controlnet_conditioning_scale=0.7,
                          **negatives)
    mine = {"negative_prompts": NEGATIVES, "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    got = ours.generate(PROMPTS, SEEDS, steps=STEPS, guidance_scale=3.5, width=SIZE, height=SIZE,
                        max_sequence_length=MSL, control_images=images, controlnet_conditioning_scale=0.7, **mine)
    assert _levels(got, expected) <= 1
    plain = ours.generate(PROMPTS[:1], SEEDS[:1], steps=STEPS, guidance_scale=3.5, width=SIZE, height=SIZE,
                          max_sequence_length=MSL, control_images=images[:1], controlnet_conditioning_scale=0.0,
                          **{k: v[:1] if isinstance(v, list) else v for k, v in mine.items()})
    assert not np.array_equal(plain[0], got[0])  # the ControlNet changed the image


def test_flux_controlnet_img2img_matches_diffusers(folders, pipes):
    """FluxControlNetImg2ImgPipeline: the control image's draw, the init image's, then the noise."""
    from PIL import Image

    ours, ref = pipes(["cn"])
    img2img = diffusers.FluxControlNetImg2ImgPipeline(
        **{k: v for k, v in ref.components.items() if k not in ("image_encoder", "feature_extractor")})
    img2img.set_progress_bar_config(disable=True)
    images, inits = control_images(2, seed=37), control_images(2, seed=38)
    inits = [np.clip(i.astype(np.int16) + 60, 0, 255).astype(np.uint8) for i in inits]
    expected = img2img(PROMPTS, image=[Image.fromarray(i) for i in inits],
                       control_image=[Image.fromarray(i) for i in images], strength=0.7, num_inference_steps=4,
                       guidance_scale=3.5, width=SIZE, height=SIZE, max_sequence_length=MSL, output_type="np",
                       generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    got = ours.generate(PROMPTS, SEEDS, init_images=inits, strength=0.7, steps=4, guidance_scale=3.5, width=SIZE,
                        height=SIZE, max_sequence_length=MSL, control_images=images)  # default scale 1.0
    assert _levels(got, [(e * 255).round().astype(np.uint8) for e in expected]) <= 1


def test_multi_controlnet_window_and_per_item_scales_match_diffusers(pipes):
    ours, ref = pipes(["cn", "cn-small"])
    a, b = control_images(2, seed=32), control_images(2, seed=33)
    per_item = [[x, y] for x, y in zip(a, b)]
    scales = [[1.0, 0.5], [0.6, 1.5]]
    got = ours.generate(PROMPTS, SEEDS, steps=STEPS, guidance_scale=3.5, width=SIZE, height=SIZE,
                        max_sequence_length=MSL, control_images=per_item, controlnet_conditioning_scale=scales,
                        control_guidance_start=[0.0, 0.34], control_guidance_end=[1.0, 1.0], micro_batch=1)
    worst = max(_levels(got[i:i + 1], _reference(ref, PROMPTS[i:i + 1], SEEDS[i:i + 1], per_item[i:i + 1],
                                                 guidance_scale=3.5, controlnet_conditioning_scale=scales[i],
                                                 control_guidance_start=[0.0, 0.34], control_guidance_end=[1.0, 1.0]))
                for i in range(2))
    assert worst <= 1


def test_item_alone_equals_item_among_conditioned_batch_mates(pipes):
    ours, _ = pipes(["cn", "cn-small"])
    a, b = control_images(3, seed=34), control_images(3, seed=35)
    per_item = [[x, y] for x, y in zip(a, b)]
    scales = [[1.0, 0.5], [0.0, 2.0], [0.7, 0.0]]
    starts = [[0.0, 0.3], [0.5, 0.0], [0.2, 0.0]]
    kwargs = dict(steps=2, width=SIZE, height=SIZE, max_sequence_length=MSL, micro_batch=2,
                  negative_prompts="blurry", true_cfg_scale=2.0)
    mixed = ours.generate(["p0", "p1", "p2"], [10, 11, 12], control_images=per_item,
                          controlnet_conditioning_scale=scales, control_guidance_start=starts, **kwargs)
    for i in (0, 1):  # alone: padding as batch-mate; item 1 alone: its zero-scale ControlNet is not run
        alone = ours.generate([f"p{i}"], [10 + i], control_images=[per_item[i]],
                              controlnet_conditioning_scale=[scales[i]], control_guidance_start=[starts[i]], **kwargs)
        assert np.array_equal(alone[0], mixed[i]), i


def test_diffusers_key_single_file_renders_equal_to_its_folder(folders, pipes, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(folders["cn-small"] / "diffusion_pytorch_model.safetensors")),
              str(tmp_path / "cn.safetensors"))
    single = load_pipeline(folders["dev"], device="cpu", dtype=torch.float32,
                           controlnets=[str(tmp_path / "cn.safetensors")])
    info = single.model_info["controlnets"][0]
    assert (info["format"], info["base"]) == ("diffusers-single-file", "FLUX.1")
    config = json.loads((folders["cn-small"] / "config.json").read_text())
    read = single.controlnet.nets[0].config  # read off the file's shapes
    assert {k: read[k] for k in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                                 "guidance_embeds", "in_channels", "joint_attention_dim", "pooled_projection_dim")} \
        == {k: config[k] for k in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                                   "guidance_embeds", "in_channels", "joint_attention_dim", "pooled_projection_dim")}
    folder = load_pipeline(folders["dev"], device="cpu", dtype=torch.float32, controlnets=[str(folders["cn-small"])])
    images = control_images(2, seed=36)
    kwargs = dict(steps=2, width=SIZE, height=SIZE, max_sequence_length=MSL, control_images=images)
    a = single.generate(PROMPTS, SEEDS, **kwargs)
    b = folder.generate(PROMPTS, SEEDS, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_refusals(folders, tmp_path):
    from batchgen.builtin import builtin_model_path
    from batchgen.tiny.controlnet import write_controlnet

    with pytest.raises(CheckpointError, match=r"cn: this is a FLUX.1 ControlNet \(FluxControlNetModel\); the model is "
                                              r"SD3/SD3.5"):
        load_pipeline(builtin_model_path("tiny-sd3"), device="cpu", dtype=torch.float32,
                      controlnets=[str(folders["cn"])])
    schnell_cn = write_controlnet(tmp_path / "schnell-cn", "flux-schnell", 1)
    with pytest.raises(CheckpointError, match=r"schnell-cn: this FLUX.1 ControlNet does not fit.*guidance_embeds"):
        load_pipeline(folders["dev"], device="cpu", dtype=torch.float32, controlnets=[str(schnell_cn)])
    bad = tmp_path / "xlabs"
    bad.mkdir()
    config = json.loads((folders["cn"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "conditioning_embedding_channels": 16}))
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(
        (folders["cn"] / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"xlabs.*config key 'conditioning_embedding_channels'"):
        load_pipeline(folders["dev"], device="cpu", dtype=torch.float32, controlnets=[str(bad)])
    union = write_controlnet(tmp_path / "union", "flux-dev", 1, {"num_mode": 3})
    with pytest.raises(CheckpointError, match=r"union: config key 'num_mode': 3 \(a union ControlNet"):
        load_pipeline(folders["dev"], device="cpu", dtype=torch.float32, controlnets=[str(union)])


def test_union_controlnet_module_matches_diffusers(folders, tmp_path):
    """The union ControlNet module (mode embedding in front of the text tokens) equals diffusers'
    FluxControlNetModel; the pipeline refuses union ControlNets until a control_mode setting exists."""
    from batchgen.checkpoints.folder import load_weights_into
    from batchgen.models.controlnet_flux import FluxControlNetModel
    from batchgen.tiny.controlnet import write_controlnet

    path = write_controlnet(tmp_path / "union", "flux-dev", 4, {"num_mode": 3})
    config = json.loads((path / "config.json").read_text())
    ref = aligned_module(diffusers.FluxControlNetModel.from_pretrained(str(path)))
    from safetensors.torch import load_file

    ours = FluxControlNetModel(config)
    load_weights_into(ours, load_file(str(path / "diffusion_pytorch_model.safetensors")), str(path))
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    ctx, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    img_ids, txt_ids = torch.randn(16, 3, generator=g), torch.zeros(8, 3)
    mode = torch.tensor([[0], [2]])
    t, guidance = torch.tensor([0.5, 0.5]), torch.tensor([3.5, 3.5])
    with torch.no_grad():
        a = ours(x, cond, 0.7, ctx, pooled, t, img_ids, txt_ids, guidance, controlnet_mode=mode)
        b = ref(hidden_states=x, controlnet_cond=cond, controlnet_mode=mode, conditioning_scale=0.7,
                encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                guidance=guidance, return_dict=False)
    for mine, theirs in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(mine, theirs))
