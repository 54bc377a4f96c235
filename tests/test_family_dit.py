"""DiT family: full-pipeline parity with diffusers' DiTPipeline on a tiny random checkpoint (guided
and unguided, learned sigma), prompt -> class mapping, fixed micro-batch invariance, and errors.

DiTPipeline takes class ids; our prompts are class names or ids, mapped with the same id2label
(model_index.json). Compared: the deterministic samplers whose scheduler has unit
``init_noise_sigma`` and an identity ``scale_model_input`` (DDIM, DPM-Solver++, UniPC). DiTPipeline
calls ``scheduler.step`` without the generator (stochastic samplers' step noise cannot match) and
neither scales its initial noise by ``init_noise_sigma`` nor steps from the unscaled sample, so
with the sigma-space schedulers (Euler, Heun, LMS) diffusers' own DiT output is wrong; ours runs
them as every other family does.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from batchgen import load_pipeline
from batchgen.tiny import make_tiny_model
from tests.diffusers_reference import REFERENCE

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["golden retriever", "white fox", "980", "Tinca tinca"]
SEEDS = [0, 12345, 2**63 - 1, 7]
STEPS = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-dit") / "dit", variant="dit", seed=0)


@pytest.fixture(scope="module")
def models(folder):
    ref = diffusers.DiTPipeline.from_pretrained(str(folder), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return load_pipeline(folder, device="cpu", dtype=torch.float32), ref, dict(ref.scheduler.config)


@pytest.mark.parametrize("sampler, guidance", [("ddim", 4.0), ("ddim", 1.0), ("dpmpp_2m", 4.0), ("unipc", 1.5)])
def test_matches_diffusers(models, sampler, guidance):
    ours, ref, config = models
    cls_name, options = REFERENCE[sampler]
    ref.scheduler = getattr(diffusers, cls_name).from_config(config, **options)
    ids = ref.get_label_ids([p for p in PROMPTS if not p.isdigit()])
    ids.insert(2, 980)
    assert [c for c, _ in ours.family.class_labels(PROMPTS)] == ids
    expected = ref(ids, guidance_scale=guidance, num_inference_steps=STEPS, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    got = ours.generate(PROMPTS, SEEDS, sampler=sampler, steps=STEPS, guidance_scale=guidance)
    expected = [(e * 255).round().astype(np.uint8) for e in expected]
    assert [g.shape for g in got] == [(64, 64, 3)] * len(PROMPTS)
    assert all(len(np.unique(g)) > 32 for g in got)  # real content: a saturated image would match trivially
    diff = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(got, expected))
    assert diff <= 1, f"{sampler} guidance {guidance}: max difference {diff} levels"


def test_class_labels(models):
    """Every name diffusers knows maps to its id; the class name is the id's full id2label entry."""
    ours, ref, _ = models
    fam = ours.family
    names = sorted(ref.labels)
    assert [c for c, _ in fam.class_labels(names)] == [ref.labels[n] for n in names]
    assert fam.class_labels(["arctic fox", " Alopex lagopus ", "279", "tench"]) == [
        (279, "arctic fox, white fox, Alopex lagopus")] * 3 + [(0, "tench, Tinca tinca")]
    assert ours.model_info["family"] == "dit"


def test_guidance_and_class_change_the_image(models):
    ours = models[0]
    a, b = ours.generate(["otter", "volcano"], [3, 3], steps=3)
    c = ours.generate(["otter"], [3], steps=3, guidance_scale=1.0)[0]
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_batch_invariance(models):
    """At micro_batch=4 an item's bytes do not depend on its batch-mates or its position (padding
    items get the null class)."""
    ours = models[0]
    target, seed = "macaw", 99
    others = ["otter", "balloon", "0", "convertible", "goldfish"]
    alone = ours.generate([target], [seed], steps=3, micro_batch=4)[0]
    for position in (0, 3, 5):
        prompts = others[:position] + [target] + others[position:]
        seeds = list(range(position)) + [seed] + list(range(100, 100 + len(others) - position))
        images = ours.generate(prompts, seeds, steps=3, micro_batch=4)
        assert images[position].tobytes() == alone.tobytes(), f"position {position}"


@pytest.mark.parametrize("prompt, words", [
    ("golden retreiver", ["golden retreiver", "close matches", "golden retriever"]),
    ("arctic fix", ["arctic fox"]),
    ("5", ["class id 5"]),
    ("", ["prompts[1]", "class"]),
])
def test_unknown_class_is_an_error(models, prompt, words):
    with pytest.raises(ValueError) as info:
        models[0].generate(["otter", prompt], [0, 1], steps=2)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("kwargs, word", [
    (dict(width=32), "fixed size"),
    (dict(height=128), "64x64"),
    (dict(negative_prompts=["", "blurry"]), "negative_prompts[1]"),
    (dict(init_images=[np.zeros((64, 64, 3), np.uint8)] * 2), "img2img"),
    (dict(sampler="flow_euler"), "flow_euler"),
    (dict(max_sequence_length=77), "max_sequence_length"),
])
def test_request_errors(models, kwargs, word):
    with pytest.raises(ValueError) as info:
        models[0].generate(["otter", "macaw"], [0, 1], steps=2, **kwargs)
    assert word in str(info.value)


def test_without_id2label_integer_ids_only(folder, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    index = json.loads((bare / "model_index.json").read_text())
    del index["id2label"]
    (bare / "model_index.json").write_text(json.dumps(index))
    fam = load_pipeline(bare, device="cpu", dtype=torch.float32).family
    assert fam.class_labels(["5", "999"]) == [(5, "5"), (999, "999")]
    with pytest.raises(ValueError, match="no id2label"):
        fam.class_labels(["otter"])
    with pytest.raises(ValueError, match="no id2label"):
        fam.class_labels(["1000"])  # the null class is not a prompt


def test_defaults(models):
    fam = models[0].family
    assert (fam.default_sampler, fam.default_steps, fam.default_guidance) == ("ddim", 50, 4.0)
    assert fam.default_size() == (64, 64) and fam.learned_sigma and fam.null_class == 1000
