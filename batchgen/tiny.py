"""Tiny random-weight checkpoints in the diffusers layout, for tests, the demo and benchmarks.

``make_tiny_model(dir, variant, seed)`` writes model_index.json, unet/, vae/, text_encoder/,
tokenizer/ (a small byte-level BPE vocabulary of our own) and scheduler/. Weights are drawn from a
generator seeded per tensor from (seed, key), so the files are identical for the same seed on any
machine. ``builtin:tiny`` (SD1 layout) and ``builtin:tiny-sd2`` (v-prediction, linear projections)
are built once into the user cache (``$BATCHGEN_CACHE`` or ``~/.cache/batchgen``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

TINY_FORMAT = 1  # bump when the tiny layout changes, so cached builtins are rebuilt
VARIANTS = ("sd1", "sd2")
BUILTINS = {"tiny": ("sd1", 0), "tiny-sd1": ("sd1", 0), "tiny-sd2": ("sd2", 0)}

# Words the tiny BPE learns merges from: common prompt vocabulary, so prompts tokenize to fewer tokens.
_CORPUS = (
    "a an the of in on at with and or by for to from photo painting portrait landscape city street "
    "night day dawn dusk sunset sunrise light dark red blue green yellow orange purple white black "
    "gold silver cat dog bird horse car bicycle house tree forest mountain river lake sea ocean beach "
    "sky cloud rain snow fog old young man woman child robot dragon castle ship boat train flower "
    "garden field road bridge tower lighthouse window door table chair cup book lamp detailed highly "
    "realistic cinematic lighting studio sharp focus soft bokeh oil watercolor sketch digital art "
    "style render octane unreal engine 4k 8k hdr beautiful vintage futuristic ancient modern"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode mapping (GPT-2 style)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """Greedy BPE over ``words`` (characters with a ``</w>`` end marker), at most ``count`` merges."""
    vocab = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
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


def tokenizer_files(max_length: int = 77) -> dict[str, str]:
    """vocab.json, merges.txt and configs of a small CLIP-style byte-level BPE tokenizer."""
    base = list(_bytes_to_unicode().values())
    merges = _learn_merges(_CORPUS, 300)
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


def _scheduler_config(variant: str) -> dict:
    common = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
        "trained_betas": None,
        "timestep_spacing": "leading",
    }
    if variant == "sd1":
        return {"_class_name": "PNDMScheduler", **common, "skip_prk_steps": True, "prediction_type": "epsilon"}
    return {"_class_name": "DDIMScheduler", **common, "prediction_type": "v_prediction"}


def _text_encoder_config(variant: str, vocab_size: int, bos: int, eos: int) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu" if variant == "sd1" else "gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }


def random_state_dict(module, seed: int) -> dict:
    """Deterministic random weights for every entry of ``module.state_dict()``.

    Each tensor is drawn from its own generator seeded from (seed, key), so adding a layer does not
    change the others. Matrices/convolutions ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2),
    biases and embeddings ~ N(0, 0.02^2) / N(0, 0.1^2).
    """
    import torch

    state = {}
    for key, ref in module.state_dict().items():
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
        noise = torch.randn(tuple(ref.shape), generator=gen, dtype=torch.float32)
        name = key.rsplit(".", 1)[-1]
        is_norm = any(tag in key for tag in ("norm", "layer_norm", "ln_"))
        if not ref.is_floating_point():
            state[key] = ref.clone()
        elif "embedding" in key:
            state[key] = noise * 0.1
        elif is_norm and name == "weight":
            state[key] = 1.0 + 0.1 * noise
        elif name == "bias" or ref.dim() < 2:
            state[key] = 0.02 * noise
        else:
            fan_in = ref[0].numel()
            state[key] = noise / fan_in**0.5
    return state


def make_tiny_model(directory: str | os.PathLike, variant: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint in the diffusers folder layout; returns its path."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from . import __version__
    from .models import UNET_SD1_TINY, UNET_SD2_TINY, VAE_TINY, AutoencoderKL, UNet2DConditionModel

    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"directory: {root} exists and is not empty")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def write_json(rel: str, data: dict) -> None:
        (root / rel).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    write_json("model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "_batchgen": {"tiny_variant": variant, "seed": seed, "batchgen_version": __version__},
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", _scheduler_config(variant)["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    write_json("scheduler/scheduler_config.json", _scheduler_config(variant))

    tok = tokenizer_files()
    for name, text in tok.items():
        (root / "tokenizer" / name).write_text(text, encoding="utf-8")
    vocab = json.loads(tok["vocab.json"])
    te_config = _text_encoder_config(variant, len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"])
    write_json("text_encoder/config.json", te_config)

    unet_config = copy.deepcopy(UNET_SD1_TINY if variant == "sd1" else UNET_SD2_TINY)
    vae_config = copy.deepcopy(VAE_TINY)
    write_json("unet/config.json", unet_config)
    write_json("vae/config.json", vae_config)

    with torch.device("cpu"):
        modules = {
            "unet/diffusion_pytorch_model.safetensors": UNet2DConditionModel(unet_config),
            "vae/diffusion_pytorch_model.safetensors": AutoencoderKL(vae_config),
            "text_encoder/model.safetensors": CLIPTextModel(CLIPTextConfig(**te_config)),
        }
    for rel, module in modules.items():
        state = random_state_dict(module, seed)
        state = {k: v.contiguous() for k, v in state.items() if not k.endswith("position_ids")}
        save_file(state, str(root / rel), metadata={"format": "pt"})
    return root


def builtin_model_path(name: str) -> Path:
    """Path of built-in model ``name`` (``tiny``, ``tiny-sd2``), building it on first use.

    Concurrent callers (several actors on one node) build it once: a file lock serialises them and
    the folder appears atomically by rename.
    """
    from .storage import cache_root, file_lock

    if name not in BUILTINS:
        raise ValueError(f"model: unknown built-in model 'builtin:{name}'; known: "
                         + ", ".join(f"builtin:{n}" for n in BUILTINS))
    variant, seed = BUILTINS[name]
    target = cache_root() / "builtin" / f"tiny-{variant}-seed{seed}-f{TINY_FORMAT}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / "model_index.json").is_file():
            return target
        log.info("building built-in model builtin:%s into %s", name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            make_tiny_model(tmp / "m", variant=variant, seed=seed)
            os.replace(tmp / "m", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def configure(parser) -> None:
    parser.add_argument("directory", help="folder to create (must not exist or be empty)")
    parser.add_argument("--variant", choices=VARIANTS, default="sd1",
                        help="sd1: epsilon, conv projections; sd2: v-prediction, linear projections")
    parser.add_argument("--seed", type=int, default=0, help="weights are deterministic from this seed")


def run(args) -> int:
    path = make_tiny_model(args.directory, variant=args.variant, seed=args.seed)
    print(f"wrote tiny {args.variant} checkpoint (seed {args.seed}) to {path}")
    return 0
