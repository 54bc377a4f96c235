"""The FLUX.1 family (schnell, dev) against diffusers' FluxPipeline / FluxImg2ImgPipeline.

Tiny random-weight folders (``make_tiny_model --variant flux-schnell|flux-dev``) are loaded by both
diffusers and batchgen, fp32 on CPU, same seeds through per-item generators; images must be within
1 uint8 level and not saturated. Plus: the schedule (sigmas after dynamic shifting) equals the one
diffusers sets, fixed micro-batch invariance, the schnell guidance warning, setting errors, and the
memory-plan options (fp8 storage, text encoders on the CPU; the GPU half runs only with CUDA).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.models.fp8 import Fp8Linear
from batchgen.sampling import get_sampler
from batchgen.builtin import BUILTINS
from batchgen.tiny import make_tiny_model

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting", ""]
NEGATIVES = ["blurry", "", "low quality"]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 64
STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {v: make_tiny_model(root / v, variant=v, seed=0) for v in ("flux-schnell", "flux-dev")}


@pytest.fixture(scope="module")
def ours(folders):
    return {v: load_pipeline(p, device="cpu", dtype=torch.float32) for v, p in folders.items()}


@pytest.fixture(scope="module")
def ref(folders):
    diffusers = pytest.importorskip("diffusers")
    out = {}
    for variant, path in folders.items():
        txt = diffusers.FluxPipeline.from_pretrained(str(path), local_files_only=True)
        txt.set_progress_bar_config(disable=True)
        img = diffusers.FluxImg2ImgPipeline(**txt.components)
        img.set_progress_bar_config(disable=True)
        out[variant] = (txt, img)
    return out


def _generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _init_images(size=SIZE):
    rng = np.random.default_rng(7)
    base = np.linspace(0, 255, size, dtype=np.float32)
    return [np.stack([np.add.outer(base, base * (i + 1)) % 256, rng.uniform(0, 255, (size, size)),
                      np.add.outer(base[::-1], base) / 2], axis=-1).astype(np.uint8) for i in range(len(PROMPTS))]


def _assert_close(ours_images, expected, width=SIZE, height=SIZE) -> int:
    expected = [(e * 255).round().astype(np.uint8) for e in expected]
    assert [o.shape for o in ours_images] == [(height, width, 3)] * len(expected)
    assert all(len(np.unique(o)) > 32 for o in ours_images)  # real content, not a saturated image
    diff = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(ours_images, expected))
    assert diff <= 1
    return diff


# ------------------------------------------------------------------------------------ parity
def test_schnell_txt2img_matches_diffusers(ours, ref):
    txt, _ = ref["flux-schnell"]
    # diffusers' schnell ignores its default guidance_scale (3.5); its max_sequence_length default
    # is 512 for both variants, ours is schnell's 256: pass it.
    expected = txt(PROMPTS, width=SIZE, height=SIZE, num_inference_steps=STEPS, max_sequence_length=256,
                   generator=_generators(), output_type="np").images
    images = ours["flux-schnell"].generate(PROMPTS, SEEDS, width=SIZE, height=SIZE)  # default steps: 4
    _assert_close(images, expected)


@pytest.mark.parametrize("width, height, length", [(64, 64, None), (96, 48, 128)], ids=["64x64", "96x48"])
def test_dev_txt2img_matches_diffusers(ours, ref, width, height, length):
    """Default settings (512 T5 tokens) at 64x64; a non-square size, whose token count gives another mu."""
    txt, _ = ref["flux-dev"]
    pipe = ours["flux-dev"]
    seq = {} if length is None else {"max_sequence_length": length}
    expected = txt(PROMPTS, width=width, height=height, num_inference_steps=STEPS, guidance_scale=4.0,
                   generator=_generators(), output_type="np", **seq).images
    images = pipe.generate(PROMPTS, SEEDS, steps=STEPS, guidance_scale=4.0, width=width, height=height, **seq)
    _assert_close(images, expected, width, height)
    # The dynamically shifted schedule (mu from this size's packed token count) is diffusers' exactly.
    settings = {"width": width, "height": height, "steps": STEPS}
    sampler = get_sampler("flow_euler", pipe.scheduler_config, STEPS, **pipe.family.schedule(settings, "flow_euler"))
    assert torch.equal(sampler.plan.sigmas, txt.scheduler.sigmas.cpu())


def test_dev_schedules_differ_by_size(ours):
    fam = ours["flux-dev"].family
    mus = [fam.schedule({"width": w, "height": h, "steps": 4}, "flow_euler")["mu"] for w, h in ((64, 64), (96, 48))]
    assert mus[0] != mus[1]
    assert fam.schedule({"width": 1024, "height": 1024, "steps": 28}, "flow_euler")["mu"] == pytest.approx(1.15)
    assert "mu" not in ours["flux-schnell"].family.schedule({"width": 64, "height": 64, "steps": 4}, "flow_euler")
    # FlowMatchEuler takes FluxPipeline's explicit sigmas; DPM-Solver with flow sigmas takes only mu.
    assert "sigmas" not in fam.schedule({"width": 64, "height": 64, "steps": 4}, "flow_dpmpp_2m")


def test_dev_img2img_matches_diffusers(ours, ref):
    from PIL import Image

    _, img = ref["flux-dev"]
    inits = _init_images()
    expected = img(PROMPTS, image=[Image.fromarray(a) for a in inits], strength=0.7, width=SIZE, height=SIZE,
                   num_inference_steps=STEPS, guidance_scale=4.0, max_sequence_length=128, generator=_generators(),
                   output_type="np").images
    images = ours["flux-dev"].generate(PROMPTS, SEEDS, init_images=inits, strength=0.7, steps=STEPS,
                                       guidance_scale=4.0, width=SIZE, height=SIZE, max_sequence_length=128)
    _assert_close(images, expected)


def test_dev_true_cfg_matches_diffusers(ours, ref):
    """diffusers runs the negative prompt as a second transformer call; we batch both into one call,
    which may round differently in the last bits: within 1 level."""
    txt, _ = ref["flux-dev"]
    expected = txt(PROMPTS, negative_prompt=NEGATIVES, true_cfg_scale=2.5, width=SIZE, height=SIZE,
                   num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=128, generator=_generators(),
                   output_type="np").images
    images = ours["flux-dev"].generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, true_cfg_scale=2.5, steps=STEPS,
                                       width=SIZE, height=SIZE, max_sequence_length=128)  # default guidance 3.5
    _assert_close(images, expected)
    plain = ours["flux-dev"].generate(PROMPTS[:1], SEEDS[:1], steps=STEPS, width=SIZE, height=SIZE,
                                      max_sequence_length=128)
    assert not np.array_equal(plain[0], images[0])  # true CFG changed the image


# ------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("variant, options", [("flux-dev", {"negative_prompts": "blurry", "true_cfg_scale": 2.0}),
                                              ("flux-schnell", {})], ids=["dev-true-cfg", "schnell"])
def test_micro_batch_invariance(ours, variant, options):
    pipe = ours[variant]
    kwargs = dict(steps=2, width=32, height=48, micro_batch=4, max_sequence_length=32, **options)
    target, seed = "a lighthouse at dawn", 99
    others = [f"filler prompt {i}" for i in range(4)]
    alone = pipe.generate([target], [seed], **kwargs)[0]
    for position in (1, 4):
        prompts = others[:position] + [target] + others[position:]
        seeds = list(range(position)) + [seed] + list(range(100, 100 + len(others) - position))
        assert pipe.generate(prompts, seeds, **kwargs)[position].tobytes() == alone.tobytes(), position


def test_img2img_micro_batch_invariance(ours):
    inits = _init_images(32) + _init_images(32)[:2]
    prompts = [f"p{i}" for i in range(5)]
    kwargs = dict(steps=4, width=32, height=32, strength=0.6, micro_batch=4, max_sequence_length=32)
    batch = ours["flux-schnell"].generate(prompts, list(range(5)), init_images=inits, **kwargs)
    alone = ours["flux-schnell"].generate(prompts[4:], [4], init_images=inits[4:], **kwargs)[0]
    assert batch[4].tobytes() == alone.tobytes()


def test_decode_splits_large_images_per_item(ours, monkeypatch):
    """At most DECODE_PIXELS (one megapixel; here 64x64) per VAE call; smaller images in one call."""
    import batchgen.families.flux as flux

    fam = ours["flux-schnell"].family
    monkeypatch.setattr(flux, "DECODE_PIXELS", 64 * 64)
    calls = []
    real = fam.vae.decode
    monkeypatch.setattr(fam.vae, "decode", lambda z: calls.append(z.shape[0]) or real(z))
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    split = fam.decode(latents)
    fam.decode(torch.zeros(3, 16, 4, 4))
    assert calls == [1, 1, 3]
    assert split.shape == (2, 3, 64, 64) and torch.allclose(split, real(latents / fam.vae.scaling_factor
                                                                         + fam.vae.shift_factor), atol=1e-4)


# ------------------------------------------------------------------- defaults, warnings, errors
def test_variants_and_defaults(ours):
    schnell, dev = ours["flux-schnell"], ours["flux-dev"]
    assert (schnell.model_info["variant"], dev.model_info["variant"]) == ("flux-schnell", "flux-dev")
    assert dev.model_info["family"] == "flux" and dev.model_info["prediction_type"] == "flow"
    assert schnell.family.defaults() == {"steps": 4, "guidance_scale": 0.0}
    assert dev.family.defaults() == {"steps": 28, "guidance_scale": 3.5}
    assert schnell.default_size == dev.default_size == (256, 256)  # the tiny VAE's sample_size
    assert schnell.family.resolve({})["max_sequence_length"] == 256
    assert dev.family.resolve({})["max_sequence_length"] == 512
    assert dev.family.resolve({"max_sequence_length": 77})["max_sequence_length"] == 77
    assert BUILTINS["tiny-flux-schnell"][0] == "flux-schnell" and BUILTINS["tiny-flux-dev"][0] == "flux-dev"


def test_max_sequence_length_changes_the_image(ours):
    pipe = ours["flux-dev"]
    a = pipe.generate(PROMPTS[:1], SEEDS[:1], steps=2, width=32, height=32, max_sequence_length=64)[0]
    b = pipe.generate(PROMPTS[:1], SEEDS[:1], steps=2, width=32, height=32, max_sequence_length=16)[0]
    assert not np.array_equal(a, b)


def test_schnell_guidance_is_ignored_with_one_warning(folders, caplog):
    pipe = load_pipeline(folders["flux-schnell"], device="cpu", dtype=torch.float32)
    kwargs = dict(steps=1, width=32, height=32, max_sequence_length=16)
    with caplog.at_level(logging.WARNING, logger="batchgen.families.flux"):
        plain = pipe.generate(["x"], [1], **kwargs)[0]
        assert not caplog.records
        guided = pipe.generate(["x"], [1], guidance_scale=7.0, **kwargs)[0]
        pipe.generate(["x", "y"], [1, 2], guidance_scale=5.0, micro_batch=1, **kwargs)
    warnings = [r for r in caplog.records if "guidance_scale" in r.getMessage()]
    assert len(warnings) == 1 and "ignored" in warnings[0].getMessage()
    assert guided.tobytes() == plain.tobytes()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_sequence_length=513), "max_sequence_length"),
    (dict(max_sequence_length=0), "max_sequence_length"),
    (dict(width=72), "multiple of 16"),
    (dict(true_cfg_scale=0.5), "true_cfg_scale"),
    (dict(original_width=64), "sdxl"),
])
def test_bad_settings(ours, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ours["flux-dev"].generate(["x"], [0], steps=1, **{"width": 32, "height": 32, **kwargs})


def test_max_sequence_length_above_the_tokenizer_limit(folders):
    pipe = load_pipeline(folders["flux-dev"], device="cpu", dtype=torch.float32)
    pipe.tokenizer_2.model_max_length = 128
    with pytest.raises(ValueError, match=r"max_sequence_length: 256 .*T5 tokenizer takes \(128"):
        pipe.generate(["x"], [0], steps=1, width=32, height=32, max_sequence_length=256)
    assert pipe.family.resolve({})["max_sequence_length"] == 128  # the default follows the tokenizer


def test_schnell_refuses_a_noise_sampler(ours):
    with pytest.raises(ValueError, match="flow-matching"):
        ours["flux-schnell"].generate(["x"], [0], sampler="ddim", steps=1, width=32, height=32)


# ------------------------------------------------------------------------------ memory plans
def test_fp8_storage(folders, ours):
    pipe = load_pipeline(folders["flux-dev"], device="cpu", dtype=torch.float32, fp8=("transformer",))
    layers = [m for m in pipe.transformer.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 14 + 2 * 6  # double blocks: 14 Linears each; single blocks: 6
    assert all(m.weight_codes.dtype == torch.uint8 for m in layers)
    assert isinstance(pipe.transformer.x_embedder, torch.nn.Linear)  # fp8_keep: stays full precision
    assert pipe.model_info["fp8"] == ["transformer"]
    kwargs = dict(steps=STEPS, width=SIZE, height=SIZE, max_sequence_length=32)
    fp8 = np.stack(pipe.generate(PROMPTS, SEEDS, **kwargs)).astype(np.int16)
    full = np.stack(ours["flux-dev"].generate(PROMPTS, SEEDS, **kwargs)).astype(np.int16)
    other = np.stack(ours["flux-dev"].generate(PROMPTS, [1, 2, 3], **kwargs)).astype(np.int16)
    # Quantization noise (measured 3.1 levels mean; random tiny weights amplify it; bf16 gives 1.2),
    # far from what another seed changes (12.5).
    assert 0 < np.abs(fp8 - full).mean() < 0.4 * np.abs(other - full).mean()
    with pytest.raises(ValueError, match="loras: .*float8"):
        pipe.set_loras([{"uri": "style.safetensors", "scale": 1.0}])
    with pytest.raises(ValueError, match="fp8: 'unet'"):
        load_pipeline(folders["flux-dev"], device="cpu", dtype=torch.float32, fp8=("unet",))


def test_fp8_text_encoder(folders, ours):
    pipe = load_pipeline(folders["flux-dev"], device="cpu", dtype=torch.float32, fp8=("text_encoder_2",))
    assert sum(isinstance(m, Fp8Linear) for m in pipe.text_encoder_2.modules()) == 2 * 7  # q k v o wi_0 wi_1 wo
    full = ours["flux-dev"].family.t5(PROMPTS, "cpu", 32)
    quantized = pipe.family.t5(PROMPTS, "cpu", 32)
    # e4m3 keeps 3 mantissa bits: 0.107 relative error measured on the random tiny T5; a wrong scale gives ~1.
    assert 0 < ((quantized - full).norm() / full.norm()).item() < 0.2


def test_fp8_linear_round_trip():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q = Fp8Linear.from_linear(linear)
    x = torch.randn(5, 64)
    rel = (q(x) - linear(x)).norm() / linear(x).norm()
    assert 0 < rel < 0.05
    assert q.to(torch.bfloat16).weight_codes.dtype == torch.uint8  # Module.to(dtype) keeps the codes
    assert q.weight_scale.dtype == torch.float32 and q.to(torch.bfloat16).weight.dtype == torch.bfloat16


def test_text_encoder_device_is_refused_by_families_without_it(tiny_sd1):
    with pytest.raises(ValueError, match="text_encoder_device"):
        load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32, text_encoder_device="cuda")


@pytest.mark.gpu
def test_memory_plans_on_gpu(folders):
    """bf16 on CUDA: text encoders on the CPU give (nearly) the same images; fp8 runs; invariance holds."""
    kwargs = dict(steps=4, width=64, height=64, micro_batch=4)
    prompts, seeds = PROMPTS + ["a lighthouse"], SEEDS + [7]
    base = load_pipeline(folders["flux-dev"], device="cuda")
    assert base.transformer.dtype == torch.bfloat16
    reference = np.stack(base.generate(prompts, seeds, **kwargs)).astype(np.int16)
    cpu_text = load_pipeline(folders["flux-dev"], device="cuda", text_encoder_device="cpu")
    assert next(cpu_text.text_encoder_2.parameters()).device.type == "cpu"
    assert next(cpu_text.transformer.parameters()).device.type == "cuda"
    images = np.stack(cpu_text.generate(prompts, seeds, **kwargs)).astype(np.int16)
    assert np.abs(images - reference).mean() < 2
    fp8 = load_pipeline(folders["flux-dev"], device="cuda", text_encoder_device="cpu", fp8=("transformer",))
    batch = fp8.generate(prompts, seeds, **kwargs)
    assert fp8.generate(prompts[3:], seeds[3:], **kwargs)[0].tobytes() == batch[3].tobytes()
    assert np.abs(np.stack(batch).astype(np.int16) - reference).mean() < 4
