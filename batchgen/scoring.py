"""CLIP score of rendered images against their prompts (a quality filter for synthetic data sets).

Why: a synthetic training set is only as good as its weakest samples; the usual filter is the
image-text cosine similarity of a CLIP model, scaled as torchmetrics' ``CLIPScore``:
``100 * max(cos(E_image, E_text), 0)``. Scores go to the manifest (column ``clip_score``) so an
export can filter on them without deleting anything.

What: :class:`ClipScorer` loads a ``transformers`` ``CLIPModel`` with its tokenizer and image
processor from a local folder or ``s3://`` prefix (downloaded once per node through
``Location.local_cache_copy``); never from the Hugging Face hub. Images are uint8 HxWx3 arrays
(or PIL images), scored in batches.

Numerics, and how they relate to torchmetrics (which takes the same model):
- images go through ``CLIPImageProcessorPil`` (the PIL backend) explicitly, so scores do not change
  with whether torchvision happens to be installed (``CLIPImageProcessor`` picks the torchvision
  backend when it is); with the same processor the pixel values equal torchmetrics' exactly;
- captions are padded to the model's ``max_position_embeddings`` (77) instead of the batch's
  longest, so model calls have fixed shapes (see :class:`ClipScorer` on batching); CLIP's causal
  mask makes the pooled (EOS) state independent of the padding, so scores agree with
  torchmetrics' within float rounding (the tests check < 1e-4). Captions over 77 tokens are truncated keeping the EOS
  token (torchmetrics cuts the ids, dropping the EOS; its scores for such captions are not CLIP's);
- features are L2-normalized in float32 whatever the model dtype; the clamp at 0 is applied per
  pair (torchmetrics' ``CLIPScore.compute`` clamps the mean; per pair they are the same).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import CheckpointError, InputError


DEFAULT_BATCH_SIZE = 16
_REQUIRED = ("config.json", "preprocessor_config.json")
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"CLIP model {folder}: not a folder (expected a transformers CLIPModel folder)")
    for name in _REQUIRED:
        if not (folder / name).is_file():
            raise CheckpointError(f"CLIP model {folder}: missing '{name}' (a transformers CLIPModel folder has "
                                  "config.json, model.safetensors, tokenizer files and preprocessor_config.json)")
    if not any(all((folder / n).is_file() for n in group) for group in _TOKENIZER_FILES):
        raise CheckpointError(f"CLIP model {folder}: missing tokenizer files (vocab.json + merges.txt, or "
                              "tokenizer.json)")
    if not any((folder / n).is_file() for n in _WEIGHTS):
        raise CheckpointError(f"CLIP model {folder}: missing weights ({' or '.join(_WEIGHTS)})")


def _as_rgb_array(image: Any, index: int) -> np.ndarray:
    """uint8 HxWx3 from a numpy array or PIL image; errors name the offending index."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        raise InputError(f"image {index}: give a uint8 HxWx3 numpy array or PIL image, not a torch tensor")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"image {index}: expected a uint8 HxWx3 array, got dtype {arr.dtype} shape {arr.shape}")
    return arr


class ClipScorer:
    """A CLIP model + tokenizer + PIL image processor that scores (image, caption) pairs.

    The model always runs on exactly ``batch_size`` rows (a short last batch is padded by
    repeating its last row) and captions are always padded to 77 tokens, so every model call has
    the same shapes. A row's float32 result can still depend on its position in the batch (BLAS
    kernels treat edge rows differently): across batch sizes and groupings scores move by float
    rounding only (~1e-5 on the 0..100 scale). ``batch_size=1`` makes a pair's score bitwise
    independent of what else is scored and how it is grouped; ``dtype=float64`` keeps every batch
    size within 1e-6 of every other.
    """

    def __init__(self, model, tokenizer, image_processor, device: str | torch.device = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.model.to(self.device)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, uri: str | os.PathLike, *, device: str | torch.device | None = None,
             dtype: str | torch.dtype = "float32", batch_size: int = DEFAULT_BATCH_SIZE,
             storage_config=None) -> "ClipScorer":
        """Load from a local folder or ``s3://`` prefix (cached per node); never from the hub.

        ``device`` None picks cuda when available; ``dtype`` float32 (default), float16, bfloat16
        or float64.
        """
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        from .storage import Location

        folder = Path(Location.parse(os.fspath(uri), storage_config).local_cache_copy())
        _check_folder(folder)
        if isinstance(dtype, str):
            if dtype not in ("float32", "float16", "bfloat16", "float64"):
                raise ValueError(f"dtype {dtype!r}: use float32, float16, bfloat16 or float64")
            dtype = getattr(torch, dtype)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            processor = CLIPImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001  (transformers raises many types for a broken folder)
            raise CheckpointError(f"CLIP model {uri}: cannot load ({type(exc).__name__}: {exc})") from None
        return cls(model, tokenizer, processor, device=device, batch_size=batch_size)

    # -- features ----------------------------------------------------------------------------

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        short = self.batch_size - x.shape[0]
        return torch.cat([x, x[-1:].expand(short, *x.shape[1:])]) if short > 0 else x

    @staticmethod
    def _normalized(feats: torch.Tensor, n: int) -> torch.Tensor:
        feats = feats[:n].float()
        return feats / feats.norm(p=2, dim=-1, keepdim=True)

    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """L2-normalized float32 image embeddings (N, projection_dim)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            arrays = [_as_rgb_array(img, start + i) for i, img in enumerate(chunk)]
            pixels = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                feats = self.model.get_image_features(self._pad(pixels).to(self.device, self._dtype()))
            out.append(self._normalized(self._tensor(feats), len(chunk)))
        return torch.cat(out) if out else torch.empty(0)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized float32 caption embeddings (N, projection_dim)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            for i, t in enumerate(chunk):
                if not isinstance(t, str):
                    raise InputError(f"caption {start + i}: expected a string, got {type(t).__name__}")
            tok = self.tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
            with torch.inference_mode():
                feats = self.model.get_text_features(self._pad(tok["input_ids"]).to(self.device),
                                                     self._pad(tok["attention_mask"]).to(self.device))
            out.append(self._normalized(self._tensor(feats), len(chunk)))
        return torch.cat(out) if out else torch.empty(0)

    # -- scores ------------------------------------------------------------------------------

    def cosine(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """Raw cosine similarity per (image, caption) pair, float64 (N,)."""
        if len(images) != len(texts):
            raise InputError(f"{len(images)} images but {len(texts)} captions: give one caption per image")
        if not len(images):
            return np.empty(0, dtype=np.float64)
        img = self.image_features(images)
        txt = self.text_features(texts)
        return (img * txt).sum(dim=-1).double().cpu().numpy()

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """CLIP score per pair: ``100 * max(cosine, 0)`` (torchmetrics' CLIPScore scale), float64 (N,)."""
        return 100.0 * np.maximum(self.cosine(images, texts), 0.0)


def clip_scores(uri: str | os.PathLike, images: Sequence[Any], texts: Sequence[str], *,
                batch_size: int = DEFAULT_BATCH_SIZE, device=None, storage_config=None) -> np.ndarray:
    """One-shot helper: load the CLIP model at ``uri`` and score the pairs."""
    scorer = ClipScorer.load(uri, device=device, batch_size=batch_size, storage_config=storage_config)
    return scorer.score(images, texts)


__all__ = ["ClipScorer", "clip_scores", "DEFAULT_BATCH_SIZE"]
