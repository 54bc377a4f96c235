"""SDXL (base, refiner) UNet and SDXL / SD3 / FLUX VAE configs against diffusers (test-only reference).

Tiny configs run end to end on perturbed weights in float32 on CPU and must match diffusers
bitwise (max abs diff 0); the real full-size configs are built on the meta device (no memory, no
download) and must have diffusers' exact state-dict keys, shapes, head counts and parameter count.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from batchgen.errors import CheckpointError  # noqa: E402
from batchgen.models import UNET_SD1_TINY  # noqa: E402
from batchgen.models.blocks import Attention  # noqa: E402
from batchgen.models.unet import (  # noqa: E402
    SDXL_BASE_UNET_CONFIG,
    SDXL_REFINER_UNET_CONFIG,
    UNET_SDXL_REFINER_TINY,
    UNET_SDXL_TINY,
    UNet2DConditionModel,
)
from batchgen.models.vae import (  # noqa: E402
    FLUX_VAE_CONFIG,
    SD3_VAE_CONFIG,
    SDXL_VAE_CONFIG,
    VAE_TINY_16CH,
    AutoencoderKL,
)

from .module_parity import max_diff, module_pair, perturb, public  # noqa: E402

# Parameter counts of the published SDXL 1.0 UNets (base fp16 file 5.14 GB, refiner 4.52 GB).
SDXL_BASE_PARAMS = 2_567_463_684
SDXL_REFINER_PARAMS = 2_259_526_660

POOLED = 32  # pooled text-embedding width of the tiny presets
TINY_UNETS = {"base": (UNET_SDXL_TINY, 6), "refiner": (UNET_SDXL_REFINER_TINY, 5)}


def _time_ids(n_ids: int) -> torch.Tensor:
    # base: original (h, w), crop (top, left), target (h, w); refiner: original, crop, aesthetic score
    rows = [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 16.0, 32.0, 6.0, 896.0]]
    return torch.tensor([row[:n_ids] for row in rows])


def _inputs(config: dict, n_ids: int, batch: int = 2, size=(16, 16), seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *size, generator=gen)
    context = torch.randn(batch, 7, config["cross_attention_dim"], generator=gen)
    text_embeds = torch.randn(batch, POOLED, generator=gen)
    time_ids = _time_ids(n_ids).repeat(batch, 1)[:batch]
    return sample, context, text_embeds, time_ids


@pytest.fixture(scope="module", params=sorted(TINY_UNETS))
def sdxl_pair(request):
    config, n_ids = TINY_UNETS[request.param]
    ref, ours = module_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, config, 1)
    return request.param, config, n_ids, ref, ours


def test_sdxl_tiny_state_dict_keys_equal_diffusers(sdxl_pair):
    _, _, _, ref, ours = sdxl_pair
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert "add_embedding.linear_1.weight" in ours.state_dict()
    assert ours.uses_added_conditioning


@pytest.mark.parametrize("timestep", [321.75, torch.tensor([10.5, 999.0])], ids=["float", "per-item"])
def test_sdxl_tiny_matches_diffusers_bitwise(sdxl_pair, timestep):
    name, config, n_ids, ref, ours = sdxl_pair
    sample, context, text_embeds, time_ids = _inputs(config, n_ids)
    with torch.no_grad():
        expected = ref(sample, timestep, context,
                       added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        got = ours(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids)
        other_ids = ours(sample, timestep, context, text_embeds=text_embeds, time_ids=time_ids.flip(0))
    assert expected.abs().max().item() > 0.1  # a real, non-trivial output
    assert max_diff(got, expected) == 0.0, name
    assert max_diff(other_ids, got) > 1e-3  # the time ids really condition the output


def test_sdxl_tiny_odd_spatial_size_matches_diffusers(sdxl_pair):
    name, config, n_ids, ref, ours = sdxl_pair
    sample, context, text_embeds, time_ids = _inputs(config, n_ids, batch=1, size=(10, 7), seed=4)
    with torch.no_grad():
        expected = ref(sample, 250, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        got = ours(sample, 250, context, text_embeds, time_ids)
    assert got.shape == (1, 4, 10, 7)
    assert max_diff(got, expected.sample) == 0.0, name


def test_num_attention_heads_equals_attention_head_dim_list(sdxl_pair):
    """diffusers refuses num_attention_heads in this class; ours reads it as the head count."""
    _, config, n_ids, ref, ours = sdxl_pair
    renamed = UNet2DConditionModel({**config, "num_attention_heads": [2, 4], "attention_head_dim": 16}).eval()
    renamed.load_state_dict(ref.state_dict(), strict=True)
    sample, context, text_embeds, time_ids = _inputs(config, n_ids, seed=5)
    with torch.no_grad():
        assert torch.equal(renamed(sample, 5.0, context, text_embeds, time_ids),
                           ours(sample, 5.0, context, text_embeds, time_ids))


def test_sdxl_batch_items_independent_of_batch_mates():
    """Fixed batch shape: identical items at positions 0 and 2 give bitwise-identical outputs."""
    ours = UNet2DConditionModel(UNET_SDXL_TINY).eval()
    perturb(ours, 5)
    sample, context, text_embeds, time_ids = _inputs(UNET_SDXL_TINY, 6, batch=3, size=(8, 8), seed=6)
    for t in (sample, context, text_embeds, time_ids):
        t[2] = t[0]
    timestep = torch.tensor([3.0, 700.0, 3.0])
    assert not torch.equal(time_ids[0], time_ids[1])
    with torch.no_grad():
        out = ours(sample, timestep, context, text_embeds, time_ids)
    assert torch.equal(out[0], out[2])
    assert not torch.equal(out[0], out[1])


def test_sdxl_missing_added_conditioning_is_a_clear_error():
    ours = UNet2DConditionModel(UNET_SDXL_TINY).eval()
    sample, context, text_embeds, time_ids = _inputs(UNET_SDXL_TINY, 6, size=(8, 8))
    with pytest.raises(ValueError, match=r"^text_embeds and time_ids missing.*addition_embed_type 'text_time'"):
        ours(sample, 1.0, context)
    with pytest.raises(ValueError, match=r"^time_ids missing"):
        ours(sample, 1.0, context, text_embeds=text_embeds)
    with pytest.raises(ValueError, match=r"^text_embeds missing"):
        ours(sample, 1.0, context, time_ids=time_ids)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 80"):
        ours(sample, 1.0, context, text_embeds, time_ids[:, :5])  # refiner-style ids into the base
    with pytest.raises(ValueError, match=r"time_ids: expected a \(2, n\) tensor"):
        ours(sample, 1.0, context, text_embeds, time_ids[:1])


def test_sd1_unet_refuses_added_conditioning():
    ours = UNet2DConditionModel(UNET_SD1_TINY).eval()
    assert not ours.uses_added_conditioning
    with pytest.raises(ValueError, match="text_embeds and time_ids: this UNet's config has no addition_embed_type"):
        ours(torch.zeros(1, 4, 8, 8), 1.0, torch.zeros(1, 3, 32), torch.zeros(1, 32), torch.zeros(1, 6))


@pytest.mark.parametrize(
    "change, key",
    [
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"addition_embed_type": "text_image"}, "addition_embed_type"),
        ({"addition_time_embed_dim": None}, "addition_time_embed_dim"),
        ({"projection_class_embeddings_input_dim": None}, "projection_class_embeddings_input_dim"),
        ({"transformer_layers_per_block": [1, 2, 3]}, "transformer_layers_per_block"),
        ({"class_embed_type": "projection"}, "class_embed_type"),
    ],
)
def test_sdxl_unsupported_config_raises_checkpoint_error(change, key):
    with pytest.raises(CheckpointError, match=key):
        UNet2DConditionModel({**UNET_SDXL_TINY, **change})


def _heads(module: torch.nn.Module, kind) -> dict:
    return {name: m.heads for name, m in module.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize(
    "config, published",
    [(SDXL_BASE_UNET_CONFIG, SDXL_BASE_PARAMS), (SDXL_REFINER_UNET_CONFIG, SDXL_REFINER_PARAMS)],
    ids=["base", "refiner"],
)
def test_real_sdxl_unet_configs_on_meta_equal_diffusers(config, published):
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**public(config))
        ours = UNet2DConditionModel(config)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    for key, value in ref_sd.items():
        assert ours_sd[key].shape == value.shape, key
    # Head counts leave no trace in the state dict: compare them module by module.
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    ref_heads = _heads(ref, DiffusersAttention)
    assert _heads(ours, Attention) == ref_heads
    assert {m.to_q.out_features // m.heads for m in ours.modules() if isinstance(m, Attention)} == {64}
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"\n{'refiner' if published == SDXL_REFINER_PARAMS else 'base'}: ours {n_ours:,} diffusers {n_ref:,}")
    assert abs(n_ours - n_ref) <= 0.01 * n_ref
    assert n_ours == n_ref == published


# ----------------------------------------------------------------------------------------- VAE

TINY_VAES = {
    "16ch": VAE_TINY_16CH,
    "16ch-quant": {**VAE_TINY_16CH, "use_quant_conv": True, "use_post_quant_conv": True},
}


@pytest.fixture(scope="module", params=sorted(TINY_VAES))
def vae16_pair(request):
    config = TINY_VAES[request.param]
    ref, ours = module_pair(diffusers.AutoencoderKL, AutoencoderKL, config, 2)
    return request.param, ref, ours


def test_vae16_encode_matches_diffusers_bitwise(vae16_pair):
    name, ref, ours = vae16_pair
    image = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latent_dist
        got = ours.encode(image)
    assert got.mean.shape == (2, 16, 4, 3)
    assert max_diff(got.mean, expected.mean) == 0.0, name
    assert max_diff(got.logvar, expected.logvar) == 0.0, name


def test_vae16_decode_matches_diffusers_bitwise(vae16_pair):
    name, ref, ours = vae16_pair
    z = torch.randn(2, 16, 4, 5, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 32, 40)
    assert expected.abs().max().item() > 0.1
    assert max_diff(got, expected) == 0.0, name


def test_vae16_quant_convs_follow_config(vae16_pair):
    name, _, ours = vae16_pair
    has_quant = name == "16ch-quant"
    assert (ours.quant_conv is not None) == has_quant and (ours.post_quant_conv is not None) == has_quant
    assert ours.latent_channels == 16 and ours.scale_factor == 8


@pytest.mark.parametrize(
    "config, latent, scaling, shift",
    [(SDXL_VAE_CONFIG, 4, 0.13025, 0.0), (SD3_VAE_CONFIG, 16, 1.5305, 0.0609), (FLUX_VAE_CONFIG, 16, 0.3611, 0.1159)],
    ids=["sdxl", "sd3", "flux"],
)
def test_real_vae_configs_on_meta_equal_diffusers(config, latent, scaling, shift):
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**public(config))
        ours = AutoencoderKL(config)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    for key, value in ref_sd.items():
        assert ours_sd[key].shape == value.shape, key
    assert (ours.quant_conv is None) == (latent == 16)
    assert ours.latent_channels == latent and ours.scale_factor == 8
    assert ours.scaling_factor == scaling and ours.shift_factor == shift and ours.force_upcast


def test_vae_refuses_per_channel_latent_normalisation():
    with pytest.raises(CheckpointError, match="latents_mean"):
        AutoencoderKL({**VAE_TINY_16CH, "latents_mean": [0.0] * 16})
