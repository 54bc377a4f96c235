"""Tiny SD3 (MMDiT, shift 3.0), SD3.5 (RMS QK-norm + SD3.5-Medium's dual attention) and SD3 without
T5 checkpoints, loadable by diffusers' ``StableDiffusion3Pipeline``.

The text side keeps SD3's shape relations at a small scale: two CLIPs with projection whose hidden
widths (8 + 16) are narrower than T5's (32 = the transformer's ``joint_attention_dim``), so the
zero padding of the CLIP states is exercised, and whose projections (32 + 32) add up to the
transformer's ``pooled_projection_dim``.

The transformers' weights get one correction after the shared random init
(:func:`fix_norm_projections`): ``random_state_dict`` draws every weight whose key contains "norm"
as a norm scale (1 + N(0, 0.1^2)), which for the adaLN projections and embedders that live under
``norm1`` / ``norm_out`` makes matrices of ~1s. Such a tiny model amplifies an input change ~1000x
(~5x once fixed), so the 1-ulp differences between two float32 implementations (diffusers'
memory-mapped weights take other CPU kernel paths than aligned ones) grew into visible pixel
differences within a few guided steps.
"""

from __future__ import annotations

import copy
import json

from .common import FolderWriter, clip_text_config, clip_tokenizer_files, t5_config, t5_tokenizer_files

CLIP_L_HIDDEN, CLIP_G_HIDDEN, PROJECTION = 8, 16, 32


def fix_norm_projections(out: FolderWriter, name: str) -> None:
    """Rewrite ``<name>``'s weights: every matrix under a "norm" module (adaLN projections, DiT's
    timestep embedder in ``norm1.emb``), drawn as 1 + 0.1 n by the shared init, becomes
    n / sqrt(fan_in) from the same draw n, like every other matrix. Deterministic."""
    from safetensors.torch import load_file, save_file

    path = out.root / name / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    for key, value in state.items():
        if "norm" in key and "embedding" not in key and key.endswith(".weight") and value.dim() >= 2:
            state[key] = ((value - 1.0) / 0.1 / value[0].numel() ** 0.5).contiguous()
    save_file(state, str(path), metadata={"format": "pt"})


def scheduler_config(variant: str) -> dict:
    """stabilityai/stable-diffusion-3(.5)-*/scheduler/scheduler_config.json."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def build(out: FolderWriter, variant: str) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..models import AutoencoderKL, SD3Transformer2DModel
    from ..models.mmdit import MMDIT_TINY, MMDIT_TINY_SD35
    from ..models.vae import VAE_TINY_16CH

    for name in ("image_encoder", "feature_extractor"):
        out.entry(name, None, None)
    out.scheduler(scheduler_config(variant))
    transformer_config = copy.deepcopy(MMDIT_TINY_SD35 if variant == "sd35" else MMDIT_TINY)
    vae_config = copy.deepcopy(VAE_TINY_16CH)
    clip_tok = clip_tokenizer_files()
    vocab = json.loads(clip_tok["vocab.json"])
    out.tokenizer("tokenizer", "CLIPTokenizer", clip_tok)
    out.tokenizer("tokenizer_2", "CLIPTokenizer", clip_tok)
    clip_configs = [
        clip_text_config(vocab, hidden=width, heads=2, act="quick_gelu" if i == 0 else "gelu",
                         projection_dim=PROJECTION, cls="CLIPTextModelWithProjection")
        for i, width in enumerate((CLIP_L_HIDDEN, CLIP_G_HIDDEN))
    ]
    with torch.device("cpu"):
        for name, config in zip(("text_encoder", "text_encoder_2"), clip_configs):
            out.model(name, "transformers", "CLIPTextModelWithProjection", config,
                      CLIPTextModelWithProjection(CLIPTextConfig(**config)))
        if variant == "sd3-no-t5":
            out.entry("text_encoder_3", None, None)
            out.entry("tokenizer_3", None, None)
        else:
            t5_tok = t5_tokenizer_files()
            out.tokenizer("tokenizer_3", "T5TokenizerFast", t5_tok)
            vocab_size = Tokenizer.from_str(t5_tok["tokenizer.json"]).get_vocab_size()
            te3 = t5_config(vocab_size, d_model=transformer_config["joint_attention_dim"])
            out.model("text_encoder_3", "transformers", "T5EncoderModel", te3, T5EncoderModel(T5Config(**te3)))
        out.model("transformer", "diffusers", "SD3Transformer2DModel", transformer_config,
                  SD3Transformer2DModel(transformer_config))
        fix_norm_projections(out, "transformer")
        out.model("vae", "diffusers", "AutoencoderKL", vae_config, AutoencoderKL(vae_config))
    out.finish()
