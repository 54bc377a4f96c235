"""Parity of batchgen's native Z-Image transformer against diffusers' ``ZImageTransformer2DModel``,
float32 CPU: diffusers' module built from the tiny preset, its weights perturbed (pad tokens and
zero-initialised layers off their init), copied into ours with ``strict=True``; outputs must be
bitwise equal, for one row, and for rows whose captions differ in length (attention masks)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import ZImageTransformer2DModel as Reference  # noqa: E402

from batchgen.errors import CheckpointError  # noqa: E402
from batchgen.models.zimage import ZIMAGE_DEFAULTS, ZIMAGE_TINY, ZIMAGE_TURBO, ZImageTransformer2DModel  # noqa: E402

from .module_parity import max_diff, module_pair, public  # noqa: E402

CONFIGS = {
    "tiny": ZIMAGE_TINY,
    "no-qk-norm-3-layers": {**ZIMAGE_TINY, "qk_norm": False, "n_layers": 3, "n_refiner_layers": 2, "dim": 64,
                            "n_heads": 4, "cap_feat_dim": 24},
}


def _reference(ref, latents, t, captions, lengths):
    out = ref([row.unsqueeze(1) for row in latents], t, [c[:n] for c, n in zip(captions, lengths)],
              return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape,lengths", [((1, 8, 8), [7]), ((3, 6, 10), [5, 40, 33]), ((2, 4, 4), [32, 30])])
def test_transformer_matches_diffusers_bitwise(name, shape, lengths):
    config = CONFIGS[name]
    ref, ours = module_pair(Reference, ZImageTransformer2DModel, config, seed=3)
    gen = torch.Generator().manual_seed(1)
    batch, h, w = shape
    latents = torch.randn(batch, config["in_channels"], h, w, generator=gen)
    t = torch.rand(batch, generator=gen)
    captions = torch.randn(batch, 48, config["cap_feat_dim"], generator=gen)
    with torch.no_grad():
        expected = _reference(ref, latents, t, captions, lengths)
        got = ours(latents, t, captions, lengths)
    assert max_diff(got, expected) == 0.0


def test_state_dict_keys_equal_diffusers():
    ref = Reference(**public(ZIMAGE_TINY))
    ours = ZImageTransformer2DModel(ZIMAGE_TINY)
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())
    assert set(ZIMAGE_DEFAULTS) <= set(public(dict(ref.config)))


@pytest.mark.parametrize("change,key", [({"siglip_feat_dim": 16}, "siglip_feat_dim"),
                                        ({"all_patch_size": [1]}, "all_patch_size"),
                                        ({"axes_dims": [4, 4, 4]}, "axes_dims"),
                                        ({"dim": 33}, "dim")])
def test_bad_configs_name_the_key(change, key):
    with pytest.raises(CheckpointError, match=key):
        ZImageTransformer2DModel({**ZIMAGE_TINY, **change})
