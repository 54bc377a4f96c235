"""Pipeline behaviour: batch invariance, argument validation, checkpoint errors, fingerprints."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from batchgen import load_pipeline
from batchgen.errors import CheckpointError

SIZE = 64


@pytest.fixture(scope="module")
def pipe(tiny_sd1):
    return load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m_sde_karras"])
def test_batch_invariance(pipe, sampler):
    """At micro_batch=4 an item's bytes do not depend on its batch-mates or its position (stochastic
    samplers included: their per-step noise comes from the item's own generator)."""
    target, seed = "a lighthouse at dawn", 99
    others = [f"filler prompt {i}" for i in range(6)]
    alone = pipe.generate([target], [seed], sampler=sampler, steps=3, width=SIZE, height=SIZE, micro_batch=4)[0]
    for position in (0, 2, 3, 5):
        prompts = others[:position] + [target] + others[position:]
        seeds = list(range(position)) + [seed] + list(range(100, 100 + len(others) - position))
        images = pipe.generate(prompts, seeds, sampler=sampler, steps=3, width=SIZE, height=SIZE, micro_batch=4)
        assert images[position].tobytes() == alone.tobytes(), f"position {position}"


def test_img2img_batch_invariance(pipe):
    rng = np.random.default_rng(0)
    inits = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(5)]
    prompts = [f"p{i}" for i in range(5)]
    kwargs = dict(steps=4, width=SIZE, height=SIZE, strength=0.6, micro_batch=4)
    batch = pipe.generate(prompts, list(range(5)), init_images=inits, **kwargs)
    alone = pipe.generate(prompts[4:], [4], init_images=inits[4:], **kwargs)[0]
    assert batch[4].tobytes() == alone.tobytes()


def test_init_image_is_resized(pipe):
    from PIL import Image

    big = Image.fromarray(np.full((100, 80, 3), 128, np.uint8))
    [img] = pipe.generate(["x"], [0], init_images=[big], strength=0.5, steps=2, width=SIZE, height=SIZE)
    assert img.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(width=60), "width"),
        (dict(height=0), "height"),
        (dict(steps=0), "steps"),
        (dict(seeds=[2**63]), "seeds[0]"),
        (dict(seeds=[-1]), "seeds[0]"),
        (dict(seeds=[1, 2]), "seeds"),
        (dict(init_images=[np.zeros((8, 8, 3), np.uint8)], strength=0.0), "strength"),
        (dict(init_images=[np.zeros((8, 8, 3), np.uint8)], strength=1.5), "strength"),
        (dict(init_images=[]), "init_images"),
        (dict(negative_prompts=["a", "b"]), "negative_prompts"),
        (dict(micro_batch=0), "micro_batch"),
        (dict(sampler="no_such_sampler"), "no_such_sampler"),
    ],
)
def test_bad_arguments_name_the_argument(pipe, kwargs, argument):
    call = dict(prompts=["a prompt"], seeds=[1], steps=2, width=SIZE, height=SIZE)
    call.update(kwargs)
    with pytest.raises(ValueError, match=__import__("re").escape(argument)):
        pipe.generate(**call)


def test_long_prompt_is_truncated_with_warning(pipe, caplog):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    with caplog.at_level(logging.WARNING):
        [img] = pipe.generate([long_prompt], [3], steps=2, width=SIZE, height=SIZE)
    assert img.shape == (SIZE, SIZE, 3)
    assert any("truncated" in r.message for r in caplog.records)


def test_missing_component_file_is_named(tiny_sd1, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_sd1, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae.*diffusion_pytorch_model\.safetensors"):
        load_pipeline(broken, device="cpu")
    (broken / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_pipeline(broken, device="cpu")


def test_shape_mismatch_names_key_and_shapes(tiny_sd1, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_sd1, broken)
    path = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"conv_in\.weight.*\(3, 3, 3, 3\).*expects"):
        load_pipeline(broken, device="cpu")


def test_pickle_weights_are_refused(tiny_sd1, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_sd1, broken)
    path = broken / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(path)), broken / "vae" / "diffusion_pytorch_model.bin")
    path.unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        load_pipeline(broken, device="cpu")
    assert load_pipeline(broken, device="cpu", allow_pickle=True).fingerprint


def test_fp16_variant_and_shards_load_same_weights(tiny_sd1, tmp_path, pipe):
    """An fp16-variant-only UNet and a sharded VAE load; outputs equal the fp16-rounded model."""
    alt = tmp_path / "m"
    shutil.copytree(tiny_sd1, alt)
    unet_file = alt / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(unet_file))
    save_file({k: v.half() for k, v in state.items()}, str(alt / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    unet_file.unlink()
    vae_file = alt / "vae" / "diffusion_pytorch_model.safetensors"
    vae_state = load_file(str(vae_file))
    keys = sorted(vae_state)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: vae_state[k] for k in part}, str(alt / "vae" / name))
        weight_map.update({k: name for k in part})
    (alt / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    vae_file.unlink()

    loaded = load_pipeline(alt, device="cpu", dtype=torch.float32)
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, state[key].half().float()), key
    for key, value in loaded.vae.state_dict().items():
        assert torch.equal(value, vae_state[key]), key
    assert loaded.fingerprint != pipe.fingerprint
    (alt / "vae" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002"):
        load_pipeline(alt, device="cpu")


def test_fingerprint_is_stable_and_content_sensitive(tiny_sd1, tmp_path, pipe):
    copy = tmp_path / "m"
    shutil.copytree(tiny_sd1, copy)
    assert load_pipeline(copy, device="cpu").fingerprint == pipe.fingerprint
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    config["steps_offset"] = 0
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert load_pipeline(copy, device="cpu").fingerprint != pipe.fingerprint


def test_builtin_tiny_is_built_once_and_deterministic(tmp_path, monkeypatch, tiny_sd1):
    from batchgen.builtin import builtin_model_path
    from batchgen.tiny import make_tiny_model

    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))
    first = builtin_model_path("tiny")
    mtime = (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert builtin_model_path("tiny") == first
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    # Same seed -> identical files to the fixture's independently built copy.
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.json"):
        assert (first / rel).read_bytes() == (tiny_sd1 / rel).read_bytes(), rel
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    assert (other / "unet/diffusion_pytorch_model.safetensors").read_bytes() != (first / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="builtin:nope"):
        builtin_model_path("nope")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(tiny_sd1, dtype):
    gpu = load_pipeline(tiny_sd1, device="cuda", dtype=dtype)
    cpu = load_pipeline(tiny_sd1, device="cpu", dtype=torch.float32)
    kwargs = dict(steps=8, width=128, height=128, micro_batch=2)
    ours = gpu.generate(["a cat", "a dog", "a ship"], [1, 2, 3], **kwargs)
    ref = cpu.generate(["a cat", "a dog", "a ship"], [1, 2, 3], **kwargs)
    assert all(o.dtype == np.uint8 and o.shape == (128, 128, 3) for o in ours)
    # Half precision drifts from fp32 but must stay close on average (same noise, same weights).
    mean_diff = np.mean([np.abs(o.astype(float) - r.astype(float)).mean() for o, r in zip(ours, ref)])
    assert mean_diff < 8.0
    again = gpu.generate(["a cat", "a dog", "a ship"], [1, 2, 3], **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, again))
