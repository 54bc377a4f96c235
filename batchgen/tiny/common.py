"""Pieces every tiny checkpoint shares: tokenizer files, deterministic random weights, and a
writer for the diffusers folder layout.

Everything is built offline and deterministically: the same seed gives the same files on any
machine (each tensor is drawn from a generator seeded from (seed, key)).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from ..checkpoints.clip_vocab import bytes_to_unicode

# Words the tiny tokenizers learn from: common prompt vocabulary, so prompts tokenize to fewer tokens.
CORPUS = (
    "a an the of in on at with and or by for to from photo painting portrait landscape city street "
    "night day dawn dusk sunset sunrise light dark red blue green yellow orange purple white black "
    "gold silver cat dog bird horse car bicycle house tree forest mountain river lake sea ocean beach "
    "sky cloud rain snow fog old young man woman child robot dragon castle ship boat train flower "
    "garden field road bridge tower lighthouse window door table chair cup book lamp detailed highly "
    "realistic cinematic lighting studio sharp focus soft bokeh oil watercolor sketch digital art "
    "style render octane unreal engine 4k 8k hdr beautiful vintage futuristic ancient modern"
).split()
DIFFUSERS_VERSION = "0.42.1"  # written into model_index.json / config.json, as diffusers does


def _learn_merges(words: list[str], count: int, end: str = "</w>") -> list[tuple[str, str]]:
    """Greedy BPE over ``words`` (characters, the last with an ``end`` marker), at most ``count`` merges."""
    vocab = Counter(tuple(w[:-1]) + (w[-1] + end,) for w in words)
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word, freq in vocab.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged: Counter = Counter()
        for word, freq in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        vocab = merged
    return merges


def clip_tokenizer_files(max_length: int = 77) -> dict[str, str]:
    """vocab.json, merges.txt and configs of a small CLIP-style byte-level BPE tokenizer."""
    base = list(bytes_to_unicode().values())
    merges = _learn_merges(CORPUS, 300)
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=0, sort_keys=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True),
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True),
    }


def t5_tokenizer_files(max_length: int = 512) -> dict[str, str]:
    """tokenizer.json and configs of a small T5-style Unigram tokenizer (``T5TokenizerFast``):
    ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, Metaspace pre-tokenizer, ``</s>`` appended."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = ["▁" + w for w in CORPUS] + ["▁"] + sorted(set("".join(CORPUS)) | set("0123456789.,!?-'"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = set()
    for i, piece in enumerate(pieces):
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, -1.0 - 0.01 * i))
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    config = {"tokenizer_class": "T5TokenizerFast", "model_max_length": max_length, "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0, "additional_special_tokens": []}
    special = {k: config[k] for k in ("eos_token", "pad_token", "unk_token")}
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True),
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True),
    }


def clip_text_config(vocab: dict, hidden: int = 32, layers: int = 2, heads: int = 4, act: str = "quick_gelu",
                     projection_dim: int = 32, cls: str = "CLIPTextModel") -> dict:
    """A tiny CLIP text encoder config.json for the tokenizer vocabulary ``vocab``."""
    return {
        "architectures": [cls],
        "model_type": "clip_text_model",
        "vocab_size": len(vocab),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "projection_dim": projection_dim,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


def t5_config(vocab_size: int, d_model: int = 32, layers: int = 2, heads: int = 4) -> dict:
    """A tiny T5 encoder config.json (gated-GELU feed-forward, like T5 v1.1 / T5-XXL)."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": d_model // heads,
        "d_ff": 2 * d_model,
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def random_state_dict(module, seed: int) -> dict:
    """Deterministic random weights for every entry of ``module.state_dict()``.

    Each tensor is drawn from its own generator seeded from (seed, key), so adding a layer does not
    change the others. Matrices/convolutions ~ N(0, 1/fan_in), norm scales (1-D weights of norm
    layers) ~ 1 + N(0, 0.1^2), biases and embeddings ~ N(0, 0.02^2) / N(0, 0.1^2). Matrices that
    live under a norm module (adaLN modulation projections, DiT's ``norm1.emb``) are matrices: drawn
    as 1 + noise they make a transformer amplify rounding differences a thousandfold. Tied
    aliases (T5's embed_tokens) and position-id buffers are left out, as checkpoints leave them out.
    """
    import torch

    from ..checkpoints import tied_aliases

    skip = tied_aliases(module)
    state = {}
    for key, ref in module.state_dict().items():
        if key in skip or key.endswith("position_ids"):
            continue
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
        noise = torch.randn(tuple(ref.shape), generator=gen, dtype=torch.float32)
        name = key.rsplit(".", 1)[-1]
        is_norm = any(tag in key for tag in ("norm", "layer_norm", "ln_"))
        if not ref.is_floating_point():
            state[key] = ref.clone()
        elif "embedding" in key:
            state[key] = noise * 0.1
        elif is_norm and name == "weight" and ref.dim() == 1:
            state[key] = 1.0 + 0.1 * noise
        elif name == "bias" or ref.dim() < 2:
            state[key] = 0.02 * noise
        else:
            fan_in = ref[0].numel()
            state[key] = noise / fan_in**0.5
    return state


class FolderWriter:
    """Writes a diffusers-layout folder component by component, then its model_index.json."""

    def __init__(self, root: Path, pipeline_class: str, seed: int, variant: str):
        from .. import __version__

        self.root = Path(root)
        self.seed = seed
        self.index: dict = {
            "_class_name": pipeline_class,
            "_diffusers_version": DIFFUSERS_VERSION,
            "_batchgen": {"tiny_variant": variant, "seed": seed, "batchgen_version": __version__},
        }

    def json(self, rel: str, data: dict) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def entry(self, name: str, library: str | None, cls: str | None) -> None:
        self.index[name] = [library, cls]

    def model(self, name: str, library: str, cls: str, config: dict, module) -> None:
        """``<name>/config.json`` + random weights of ``module`` (built from ``config``)."""
        from safetensors.torch import save_file

        self.json(f"{name}/config.json", config)
        state = {k: v.contiguous() for k, v in random_state_dict(module, self.seed).items()}
        stem = "diffusion_pytorch_model" if library == "diffusers" else "model"
        save_file(state, str(self.root / name / f"{stem}.safetensors"), metadata={"format": "pt"})
        self.entry(name, library, cls)

    def tokenizer(self, name: str, cls: str, files: dict[str, str]) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (self.root / name / fname).write_text(text, encoding="utf-8")
        self.entry(name, "transformers", cls)

    def scheduler(self, config: dict, name: str = "scheduler") -> None:
        self.json(f"{name}/scheduler_config.json", config)
        self.entry(name, "diffusers", config["_class_name"])

    def finish(self, **extra) -> Path:
        self.index.update(extra)
        self.json("model_index.json", self.index)
        return self.root
