"""Tiny random-weight IP-Adapters in the h94/IP-Adapter layout, for the tiny SD 1.x and SDXL models.

A folder holds the weight file (``ip-adapter_sd15.safetensors`` / ``ip-adapter_sdxl.safetensors``,
or the ``-plus`` ones: ``image_proj.*`` + ``ip_adapter.<n>.to_k_ip/to_v_ip.weight``) and
``image_encoder/`` (a tiny CLIPVisionModelWithProjection: config.json + model.safetensors, 32 px
images), as h94 ships them, so diffusers' ``load_ip_adapter`` reads the same folder. The adapter's
layers are sized from the tiny UNet preset of its base; every weight is deterministic from the seed.
"""

from __future__ import annotations

from pathlib import Path

BASES = ("sd1", "sdxl")
FILE_NAMES = {("sd1", "plain"): "ip-adapter_sd15.safetensors", ("sd1", "plus"): "ip-adapter-plus_sd15.safetensors",
              ("sdxl", "plain"): "ip-adapter_sdxl.safetensors",
              ("sdxl", "plus"): "ip-adapter-plus_sdxl_vit-h.safetensors"}
ENCODER_CONFIG = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_channels": 3,
    "image_size": 32,
    "patch_size": 8,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}
TOKENS = 4  # plain: image tokens (h94's are 4); Plus: resampler queries (h94's are 16)
PLUS_HIDDEN = 64  # one 64-wide head
PLUS_DEPTH = 4  # diffusers builds the resampler with 4 blocks


def _unet(base: str):
    import torch

    from ..models import UNET_SD1_TINY
    from ..models.unet import UNET_SDXL_TINY, UNet2DConditionModel

    if base not in BASES:
        raise ValueError(f"base: expected one of {', '.join(BASES)}, got {base!r}")
    with torch.device("meta"):
        return UNet2DConditionModel(UNET_SD1_TINY if base == "sd1" else UNET_SDXL_TINY)


def adapter_state(base: str, kind: str, seed: int) -> dict:
    """The weight file's tensors (names as in the h94 files) for the tiny ``base`` UNet."""
    import torch

    from ..models.ip_adapter import ImageProjection, IPAdapterModel, Resampler
    from .common import random_state_dict

    layers = _unet(base).cross_attentions()
    cross = int(layers[0][1].to_k.weight.shape[1])
    inner = [int(attn.to_k.weight.shape[0]) for _name, attn in layers]
    embed = ENCODER_CONFIG["projection_dim"] if kind == "plain" else ENCODER_CONFIG["hidden_size"]
    with torch.device("cpu"):
        if kind == "plain":
            proj = ImageProjection(embed, TOKENS, cross)
        else:
            proj = Resampler(embed, PLUS_HIDDEN, PLUS_HIDDEN, cross, TOKENS, PLUS_DEPTH)
        module = IPAdapterModel(kind, proj, cross, inner)
    state = random_state_dict(module, seed)
    for key, value in state.items():  # the feed-forward LayerNorms' scales (keys "layers.<i>.1.0.weight")
        if key.endswith(".1.0.weight"):
            state[key] = 1.0 + 5.0 * value
    return {k: v.contiguous() for k, v in state.items()}


def write_image_encoder(root: Path, seed: int) -> Path:
    """A tiny CLIPVisionModelWithProjection folder (config.json + model.safetensors)."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from .common import random_state_dict

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with torch.device("cpu"):
        module = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER_CONFIG))
    state = {k: v.contiguous() for k, v in random_state_dict(module, seed).items()}
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(ENCODER_CONFIG, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return root


def write_ip_adapter(root: Path, base: str, kind: str = "plain", seed: int = 0, encoder: bool = True) -> Path:
    """Write the tiny ``base`` (sd1 / sdxl) IP-Adapter file of ``kind`` (plain / plus) into folder
    ``root`` (+ ``image_encoder/`` unless ``encoder`` is False); returns the weight file's path."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / FILE_NAMES[base, kind]
    save_file(adapter_state(base, kind, seed), str(path), metadata={"format": "pt"})
    if encoder and not (root / "image_encoder").is_dir():
        write_image_encoder(root / "image_encoder", seed)
    return path


def build(out, variant: str) -> None:
    """:func:`batchgen.tiny.make_tiny_model`'s builder for ``sd1-ip-adapter`` / ``sdxl-ip-adapter``."""
    write_ip_adapter(out.root, variant.removesuffix("-ip-adapter"), "plain", out.seed)
