"""Parity of batchgen's native UNet / VAE against diffusers (test-only reference), in float32.

diffusers' modules are built from small configs, their weights perturbed (so norms and biases are
not at their trivial init), copied into ours with ``strict=True``, and outputs compared.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from batchgen.errors import CheckpointError  # noqa: E402
from batchgen.models import (  # noqa: E402
    UNET_SD1_TINY,
    UNET_SD2_TINY,
    VAE_TINY,
    AutoencoderKL,
    UNet2DConditionModel,
    convert_legacy_vae_keys,
    tiny_config,
)
from batchgen.models.blocks import attention  # noqa: E402
from batchgen.noise import item_generators  # noqa: E402

from .module_parity import max_diff, module_pair, perturb, public  # noqa: E402

TOL = 1e-4

UNET_CONFIGS = {
    # SD1-like: conv proj, one head count for all blocks, 32 groups, three levels.
    "sd1": {
        "sample_size": 16,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 32,
    },
    # SD2-like: linear proj, per-block head counts, upcast attention, v-style freq settings.
    "sd2": {
        "sample_size": 16,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "upcast_attention": True,
        "norm_num_groups": 8,
        "freq_shift": 1,
        "flip_sin_to_cos": False,
    },
    # Deeper transformers (SDXL-style per-block list), two resnets per block, mid scale factor.
    "tlayers": {
        "sample_size": 16,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": 32,
        "attention_head_dim": [2, 2],
        "use_linear_projection": True,
        "norm_num_groups": 8,
        "mid_block_scale_factor": 1.41421356,
        "center_input_sample": True,
    },
    "tiny-sd1": UNET_SD1_TINY,
    "tiny-sd2": UNET_SD2_TINY,
}


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def unet_pair(request):
    config = UNET_CONFIGS[request.param]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**public(config)).eval()
    perturb(ref, 1)
    ours = UNet2DConditionModel(config).eval()
    return request.param, ref, ours


def test_unet_state_dict_keys_equal_diffusers(unet_pair):
    _, ref, ours = unet_pair
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key


@pytest.mark.parametrize(
    "timestep",
    [500, 321.75, torch.tensor(42), torch.tensor([10.5, 999.0]), torch.tensor([7])],
    ids=["int", "float", "0-dim", "per-item", "single"],
)
def test_unet_matches_diffusers(unet_pair, timestep):
    name, ref, ours = unet_pair
    ours.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        expected = ref(sample, timestep, context).sample
        got = ours(sample, timestep, context)
    assert expected.abs().max().item() > 0.1  # a real, non-trivial output
    assert max_diff(got, expected) <= TOL, name


def test_unet_odd_spatial_size_matches_diffusers(unet_pair):
    """Sizes not divisible by 2**upsamplers take diffusers' forwarded-upsample-size path."""
    name, ref, ours = unet_pair
    ours.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(4)
    sample = torch.randn(1, 4, 10, 7, generator=gen)
    context = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        expected = ref(sample, 250.5, context).sample
        got = ours(sample, 250.5, context)
    assert got.shape == (1, 4, 10, 7)
    assert max_diff(got, expected) <= TOL, name


def test_unet_items_independent_of_batch_mates():
    ours = UNet2DConditionModel(UNET_SD2_TINY).eval()
    perturb(ours, 5)
    gen = torch.Generator().manual_seed(6)
    sample = torch.randn(3, 4, 8, 8, generator=gen)
    context = torch.randn(3, 4, 32, generator=gen)
    with torch.no_grad():
        full = ours(sample, torch.tensor([1.0, 2.0, 3.0]), context)
        alone = ours(sample[1:2], 2.0, context[1:2])
    assert max_diff(full[1:2], alone) <= TOL


def test_unet_rejects_bad_timestep_shape():
    ours = UNet2DConditionModel(UNET_SD1_TINY).eval()
    with pytest.raises(ValueError, match="timestep"):
        ours(torch.zeros(2, 4, 8, 8), torch.tensor([1.0, 2.0, 3.0]), torch.zeros(2, 3, 32))


@pytest.mark.parametrize(
    "change, key",
    [
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}, "SimpleCrossAttnDownBlock2D"),
        ({"up_block_types": ["CrossAttnUpBlock2D", "AttnUpBlock2D"]}, "AttnUpBlock2D"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "UNetMidBlock2DSimpleCrossAttn"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"addition_embed_type": "text_time"}, "addition_time_embed_dim"),
        ({"addition_embed_type": "image"}, "addition_embed_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"attention_head_dim": [2, 4, 8]}, "attention_head_dim"),
        ({"attention_head_dim": 3}, "attention_head_dim"),
        ({"act_fn": "gelu"}, "act_fn"),
    ],
)
def test_unet_unsupported_config_raises_checkpoint_error(change, key):
    config = {**UNET_SD1_TINY, **change}
    with pytest.raises(CheckpointError, match=key):
        UNet2DConditionModel(config)


def test_unet_config_resolved_with_defaults_and_bookkeeping_ignored():
    ours = UNet2DConditionModel({**UNET_SD1_TINY, "_diffusers_version": "0.6.0", "_name_or_path": "x"})
    assert "_class_name" not in ours.config and "_diffusers_version" not in ours.config
    assert ours.config["resnet_time_scale_shift"] == "default"
    assert ours.config["block_out_channels"] == [32, 64]
    assert ours.dtype == torch.float32


# ----------------------------------------------------------------------------------------- VAE

VAE_CONFIGS = {
    "tiny": VAE_TINY,
    "no-quant-no-attn": {
        "block_out_channels": [32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 16,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,
    },
}


@pytest.fixture(scope="module", params=sorted(VAE_CONFIGS))
def vae_pair(request):
    config = VAE_CONFIGS[request.param]
    ref, ours = module_pair(diffusers.AutoencoderKL, AutoencoderKL, config, 2)
    return request.param, ref, ours


def test_vae_state_dict_keys_equal_diffusers(vae_pair):
    _, ref, ours = vae_pair
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())


def test_vae_encode_matches_diffusers(vae_pair):
    name, ref, ours = vae_pair
    image = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latent_dist
        got = ours.encode(image)
    assert max_diff(got.mean, expected.mean) <= TOL, name
    assert max_diff(got.logvar, expected.logvar) <= TOL, name
    assert max_diff(got.std, expected.std) <= TOL, name


def test_vae_decode_matches_diffusers(vae_pair):
    name, ref, ours = vae_pair
    z = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 4 * ours.scale_factor, 5 * ours.scale_factor)
    assert max_diff(got, expected) <= TOL, name


def test_vae_posterior_sample_matches_diffusers_per_item_generators(vae_pair):
    """diffusers img2img: encode(image[i:i+1]).latent_dist.sample(generator=g_i) per item."""
    name, ref, ours = vae_pair
    seeds = [11, 2**62 + 5, 11]
    image = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        expected = torch.cat(
            [
                ref.encode(image[i : i + 1]).latent_dist.sample(generator=torch.Generator().manual_seed(s))
                for i, s in enumerate(seeds)
            ]
        )
        got = ours.encode(image).sample(item_generators(seeds))
    assert max_diff(got, expected) <= TOL, name
    assert max_diff(got[0], got[2]) > 0  # same seed, different images: different latents
    with pytest.raises(ValueError, match="generators"):
        ours.encode(image).sample(item_generators(seeds[:2]))


def test_vae_scale_factor_and_tiny_preset():
    vae = AutoencoderKL(VAE_TINY)
    assert vae.scale_factor == 8
    assert vae.scaling_factor == pytest.approx(0.18215)
    assert vae.shift_factor == 0.0
    assert vae.latent_channels == 4
    assert tiny_config("vae") == VAE_TINY and tiny_config("vae") is not VAE_TINY


def test_vae_loads_legacy_attention_keys(vae_pair):
    name, ref, ours = vae_pair
    if not ref.config.mid_block_add_attention:
        pytest.skip("no attention in this config")
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]  # also accept 1x1-conv shaped weights
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    fresh = AutoencoderKL(VAE_CONFIGS[name]).eval()
    fresh.load_state_dict(legacy, strict=True)
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert max_diff(fresh.decode(z), ref.decode(z).sample) <= TOL
    converted = convert_legacy_vae_keys(legacy)
    assert sorted(converted) == sorted(ref.state_dict())


def test_vae_unsupported_block_type_raises_checkpoint_error():
    config = {**VAE_TINY, "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}
    with pytest.raises(CheckpointError, match="AttnDownEncoderBlock2D"):
        AutoencoderKL(config)
    with pytest.raises(CheckpointError, match="up_block_types"):
        AutoencoderKL({**VAE_TINY, "up_block_types": ["UpDecoderBlock2D"] * 3})


def test_upcast_attention_computes_in_float32():
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 6, 8, generator=gen) * 4 for _ in range(3))
    exact = attention(q, k, v, heads=2)
    upcast = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=2, upcast=True)
    assert upcast.dtype == torch.bfloat16
    expected = attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), heads=2)
    assert torch.equal(upcast, expected.bfloat16())
    assert max_diff(upcast.float(), exact) < 0.1


def test_posterior_logvar_clamped_like_diffusers():
    from batchgen.models import DiagonalGaussian

    params = torch.tensor([0.5, -100.0, 0.25, 50.0]).view(1, 4, 1, 1)  # mean (0.5, -100), logvar (0.25, 50)
    posterior = DiagonalGaussian(params)
    assert posterior.logvar.flatten().tolist() == [0.25, 20.0]
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    reference = DiagonalGaussianDistribution(params)
    assert torch.equal(posterior.std, reference.std)
