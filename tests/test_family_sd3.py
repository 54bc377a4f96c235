"""SD3 / SD3.5 family: full-pipeline parity with diffusers' StableDiffusion3(Img2Img)Pipeline on tiny
random checkpoints, fixed micro-batch invariance, and the family's errors.

diffusers runs each flow sampler with the scheduler it stands for (tests/diffusers_reference.py),
built with ``from_config`` of the checkpoint's FlowMatchEuler config (DPM-Solver gets
``flow_shift`` = the config's ``shift``). ``flow_dpmpp_2m`` has no img2img reference: diffusers'
SD3 img2img pipeline calls ``scheduler.scale_noise``, which DPMSolverMultistepScheduler lacks.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.errors import CheckpointError
from batchgen.tiny import make_tiny_model
from tests.diffusers_reference import FLOW_SHIFT_FROM, REFERENCE

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting", ""]
NEGATIVES = ["blurry", "", "low quality"]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 64
STEPS = 4
MSL = 24  # a short T5 sequence keeps the tests fast; the default (256) is tested once


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd3")
    out = {v: make_tiny_model(root / v, variant=v, seed=0) for v in ("sd3", "sd35", "sd3-no-t5")}
    # A dynamically shifted config; no max_shift key: the loaded FlowMatchEuler scheduler's default
    # (1.15) applies, not the SD3 pipeline's fallback (1.16).
    dyn = root / "sd3-dynamic"
    shutil.copytree(out["sd3"], dyn)
    sched = dyn / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "use_dynamic_shifting": True,
                                 "base_image_seq_len": 4, "max_image_seq_len": 64, "base_shift": 0.3}))
    out["sd3-dynamic"] = dyn
    return out


@pytest.fixture(scope="module")
def models(folders):
    cache = {}

    def get(variant):
        if variant not in cache:
            extra = {"text_encoder_3": None, "tokenizer_3": None} if variant == "sd3-no-t5" else {}
            txt = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folders[variant]), local_files_only=True,
                                                                     **extra)
            txt.set_progress_bar_config(disable=True)
            img = diffusers.StableDiffusion3Img2ImgPipeline(**txt.components)
            img.set_progress_bar_config(disable=True)
            ours = load_pipeline(folders[variant], device="cpu", dtype=torch.float32)
            cache[variant] = (ours, txt, img, dict(txt.scheduler.config))
        return cache[variant]

    return get


def _scheduler(name, config):
    cls_name, options = REFERENCE[name]
    options = {**options, FLOW_SHIFT_FROM[name]: config["shift"]}
    if config.get("use_dynamic_shifting") and cls_name != "FlowMatchEulerDiscreteScheduler":
        # from_config drops the keys FlowMatchEuler filled with its defaults (`_use_default_values`:
        # max_shift 1.15 here), so the SD3 pipeline would fall back to its own max_shift 1.16 for a
        # swapped-in scheduler. batchgen uses the checkpoint's scheduler values for every sampler.
        config = {k: v for k, v in config.items() if k != "_use_default_values"}
    return getattr(diffusers, cls_name).from_config(config, **options)


def _init_images(n):
    rng = np.random.default_rng(7)
    base = np.linspace(0, 255, SIZE, dtype=np.float32)
    return [np.stack([np.add.outer(base, base * (i + 1)) % 256, rng.uniform(0, 255, (SIZE, SIZE)),
                      np.add.outer(base[::-1], base) / 2], axis=-1).astype(np.uint8) for i in range(n)]


def _check(models, variant, sampler, img2img=False, guidance=7.0, negatives=NEGATIVES, msl=MSL):
    from PIL import Image

    ours, txt, img, config = models(variant)
    ref = img if img2img else txt
    ref.scheduler = _scheduler(sampler, config)
    common = dict(negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=guidance, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in SEEDS], width=SIZE, height=SIZE)
    kwargs = dict(negative_prompts=negatives, sampler=sampler, steps=STEPS, guidance_scale=guidance, width=SIZE,
                  height=SIZE)
    if msl is not None:
        common["max_sequence_length"] = kwargs["max_sequence_length"] = msl
    if img2img:
        inits = _init_images(len(PROMPTS))
        expected = ref(PROMPTS, image=[Image.fromarray(a) for a in inits], strength=0.7, **common).images
        got = ours.generate(PROMPTS, SEEDS, init_images=inits, strength=0.7, **kwargs)
    else:
        expected = ref(PROMPTS, **common).images
        got = ours.generate(PROMPTS, SEEDS, **kwargs)
    expected = [(e * 255).round().astype(np.uint8) for e in expected]
    assert [g.shape for g in got] == [(SIZE, SIZE, 3)] * len(PROMPTS)
    assert all(len(np.unique(g)) > 32 for g in got)  # real content: a saturated image would match trivially
    diff = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(got, expected))
    assert diff <= 1, f"{variant} {sampler} img2img={img2img}: max difference {diff} levels"
    return got


@pytest.mark.parametrize("sampler, img2img", [("flow_euler", False), ("flow_euler", True), ("flow_heun", False),
                                              ("flow_heun", True), ("flow_dpmpp_2m", False)])
def test_sd3_matches_diffusers(models, sampler, img2img):
    _check(models, "sd3", sampler, img2img)


def test_sd35_qk_norm_dual_attention_matches_diffusers(models):
    ours = models("sd35")[0]
    assert ours.model_info["variant"] == "sd35"
    assert ours.transformer.config["qk_norm"] == "rms_norm" and ours.transformer.config["dual_attention_layers"]
    _check(models, "sd35", "flow_euler")


def test_without_t5_matches_diffusers(models):
    """No text_encoder_3: T5's place holds zeros (max_sequence_length x joint_attention_dim), as in diffusers."""
    ours = models("sd3-no-t5")[0]
    assert ours.model_info["t5"] is False
    got = _check(models, "sd3-no-t5", "flow_euler")
    with_t5 = models("sd3")[0].generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, steps=STEPS, width=SIZE,
                                        height=SIZE, max_sequence_length=MSL)
    assert not np.array_equal(got[0], with_t5[0])


def test_default_sequence_length_and_no_guidance_match_diffusers(models):
    _check(models, "sd3", "flow_euler", guidance=1.0, negatives=None, msl=None)


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_dpmpp_2m"])
def test_dynamic_shifting_mu_matches_diffusers(models, sampler):
    ours = models("sd3-dynamic")[0]
    assert "mu" in ours.family.schedule({"width": SIZE, "height": SIZE}, "flow_euler")
    _check(models, "sd3-dynamic", sampler)
    with pytest.raises(ValueError, match="flow_heun.*mu|mu.*flow_heun"):  # diffusers: set_timesteps takes no mu
        ours.generate(["x"], [0], sampler="flow_heun", steps=2, width=SIZE, height=SIZE)


@pytest.mark.parametrize("variant, img2img", [("sd3", False), ("sd3", True), ("sd35", False)],
                         ids=["sd3-txt2img", "sd3-img2img", "sd35-txt2img"])
def test_batch_invariance(models, variant, img2img):
    """At micro_batch=4 an item's bytes do not depend on its batch-mates or its position (SD3.5:
    QK-norm and dual attention too)."""
    pipe = models(variant)[0]
    target, seed = "a lighthouse at dawn", 99
    others = [f"filler prompt {i}" for i in range(5)]
    kwargs = dict(steps=3, width=SIZE, height=SIZE, micro_batch=4, max_sequence_length=MSL, negative_prompts="fog")
    inits = _init_images(6) if img2img else None
    alone = pipe.generate([target], [seed], init_images=inits and inits[5:], **kwargs)[0]
    for position in (0, 3, 5):
        prompts = others[:position] + [target] + others[position:]
        seeds = list(range(position)) + [seed] + list(range(100, 100 + len(others) - position))
        order = None
        if img2img:
            order = inits[:5]
            order = order[:position] + inits[5:] + order[position:]
        images = pipe.generate(prompts, seeds, init_images=order, **kwargs)
        assert images[position].tobytes() == alone.tobytes(), f"position {position}"


def test_non_flow_sampler_names_sampler_and_prediction_type(models):
    pipe = models("sd3")[0]
    with pytest.raises(ValueError, match=r"sampler 'ddim'.*flow-matching"):
        pipe.generate(["x"], [0], sampler="ddim", steps=2, width=SIZE, height=SIZE)
    assert pipe.model_info["prediction_type"] == "flow"


@pytest.mark.parametrize("value", [0, 513, 2.5])
def test_max_sequence_length_out_of_range(models, value):
    with pytest.raises(ValueError, match="max_sequence_length"):
        models("sd3")[0].generate(["x"], [0], steps=2, width=SIZE, height=SIZE, max_sequence_length=value)


@pytest.mark.parametrize("kwargs, word", [(dict(width=72), "multiple of 16"), (dict(height=1024), "position table"),
                                          (dict(sampler="flow_heun", sampler_options={"eta": 1}), "eta"),
                                          (dict(true_cfg_scale=2.0), "true_cfg_scale")])
def test_request_errors(models, kwargs, word):
    args = {"steps": 2, "width": SIZE, "height": SIZE, **kwargs}
    with pytest.raises(ValueError, match=word):
        models("sd3")[0].generate(["x"], [0], **args)


def test_t5_encoder_without_its_tokenizer_is_refused(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["sd3"], broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["tokenizer_3"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tokenizer_3"):
        load_pipeline(broken, device="cpu", dtype=torch.float32)


def test_defaults(models):
    pipe = models("sd3")[0]
    fam = pipe.family
    assert (fam.default_sampler, fam.default_steps, fam.default_guidance) == ("flow_euler", 28, 7.0)
    assert fam.cuda_dtype == torch.bfloat16
    assert fam.resolve({})["max_sequence_length"] == 256
    assert pipe.default_size == (256, 256)  # transformer sample_size 32 x VAE factor 8
