"""Z-Image as ComfyUI users hold it: the diffusion model alone (``z_image_turbo_*.safetensors``, Z-Image's
original key names with fused qkv, bare or under ``model.diffusion_model.``), the Qwen3 text encoder
file (transformers names under ``model.``) and the VAE file (``ae.safetensors``, LDM names), plus a
tokenizer folder (single files carry none). Detected without a config, converted, loaded strictly:
the tiny model renders byte-identically to its diffusers folder. Our conversion is checked against
diffusers' own single-file converter and detector, and at Z-Image-Turbo's real size on the meta device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from batchgen import load_pipeline
from batchgen.checkpoints import single_file as sf
from batchgen.checkpoints import write_single_file
from batchgen.errors import CheckpointError
from batchgen.inspect import inspect_model
from batchgen.models.zimage import ZIMAGE_TURBO, ZImageTransformer2DModel, resolve_zimage_config
from batchgen.builtin import builtin_model_path

PROMPTS = ["a red cat on a table, oil painting", "a lighthouse at night"]
SEEDS = [1, 2**40 + 3]


def render(pipe, **kwargs):
    return pipe.generate(PROMPTS, SEEDS, steps=2, width=32, height=32, **kwargs)


def load(path, **kwargs):
    return load_pipeline(path, device="cpu", dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The tiny folder and its ComfyUI-style split files."""
    root = tmp_path_factory.mktemp("zimage-split")
    folder = builtin_model_path("tiny-zimage")
    model = write_single_file(folder, root / "z_image_tiny.safetensors", components=["transformer"],
                              denoiser_prefix="", embed_tokenizers=False)
    vae_state = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    ldm = sf.to_single_file({"vae": vae_state}, "zimage")
    vae = root / "ae.safetensors"
    save_file({k.removeprefix(sf.VAE_PREFIXES[0]): v.contiguous() for k, v in ldm.items()}, str(vae))
    text = root / "qwen_3_tiny.safetensors"
    save_file({f"model.{k}": v for k, v in load_file(str(folder / "text_encoder" / "model.safetensors")).items()},
              str(text))
    return {"folder": folder, "model": model, "vae": vae, "text": text, "tokenizer": folder / "tokenizer"}


def test_split_files_render_like_the_folder(split):
    header = sf.read_header(split["model"])
    assert any(k.endswith("attention.qkv.weight") for k in header) and "x_embedder.weight" in header
    detected = sf.detect(header)
    assert (detected.family, detected.variant, detected.components) == ("zimage", "zimage", {"transformer": ""})
    with pytest.raises(CheckpointError, match="needs component 'vae'"):
        load(split["model"])
    with pytest.raises(CheckpointError, match="tokenizer"):
        load(split["model"], vae=split["vae"], text_encoders={"text_encoder": split["text"]})
    got = load(split["model"], vae=split["vae"], text_encoders={"text_encoder": split["text"]},
               tokenizers={"tokenizer": split["tokenizer"]})
    want = render(load(split["folder"]))
    assert all(len(np.unique(x)) > 32 for x in want)
    assert all(np.array_equal(a, b) for a, b in zip(render(got), want, strict=True))
    assert got.model_info["family"] == "zimage" and got.model_info["format"] == "single_file"
    info = inspect_model(split["model"], vae=split["vae"], text_encoders={"text_encoder": split["text"]},
                         tokenizers={"tokenizer": split["tokenizer"]})
    assert (info["family"], info["variant"]) == ("zimage", "zimage")
    assert info["fingerprint"] == got.fingerprint


def test_prefixed_file_with_vae_and_bf16_storage(split, tmp_path):
    path = write_single_file(split["folder"], tmp_path / "z.safetensors", dtype=torch.bfloat16)
    header = sf.read_header(path)
    assert all(k.startswith((sf.DENOISER_PREFIX, "first_stage_model.")) for k in header)
    assert sf.detect(header).components == {"transformer": sf.DENOISER_PREFIX, "vae": "first_stage_model."}
    pipe = load(path, text_encoders={"text_encoder": split["text"]})
    assert all(len(np.unique(x)) > 32 for x in render(pipe))


def test_conversion_matches_diffusers_converter(split):
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import (
        convert_z_image_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    single = load_file(str(split["model"]))
    assert infer_diffusers_model_type(dict(single)) == "z-image-turbo"
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(dict(single))
    ours = sf.convert(single, sf.detect(single))["transformer"]
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_real_size_detects_and_converts_on_meta():
    with torch.device("meta"):
        model = ZImageTransformer2DModel(ZIMAGE_TURBO)
    state = model.state_dict()
    for prefix in ("", sf.DENOISER_PREFIX):
        single = sf.to_single_file({"transformer": state}, "zimage", "zimage", denoiser_prefix=prefix)
        single[prefix + "norm_final.weight"] = torch.empty(3840, device="meta")  # exports may carry it
        detected = sf.detect(single)
        converted = sf.convert(single, detected)["transformer"]
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state.items()}
        configs = sf.standard_configs(detected)
        assert configs["pipeline_class"] == "ZImagePipeline"
        assert resolve_zimage_config(configs["transformer"]) == resolve_zimage_config(ZIMAGE_TURBO)
        assert configs["model_index"]["text_encoder"] == ["transformers", "Qwen3Model"]


def test_omni_files_are_refused():
    keys = {"layers.0.adaLN_modulation.0.weight": (1, 1), "cap_embedder.0.weight": (1,),
            "siglip_embedder.0.weight": (1,)}
    with pytest.raises(CheckpointError, match="Omni"):
        sf.detect(keys)
