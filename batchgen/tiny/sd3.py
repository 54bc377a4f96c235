"""Tiny SD3 (MMDiT, shift 3.0), SD3.5 (RMS QK-norm + SD3.5-Medium's dual attention) and SD3 without
T5 checkpoints, loadable by diffusers' ``StableDiffusion3Pipeline``.

The text side keeps SD3's shape relations at a small scale: two CLIPs with projection whose hidden
widths (8 + 16) are narrower than T5's (32 = the transformer's ``joint_attention_dim``), so the
zero padding of the CLIP states is exercised, and whose projections (32 + 32) add up to the
transformer's ``pooled_projection_dim``.
"""

from __future__ import annotations

import copy
import json

from .common import FolderWriter, clip_text_config, clip_tokenizer_files, t5_config, t5_tokenizer_files

CLIP_L_HIDDEN, CLIP_G_HIDDEN, PROJECTION = 8, 16, 32


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
        out.model("vae", "diffusers", "AutoencoderKL", vae_config, AutoencoderKL(vae_config))
    out.finish()
