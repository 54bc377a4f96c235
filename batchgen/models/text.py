"""CLIP text encoder and tokenizer (through ``transformers``), encoding prompts as diffusers does."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)


def load_tokenizer(folder: Path):
    """CLIPTokenizer from a diffusers ``tokenizer/`` folder (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: missing component file '{name}'")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise CheckpointError(f"{folder}: cannot load the CLIP tokenizer ({exc})") from None


def build_text_encoder(config_path: Path):
    """An uninitialised CLIPTextModel for ``text_encoder/config.json`` (weights are loaded next)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if not config_path.is_file():
        raise CheckpointError(f"{config_path.parent}: missing component file 'config.json'")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") not in (None, "clip_text_model", "clip"):
        raise CheckpointError(f"{config_path}: model_type '{config.get('model_type')}' is not a CLIP text model")
    allowed = set(CLIPTextConfig().to_dict())
    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k in allowed and k != "transformers_version"})
    return CLIPTextModel(cfg)


class PromptEncoder:
    """Tokenize and encode prompts into the UNet's cross-attention context.

    Mirrors diffusers' StableDiffusionPipeline.encode_prompt: pad to ``model_max_length``,
    truncate (with a warning naming the dropped text), attention mask only when the encoder's
    config asks for it, the encoder's last hidden state as the context.
    """

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def __call__(self, prompts: list[str], device, dtype) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        self._warn_truncated(prompts)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(device)
        with torch.inference_mode():
            hidden = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
        return hidden.to(device=device, dtype=dtype)

    def _warn_truncated(self, prompts: list[str]) -> None:
        for i, ids in enumerate(self.tokenizer(prompts, truncation=False).input_ids):
            if len(ids) > self.max_length:
                dropped = self.tokenizer.decode(ids[self.max_length - 1:-1])
                log.warning("prompt %d is longer than %d tokens; truncated, dropping: %r", i, self.max_length, dropped)
