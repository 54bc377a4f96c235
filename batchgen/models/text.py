"""Text encoders and tokenizers (through ``transformers``), encoding prompts as diffusers does.

Families combine them differently (SD 1/2: CLIP last hidden state; SDXL: two CLIPs' penultimate
states + the projection encoder's pooled vector; SD3: two CLIPs + T5; FLUX: CLIP's pooler output +
T5), so this module offers two small encoders with the knobs those recipes need:

- :class:`ClipEncoder`: pad to ``model_max_length`` (77), truncate with a warning that names the
  item and the dropped text, and return the requested hidden state and pooled vector;
- :class:`T5Encoder`: pad/truncate to a per-job ``max_sequence_length``, last hidden state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

_CONFIG_CLASSES = {
    "CLIPTextModel": "CLIPTextConfig",
    "CLIPTextModelWithProjection": "CLIPTextConfig",
    "T5EncoderModel": "T5Config",
    "Qwen3Model": "Qwen3Config",
}
_MODEL_TYPES = {"CLIPTextConfig": (None, "clip_text_model", "clip"), "T5Config": (None, "t5", "umt5"),
                "Qwen3Config": ("qwen3",)}
_WARN_CHARS = 60  # dropped text quoted in a truncation warning


def build_text_encoder(cls_name: str, config: dict):
    """An uninitialised transformers text encoder of class ``cls_name`` for a ``config.json`` dict."""
    import transformers

    if cls_name not in _CONFIG_CLASSES:
        raise CheckpointError(f"text encoder class {cls_name!r} is not supported "
                              f"(supported: {', '.join(_CONFIG_CLASSES)})")
    config_cls = getattr(transformers, _CONFIG_CLASSES[cls_name])
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES[_CONFIG_CLASSES[cls_name]]:
        raise CheckpointError(f"text encoder config: model_type {model_type!r} does not fit class {cls_name}")
    # legacy RoPE keys (Qwen3 configs saved before transformers 5 keep rope_theta at the top; the
    # config class folds them into rope_parameters)
    allowed = set(config_cls().to_dict()) | {"rope_theta", "rope_scaling"}
    cfg = config_cls(**{k: v for k, v in config.items() if k in allowed and k != "transformers_version"})
    return getattr(transformers, cls_name)(cfg)


def load_tokenizer(folder: Path, cls_name: str = "CLIPTokenizer"):
    """A CLIP (vocab.json + merges.txt), T5 (tokenizer.json / spiece.model) or Qwen2 (tokenizer.json) tokenizer from a
    local folder; never downloads."""
    import transformers

    if cls_name.startswith("Qwen2"):  # Qwen3 text encoders (Z-Image) ship a Qwen2 byte-level BPE tokenizer
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder}: missing component file 'tokenizer.json' (a {cls_name})")
        cls = transformers.Qwen2Tokenizer
    elif cls_name.startswith("CLIP"):
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: missing component file '{name}'")
        cls = transformers.CLIPTokenizer
    else:
        if not any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model")):
            raise CheckpointError(f"{folder}: missing component file 'tokenizer.json' or 'spiece.model' "
                                  "(a T5 tokenizer)")
        cls = transformers.T5TokenizerFast
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise CheckpointError(f"{folder}: cannot load the {cls_name} tokenizer ({exc})") from None


def _label(labels: Sequence[str] | None, i: int) -> str:
    return f"item {labels[i]}" if labels is not None and i < len(labels) and labels[i] else f"prompt {i}"


class _Tokenized:
    """Fixed-length token ids of a batch of prompts, warning once per truncated prompt."""

    def __init__(self, tokenizer, prompts: list[str], max_length: int, labels=None, **extra):
        tok = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt", **extra)
        self.input_ids = tok.input_ids
        self.attention_mask = tok.attention_mask
        full = tokenizer(prompts, truncation=False, **extra).input_ids
        for i, ids in enumerate(full):
            if len(ids) > max_length:
                # CLIP ([BOS] ... [EOS]) and T5 (... [EOS]) both keep max_length - 1 tokens + EOS.
                dropped = tokenizer.decode(ids[max_length - 1:-1])
                shown = dropped if len(dropped) <= _WARN_CHARS else dropped[:_WARN_CHARS] + "..."
                log.warning("%s: prompt is %d tokens, longer than %d; truncated, dropping %d characters: %r",
                            _label(labels, i), len(ids), max_length, len(dropped), shown)


class ClipEncoder:
    """A CLIP tokenizer + text encoder (``CLIPTextModel`` or ``CLIPTextModelWithProjection``)."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer = tokenizer
        self.encoder = encoder

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def width(self) -> int:
        return int(self.encoder.config.hidden_size)

    def __call__(self, prompts: list[str], device, *, hidden: str = "last", pooled: str | None = None,
                 labels: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (B, 77, width), pooled (B, dim) or None).

        ``hidden``: ``last`` (the final layer-normed state; SD 1/2) or ``penultimate`` (SDXL, SD3).
        ``pooled``: None, ``output0`` (the encoder's first output when it is 2-D: the projected
        ``text_embeds`` of a ``CLIPTextModelWithProjection``; SDXL, SD3) or ``pooler`` (the pooled
        EOS state; FLUX).
        """
        tok = _Tokenized(self.tokenizer, prompts, self.max_length, labels)
        ids = tok.input_ids.to(device)
        with torch.inference_mode():
            if hidden == "last" and pooled is None:
                mask = None
                if getattr(self.encoder.config, "use_attention_mask", False):
                    mask = tok.attention_mask.to(device)
                return self.encoder(ids, attention_mask=mask)[0], None
            out = self.encoder(ids, output_hidden_states=hidden == "penultimate")
        states = out.hidden_states[-2] if hidden == "penultimate" else out[0]
        vector = None
        if pooled == "output0":
            vector = out[0]
            if vector.ndim != 2:
                raise CheckpointError("text encoder: expected a CLIPTextModelWithProjection (2-D text_embeds) "
                                      f"for the pooled prompt vector, got {type(self.encoder).__name__}")
        elif pooled == "pooler":
            vector = out.pooler_output
        return states, vector


    def weighted(self, prompts: list[str], device, n_chunks: int, *, hidden: str = "last",
                 pooled: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like ``__call__`` for A1111-syntax prompts (:mod:`batchgen.prompt_syntax`): weights,
        BREAK and 75-token chunks, each chunk encoded as its own 77-token sequence and the states
        concatenated to ``n_chunks * 77`` tokens (the pooled vector is the first chunk's)."""
        from ..prompt_syntax import encode_prompts

        def encode(ids: torch.Tensor):
            with torch.inference_mode():
                if hidden == "last" and pooled is None:
                    return self.encoder(ids)[0]
                out = self.encoder(ids, output_hidden_states=hidden == "penultimate")
            states = out.hidden_states[-2] if hidden == "penultimate" else out[0]
            vector = out[0] if pooled == "output0" else out.pooler_output if pooled == "pooler" else None
            return (states, vector) if vector is not None else states

        return encode_prompts(self.tokenizer, encode, prompts, device=device, n_chunks=n_chunks)

    def chunks(self, prompt: str) -> int:
        """75-token chunks ``prompt`` takes in A1111 syntax."""
        from ..prompt_syntax import chunk_count

        return chunk_count(self.tokenizer, prompt)


class T5Encoder:
    """A T5 tokenizer + ``T5EncoderModel``: the last hidden state at a fixed sequence length."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer = tokenizer
        self.encoder = encoder

    @property
    def width(self) -> int:
        return int(self.encoder.config.d_model)

    def __call__(self, prompts: list[str], device, max_length: int,
                 labels: Sequence[str] | None = None) -> torch.Tensor:
        tok = _Tokenized(self.tokenizer, prompts, max_length, labels, add_special_tokens=True)
        with torch.inference_mode():
            return self.encoder(tok.input_ids.to(device))[0]
