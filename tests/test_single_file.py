"""Single-file checkpoint detection and key conversion (batchgen.checkpoints.single_file) against diffusers.

Tiny diffusers / transformers modules of every family (random, all-distinct weights) are turned
into the single-file layout by our inverse, then read back twice: by diffusers' own converters in
``diffusers.loaders.single_file_utils`` (an independent implementation: proves the inverse) and by
our forward :func:`convert` (every key, every tensor bit-equal). Detection runs on the real shapes
of every variant: diffusers modules built on the meta device from :func:`standard_configs`, which
also checks those configs against the public parameter counts.
"""

from __future__ import annotations

import inspect
import json
import struct

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as dsf  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from batchgen.checkpoints import single_file as sf  # noqa: E402
from batchgen.errors import CheckpointError  # noqa: E402
from batchgen.models import UNET_SD1_TINY, UNET_SD2_TINY, VAE_TINY  # noqa: E402

DM = "model.diffusion_model."

# ---- tiny builders ---------------------------------------------------------------------------


def _fill(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values in every tensor (tied tensors stay tied), returned as a state dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in module.state_dict().values():
            value.copy_(torch.randn(value.shape, generator=gen))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _clip(hidden: int, projection: int | None = None, layers: int = 2, seed: int = 0):
    config = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=hidden + 8, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model, _fill(model, seed)


def _t5(seed: int = 0):
    model = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return model, _fill(model, seed)


def _vae(seed: int, **extra):
    config = {k: v for k, v in {**VAE_TINY, **extra}.items() if not k.startswith("_")}
    return config, _fill(AutoencoderKL(**config), seed)


def _unet(config: dict, seed: int):
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return config, _fill(UNet2DConditionModel(**config), seed)


UNET_SDXL_TINY = {
    "sample_size": 16, "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2, "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4], "cross_attention_dim": 32, "use_linear_projection": True, "norm_num_groups": 8,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 16 + 6 * 4,
}
UNET_REFINER_TINY = {
    **UNET_SDXL_TINY, "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": 2,
    "attention_head_dim": [2, 4, 4], "cross_attention_dim": 16, "projection_class_embeddings_input_dim": 16 + 5 * 4,
}
SD3_TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
            "attention_head_dim": 4, "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 8,
            "pooled_projection_dim": 24 + 16, "pos_embed_max_size": 8}
SD3_TINY_VARIANTS = {
    "sd3-medium": {},
    "sd3.5-medium": {"dual_attention_layers": (0, 1), "qk_norm": "rms_norm"},
    "sd3.5-large": {"qk_norm": "rms_norm"},
}
FLUX_TINY = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 4,
             "num_attention_heads": 2, "joint_attention_dim": 16, "pooled_projection_dim": 24, "axes_dims_rope": (2, 2)}
FLAT_VAE = {"use_quant_conv": False, "use_post_quant_conv": False}


def tiny_pipeline(case: str) -> tuple[str, dict, dict, dict]:
    """(family, components' state dicts, their modules/configs for diffusers' converters, expected variant)."""
    if case in ("sd1", "sd2"):
        unet_config, unet = _unet(UNET_SD1_TINY if case == "sd1" else UNET_SD2_TINY, 1)
        vae_config, vae = _vae(2)
        te_model, te = _clip(32, seed=3)
        return case, {"unet": unet, "vae": vae, "text_encoder": te}, \
            {"unet": unet_config, "vae": vae_config, "text_encoder": te_model}, {"variant": case}
    if case == "sdxl":
        unet_config, unet = _unet(UNET_SDXL_TINY, 1)
        vae_config, vae = _vae(2)
        te_model, te = _clip(16, seed=3)
        te2_model, te2 = _clip(16, projection=16, seed=4)
        return "sdxl", {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": te2}, \
            {"unet": unet_config, "vae": vae_config, "text_encoder": te_model, "text_encoder_2": te2_model}, \
            {"variant": "sdxl-base"}
    if case == "sdxl_refiner":
        unet_config, unet = _unet(UNET_REFINER_TINY, 1)
        vae_config, vae = _vae(2)
        te2_model, te2 = _clip(16, projection=16, seed=4)
        return "sdxl_refiner", {"unet": unet, "vae": vae, "text_encoder_2": te2}, \
            {"unet": unet_config, "vae": vae_config, "text_encoder_2": te2_model}, {"variant": "sdxl-refiner"}
    if case in SD3_TINY_VARIANTS:
        model = SD3Transformer2DModel(**SD3_TINY, **SD3_TINY_VARIANTS[case])
        vae_config, vae = _vae(2, latent_channels=4, **FLAT_VAE)
        _, te = _clip(16, projection=16, seed=3)
        _, te2 = _clip(16, projection=24, seed=4)
        _, te3 = _t5(5)
        return "sd3", {"transformer": _fill(model, 1), "vae": vae, "text_encoder": te, "text_encoder_2": te2,
                       "text_encoder_3": te3}, {"vae": vae_config}, {"variant": case}
    if case in ("flux-dev", "flux-schnell"):
        model = FluxTransformer2DModel(**FLUX_TINY, guidance_embeds=case == "flux-dev")
        vae_config, vae = _vae(2, latent_channels=4, **FLAT_VAE)
        _, te = _clip(24, seed=3)
        _, te2 = _t5(5)
        return "flux", {"transformer": _fill(model, 1), "vae": vae, "text_encoder": te, "text_encoder_2": te2}, \
            {"vae": vae_config}, {"variant": case}
    raise AssertionError(case)


CASES = ["sd1", "sd2", "sdxl", "sdxl_refiner", "sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell"]

# ---- comparison ------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(got: dict, want: dict, what: str) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{what}: missing {missing[:6]}, extra {extra[:6]}"
    for key, ref in want.items():
        value = got[key]
        assert value.dtype == ref.dtype, f"{what}: {key} dtype {value.dtype} != {ref.dtype}"
        assert value.shape == ref.shape, f"{what}: {key} shape {tuple(value.shape)} != {tuple(ref.shape)}"
        if ref.device.type != "meta":
            assert torch.equal(_bits(value), _bits(ref)), f"{what}: {key} values differ"


def _flat(state: dict) -> dict:
    """diffusers' CLIP converters keep 'text_model.'; the installed CLIPTextModel may be flat (as
    create_diffusers_clip_model_from_ldm strips it for such transformers versions)."""
    prefix = sf.clip_text_model_prefix()
    return state if prefix else {k.removeprefix("text_model."): v for k, v in state.items()}


def _diffusers_flux_converter(inner_dim: int):
    """diffusers' FLUX converter hard-codes FLUX.1's width (inner_dim = 3072) for the single-block
    split; for tiny models we run its own source with that one constant replaced."""
    source = inspect.getsource(dsf.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1
    namespace = dict(vars(dsf))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # noqa: S102
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def _sub(single: dict, prefix: str) -> dict:
    return {k: v for k, v in single.items() if k.startswith(prefix)}


def diffusers_reads(family: str, single: dict, refs: dict, components: dict) -> dict[str, dict]:
    """What diffusers' own single-file converters make of ``single``, per component."""
    out = {}
    if "unet" in components:
        out["unet"] = dsf.convert_ldm_unet_checkpoint(single, refs["unet"])
    if "vae" in components:
        out["vae"] = dsf.convert_ldm_vae_checkpoint(single, refs["vae"])
    if family in ("sd1", "sdxl"):
        out["text_encoder"] = _flat(dsf.convert_ldm_clip_checkpoint(single))
    if family == "sd2":
        out["text_encoder"] = _flat(dsf.convert_open_clip_checkpoint(refs["text_encoder"], single,
                                                                     prefix="cond_stage_model.model."))
    if family in ("sdxl", "sdxl_refiner"):
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
        out["text_encoder_2"] = dsf.convert_open_clip_checkpoint(refs["text_encoder_2"], single, prefix=prefix)
    if family == "sd3":
        out["transformer"] = dsf.convert_sd3_transformer_checkpoint_to_diffusers(_sub(single, DM))
        out["text_encoder"] = dsf.convert_ldm_clip_checkpoint(single, "text_encoders.clip_l.transformer.")
        out["text_encoder_2"] = dsf.convert_ldm_clip_checkpoint(single, "text_encoders.clip_g.transformer.")
        out["text_encoder_3"] = dsf.convert_sd3_t5_checkpoint_to_diffusers(single)
    if family == "flux":
        inner = components["transformer"]["x_embedder.weight"].shape[0]
        out["transformer"] = _diffusers_flux_converter(inner)(_sub(single, DM))
        out["text_encoder"] = _flat(dsf.convert_ldm_clip_checkpoint(single, "text_encoders.clip_l.transformer."))
        out["text_encoder_2"] = dsf.convert_sd3_t5_checkpoint_to_diffusers(single)
    return out


# ---- round trips on tiny models --------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_tiny_round_trip_against_diffusers_converters(case):
    family, components, refs, expect = tiny_pipeline(case)
    single = sf.to_single_file(components, family, expect["variant"])

    # (a) diffusers' converters map our single file back to exactly the original tensors.
    for name, state in diffusers_reads(family, single, refs, components).items():
        want = dict(components[name])
        if "encoder.embed_tokens.weight" in want:  # T5: tied to shared.weight, not stored in the file
            assert "encoder.embed_tokens.weight" not in state
            want.pop("encoder.embed_tokens.weight")
        assert_same_state(state, want, f"{case} {name} via diffusers")

    # (b) our detection and forward conversion do the same, every component.
    detected = sf.detect(single)
    assert (detected.family, detected.variant, detected.prefix) == (family, expect["variant"], DM)
    assert set(detected.components) == set(components)
    converted = sf.convert(single, detected)
    assert set(converted) == set(components)
    for name, state in components.items():
        assert_same_state(converted[name], state, f"{case} {name} via batchgen")


@pytest.mark.parametrize("case", ["sd1", "sd2"])
def test_converted_components_load_strictly_into_batchgen_models(case):
    from batchgen.models import AutoencoderKL as OurVAE
    from batchgen.models import UNet2DConditionModel as OurUNet

    family, components, refs, _ = tiny_pipeline(case)
    single = sf.to_single_file(components, family)
    converted = sf.convert(single, sf.detect(single))
    OurUNet(refs["unet"]).load_state_dict(converted["unet"], strict=True)
    OurVAE(refs["vae"]).load_state_dict(converted["vae"], strict=True)
    refs["text_encoder"].load_state_dict(converted["text_encoder"], strict=True)


def test_single_file_extras_are_ignored_and_unknown_component_keys_refused():
    family, components, _, _ = tiny_pipeline("sd1")
    single = sf.to_single_file(components, "sd1")
    single.update({
        "alphas_cumprod": torch.rand(10), "model_ema.decay": torch.tensor(0.999),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16)[None],
    })
    converted = sf.convert(single, sf.detect(single))
    for name, state in components.items():
        assert_same_state(converted[name], state, f"sd1 {name} with extras")

    single[DM + "input_blocks.1.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"^x\.safetensors: unet \('model\.diffusion_model\.\*'\).*"
                                              r"input_blocks\.1\.0\.mystery"):
        sf.convert(single, sf.detect(single), source="x.safetensors")


def test_sd2_full_openclip_tower_drops_last_layer_and_projection():
    """Real SD 2 files carry OpenCLIP's whole text tower; SD 2 conditions on the penultimate layer
    and diffusers' SD 2 text encoder has one layer fewer and no projection."""
    _, unet = _unet(UNET_SD2_TINY, 1)
    _, tower = _clip(32, projection=16, layers=3, seed=3)
    full = sf.to_single_file({"text_encoder_2": tower}, "sdxl_refiner")
    single = sf.to_single_file({"unet": unet}, "sd2")
    single.update({k.replace("conditioner.embedders.0.model.", "cond_stage_model.model."): v for k, v in full.items()})
    assert "cond_stage_model.model.text_projection" in single
    got = sf.convert(single, sf.detect(single))["text_encoder"]
    want = _flat({k: v for k, v in tower.items() if "layers.2." not in k and k != "text_projection.weight"})
    assert_same_state(got, want, "sd2 text encoder")


def test_bare_flux_transformer_file():
    _, components, _, _ = tiny_pipeline("flux-schnell")
    single = sf.to_single_file({"transformer": components["transformer"]}, "flux", "flux-schnell", denoiser_prefix="")
    assert "double_blocks.0.img_attn.qkv.weight" in single
    detected = sf.detect(single)
    assert (detected.family, detected.variant, detected.prefix, detected.components) == \
        ("flux", "flux-schnell", "", {"transformer": ""})
    assert_same_state(sf.convert(single, detected)["transformer"], components["transformer"], "bare flux")


def test_sd3_clip_l_without_projection_gets_identity():
    _, components, _, _ = tiny_pipeline("sd3-medium")
    single = sf.to_single_file(components, "sd3")
    del single["text_encoders.clip_l.transformer.text_projection.weight"]
    te = sf.convert(single, sf.detect(single))["text_encoder"]
    assert torch.equal(te["text_projection.weight"], torch.eye(16))


# ---- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,name", [(torch.float16, "F16"), (torch.bfloat16, "BF16"),
                                        (torch.float8_e4m3fn, "F8_E4M3")])
def test_stored_dtypes_round_trip_through_a_file_and_upcast(tmp_path, dtype, name):
    from safetensors.torch import load_file, save_file

    _, components, _, _ = tiny_pipeline("flux-dev")
    stored = {c: {k: v.to(dtype) for k, v in s.items()} for c, s in components.items()}
    path = tmp_path / "model.safetensors"
    save_file(sf.to_single_file(stored, "flux", "flux-dev"), str(path))
    header = sf.read_header(path)
    assert header[DM + "single_blocks.0.linear1.weight"] == (name, (3 * 8 + 32, 8))
    detected = sf.detect(header)
    assert (detected.family, detected.variant) == ("flux", "flux-dev")
    converted = sf.convert(load_file(str(path)), detected)
    for comp, state in stored.items():
        assert_same_state(converted[comp], state, f"{comp} in {dtype}")
        up = sf.upcast(converted[comp], torch.float32)
        assert all(v.dtype == torch.float32 for v in up.values())
        assert all(torch.equal(up[k], v.to(torch.float32)) for k, v in state.items())


def test_read_header_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors: cannot read"):
        sf.read_header(missing)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="short.safetensors: not a safetensors file"):
        sf.read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="huge.safetensors: not a safetensors file .header length"):
        sf.read_header(huge)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="bad.safetensors: the safetensors header is not valid JSON"):
        sf.read_header(bad)
    # A header-only file (no tensor data) is enough to read the layout.
    head = json.dumps({"__metadata__": {"format": "pt"}, "a.weight": {"dtype": "BF16", "shape": [2, 3],
                                                                       "data_offsets": [0, 12]}}).encode()
    only = tmp_path / "header_only.safetensors"
    only.write_bytes(struct.pack("<Q", len(head)) + head)
    assert sf.read_header(only) == {"a.weight": ("BF16", (2, 3))}


# ---- detection on the real shapes of every variant -------------------------------------------

_CLASSES = {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL,
            "SD3Transformer2DModel": SD3Transformer2DModel, "FluxTransformer2DModel": FluxTransformer2DModel}
REAL = {  # variant -> (family, diffusers' infer_diffusers_model_type, parameters of the denoiser's state dict)
    "sd1": ("sd1", "v1", 859_520_964),
    "sd2": ("sd2", "v2", 865_910_724),
    "sdxl-base": ("sdxl", "xl_base", 2_567_463_684),
    "sdxl-refiner": ("sdxl_refiner", "xl_refiner", None),
    "sd3-medium": ("sd3", "sd3", None),
    "sd3.5-medium": ("sd3", "sd35_medium", None),
    "sd3.5-large": ("sd3", "sd35_large", None),
    "flux-dev": ("flux", "flux-dev", 11_901_408_320),
    "flux-schnell": ("flux", "flux-schnell", None),
}


def _meta_module(config: dict):
    with torch.device("meta"):
        if "_class_name" in config:
            return _CLASSES[config["_class_name"]].from_config(config)
        kwargs = {k: v for k, v in config.items() if k != "architectures"}
        arch = config["architectures"][0]
        if arch == "T5EncoderModel":
            return T5EncoderModel(T5Config(**kwargs))
        return {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}[arch](
            CLIPTextConfig(**kwargs))


@pytest.mark.parametrize("variant", list(REAL))
def test_detect_real_variant_shapes(variant):
    family, diffusers_type, params = REAL[variant]
    configs = sf.standard_configs(sf.Detected(family, variant, DM))
    components = {name: _meta_module(configs[name]).state_dict()
                  for name in sf.COMPONENT_KINDS[family] if configs.get(name)}
    if params is not None:
        denoiser = components["transformer" if family in ("sd3", "flux") else "unet"]
        assert sum(v.numel() for v in denoiser.values()) == params
    single = sf.to_single_file(components, family, variant)

    detected = sf.detect({k: tuple(v.shape) for k, v in single.items()})
    assert (detected.family, detected.variant, detected.prefix) == (family, variant, DM)
    assert set(detected.components) == set(components)
    expected_prediction = {"sd1": "epsilon", "sd2": None, "sdxl": "epsilon", "sdxl_refiner": "epsilon"}.get(
        family, "flow_matching")
    assert detected.prediction_type == expected_prediction
    # diffusers' own detector agrees on what the file is
    assert dsf.infer_diffusers_model_type(single) == diffusers_type
    # full-size key layout: diffusers' converters (unpatched) and ours give every key with its shape
    if family in ("sd1", "sd2", "sdxl", "sdxl_refiner"):
        theirs = {"unet": dsf.convert_ldm_unet_checkpoint(single, configs["unet"])}
    elif family == "sd3":
        theirs = {"transformer": dsf.convert_sd3_transformer_checkpoint_to_diffusers(_sub(single, DM))}
    else:
        theirs = {"transformer": dsf.convert_flux_transformer_checkpoint_to_diffusers(_sub(single, DM))}
    theirs["vae"] = dsf.convert_ldm_vae_checkpoint(single, configs["vae"])
    ours = sf.convert(single, detected)
    scheduler = getattr(diffusers, configs["scheduler"]["_class_name"]).from_config(configs["scheduler"])
    assert scheduler.config.get("prediction_type", "flow_matching") == (expected_prediction or "v_prediction")
    for name, state in components.items():
        want = dict(state)
        if name in theirs:
            assert_same_state(theirs[name], want, f"{variant} {name} via diffusers")
        assert_same_state(ours[name], want, f"{variant} {name} via batchgen")


def test_detect_transformer_only_real_flux_file_with_and_without_prefix():
    configs = sf.standard_configs(sf.Detected("flux", "flux-dev", DM))
    state = _meta_module(configs["transformer"]).state_dict()
    for prefix in (DM, ""):
        single = sf.to_single_file({"transformer": state}, "flux", "flux-dev", denoiser_prefix=prefix)
        detected = sf.detect({k: tuple(v.shape) for k, v in single.items()})
        assert (detected.variant, detected.prefix, detected.components) == ("flux-dev", prefix, {"transformer": prefix})


def test_unknown_and_unsupported_files_raise_checkpoint_error():
    with pytest.raises(CheckpointError) as info:
        sf.detect({"encoder.layer.0.weight": (4, 4), "decoder.x": (2,)})
    message = str(info.value)
    assert "joint_blocks.0.x_block.attn.qkv.weight" in message and "double_blocks.0.img_attn.qkv.weight" in message
    assert "input_blocks.0.0.weight" in message and "first keys found: ['decoder.x', 'encoder.layer.0.weight']" in message
    with pytest.raises(CheckpointError, match="^empty.safetensors: single-file checkpoint has no tensors"):
        sf.detect({}, source="empty.safetensors")
    _, unet = _unet(UNET_SD1_TINY, 1)
    inpaint = sf.to_single_file({"unet": unet}, "sd1")
    inpaint[DM + "input_blocks.0.0.weight"] = torch.zeros(32, 8, 3, 3)  # instruct-pix2pix (9: inpainting, read)
    with pytest.raises(CheckpointError, match="8 input channels"):
        sf.detect(inpaint)


def test_prediction_type_marker_and_standard_configs():
    _, unet = _unet(UNET_SD2_TINY, 1)
    plain = sf.detect(sf.to_single_file({"unet": unet}, "sd2"))
    assert (plain.family, plain.prediction_type) == ("sd2", None)
    configs = sf.standard_configs(plain)  # unknown: SD 2.1 768-v, as diffusers' from_single_file assumes
    assert configs["scheduler"]["prediction_type"] == "v_prediction" and configs["unet"]["sample_size"] == 96
    base = sf.standard_configs(plain, prediction_type="epsilon")
    assert base["scheduler"]["prediction_type"] == "epsilon" and base["unet"]["sample_size"] == 64
    marked = sf.detect(sf.to_single_file({"unet": unet}, "sd2", prediction_type="v_prediction"))
    assert marked.prediction_type == "v_prediction"
    assert sf.standard_configs(marked)["scheduler"]["prediction_type"] == "v_prediction"
    ztsnr = sf.detect({**sf.to_single_file({"unet": unet}, "sd2", prediction_type="v_prediction"),
                       "ztsnr": torch.zeros(0)})
    assert ztsnr.zero_terminal_snr and sf.standard_configs(ztsnr)["scheduler"]["rescale_betas_zero_snr"] is True

    sdxl = sf.standard_configs(sf.Detected("sdxl", "sdxl-base", DM, prediction_type="epsilon"))
    assert sdxl["pipeline_class"] == "StableDiffusionXLPipeline"
    assert sdxl["model_index"]["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert sdxl["model_index"]["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    flux = sf.standard_configs(sf.Detected("flux", "flux-schnell", ""))
    assert flux["pipeline_class"] == "FluxPipeline" and flux["transformer"]["guidance_embeds"] is False
    assert flux["model_index"]["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    refiner = sf.standard_configs(sf.Detected("sdxl_refiner", "sdxl-refiner", DM))
    assert refiner["text_encoder"] is None and refiner["model_index"]["tokenizer"] == [None, None]
    with pytest.raises(CheckpointError, match="does not apply"):
        sf.standard_configs(sf.Detected("sd3", "sd3-medium", DM), prediction_type="epsilon")
