"""Parity of batchgen's native FLUX.1 transformer and latent packing against diffusers, float32 CPU.

diffusers' FluxTransformer2DModel is built from the tiny presets, its weights perturbed (so adaLN
linears, RMS QK-norm weights and biases are not at their init), copied into ours with
``strict=True``; outputs must be bitwise equal (max abs diff == 0).
"""

from __future__ import annotations

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402

from batchgen.errors import CheckpointError  # noqa: E402
from batchgen.models.flux import (  # noqa: E402
    FLUX_1_DEV,
    FLUX_1_SCHNELL,
    FLUX_DEFAULTS,
    FLUX_TINY_DEV,
    FLUX_TINY_SCHNELL,
    FluxTransformer2DModel,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)

from .module_parity import max_diff, module_pair, perturb, public  # noqa: E402

FLUX_CONFIGS = {
    "tiny-schnell": FLUX_TINY_SCHNELL,
    "tiny-dev": FLUX_TINY_DEV,
    # Edge stacks: only double-stream blocks / only single-stream blocks, explicit out_channels.
    "double-only": {**FLUX_TINY_DEV, "num_layers": 1, "num_single_layers": 0},
    "single-only": {**FLUX_TINY_SCHNELL, "num_layers": 0, "num_single_layers": 1, "out_channels": 16},
}
LATENT_CHANNELS = 16
TEXT_TOKENS = 5


def _inputs(config: dict, batch: int, latent_h: int, latent_w: int, seed: int) -> dict:
    """Pipeline-shaped inputs: packed noise, text states, zero text ids, t/1000, raw guidance scale."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, LATENT_CHANNELS, latent_h, latent_w, generator=gen)
    return {
        "hidden_states": pack_latents(latents),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=gen),
        "timestep": torch.rand(batch, generator=gen),
        "img_ids": latent_image_ids(latent_h, latent_w),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "guidance": (1.0 + 6.0 * torch.rand(batch, generator=gen)) if config["guidance_embeds"] else None,
    }


@pytest.fixture(scope="module", params=sorted(FLUX_CONFIGS))
def flux_pair(request):
    config = FLUX_CONFIGS[request.param]
    ref, ours = module_pair(diffusers.FluxTransformer2DModel, FluxTransformer2DModel, config, 1)
    return request.param, config, ref, ours


@pytest.mark.parametrize("latent_hw", [(8, 8), (6, 10)], ids=["square", "non-square"])
def test_flux_matches_diffusers_bitwise(flux_pair, latent_hw):
    name, config, ref, ours = flux_pair
    inputs = _inputs(config, 2, *latent_hw, seed=3)
    with torch.no_grad():
        expected = ref(**inputs).sample
        got = ours(**inputs)
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    assert got.shape == (2, tokens, ours.config["out_channels"])
    assert expected.abs().max().item() > 0.1  # a real, non-trivial output
    assert max_diff(got, expected) == 0.0, name


def test_flux_single_timestep_broadcasts_like_diffusers(flux_pair):
    """A (1,) timestep / guidance serves the whole batch, as diffusers' broadcasting does."""
    name, config, ref, ours = flux_pair
    inputs = _inputs(config, 2, 4, 6, seed=4)
    inputs["timestep"] = torch.tensor([0.75])
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        assert max_diff(ours(**inputs), ref(**inputs).sample) == 0.0, name


def test_flux_state_dict_keys_equal_diffusers(flux_pair):
    _, _, ref, ours = flux_pair
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    for key, value in ref_sd.items():
        assert ours_sd[key].shape == value.shape, key


def test_flux_item_output_independent_of_batch_position():
    """Item a's output is bitwise identical at position 0 of [a, b, c] and position 2 of [c, b, a]."""
    torch.manual_seed(0)
    ours = FluxTransformer2DModel(FLUX_TINY_DEV).eval()
    perturb(ours, 5)
    inputs = _inputs(FLUX_TINY_DEV, 3, 6, 8, seed=6)
    reverse = torch.tensor([2, 1, 0])
    flipped = {k: (v if k in ("img_ids", "txt_ids") else v[reverse]) for k, v in inputs.items()}
    with torch.no_grad():
        forward = ours(**inputs)
        backward = ours(**flipped)
    assert not torch.equal(forward[0], forward[2])  # the items do differ
    assert torch.equal(forward[0], backward[2])
    assert torch.equal(forward[2], backward[0])
    assert torch.equal(forward[1], backward[1])


@pytest.mark.parametrize("real", [FLUX_1_DEV, FLUX_1_SCHNELL], ids=["dev", "schnell"])
def test_real_flux_configs_on_meta_match_diffusers(real):
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(**public(real))
        ours = FluxTransformer2DModel(real)
    assert ours.device.type == "meta" and ours.dtype == torch.float32
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    for key, value in ref_sd.items():
        assert ours_sd[key].shape == value.shape, key
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in ref.parameters())
    assert abs(params - 11.9e9) <= 0.01 * 11.9e9, params
    assert ours.config["guidance_embeds"] == real["guidance_embeds"]


def test_config_resolved_with_defaults():
    model_cfg = FluxTransformer2DModel({**FLUX_TINY_SCHNELL, "_diffusers_version": "0.30.0"}).config
    assert model_cfg["out_channels"] == 64  # null -> in_channels, as diffusers
    assert model_cfg["axes_dims_rope"] == [4, 6, 6]
    assert "_class_name" not in model_cfg and "_diffusers_version" not in model_cfg
    signature = inspect.signature(diffusers.FluxTransformer2DModel.__init__)
    diffusers_defaults = {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in signature.parameters.items()
        if name != "self"
    }
    assert FLUX_DEFAULTS == diffusers_defaults


@pytest.mark.parametrize(
    "change, key",
    [
        ({"patch_size": 2}, "patch_size"),
        ({"axes_dims_rope": [4, 6, 8]}, "axes_dims_rope"),  # sums to 18 != head dim 16
        ({"axes_dims_rope": [5, 5, 6]}, "axes_dims_rope"),  # odd axis
        ({"axes_dims_rope": [8, 8]}, "axes_dims_rope"),  # not three axes
        ({"guidance_embeds": "yes"}, "guidance_embeds"),
        ({"num_layers": -1}, "num_layers"),
        ({"out_channels": 0}, "out_channels"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
    ],
)
def test_unsupported_config_raises_checkpoint_error(change, key):
    with pytest.raises(CheckpointError, match=key):
        FluxTransformer2DModel({**FLUX_TINY_SCHNELL, **change})


def test_guidance_must_match_guidance_embeds():
    torch.manual_seed(0)
    schnell, dev = FluxTransformer2DModel(FLUX_TINY_SCHNELL), FluxTransformer2DModel(FLUX_TINY_DEV)
    inputs = _inputs(FLUX_TINY_DEV, 1, 4, 4, seed=7)
    with pytest.raises(ValueError, match="guidance_embeds: false"):
        schnell(**inputs)
    with pytest.raises(ValueError, match="guidance_embeds: true"):
        dev(**{**inputs, "guidance": None})
    with pytest.raises(ValueError, match="img_ids"):
        dev(**{**inputs, "img_ids": inputs["img_ids"][None]})


@pytest.mark.parametrize("latent_hw", [(8, 8), (6, 10)], ids=["square", "non-square"])
def test_pack_unpack_equal_flux_pipeline(latent_hw):
    h, w = latent_hw
    latents = torch.randn(2, LATENT_CHANNELS, h, w, generator=torch.Generator().manual_seed(8))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, LATENT_CHANNELS, h, w))
    # Pixel sizes as the pipeline sees them, including ones not divisible by 16 (floored the same way).
    for height_px, width_px in ((h * 8, w * 8), (h * 8 + 7, w * 8 + 15)):
        got = unpack_latents(packed, height_px, width_px, 8)
        assert torch.equal(got, FluxPipeline._unpack_latents(packed, height_px, width_px, 8))
        assert torch.equal(got, latents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_image_ids_equal_flux_pipeline(dtype):
    latent_h, latent_w = 6, 10  # what prepare_latents holds; it calls the helper with h // 2, w // 2
    expected = FluxPipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, "cpu", dtype)
    got = latent_image_ids(latent_h, latent_w, dtype=dtype)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)
    assert latent_image_ids(latent_h, latent_w).dtype == torch.float32
    assert got.shape == (15, 3) and got[-1].tolist() == [0.0, 2.0, 4.0]


def test_packing_rejects_odd_latents():
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 8))
    with pytest.raises(ValueError, match="even"):
        latent_image_ids(5, 8)
    with pytest.raises(ValueError, match="does not fit"):
        unpack_latents(torch.zeros(1, 12, 64), 64, 64, 8)
