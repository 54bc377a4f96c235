"""Parity of batchgen's native DiT against diffusers' DiTTransformer2DModel (test-only), and class_id.

diffusers' module is built from a tiny config, its weights perturbed, copied into ours with
``strict=True`` and both run in float32 on CPU: outputs must be bitwise equal (max abs diff 0).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from batchgen.errors import CheckpointError  # noqa: E402
from batchgen.models.dit import (  # noqa: E402
    DIT_TINY,
    DIT_XL_2_256,
    DIT_XL_2_512,
    DiTTransformer2DModel,
    class_id,
)

from .module_parity import module_pair, public  # noqa: E402

CONFIGS = {
    "learned-sigma": DIT_TINY,  # out_channels = 2 * in_channels
    # epsilon only, exact-erf GELU, affine norm3 (keys norm3.weight / norm3.bias)
    "eps-only": {**DIT_TINY, "out_channels": None, "activation_fn": "gelu", "norm_elementwise_affine": True,
                 "norm_eps": 1e-6, "num_layers": 3},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    config = CONFIGS[request.param]
    ref, ours = module_pair(diffusers.DiTTransformer2DModel, DiTTransformer2DModel, config, 1)
    return request.param, ref, ours


def test_state_dict_keys_and_shapes_equal_diffusers(pair):
    name, ref, ours = pair
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert sorted(our_sd) == sorted(ref_sd), name
    assert all(our_sd[k].shape == v.shape for k, v in ref_sd.items())
    assert "pos_embed.pos_embed" not in our_sd  # DiT's table is recomputed, not stored
    assert torch.equal(DiTTransformer2DModel(CONFIGS[name]).pos_embed.pos_embed, ref.pos_embed.pos_embed)


@pytest.mark.parametrize(
    "size, timestep",
    [
        (8, torch.tensor([999, 500, 0])),  # integer timesteps, the sample size
        (8, torch.tensor([999.0, 321.75, 12.5])),  # fractional timesteps
        (12, torch.tensor([700, 700, 3])),  # not the sample size: position table recomputed
    ],
    ids=["int", "float", "other-size"],
)
def test_matches_diffusers_bitwise(pair, size, timestep):
    name, ref, ours = pair
    hidden = torch.randn(3, 4, size, size, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 7, 10])  # 10 = the null class used for classifier-free guidance
    with torch.no_grad():
        expected = ref(hidden, timestep, labels).sample
        got = ours(hidden, timestep, labels)
    assert got.shape == (3, ours.out_channels, size, size)
    assert expected.abs().max().item() > 0.1
    assert (got - expected).abs().max().item() == 0.0, name


def test_learned_sigma_output_channels(pair):
    name, _, ours = pair
    assert ours.learned_sigma == (name == "learned-sigma")
    assert ours.out_channels == (8 if name == "learned-sigma" else 4)


def test_scalar_timestep_equals_expanded_tensor(pair):
    _, ref, ours = pair
    hidden = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        expected = ref(hidden, torch.tensor([250, 250]), labels).sample
        assert torch.equal(ours(hidden, 250, labels), expected)
        assert torch.equal(ours(hidden, torch.tensor(250), labels), expected)


def test_item_output_independent_of_position_and_batch_mates(pair):
    name, _, ours = pair
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 4, 8, 8, generator=gen)
    timestep, labels = torch.tensor([900.0, 10.0, 455.5]), torch.tensor([3, 10, 5])
    order = [1, 2, 0]  # item 0 moves to position 2, next to different batch mates
    with torch.no_grad():
        first = ours(hidden, timestep, labels)
        moved = ours(hidden[order], timestep[order], labels[order])
    assert torch.equal(first[0], moved[2]), name
    assert not torch.equal(first[0], first[1])


def test_non_square_latent():
    """diffusers' DiT unpatchify assumes a square grid (it cannot run H != W); ours uses the real grid.
    Checked piecewise: the recomputed table equals diffusers' for that grid, and unpatchify puts
    token (i, j)'s (a, b, c) entry at pixel (c, i*p + a, j*p + b)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from batchgen.models.dit_blocks import sincos_pos_table, unpatchify

    expected = get_2d_sincos_pos_embed(32, (4, 8), base_size=4).float().unsqueeze(0)
    assert torch.equal(sincos_pos_table(32, 4, 8, base_size=4), expected)
    p, channels, gh, gw = 2, 3, 2, 3
    tokens = torch.arange(gh * gw * p * p * channels, dtype=torch.float32).reshape(1, gh * gw, -1)
    out = unpatchify(tokens, gh, gw, p, channels)
    for i in range(gh):
        for j in range(gw):
            for a in range(p):
                for b in range(p):
                    for c in range(channels):
                        assert out[0, c, i * p + a, j * p + b] == tokens[0, i * gw + j, (a * p + b) * channels + c]
    ours = DiTTransformer2DModel(DIT_TINY).eval()
    with torch.no_grad():
        assert ours(torch.randn(1, 4, 8, 16), torch.tensor([10.0]), torch.tensor([1])).shape == (1, 8, 8, 16)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"norm_type": "ada_norm"}, "norm_type"),
        ({"norm_type": "layer_norm"}, "norm_type"),
        ({"activation_fn": "geglu"}, "activation_fn"),
        ({"upcast_attention": True}, "upcast_attention"),
        ({"num_embeds_ada_norm": None}, "num_embeds_ada_norm"),
        ({"cross_attention_dim": 768}, "cross_attention_dim"),
        ({"num_vector_embeds": 1024}, "num_vector_embeds"),
        ({"attention_head_dim": 3, "num_attention_heads": 2}, "attention_head_dim"),
    ],
)
def test_unsupported_config_raises_checkpoint_error(change, key):
    with pytest.raises(CheckpointError, match=key):
        DiTTransformer2DModel({**DIT_TINY, **change})


def test_legacy_transformer2d_config_accepted():
    """The hub's DiT folders carry a Transformer2DModel config; its off-switch keys are accepted."""
    legacy = {**DIT_TINY, "_class_name": "Transformer2DModel", "cross_attention_dim": None,
              "num_vector_embeds": None, "only_cross_attention": False, "use_linear_projection": False}
    ours = DiTTransformer2DModel(legacy)
    assert "cross_attention_dim" not in ours.config and ours.config["num_embeds_ada_norm"] == 10


def test_bad_inputs_raise_value_error():
    ours = DiTTransformer2DModel(DIT_TINY).eval()
    hidden = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="class_labels"):
        ours(hidden, 10, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="class_labels"):
        ours(hidden, 10, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="timestep"):
        ours(hidden, torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="patch_size"):
        ours(hidden[..., :7], 10, torch.tensor([1, 2]))


def test_config_resolved_with_defaults():
    ours = DiTTransformer2DModel({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16})
    assert ours.config["out_channels"] == 4 and ours.config["norm_type"] == "ada_norm_zero"
    assert ours.config["sample_size"] == 32 and ours.config["num_embeds_ada_norm"] == 1000
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")


@pytest.mark.parametrize("config", [DIT_XL_2_256, DIT_XL_2_512], ids=["256", "512"])
def test_real_configs_on_meta_equal_diffusers(config):
    with torch.device("meta"):
        ref = diffusers.DiTTransformer2DModel(**public(config))
        ours = DiTTransformer2DModel(config)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in ref.parameters())
    # DiT-XL/2's known ≈675M counts unique weights: diffusers keeps 28 copies of the timestep /
    # class embedder (one per block), of which the 27 beyond block 0's are extra.
    copies = sum(p.numel() for n, p in ours.named_parameters()
                 if ".norm1.emb." in n and not n.startswith("transformer_blocks.0."))
    assert abs((params - copies) - 675e6) / 675e6 < 0.01, params - copies


# ------------------------------------------------------------------------------------ class_id

ID2LABEL = {
    "0": "tench, Tinca tinca",
    "1": "goldfish, Carassius auratus",
    "2": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    "3": "crane",
    "4": "golden retriever",
    "5": "crane, derrick",  # 'crane' again: the later id wins, as in diffusers
    "6": "Labrador retriever",
}


def test_class_id_numbers_and_names():
    assert class_id("4", ID2LABEL) == 4
    assert class_id(" 0 ", ID2LABEL) == 0
    assert class_id("goldfish", ID2LABEL) == 1
    assert class_id("Carassius auratus", ID2LABEL) == 1
    assert class_id("man-eater", ID2LABEL) == 2
    assert class_id("crane", ID2LABEL) == 5
    assert class_id("derrick", {5: "crane, derrick"}) == 5  # int keys too


def test_class_id_equals_dit_pipeline_get_label_ids():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    transformer = diffusers.DiTTransformer2DModel(**public({**DIT_TINY, "num_layers": 1}))
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4)
    pipe = DiTPipeline(transformer, vae, DDIMScheduler(), id2label=ID2LABEL)
    names = list(pipe.labels)
    assert len(names) == 13
    assert [class_id(n, ID2LABEL) for n in names] == pipe.get_label_ids(names)


@pytest.mark.parametrize("prompt", ["7", "-1", "1000"])
def test_class_id_out_of_range(prompt):
    with pytest.raises(ValueError, match=f"prompt '{prompt}'.*0..6"):
        class_id(prompt, ID2LABEL)


def test_class_id_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="prompt 'golden retreiver'") as err:
        class_id("golden retreiver", ID2LABEL)
    message = str(err.value)
    assert "'golden retriever'" in message and "'Labrador retriever'" in message
    with pytest.raises(ValueError, match="close matches: 'goldfish'"):
        class_id("Goldfish", ID2LABEL)  # names are case-sensitive, as in diffusers
    many = {i: f"dog breed {i}" for i in range(20)}
    with pytest.raises(ValueError) as err:
        class_id("dog breed", many)
    assert str(err.value).count("'dog breed ") == 5  # at most 5 suggestions
    with pytest.raises(ValueError, match="'zzzz'") as err:
        class_id("zzzz", ID2LABEL)
    assert "close matches" not in str(err.value)
