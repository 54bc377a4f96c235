"""Few-step samplers through generate(): explicit timesteps, micro-batch invariance, and the
step-distilled recipes (SDXL-Turbo, SDXL-Lightning, Hyper-SD, DMD2, LCM-LoRA) against diffusers'
pipelines with the same scheduler, spacing, steps, guidance and timesteps, on tiny random models
(the weights are random: what is checked is the schedule and the guidance path, <= 1 level).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from tests.diffusers_reference import aligned
from tests.test_pipeline_parity import _init_images, _max_level_diff, _scheduler

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting", ""]
NEGATIVES = ["blurry", "", "low quality"]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 48
DMD2 = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    txt = diffusers.StableDiffusionPipeline.from_pretrained(
        str(tiny_sd1), safety_checker=None, requires_safety_checker=False, local_files_only=True)
    txt.set_progress_bar_config(disable=True)
    img = diffusers.StableDiffusionImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32), txt, img, dict(txt.scheduler.config)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from batchgen.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "sdxl", variant="sdxl", seed=0)
    txt = aligned(diffusers.StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True))
    txt.set_progress_bar_config(disable=True)
    img = diffusers.StableDiffusionXLImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return load_pipeline(path, device="cpu", dtype=torch.float32), txt, img, dict(txt.scheduler.config)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _uint8(images):
    return [(e * 255).round().astype(np.uint8) for e in images]


def render_both(models, sampler, *, steps=None, guidance, config=None, ref_options=None, sampler_options=None,
                eta=None, img2img=False, strength=0.7, prompts=PROMPTS, negatives=NEGATIVES, seeds=SEEDS):
    """(ours, diffusers') images of one recipe. ``config``: the checkpoint's scheduler config keys
    (both sides); ``ref_options``: diffusers' ``Scheduler.from_config(config, **ref_options)``;
    ``sampler_options``: ours; same steps or timesteps, guidance and eta on both sides."""
    from PIL import Image

    ours_pipe, txt, img, base = models
    options = dict(sampler_options or {})
    ref = img if img2img else txt
    ref_config = {**base, **(config or {}), **(ref_options or {})}
    ref.scheduler = _scheduler(sampler, ref_config, **({"eta": eta} if eta is not None else {}))
    common = dict(negative_prompt=negatives, guidance_scale=guidance, output_type="np",
                  generator=_generators(seeds))
    if "timesteps" in options:
        common["timesteps"] = list(options["timesteps"])
    else:
        common["num_inference_steps"] = steps
    if sampler == "tcd" and eta is not None:
        options["eta"] = eta
    kwargs = dict(negative_prompts=negatives, sampler=sampler, steps=steps, guidance_scale=guidance, width=SIZE,
                  height=SIZE, sampler_options=options)
    ours_pipe.family.scheduler_config = {**base, **(config or {})}
    try:
        if img2img:
            inits = _init_images()[: len(prompts)]
            expected = ref(prompts, image=[Image.fromarray(a) for a in inits], strength=strength, **common).images
            ours = ours_pipe.generate(prompts, seeds, init_images=inits, strength=strength, **kwargs)
        else:
            expected = ref(prompts, width=SIZE, height=SIZE, **common).images
            ours = ours_pipe.generate(prompts, seeds, **kwargs)
    finally:
        ours_pipe.family.scheduler_config = base
    return ours, _uint8(expected)


def assert_match(ours, expected):
    assert all(o.shape == (SIZE, SIZE, 3) and o.dtype == np.uint8 for o in ours)
    assert all(len(np.unique(o)) > 32 for o in ours)  # real content, not a saturated image
    diff = _max_level_diff(ours, expected)
    assert diff <= 1, f"{diff} levels apart"
    return diff


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_explicit_timesteps_match_diffusers(sd1, sampler, img2img):
    """sampler_options.timesteps = the pipeline's timesteps=...; steps left unset = the list's length."""
    assert_match(*render_both(sd1, sampler, guidance=1.0, sampler_options={"timesteps": DMD2}, img2img=img2img,
                              negatives=None))


@pytest.mark.parametrize("sampler,img2img", [("euler", False), ("dpmpp_2m", True)], ids=["euler-txt2img",
                                                                                       "dpmpp_2m-img2img"])
def test_explicit_timesteps_of_other_samplers_match_diffusers(sd1, sampler, img2img):
    """euler / dpmpp_2m with sampler_options.timesteps == the pipeline's timesteps=... (with CFG;
    img2img cuts the list: strength 0.5 of 4 timesteps starts at the third)."""
    assert_match(*render_both(sd1, sampler, guidance=3.0, sampler_options={"timesteps": [999, 700, 301, 40]},
                              img2img=img2img, strength=0.5))


def test_steps_must_agree_with_timesteps(sd1):
    with pytest.raises(ValueError, match="4 timesteps for steps=3; set steps=4"):
        sd1[0].generate(["x"], [1], sampler="lcm", steps=3, sampler_options={"timesteps": DMD2}, width=SIZE,
                        height=SIZE)
    with pytest.raises(ValueError, match="not accepted by sampler 'ddim'"):
        sd1[0].generate(["x"], [1], sampler="ddim", sampler_options={"timesteps": DMD2}, width=SIZE, height=SIZE)


@pytest.mark.parametrize("sampler,options", [("lcm", {}), ("tcd", {"eta": 0.6}),
                                             ("dpmpp_2m_sde", {"timesteps": [999, 700, 301, 40]})])
def test_item_alone_equals_item_among_others(sd1, sampler, options):
    """Per-step noise comes from each item's generator: an item rendered alone equals the same item
    rendered among other conditioned items at the same micro-batch size."""
    pipe = sd1[0]
    kwargs = dict(sampler=sampler, steps=4, guidance_scale=3.0, width=SIZE, height=SIZE, sampler_options=options,
                  micro_batch=2)
    mixed = pipe.generate(PROMPTS, SEEDS, negative_prompts=NEGATIVES, **kwargs)
    for i in range(len(PROMPTS)):
        alone = pipe.generate([PROMPTS[i]], [SEEDS[i]], negative_prompts=[NEGATIVES[i]], **kwargs)
        assert np.array_equal(alone[0], mixed[i]), f"item {i} changes with its batch-mates"


# --- the step-distilled recipes (docs/samplers.md, "Few-step distilled checkpoints") ------------
# name -> (sampler, steps, guidance, checkpoint config keys, diffusers from_config options, our
# sampler_options, eta). Weights are random: what is checked is the schedule and the guidance path.
RECIPES = {
    # stabilityai/sdxl-turbo ships an EulerAncestral config with trailing spacing; guidance 0
    "sdxl-turbo-4": ("euler_a", 4, 0.0, {"timestep_spacing": "trailing"}, {}, {}, None),
    # ByteDance/SDXL-Lightning on the SDXL base config: EulerDiscrete(timestep_spacing="trailing"), guidance 0
    "sdxl-lightning-4": ("euler", 4, 0.0, {}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "trailing"}, None),
    # ByteDance/Hyper-SD: N-step LoRAs with DDIM trailing (guidance 0; the CFG LoRA with guidance 5),
    # the unified 1-step LoRA with TCD eta 1, the 1-step UNet with LCM at timesteps [800]
    "hyper-sd-ddim-4": ("ddim", 4, 0.0, {}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "trailing"}, None),
    "hyper-sd-ddim-cfg-8": ("ddim", 8, 5.0, {}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "trailing"},
                            None),
    "hyper-sd-tcd-1": ("tcd", 1, 0.0, {}, {}, {}, 1.0),
    "hyper-sd-tcd-4": ("tcd", 4, 0.0, {}, {}, {}, 0.5),
    "hyper-sd-unet-1": ("lcm", None, 0.0, {}, {}, {"timesteps": [800]}, None),
    # tianweiy/DMD2: LCMScheduler with timesteps [999, 749, 499, 249] (1-step: [399]), guidance 0
    "dmd2-4": ("lcm", None, 0.0, {}, {}, {"timesteps": DMD2}, None),
    "dmd2-1": ("lcm", None, 0.0, {}, {}, {"timesteps": [399]}, None),
    # latent-consistency/lcm-lora-sdxl: LCMScheduler, 4-8 steps, guidance 1 (no CFG) to 2 (CFG)
    # (guidance 1, no CFG, is the dmd2 rows' path)
    "lcm-lora-cfg-4": ("lcm", 4, 2.0, {}, {}, {}, None),
    # h1t/TCD-SDXL-LoRA: TCDScheduler, 4 steps, guidance 0, eta 0.3
    "tcd-lora-4": ("tcd", 4, 0.0, {}, {}, {}, 0.3),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_sdxl_recipe_matches_diffusers(sdxl, recipe):
    sampler, steps, guidance, config, ref_options, options, eta = RECIPES[recipe]
    # SDXL zeroes an empty negative prompt per item where diffusers encodes "" in a list (see
    # families/sdxl.py): the guided recipes use non-empty negatives.
    negatives = ["blurry", "low quality"] if guidance > 1 else None
    ours, expected = render_both(sdxl, sampler, steps=steps, guidance=guidance, config=config, ref_options=ref_options,
                                 sampler_options=options, eta=eta, negatives=negatives, prompts=PROMPTS[:2],
                                 seeds=SEEDS[1:])
    print(f"{recipe}: {assert_match(ours, expected)} levels")


@pytest.mark.parametrize("recipe", ["sdxl-lightning-4", "dmd2-4", "hyper-sd-tcd-4"])
def test_sdxl_recipe_img2img_matches_diffusers(sdxl, recipe):
    sampler, steps, guidance, config, ref_options, options, eta = RECIPES[recipe]
    ours, expected = render_both(sdxl, sampler, steps=steps, guidance=guidance, config=config, ref_options=ref_options,
                                 sampler_options=options, eta=eta, negatives=None, img2img=True, strength=0.5,
                                 prompts=PROMPTS[:2], seeds=SEEDS[1:])
    print(f"{recipe} img2img: {assert_match(ours, expected)} levels")


def test_spacing_option_changes_the_schedule(sdxl):
    """Without the option the SDXL base config's leading spacing gives another image (the option acts)."""
    pipe = sdxl[0]
    kwargs = dict(sampler="euler", steps=4, guidance_scale=0.0, width=SIZE, height=SIZE)
    leading = pipe.generate(PROMPTS[:1], SEEDS[:1], **kwargs)
    trailing = pipe.generate(PROMPTS[:1], SEEDS[:1], sampler_options={"timestep_spacing": "trailing"}, **kwargs)
    assert _max_level_diff(leading, trailing) > 1


# --- LCM-LoRA files through the LoRA loader -------------------------------------------------------
# The modules latent-consistency/lcm-lora-sdv1-5 / -sdxl adapt: attention, projections, feed-forward,
# every resnet conv (3x3 conv LoRA), the time-embedding projections and the resamplers.
LCM_LORA_TARGETS = re.compile(r"\.(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2|"
                              r"conv_shortcut|time_emb_proj|downsamplers\.0\.conv|upsamplers\.0\.conv)$")


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lcm_lora_layout_loads_and_matches_diffusers(sd1, tiny_sd1, tmp_path, layout):
    """A tiny LCM-LoRA-shaped file (UNet only, alpha = rank as LCM-LoRA's) fused by our loader, then the
    LCM-LoRA recipe (lcm, 4 steps, guidance 1): equal to diffusers' load_lora_weights + fuse_lora."""
    pytest.importorskip("peft")
    from tests.test_lora import _kohya, _pairs, _peft, _reference

    pipe = sd1[0]
    unet = pipe.family.unet
    names = [k[: -len(".weight")] for k in dict(unet.named_parameters()) if LCM_LORA_TARGETS.search(k[: -7])]
    assert any("conv1" in n for n in names) and any("time_emb_proj" in n for n in names)
    pairs = _pairs(unet, names, 4, seed=11, strength=0.5)
    if layout == "kohya":
        path = _kohya(tmp_path / "lcm-lora.safetensors", {"lora_unet_": pairs}, alpha=4.0)
    else:
        path = _peft(tmp_path / "lcm-lora.safetensors", {"unet": pairs})  # no alpha: lora_alpha = r
    base = pipe.generate(PROMPTS, SEEDS, sampler="lcm", steps=4, guidance_scale=1.0, width=SIZE, height=SIZE)
    try:
        info = pipe.set_loras([{"uri": str(path), "scale": 1.0}])
        assert info[0]["format"] == layout
        ref = _reference(tiny_sd1, [(path, 1.0)])
        ref.scheduler = _scheduler("lcm", dict(ref.scheduler.config))
        expected = _uint8(ref(PROMPTS, width=SIZE, height=SIZE, num_inference_steps=4, guidance_scale=1.0,
                              output_type="np", generator=_generators(SEEDS)).images)
        ours = pipe.generate(PROMPTS, SEEDS, sampler="lcm", steps=4, guidance_scale=1.0, width=SIZE, height=SIZE)
    finally:
        pipe.set_loras([])
    print(f"LCM-LoRA ({layout}): {assert_match(ours, expected)} levels; {_max_level_diff(ours, base)} from the base")
    assert _max_level_diff(ours, base) > 8  # the LoRA acts


def test_a_job_with_explicit_timesteps_takes_its_step_count_from_them(tmp_path):
    """Pre-flight (no Ray): a spec with sampler_options.timesteps and no sampling.steps resolves
    steps to the list's length, as generate() does; a steps that differs is refused naming a row."""
    from batchgen.errors import BatchgenError
    from batchgen.spec import spec_from_dict
    from tests.faults import prepare
    from tests.fixtures_jobs import job_dict, write_prompts

    inp = write_prompts(tmp_path / "p.parquet", 2)
    sampling = {"sampler": "lcm", "sampler_options": {"timesteps": [999, 759, 499, 259]}, "guidance_scale": 1.0,
                "steps": None}
    plan = prepare(spec_from_dict(job_dict(inp, tmp_path / "out", sampling=sampling)))
    try:
        assert plan.resolved["settings"]["steps"] == 4
    finally:
        plan.release()
    with pytest.raises(BatchgenError, match="timesteps"):
        prepare(spec_from_dict(job_dict(inp, tmp_path / "out2", sampling={**sampling, "steps": 6})))
