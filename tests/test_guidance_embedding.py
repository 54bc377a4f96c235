"""UNets distilled with a guidance embedding (``time_cond_proj_dim``: LCM-Dreamshaper, LCM-SDXL, some
DMD2 UNets): the w-embedding of ``guidance_scale - 1`` fed as ``timestep_cond``, no classifier-free
guidance, equal to diffusers' SD / SDXL pipelines (which do the same when the UNet has the key);
folder and single-file loading of such UNets (strict)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from batchgen import load_pipeline
from batchgen.errors import CheckpointError
from batchgen.models import UNET_SD1_TINY
from batchgen.models.unet import UNet2DConditionModel, guidance_scale_embedding
from tests.diffusers_reference import aligned
from tests.test_fewstep_pipeline import PROMPTS, SEEDS, SIZE, assert_match, render_both

diffusers = pytest.importorskip("diffusers")

W_DIM = 12  # tiny guidance-embedding width (LCM-Dreamshaper: 256)


def add_guidance_embedding(folder, dim=W_DIM, seed=3):
    """Turn a tiny diffusers folder into a guidance-distilled one: unet config key + cond_proj weight."""
    unet = folder / "unet"
    config = json.loads((unet / "config.json").read_text())
    config["time_cond_proj_dim"] = dim
    (unet / "config.json").write_text(json.dumps(config))
    weights = unet / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    width = state["time_embedding.linear_1.weight"].shape[1]
    state["time_embedding.cond_proj.weight"] = torch.randn(width, dim, generator=torch.Generator().manual_seed(seed))
    save_file(state, str(weights))
    return folder


@pytest.fixture(scope="module")
def lcm_sd1(tmp_path_factory):
    from batchgen.tiny import make_tiny_model

    path = add_guidance_embedding(make_tiny_model(tmp_path_factory.mktemp("tiny") / "lcm-sd1", variant="sd1", seed=0))
    txt = diffusers.StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, requires_safety_checker=False, local_files_only=True)
    txt.set_progress_bar_config(disable=True)
    img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return load_pipeline(path, device="cpu", dtype=torch.float32), txt, img, dict(txt.scheduler.config), path


@pytest.fixture(scope="module")
def lcm_sdxl(tmp_path_factory):
    from batchgen.tiny import make_tiny_model

    path = add_guidance_embedding(make_tiny_model(tmp_path_factory.mktemp("tiny") / "lcm-sdxl", variant="sdxl",
                                                  seed=0))
    txt = aligned(diffusers.StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True))
    txt.set_progress_bar_config(disable=True)
    img = diffusers.StableDiffusionXLImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return load_pipeline(path, device="cpu", dtype=torch.float32), txt, img, dict(txt.scheduler.config)


def test_embedding_equals_diffusers():
    pipe = diffusers.StableDiffusionPipeline.__new__(diffusers.StableDiffusionPipeline)
    w = torch.tensor([0.0, 0.5, 7.0, 1e-3])
    for dim in (256, 13, 4):
        assert torch.equal(guidance_scale_embedding(w, dim), pipe.get_guidance_scale_embedding(w, embedding_dim=dim))


def test_unet_module_matches_diffusers_bitwise():
    config = {**UNET_SD1_TINY, "time_cond_proj_dim": W_DIM}
    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ours = UNet2DConditionModel(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    cond = guidance_scale_embedding(torch.tensor([3.0, 0.5]), W_DIM)
    with torch.no_grad():
        expected = ref(x, torch.tensor(499), ctx, timestep_cond=cond).sample
        got = ours(x, torch.tensor(499.0), ctx, timestep_cond=cond)
        without = ours(x, torch.tensor(499.0), ctx)
    assert torch.equal(got, expected)
    assert not torch.equal(got, without)
    with pytest.raises(ValueError, match=r"timestep_cond: expected shape \(2, 12\)"):
        ours(x, torch.tensor(499.0), ctx, timestep_cond=cond[:1])


def test_bad_config_value_is_refused():
    with pytest.raises(CheckpointError, match="config key 'time_cond_proj_dim'"):
        UNet2DConditionModel({**UNET_SD1_TINY, "time_cond_proj_dim": "256"})


def test_plain_unet_refuses_timestep_cond():
    unet = UNet2DConditionModel(UNET_SD1_TINY)
    with pytest.raises(ValueError, match="has no time_cond_proj_dim"):
        unet(torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 7, UNET_SD1_TINY["cross_attention_dim"]),
             timestep_cond=torch.zeros(1, 4))


@pytest.mark.parametrize("guidance,img2img", [(8.0, False), (8.0, True), (1.0, False)],
                         ids=["8-txt2img", "8-img2img", "1-txt2img"])
def test_sd1_matches_diffusers(lcm_sd1, guidance, img2img):
    """LCM-Dreamshaper's recipe: lcm, 4 steps, guidance 8 (w = 7 as an input, one model row per item)."""
    assert_match(*render_both(lcm_sd1[:4], "lcm", steps=4, guidance=guidance, img2img=img2img))


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_sdxl_matches_diffusers(lcm_sdxl, img2img):
    assert_match(*render_both(lcm_sdxl, "lcm", steps=4, guidance=5.0, img2img=img2img))


def test_guidance_is_an_input_not_two_passes(lcm_sd1):
    pipe = lcm_sd1[0]
    calls = []
    handle = pipe.family.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        kwargs = dict(sampler="lcm", steps=2, width=SIZE, height=SIZE)
        a = pipe.generate(PROMPTS[:2], SEEDS[:2], guidance_scale=8.0, **kwargs)
        assert calls == [2, 2]  # no classifier-free guidance: one row per item
        b = pipe.generate(PROMPTS[:2], SEEDS[:2], guidance_scale=2.0, **kwargs)
        c = pipe.generate(PROMPTS[:2], SEEDS[:2], guidance_scale=8.0, negative_prompts=["blurry", "ugly"], **kwargs)
    finally:
        handle.remove()
    assert not np.array_equal(a[0], b[0])  # w changes the image ...
    assert all(np.array_equal(x, y) for x, y in zip(a, c))  # ... the negative prompt does not (as in diffusers)
    assert pipe.model_info["guidance_embedding"] == W_DIM


def test_micro_batch_invariance(lcm_sd1):
    pipe = lcm_sd1[0]
    kwargs = dict(sampler="lcm", steps=3, guidance_scale=6.0, width=SIZE, height=SIZE, micro_batch=2)
    mixed = pipe.generate(PROMPTS, SEEDS, **kwargs)
    for i in range(len(PROMPTS)):
        assert np.array_equal(pipe.generate([PROMPTS[i]], [SEEDS[i]], **kwargs)[0], mixed[i])


def test_single_file_loads_and_renders_like_the_folder(lcm_sd1, tmp_path):
    from batchgen.checkpoints import single_file as sf
    from batchgen.checkpoints import write_single_file

    folder = lcm_sd1[4]
    path = write_single_file(folder, tmp_path / "lcm.safetensors")
    shapes = {k: tuple(v[1]) for k, v in sf.read_header(path).items()}
    assert shapes["model.diffusion_model.time_embedding.cond_proj.weight"] == (32, W_DIM)
    kwargs = dict(sampler="lcm", steps=3, guidance_scale=6.0, width=SIZE, height=SIZE)
    single = load_pipeline(path, device="cpu", dtype=torch.float32)
    assert single.family.unet.config["time_cond_proj_dim"] == W_DIM
    assert all(np.array_equal(a, b) for a, b in zip(single.generate(PROMPTS, SEEDS, **kwargs),
                                                    lcm_sd1[0].generate(PROMPTS, SEEDS, **kwargs)))


def test_single_file_detection_reads_the_width():
    """A real-size SD 1.5 LCM file as diffusers' converter writes it (cond_proj under its diffusers
    name): detected as sd1 with time_cond_proj_dim from the weight, in the standard UNet config."""
    from batchgen.checkpoints import single_file as sf

    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
              "model.diffusion_model.time_embed.0.weight": (1280, 320),
              "model.diffusion_model.time_embedding.cond_proj.weight": (320, 256),
              "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    detected = sf.detect(shapes)
    assert (detected.variant, detected.time_cond_proj_dim) == ("sd1", 256)
    assert sf.standard_configs(detected)["unet"]["time_cond_proj_dim"] == 256
    del shapes["model.diffusion_model.time_embedding.cond_proj.weight"]
    plain = sf.detect(shapes)
    assert plain.time_cond_proj_dim is None and "time_cond_proj_dim" not in sf.standard_configs(plain)["unet"]
