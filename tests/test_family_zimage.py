"""The Z-Image family against diffusers' ZImagePipeline / ZImageImg2ImgPipeline.

The tiny random-weight folder (``make_tiny_model --variant zimage``, builtin:tiny-zimage) is loaded
by both diffusers and batchgen, fp32 on CPU, same seeds through per-item generators; images must be
within 1 uint8 level and not saturated. Prompts of different token lengths are mixed (diffusers
then masks attention inside its batch; we group items by padded caption length), CFG on and off,
two sizes. Plus fixed micro-batch invariance, defaults and setting errors.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.builtin import BUILTINS, builtin_model_path
from batchgen.sampling import get_sampler

PROMPTS = ["a red bicycle in the rain", "portrait of an old man, oil painting, " * 3, ""]
NEGATIVES = ["blurry", "", "low quality, " * 4]
SEEDS = [0, 12345, 2**63 - 1]
SIZE = 64
STEPS = 4


@pytest.fixture(scope="module")
def folder():
    return builtin_model_path("tiny-zimage")  # built once per test session


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ref(folder):
    diffusers = pytest.importorskip("diffusers")
    txt = diffusers.ZImagePipeline.from_pretrained(str(folder), local_files_only=True)
    txt.set_progress_bar_config(disable=True)
    img = diffusers.ZImageImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    return txt, img


def _generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _init_images(size=SIZE, n=len(PROMPTS)):
    rng = np.random.default_rng(7)
    base = np.linspace(0, 255, size, dtype=np.float32)
    return [np.stack([np.add.outer(base, base * (i + 1)) % 256, rng.uniform(0, 255, (size, size)),
                      np.add.outer(base[::-1], base) / 2], axis=-1).astype(np.uint8) for i in range(n)]


def _assert_close(ours_images, expected, width=SIZE, height=SIZE) -> int:
    expected = [(e * 255).round().astype(np.uint8) for e in expected]
    assert [o.shape for o in ours_images] == [(height, width, 3)] * len(expected)
    assert all(len(np.unique(o)) > 32 for o in ours_images)  # real content, not a saturated image
    diff = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(ours_images, expected))
    assert diff <= 1
    return diff


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("width, height, length", [(48, 48, None), (64, 32, 40)], ids=["48x48", "64x32-40tok"])
@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["turbo-no-cfg", "cfg"])
def test_txt2img_matches_diffusers(pipe, ref, width, height, length, guidance):
    """diffusers' pipeline templates its prompt list in place: it gets copies."""
    txt, _ = ref
    seq = {} if length is None else {"max_sequence_length": length}
    negatives = NEGATIVES if guidance else None
    expected = txt(list(PROMPTS), negative_prompt=None if negatives is None else list(negatives), width=width,
                   height=height, num_inference_steps=STEPS, guidance_scale=guidance, generator=_generators(),
                   output_type="np", **seq).images
    images = pipe.generate(PROMPTS, SEEDS, negative_prompts=negatives, steps=STEPS, guidance_scale=guidance,
                           width=width, height=height, **seq)
    _assert_close(images, expected, width, height)
    settings = {"width": width, "height": height, "steps": STEPS}
    sampler = get_sampler("flow_euler", pipe.scheduler_config, STEPS, **pipe.family.schedule(settings, "flow_euler"))
    assert torch.equal(sampler.plan.sigmas, txt.scheduler.sigmas.cpu())


@pytest.mark.parametrize("guidance", [0.0, 2.0], ids=["no-cfg", "cfg"])
def test_img2img_matches_diffusers(pipe, ref, guidance):
    from PIL import Image

    _, img = ref
    inits = _init_images()
    expected = img(list(PROMPTS), image=[Image.fromarray(a) for a in inits], strength=0.7, width=SIZE, height=SIZE,
                   num_inference_steps=STEPS, guidance_scale=guidance, max_sequence_length=64,
                   generator=_generators(), output_type="np").images
    images = pipe.generate(PROMPTS, SEEDS, init_images=inits, strength=0.7, steps=STEPS, guidance_scale=guidance,
                           width=SIZE, height=SIZE, max_sequence_length=64)
    _assert_close(images, expected)


def test_guidance_one_still_runs_cfg(pipe):
    """ZImagePipeline's CFG is pos + g * (pos - neg), on for any g > 0: 1.0 is not 'off'."""
    kwargs = dict(steps=2, width=32, height=32, max_sequence_length=32)
    off = pipe.generate(PROMPTS[:1], SEEDS[:1], guidance_scale=0.0, **kwargs)[0]
    one = pipe.generate(PROMPTS[:1], SEEDS[:1], guidance_scale=1.0, **kwargs)[0]
    assert not np.array_equal(off, one)


# ------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("options", [{}, {"negative_prompts": "blurry", "guidance_scale": 2.0}], ids=["turbo", "cfg"])
def test_micro_batch_invariance(pipe, options):
    """An item alone == the item among other prompts (some of other caption lengths) at one micro_batch."""
    kwargs = dict(steps=2, width=32, height=48, micro_batch=3, max_sequence_length=96, **options)
    target, seed = "a lighthouse at dawn", 99
    others = ["filler prompt", "a long filler prompt about " + "mountains and rivers " * 6, "x", "city at night"]
    alone = pipe.generate([target], [seed], **kwargs)[0]
    for position in (1, 4):
        prompts = others[:position] + [target] + others[position:]
        seeds = list(range(position)) + [seed] + list(range(100, 100 + len(others) - position))
        assert pipe.generate(prompts, seeds, **kwargs)[position].tobytes() == alone.tobytes(), position


@pytest.mark.parametrize("options", [{}, {"negative_prompts": ["", "blurry " * 20, "", ""], "guidance_scale": 2.0}],
                         ids=["turbo", "cfg"])
def test_micro_batches_group_items_by_caption_length(pipe, options, monkeypatch):
    """Every transformer call sees one padded caption length per half (prompts; negatives under
    CFG), so an item's shapes never depend on its batch-mates."""
    from batchgen.models.zimage import padded_length

    calls = []
    forward = pipe.family.transformer.forward
    monkeypatch.setattr(pipe.family.transformer, "forward",
                        lambda x, t, c, lengths: calls.append(list(lengths)) or forward(x, t, c, lengths))
    prompts = ["short", "a much longer prompt about " + "mountains and rivers " * 6, "x", "short two"]
    pipe.generate(prompts, [0, 1, 2, 3], steps=1, width=32, height=32, micro_batch=2, max_sequence_length=96,
                  **options)
    halves = 2 if options else 1
    assert len(calls) >= 3
    for lengths in calls:
        for half in np.array_split(np.array(lengths), halves):
            assert len({padded_length(int(n)) for n in half}) == 1, calls


def test_img2img_micro_batch_invariance(pipe):
    inits = _init_images(32, 5)
    prompts = [f"p{i}" for i in range(4)] + ["a fifth, longer prompt " * 3]
    kwargs = dict(steps=4, width=32, height=32, strength=0.6, micro_batch=4, max_sequence_length=64)
    batch = pipe.generate(prompts, list(range(5)), init_images=inits, **kwargs)
    alone = pipe.generate(prompts[:1], [0], init_images=inits[:1], **kwargs)[0]
    assert batch[0].tobytes() == alone.tobytes()


# ------------------------------------------------------------------- defaults, warnings, errors
def test_defaults_and_info(pipe):
    fam = pipe.family
    assert pipe.model_info["family"] == "zimage" and pipe.model_info["prediction_type"] == "flow"
    assert pipe.model_info["pipeline_class"] == "ZImagePipeline"
    assert fam.defaults() == {"steps": 9, "guidance_scale": 0.0}  # Z-Image-Turbo's model card
    assert fam.resolve({})["max_sequence_length"] == 512
    assert pipe.default_size == (256, 256)  # the tiny VAE's sample_size (1024 for the real VAE)
    assert BUILTINS["tiny-zimage"] == ("zimage", 0)
    dynamic = {**fam.scheduler_config, "use_dynamic_shifting": True}
    fam.scheduler_config, saved = dynamic, fam.scheduler_config
    try:
        mus = [fam.schedule({"width": w, "height": h, "steps": 4}, "flow_euler")["mu"] for w, h in ((64, 64),
                                                                                                   (1024, 1024))]
    finally:
        fam.scheduler_config = saved
    assert mus[0] != mus[1] and mus[1] == pytest.approx(1.15)


def test_truncated_prompt_warns_naming_the_item(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="batchgen.families.zimage"):
        pipe.generate(["short", "a long prompt " * 10], [0, 1], item_ids=["a", "b"], steps=1, width=32, height=32,
                      max_sequence_length=32)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["item b"]


def test_errors_name_the_setting(pipe):
    with pytest.raises(ValueError, match="width: 40 is not a multiple of 16"):
        pipe.generate(["x"], [0], width=40, height=32, steps=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.generate(["x"], [0], width=32, height=32, steps=1, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        pipe.generate(["x"], [0], width=32, height=32, steps=1, true_cfg_scale=2.0)
