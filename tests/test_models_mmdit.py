"""Parity of batchgen's native SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel (test-only).

diffusers' module is built from a tiny config, its weights perturbed (norm scales, biases and the
zero-initialised adaLN gates all away from their init), copied into ours with ``strict=True`` and
both run in float32 on CPU. Our arithmetic follows diffusers op for op, so outputs must be
bitwise equal (max abs diff exactly 0).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from batchgen.errors import CheckpointError  # noqa: E402
from batchgen.models.mmdit import (  # noqa: E402
    MMDIT_TINY,
    MMDIT_TINY_SD35,
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    SD3Transformer2DModel,
)

from .module_parity import module_pair, public  # noqa: E402

CONFIGS = {
    "sd3": MMDIT_TINY,  # no QK norm, no attn2
    "sd35-large": {**MMDIT_TINY, "qk_norm": "rms_norm"},  # RMS QK norm in every block
    "sd35-medium": MMDIT_TINY_SD35,  # RMS QK norm + attn2 in block 0 (MMDiT-X)
}


def _inputs(batch: int, height: int, width: int, seed: int, tokens: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, height, width, generator=gen),
        torch.randn(batch, tokens, 32, generator=gen),
        torch.randn(batch, 64, generator=gen),
        torch.rand(batch, generator=gen) * 1000,
    )


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    config = CONFIGS[request.param]
    ref, ours = module_pair(diffusers.SD3Transformer2DModel, SD3Transformer2DModel, config, 1)
    return request.param, ref, ours


def test_state_dict_keys_and_shapes_equal_diffusers(pair):
    name, ref, ours = pair
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert sorted(our_sd) == sorted(ref_sd), name
    assert all(our_sd[k].shape == v.shape for k, v in ref_sd.items())
    has_attn2 = any(".attn2." in k for k in our_sd)
    has_qk_norm = any(".norm_added_q." in k for k in our_sd)
    assert has_attn2 == (name == "sd35-medium") and has_qk_norm == (name != "sd3")


def test_fresh_position_table_equals_diffusers(pair):
    """The table we compute at init (not only the loaded one) is diffusers' bit for bit."""
    name, ref, _ = pair
    fresh = SD3Transformer2DModel(CONFIGS[name])
    assert torch.equal(fresh.pos_embed.pos_embed, ref.pos_embed.pos_embed)


@pytest.mark.parametrize("size", [(16, 16), (12, 20), (32, 32)], ids=["square", "non-square", "full-table"])
def test_matches_diffusers_bitwise(pair, size):
    name, ref, ours = pair
    hidden, context, pooled, timestep = _inputs(2, *size, seed=3)
    with torch.no_grad():
        expected = ref(hidden, context, pooled, timestep).sample
        got = ours(hidden, context, pooled, timestep)
    assert got.shape == (2, 16, *size)
    assert expected.abs().max().item() > 0.1  # a real, non-trivial output
    assert (got - expected).abs().max().item() == 0.0, name


def test_scalar_timestep_equals_expanded_tensor(pair):
    _, ref, ours = pair
    hidden, context, pooled, _ = _inputs(2, 8, 8, seed=4)
    with torch.no_grad():
        expected = ref(hidden, context, pooled, torch.tensor([250.5, 250.5])).sample
        assert torch.equal(ours(hidden, context, pooled, 250.5), expected)
        assert torch.equal(ours(hidden, context, pooled, torch.tensor(250.5)), expected)


def test_item_output_independent_of_position_and_batch_mates(pair):
    name, _, ours = pair
    hidden, context, pooled, timestep = _inputs(3, 12, 20, seed=5)
    order = [1, 2, 0]  # item 0 moves to position 2, next to different batch mates
    with torch.no_grad():
        first = ours(hidden, context, pooled, timestep)
        moved = ours(hidden[order], context[order], pooled[order], timestep[order])
    assert torch.equal(first[0], moved[2]), name
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize(
    "change, key",
    [
        ({"qk_norm": "layer_norm"}, "qk_norm"),
        ({"qk_norm": "rms_norm_across_heads"}, "qk_norm"),
        ({"caption_projection_dim": 24}, "caption_projection_dim"),
        ({"dual_attention_layers": [0, 2]}, "dual_attention_layers"),
        ({"pos_embed_max_size": None}, "pos_embed_max_size"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_unsupported_config_raises_checkpoint_error(change, key):
    with pytest.raises(CheckpointError, match=key):
        SD3Transformer2DModel({**MMDIT_TINY, **change})


def test_bad_inputs_raise_value_error():
    ours = SD3Transformer2DModel(MMDIT_TINY).eval()
    hidden, context, pooled, timestep = _inputs(2, 8, 8, seed=6)
    with pytest.raises(ValueError, match="patch_size"):
        ours(hidden[..., :7], context, pooled, timestep)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours(torch.zeros(1, 16, 66, 8), context[:1], pooled[:1], timestep[:1])
    with pytest.raises(ValueError, match="timestep"):
        ours(hidden, context, pooled, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="pooled_projections"):
        ours(hidden, context, pooled[:, :10], timestep)


def test_config_resolved_with_defaults_and_bookkeeping_ignored():
    ours = SD3Transformer2DModel({**MMDIT_TINY, "_diffusers_version": "0.31.0", "out_channels": None})
    assert "_class_name" not in ours.config and "_diffusers_version" not in ours.config
    assert ours.config["out_channels"] == 16 and ours.config["qk_norm"] is None
    assert ours.config["dual_attention_layers"] == []
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    assert SD3Transformer2DModel(MMDIT_TINY_SD35).config["dual_attention_layers"] == [0]


# Known sizes. The ≈2.47B of SD3.5-Medium counts its stored 384x384 position table (226.5M
# numbers, a buffer in diffusers, not a parameter); the others are parameter counts.
REAL = {
    "sd3-medium": (SD3_MEDIUM, "parameters", 2.03e9),
    "sd3.5-medium": (SD35_MEDIUM, "state_dict", 2.47e9),
    "sd3.5-large": (SD35_LARGE, "parameters", 8.1e9),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_configs_on_meta_equal_diffusers(name):
    config, counted, known = REAL[name]
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**public(config))
        ours = SD3Transformer2DModel(config)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert sorted(our_sd) == sorted(ref_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in ref.parameters())
    total = params if counted == "parameters" else sum(v.numel() for v in our_sd.values())
    assert abs(total - known) / known < 0.01, (name, total)
