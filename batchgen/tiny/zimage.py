"""Tiny Z-Image checkpoint (``zimage``) in the layout diffusers' ``ZImagePipeline`` loads.

Components as the published Tongyi-MAI/Z-Image-Turbo folder has them, at toy width: the
ZIMAGE_TINY transformer, a 16-channel 8x VAE with the FLUX.1 VAE's scaling/shift factors (Z-Image
uses that VAE), a tiny ``Qwen3Model`` (its hidden size is the transformer's ``cap_feat_dim``) with
a byte-level BPE tokenizer of our own that carries a Qwen3-style chat template, and Z-Image-Turbo's
scheduler config (static shift 3).
"""

from __future__ import annotations

import copy
import json

from ..checkpoints.clip_vocab import bytes_to_unicode
from .common import CORPUS, FolderWriter, _learn_merges

# The published scheduler/scheduler_config.json of Z-Image-Turbo.
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": False}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's template for what ZImagePipeline renders (one user message, the generation prompt; with
# enable_thinking=False Qwen3 adds an empty think block).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)


def qwen_tokenizer_files() -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json of a small Qwen2-style byte-level BPE tokenizer
    (``Qwen2Tokenizer``): the 256 byte symbols, merges learned from the prompt corpus, Qwen's
    special tokens (pad ``<|endoftext|>``), no BOS, the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges = _learn_merges(["Ġ" + w for w in CORPUS] + CORPUS, 300, end="")
    vocab: dict[str, int] = {}
    for token in list(bytes_to_unicode().values()) + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "add_bos_token": False,
              "errors": "replace", "split_special_tokens": False, "chat_template": CHAT_TEMPLATE}
    return {"tokenizer.json": tok.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True)}


def qwen3_config(vocab_size: int, hidden: int = 32, layers: int = 3, heads: int = 4, kv_heads: int = 2) -> dict:
    """A tiny Qwen3 text model config.json (grouped-query attention, QK-norm, like Qwen3-4B)."""
    return {
        "architectures": ["Qwen3Model"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": False,
    }


def build(out: FolderWriter, variant: str) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from ..models.vae import FLUX_VAE_CONFIG, VAE_TINY_16CH, AutoencoderKL
    from ..models.zimage import ZIMAGE_TINY, ZImageTransformer2DModel

    transformer_config = copy.deepcopy(ZIMAGE_TINY)
    vae_config = {**copy.deepcopy(VAE_TINY_16CH), "scaling_factor": FLUX_VAE_CONFIG["scaling_factor"],
                  "shift_factor": FLUX_VAE_CONFIG["shift_factor"]}
    tok = qwen_tokenizer_files()
    vocab = len(json.loads(tok["tokenizer.json"])["model"]["vocab"]) + len(SPECIAL_TOKENS)
    text_config = qwen3_config(vocab, hidden=transformer_config["cap_feat_dim"])
    out.scheduler(copy.deepcopy(SCHEDULER))
    out.tokenizer("tokenizer", "Qwen2Tokenizer", tok)
    with torch.device("cpu"):
        out.model("text_encoder", "transformers", "Qwen3Model", text_config, Qwen3Model(Qwen3Config(**text_config)))
        out.model("transformer", "diffusers", "ZImageTransformer2DModel", transformer_config,
                  ZImageTransformer2DModel(transformer_config))
        out.model("vae", "diffusers", "AutoencoderKL", vae_config, AutoencoderKL(vae_config))
    out.finish()
