"""Class-conditional DiT (Peebles & Xie 2022), built from a diffusers ``transformer/config.json`` dict.

Why it looks the way it does: DiT showed that a plain ViT over latent patches can replace the
UNet when conditioning enters through adaLN-Zero - each block regresses shift / scale / gate from
``timestep embedding + class embedding`` and the gates start at zero, so every block starts as the
identity. There is no text: the condition is one of ``num_embeds_ada_norm`` ImageNet classes, plus
one extra "null" class row used for classifier-free guidance. With ``out_channels = 2 *
in_channels`` the model also predicts the (learned) variance; the first ``in_channels`` output
channels are the noise prediction.

diffusers quirk kept on purpose: every block owns a copy of the timestep / class embedder
(``transformer_blocks.N.norm1.emb``) and the output layer reuses block 0's, so the state dict and
parameter count (~675M unique weights in DiT-XL/2, ~750M with the copies) match diffusers'.

Parameter names equal diffusers' ``DiTTransformer2DModel`` (and legacy ``Transformer2DModel``
with ``norm_type: ada_norm_zero``) state-dict keys; float32 outputs match it bitwise.
"""

from __future__ import annotations

import difflib
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .blocks import Attention, ModelModule, TimestepEmbedding, timestep_embedding
from .dit_blocks import AdaLayerNormZero, GELUFeedForward, PatchEmbed, batch_timesteps, modulate, unpatchify

# diffusers' defaults for DiTTransformer2DModel.__init__.
DIT_DEFAULTS: dict = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

# Keys of the legacy Transformer2DModel config (the hub's DiT folders use it) that DiT has no use
# for: accepted only at the value that means "feature off"; anything else is refused.
_LEGACY_OFF: dict = {
    "cross_attention_dim": None,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "double_self_attention": False,
    "attention_type": "default",
    "caption_channels": None,
    "use_additional_conditions": None,
    "interpolation_scale": None,
}

# diffusers' gelu / gelu-approximate feed-forwards; `approximate` for F.gelu.
ACTIVATIONS = {"gelu-approximate": "tanh", "gelu": "none"}

_DIT_BASE: dict = {
    "_class_name": "DiTTransformer2DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_zero",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "upcast_attention": False,
}

# Real transformer configs (facebook/DiT-XL-2-256 and -512, transformer/config.json).
DIT_XL_2_256: dict = {**_DIT_BASE, "sample_size": 32}
DIT_XL_2_512: dict = {**_DIT_BASE, "sample_size": 64}

# Tiny preset for random-weight test checkpoints (learned sigma, 10 classes). Width 2 x 16 = 32:
# a multiple of 32 floats keeps items batch-position invariant on CPU (see mmdit.MMDIT_TINY).
DIT_TINY: dict = {
    **_DIT_BASE,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "num_layers": 2,
    "num_embeds_ada_norm": 10,
    "sample_size": 8,
}


def resolve_dit_config(config: dict) -> dict:
    """diffusers' defaults applied to ``config``; bookkeeping (``_*``) and unknown keys dropped.

    Raises CheckpointError naming the key for a value this module does not build.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"transformer config: expected a dict (config.json), got {type(config).__name__}")
    for key, off in _LEGACY_OFF.items():
        if config.get(key, off) != off:
            raise CheckpointError(
                f"config key {key!r}: value {config[key]!r} is not supported by batchgen's DiT "
                f"(supported: {off!r}; DiT is class-conditional without cross-attention)"
            )
    cfg = dict(DIT_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if k in DIT_DEFAULTS})
    if cfg["norm_type"] != "ada_norm_zero":
        raise CheckpointError(
            f"config key 'norm_type': value {cfg['norm_type']!r} is not supported by batchgen's DiT "
            "(supported: 'ada_norm_zero')"
        )
    if cfg["activation_fn"] not in ACTIVATIONS:
        raise CheckpointError(
            f"config key 'activation_fn': value {cfg['activation_fn']!r} is not supported by batchgen's DiT "
            f"(supported: {', '.join(ACTIVATIONS)})"
        )
    if cfg["upcast_attention"]:
        raise CheckpointError("config key 'upcast_attention': only false is supported by batchgen's DiT")
    if cfg["out_channels"] is None:
        cfg["out_channels"] = cfg["in_channels"]
    for key in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                "sample_size", "patch_size", "num_embeds_ada_norm"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"config key {key!r}: expected a positive integer, got {value!r}")
    if (cfg["num_attention_heads"] * cfg["attention_head_dim"]) % 4:
        raise CheckpointError(
            "config key 'attention_head_dim': model width num_attention_heads * attention_head_dim must be "
            "divisible by 4 (2-D sin-cos table)"
        )
    return cfg


# --------------------------------------------------------------------------- blocks


class LabelEmbedding(nn.Module):
    """Class id -> vector (key ``embedding_table``); the extra last row is the CFG "null" class.

    diffusers drops labels at random only in training; this module is inference-only and never does.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nn.Module):
    """MLP(sinusoidal timestep, 256, freq shift 1) + class embedding (keys ``timestep_embedder``,
    ``class_embedder``)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.class_embedder = LabelEmbedding(num_classes, dim)

    def forward(self, timesteps: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = timestep_embedding(timesteps, 256, flip_sin_to_cos=True, freq_shift=1)
        return self.timestep_embedder(t.to(dtype=dtype)) + self.class_embedder(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: gated self-attention, then a gated GELU MLP on the modulated LayerNorm.

    diffusers' ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` and no cross-attention.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, num_classes: int, cfg: dict):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, emb=CombinedTimestepLabelEmbeddings(num_classes, dim))
        self.attn1 = Attention(dim, heads, head_dim, None, bias=bool(cfg["attention_bias"]))
        self.norm3 = nn.LayerNorm(dim, eps=cfg["norm_eps"], elementwise_affine=bool(cfg["norm_elementwise_affine"]))
        self.ff = GELUFeedForward(dim, approximate=ACTIVATIONS[cfg["activation_fn"]])

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.norm1.emb(timesteps, labels, x.dtype)
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, cond)
        x = gate_msa.unsqueeze(1) * self.attn1(nx) + x
        ff = self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return gate_mlp.unsqueeze(1) * ff + x


# --------------------------------------------------------------------------- model


class DiTTransformer2DModel(ModelModule):
    """Class-conditional DiT. ``forward(hidden_states, timestep, class_labels)``."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_dit_config(config)
        self.config = cfg
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        dim = heads * head_dim
        self.inner_dim, self.out_channels, self.patch_size = dim, cfg["out_channels"], cfg["patch_size"]
        self.num_classes = cfg["num_embeds_ada_norm"]
        self.pos_embed = PatchEmbed(cfg["sample_size"], cfg["patch_size"], cfg["in_channels"], dim)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(dim, heads, head_dim, self.num_classes, cfg) for _ in range(cfg["num_layers"])
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, cfg["patch_size"] ** 2 * self.out_channels)

    @property
    def learned_sigma(self) -> bool:
        """True when the output carries a variance prediction after the noise prediction."""
        return self.out_channels == 2 * self.config["in_channels"]

    def forward(self, hidden_states: torch.Tensor, timestep, class_labels: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` latent, timestep (``(B,)`` tensor or one value for all), ``(B,)`` int64
        class ids in ``[0, num_classes]`` (``num_classes`` = the null class) -> ``(B, out_channels, H, W)``."""
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states: expected (B, C, H, W), got shape {tuple(hidden_states.shape)}")
        b = hidden_states.shape[0]
        if not torch.is_tensor(class_labels) or class_labels.shape != (b,) or class_labels.is_floating_point():
            raise ValueError(f"class_labels: expected a ({b},) integer tensor, got {class_labels!r:.80}")
        if bool(((class_labels < 0) | (class_labels > self.num_classes)).any()):
            raise ValueError(
                f"class_labels: ids must be in [0, {self.num_classes}] ({self.num_classes} is the null class "
                f"for guidance), got {class_labels.tolist()}"
            )
        gh, gw = self.pos_embed.check_size(*hidden_states.shape[-2:])
        timesteps = batch_timesteps(timestep, b, hidden_states.device)
        labels = class_labels.to(hidden_states.device)

        x = self.pos_embed(hidden_states)
        for block in self.transformer_blocks:
            x = block(x, timesteps, labels)
        cond = self.transformer_blocks[0].norm1.emb(timesteps, labels, x.dtype)
        shift, scale = self.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        x = self.proj_out_2(modulate(self.norm_out(x), shift, scale))
        return unpatchify(x, gh, gw, self.patch_size, self.out_channels)


# --------------------------------------------------------------------------- prompts -> class ids


def _label_table(id2label: dict) -> dict[str, int]:
    """Name -> class id, every comma-separated synonym of every label (later ids win, as in diffusers)."""
    table: dict[str, int] = {}
    for key, value in id2label.items():
        for name in str(value).split(","):
            table[name.strip()] = int(key)
    return table


def class_id(prompt: str, id2label: dict) -> int:
    """The class id a DiT prompt stands for.

    ``prompt`` is either an integer id written as text (``"207"``; must be a key of ``id2label``) or
    one of the comma-separated names of an ``id2label`` value (``"golden retriever"``), matched
    exactly after stripping surrounding whitespace, like ``DiTPipeline.get_label_ids``. Raises
    ValueError naming the prompt (and up to 5 close names) otherwise.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a class name or id as text, got {type(prompt).__name__}")
    text = prompt.strip()
    ids = sorted(int(k) for k in id2label)
    if re.fullmatch(r"[+-]?\d+", text):
        value = int(text)
        if value not in ids:
            span = f"{ids[0]}..{ids[-1]}" if ids else "none"
            raise ValueError(f"prompt {prompt!r}: class id {value} is not one of the model's classes ({span})")
        return value
    table = _label_table(id2label)
    if text in table:
        return table[text]
    lowered: dict[str, str] = {}
    for name in table:
        lowered.setdefault(name.lower(), name)
    close = [lowered[m] for m in difflib.get_close_matches(text.lower(), list(lowered), n=5)]
    hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
    raise ValueError(
        f"prompt {prompt!r}: not a class name of this model (write an ImageNet class name or a class id"
        f"{f' {ids[0]}..{ids[-1]}' if ids else ''}){hint}"
    )
