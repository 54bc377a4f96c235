"""CLIP score: a tiny random CLIPModel built here (our tiny tokenizer, a 32 px PIL image
processor) scored by batchgen.scoring and by torchmetrics' CLIPScore on the same model.

torchmetrics 1.9.0 predates transformers 5, whose ``get_image_features`` / ``get_text_features``
return a ModelOutput instead of a tensor (torchmetrics issue #3407, fixed upstream by unwrapping
``pooler_output``); the reference is therefore given the model through a thin adapter that does
exactly that unwrapping. Nothing of ours is mocked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen.errors import CheckpointError, InputError
from batchgen.scoring import ClipScorer

CAPTIONS = ["a photo of a cat", "a red car on a road", "portrait of an old man", "a dog in the snow",
            "a castle at sunset, highly detailed", "", "blue", "a ship on the sea at night, oil painting"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from batchgen.tiny.common import clip_tokenizer_files

    folder = tmp_path_factory.mktemp("clip")
    files = clip_tokenizer_files()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    import json

    vocab = json.loads(files["vocab.json"])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb so norms and biases are not at their trivial init
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(folder))
    return folder


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer.load(clip_dir, device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    shapes = [(32, 32), (40, 56), (64, 48), (33, 90), (100, 100), (48, 40), (32, 64), (70, 35)]
    out = []
    for i, (h, w) in enumerate(shapes):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[: h // 2, :, i % 3] = 255  # some structure, different per image
        out.append(img)
    return out


class _Unwrapped(torch.nn.Module):
    """torchmetrics' view of a transformers-5 CLIPModel: features as tensors (upstream fix #3408)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        return self.inner.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.inner.get_text_features(*args, **kwargs).pooler_output


def _reference(scorer):
    from transformers import CLIPProcessor

    processor = CLIPProcessor(image_processor=scorer.image_processor, tokenizer=scorer.tokenizer)
    return _Unwrapped(scorer.model), processor


def test_scores_equal_torchmetrics_clipscore(scorer, images):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = _reference(scorer)
    chw = [torch.from_numpy(img).permute(2, 0, 1).contiguous() for img in images]
    ours = scorer.score(images, CAPTIONS)
    cos = scorer.cosine(images, CAPTIONS)
    assert (cos > 0).any() and (cos < 0).any()  # both sides of the clamp are exercised

    # unclamped 100 * cosine for the whole batch, as torchmetrics computes it
    raw, n = _clip_score_update(chw, CAPTIONS, model, processor)
    assert n == len(images)
    np.testing.assert_allclose(100 * cos, raw.detach().double().numpy(), rtol=0, atol=1e-4)

    # the metric itself, one pair at a time (its compute() clamps the mean; one pair = that pair)
    for img, caption, mine in zip(chw, CAPTIONS, ours):
        metric = CLIPScore(model_name_or_path=lambda: (model, processor))
        metric.update(img, caption)
        assert abs(metric.compute().item() - mine) <= 1e-4
    assert ((ours >= 0) & (ours <= 100)).all()
    np.testing.assert_array_equal(ours, 100 * np.maximum(cos, 0))


def test_batching_does_not_change_scores(scorer, clip_dir, images):
    reference = ClipScorer(scorer.model, scorer.tokenizer, scorer.image_processor, batch_size=1)
    all_at_once = reference.score(images, CAPTIONS)
    # batch_size 1: however the pairs are grouped into calls or ordered, bitwise the same scores
    one_by_one = np.concatenate([reference.score([img], [cap]) for img, cap in zip(images, CAPTIONS)])
    np.testing.assert_array_equal(one_by_one, all_at_once)
    order = [5, 2, 7, 0, 1, 6, 3, 4]
    again = reference.score([images[i] for i in order], [CAPTIONS[i] for i in order])
    np.testing.assert_array_equal(again, all_at_once[order])
    # other batch sizes in float32: rounding only (measured ~5e-6 on the 0..100 scale)
    for bs in (2, 3, 5, 8, 16):
        other = ClipScorer(scorer.model, scorer.tokenizer, scorer.image_processor, batch_size=bs)
        np.testing.assert_allclose(other.score(images, CAPTIONS), all_at_once, rtol=0, atol=1e-4)
    # in float64 no batch size moves a score by 1e-6
    wide = ClipScorer.load(clip_dir, device="cpu", dtype="float64", batch_size=1)
    ref = 100 * wide.cosine(images, CAPTIONS)
    np.testing.assert_allclose(ref, 100 * reference.cosine(images, CAPTIONS), rtol=0, atol=1e-4)
    for bs in (2, 3, 8):
        wide.batch_size = bs
        np.testing.assert_allclose(100 * wide.cosine(images, CAPTIONS), ref, rtol=0, atol=1e-6)


def test_pil_images_and_matching_pairs(scorer, images):
    from PIL import Image

    pil = [Image.fromarray(img) for img in images[:3]]
    np.testing.assert_allclose(scorer.score(pil, CAPTIONS[:3]), scorer.score(images[:3], CAPTIONS[:3]),
                               rtol=0, atol=1e-6)
    # a caption's score depends on its own image: swapping images changes it
    swapped = scorer.cosine([images[1], images[0]], CAPTIONS[:2])
    assert not np.allclose(swapped, scorer.cosine(images[:2], CAPTIONS[:2]))


def test_long_caption_keeps_its_eos(scorer, images):
    long_caption = " ".join(["cat"] * 200)
    cut = scorer.tokenizer(long_caption, truncation=True, max_length=77).input_ids
    assert len(cut) == 77 and cut[-1] == scorer.tokenizer.eos_token_id
    score = scorer.score(images[:1], [long_caption])
    assert np.isfinite(score).all()


def test_bad_inputs(scorer, images, clip_dir, tmp_path):
    with pytest.raises(InputError, match="2 images but 1 captions"):
        scorer.score(images[:2], CAPTIONS[:1])
    with pytest.raises(InputError, match="image 1: expected a uint8 HxWx3"):
        scorer.score([images[0], images[1][..., :2]], CAPTIONS[:2])
    with pytest.raises(InputError, match="image 0: expected a uint8"):
        scorer.score([images[0].astype(np.float32)], CAPTIONS[:1])
    with pytest.raises(InputError, match="caption 0"):
        scorer.score(images[:1], [None])
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="missing 'preprocessor_config.json'"):
        ClipScorer.load(broken)
    with pytest.raises(CheckpointError, match="not a folder"):
        ClipScorer.load(clip_dir / "model.safetensors")


def test_load_from_s3(scorer, images, clip_dir, s3_bucket, s3_server, tmp_path, monkeypatch):
    from tests.fixtures_s3 import s3_client

    from batchgen.storage import StorageConfig

    client = s3_client(s3_server)
    for path in clip_dir.iterdir():
        client.upload_file(str(path), s3_bucket, f"models/clip/{path.name}")
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))
    remote = ClipScorer.load(f"s3://{s3_bucket}/models/clip", device="cpu",
                             storage_config=StorageConfig(endpoint_url=s3_server))
    np.testing.assert_array_equal(remote.score(images[:4], CAPTIONS[:4]), scorer.score(images[:4], CAPTIONS[:4]))
