"""LoRA files (kohya / sd-scripts, diffusers / PEFT), turned into weight deltas and fused into our weights.

A LoRA stores, per targeted module, a low-rank pair ``down`` (rank x in[, kh, kw]) and ``up``
(out x rank[, 1, 1]) and optionally an ``alpha``; the module's weight changes by
``scale * alpha / rank * up @ down`` (a convolution of the two for 3x3 conv LoRA). We fuse that
delta into the weight instead of running adapter layers: a batch job renders thousands of images
with one LoRA set, so fusing costs nothing per step, keeps the model's modules (and its bitwise
batch invariance) unchanged, and the arithmetic is PEFT's own (``W + (B @ A) * scaling``), so a
fused weight equals diffusers' ``fuse_lora`` bit for bit where diffusers keeps the file's factors.

Why the names are looked up through the model, not rewritten with string replacements: kohya
names are module paths with every ``.`` turned into ``_`` (``lora_unet_down_blocks_0_attentions_0_
proj_in``), which cannot be reversed (module names contain underscores). So each model component
gets an index from its own parameter names to the LoRA names that would target them:

- diffusers / transformers names (what sd-scripts writes for SD 1.x / 2.x UNets, every text
  encoder, PEFT files, OneTrainer-style ``lora_transformer_*``), with and without CLIP's
  ``text_model.`` level (transformers 5 flattened it; older files have it);
- the original training layouts for files written against them (sd-scripts' SGM names for SDXL,
  ``input_blocks_4_1_...``; BFL names for FLUX, ``double_blocks_0_img_attn_qkv``), derived from
  the single-file rule tables of :mod:`batchgen.checkpoints.single_file` (one tested table, used in both
  places). Where the layouts differ by more than a name (BFL's fused q/k/v and q/k/v/mlp
  projections, the swapped adaLN halves of the final layer), the rule's row operation is applied
  to the ``up`` matrix, so the fused LoRA's delta becomes the matching row slices for ``to_q`` /
  ``to_k`` / ``to_v`` (/ ``proj_mlp``): the same per-split ``up_i @ down`` diffusers' converter
  computes.

Removing or swapping LoRAs is exact: :class:`LoraFuser` keeps the original tensor of every
parameter it touched (on the CPU) and recomputes ``original + deltas`` from it, so switching sets
restores or re-fuses only the touched parameters and "no LoRA" gives back the base weights bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

__all__ = [
    "LORA_COMPONENTS",
    "LoraFile",
    "LoraFuser",
    "LoraPair",
    "LoraSpec",
    "inspect_lora",
    "lora_components",
    "lora_deltas",
    "parse_lora_specs",
    "read_lora",
]

# Model components a LoRA may target, by the names our families (and diffusers) give them.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

# kohya / sd-scripts key prefixes -> which part of the model ("denoiser" is the UNet or transformer).
# sd-scripts writes lora_te1/lora_te2 for SDXL's / SD3's CLIP encoders and lora_te3 for the T5 of
# SD3 and FLUX (early FLUX LoRAs used lora_te2 for the T5, which is FLUX's text_encoder_2 as well).
_KOHYA_PREFIXES = (("lora_unet_", "denoiser"), ("lora_transformer_", "transformer"), ("lora_te1_", "te1"),
                   ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te1"))
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# diffusers / PEFT: "<component>.<module path>.lora_A.weight". ``diffusion_model.`` (ComfyUI,
# musubi-tuner) is the denoiser under its original-layout names.
_PEFT_PREFIXES = (("unet.", "unet"), ("transformer.", "transformer"), ("text_encoder.", "text_encoder"),
                  ("text_encoder_2.", "text_encoder_2"), ("text_encoder_3.", "text_encoder_3"),
                  ("diffusion_model.", "denoiser"))
_PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
# Adapter types that are not plain LoRA (key patterns): recognised so the error names them.
_OTHER_ADAPTERS = ((r"\.hada_w[12]_[ab]$", "LyCORIS LoHa"), (r"\.lokr_w[12](_[ab])?$", "LyCORIS LoKr"),
                   (r"\.dora_scale$|lora_magnitude_vector", "DoRA"), (r"\.oft_(blocks|diag)", "OFT"),
                   (r"\.lora_embedding_[AB]$", "PEFT embedding LoRA"), (r"\.lora_B\.bias$", "PEFT LoRA with bias"),
                   (r"\.diff(_b)?$", "full weight difference (LyCORIS 'diff')"),
                   (r"\.lora_mid\.weight$", "LoCon with CP / Tucker decomposition (lora_mid)"),
                   (r"(^|\.|_)lora\.(down|up)\.weight$", "old diffusers attention-processor LoRA (to_q_lora / "
                    "lora.down; load it in diffusers and save it again to get lora_A / lora_B keys)"),
                   (r"\.lora_linear_layer\.", "old diffusers text-encoder LoRA (lora_linear_layer; load it in "
                    "diffusers and save it again to get lora_A / lora_B keys)"))
_LOOKED_FOR = ("kohya / sd-scripts keys 'lora_unet_*', 'lora_te_*', 'lora_te1_*', 'lora_te2_*', 'lora_te3_*' "
               "ending in '.lora_down.weight' / '.lora_up.weight' / '.alpha'; diffusers / PEFT keys "
               "'unet.*', 'transformer.*', 'text_encoder.*', 'text_encoder_2.*', 'diffusion_model.*' ending in "
               "'.lora_A.weight' / '.lora_B.weight' / '.alpha'")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
# Our denoiser classes whose original training layout single_file.py has a rule table for.
_ORIGINAL_LAYOUT_KINDS = {"UNet2DConditionModel": "unet", "FluxTransformer2DModel": "flux",
                          "SD3Transformer2DModel": "sd3"}
_CACHE_SIZE = 8  # parsed LoRA files a fuser keeps in memory
_FINITE_CHECK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # isfinite works on these


# --------------------------------------------------------------------------------------------
# Reading a file
# --------------------------------------------------------------------------------------------


@dataclass
class LoraPair:
    """One low-rank update as the file stores it.

    ``side``: ``denoiser`` (the UNet or transformer), ``te1`` / ``te2`` / ``te3`` (kohya's text
    encoder slots) or a component name (PEFT prefixes). ``module``: the targeted module's path in
    the file's spelling (``underscored`` for kohya names). ``factor``: alpha / rank (alpha /
    sqrt(rank) for rsLoRA), 1.0 without an alpha.
    """

    key: str
    side: str
    module: str
    underscored: bool
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


@dataclass
class LoraFile:
    """A parsed LoRA file: its pairs, content hash and detected format."""

    path: Path
    uri: str
    sha256: str
    format: str  # "kohya" | "peft" | "kohya+peft"
    pairs: list[LoraPair]
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.uri


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_path(uri, storage_config=None) -> Path:
    """A local path for a LoRA URI: a path, ``file://`` or ``s3://`` (downloaded once into the cache)."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"LoRA uri: expected a path, file:// or s3:// URI, got {uri!r}")
    if ":" not in uri:  # a plain local path
        path = Path(uri).expanduser()
        if not path.exists():
            raise CheckpointError(f"LoRA {uri}: no such file")
        return path
    from ..storage import Location

    return Path(Location.parse(uri, storage_config).local_cache_copy())


def read_lora(uri, storage_config=None) -> LoraFile:
    """Read and parse a LoRA ``.safetensors`` file (local path, ``file://`` or ``s3://``).

    Raises CheckpointError naming the file for an unreadable file, a pickle, an unknown format
    (listing the key patterns looked for) or an incomplete down/up pair.
    """
    path = _local_path(uri, storage_config)
    source = str(uri)
    if path.is_dir():
        raise CheckpointError(f"LoRA {source}: is a folder; give the .safetensors file")
    if path.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(f"LoRA {source}: pickle files ({path.suffix}) are refused (they can run code when "
                              "loaded); convert the LoRA to .safetensors")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            state = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"LoRA {source}: cannot read it as a safetensors file ({exc})") from None
    fmt, pairs = parse_lora_state(state, metadata, source)
    return LoraFile(path=path, uri=source, sha256=_sha256(path), format=fmt, pairs=pairs, metadata=metadata)


def _classify(key: str) -> tuple[str, str, str, str, str] | None:
    """(format, side, module, stem, part) of one key, or None when it fits no supported pattern;
    ``stem`` is the key without its part (names the module in messages)."""
    for prefix, side in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            stem, _, part = key.partition(".")
            if part in _KOHYA_PARTS:
                return "kohya", side, stem[len(prefix):], stem, _KOHYA_PARTS[part]
            return None
    for prefix, side in _PEFT_PREFIXES:
        if key.startswith(prefix):
            for suffix, part in _PEFT_PARTS.items():
                if key.endswith("." + suffix):
                    stem = key[: -len(suffix) - 1]
                    return "peft", side, stem[len(prefix):], stem, part
            return None
    return None


def _peft_alphas(metadata: Mapping[str, str], source: str) -> dict[str, dict]:
    """Per component, the LoraConfig fields diffusers saves in the ``lora_adapter_metadata`` header
    entry (``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora`` ...). The header is
    untrusted: the fields read here are type-checked (an error names the file and the key)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"LoRA {source}: header entry 'lora_adapter_metadata' is not JSON ({exc})") from None
    if not isinstance(flat, dict):
        raise CheckpointError(f"LoRA {source}: header entry 'lora_adapter_metadata' must be a JSON object "
                              f"('<component>.<field>': value), got {type(flat).__name__}")
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        where = f"LoRA {source}: 'lora_adapter_metadata' key '{key}'"
        if name == "lora_alpha":
            value = _finite_number(value, where)
        elif name == "alpha_pattern":
            if not isinstance(value, dict):
                raise CheckpointError(f"{where}: expected an object {{module path: alpha}}, "
                                      f"got {type(value).__name__}")
            value = {pattern: _finite_number(alpha, f"{where}, pattern {pattern!r}")
                     for pattern, alpha in value.items()}
            for pattern in value:
                _check_alpha_pattern(pattern, where)
        elif name in ("use_rslora", "use_dora") and not isinstance(value, bool):
            raise CheckpointError(f"{where}: expected true or false, got {value!r}")
        out.setdefault(component, {})[name] = value
    for component, config in out.items():
        if config.get("use_dora"):
            raise CheckpointError(f"LoRA {source}: the {component} adapter is DoRA (use_dora in its metadata); "
                                  "only plain LoRA is supported")
    return out


def _finite_number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


# Characters that would make an alpha_pattern key a regular expression rather than a module path.
_PATTERN_SPECIALS = frozenset("\\^$*+?{}[]()|")


def _check_alpha_pattern(pattern: str, where: str) -> None:
    """``alpha_pattern`` keys are matched as module-path suffixes, never compiled as regular
    expressions: they come from the file, and a pattern like ``(.*)*x`` would make the matcher run
    for hours (catastrophic backtracking). diffusers writes module paths there; a key with regex
    syntax is refused, naming it."""
    bad = sorted(_PATTERN_SPECIALS & set(pattern))
    if not pattern or bad:
        what = f"it contains {' '.join(bad)}" if bad else "it is empty"
        raise CheckpointError(f"{where}: pattern {pattern!r} is not a module path ({what}); batchgen matches "
                              "alpha_pattern keys as literal module-path suffixes, not regular expressions: "
                              "write the module paths out")


def _config_alpha(config: Mapping, module: str) -> float | None:
    """PEFT's alpha for ``module``: the first ``alpha_pattern`` key that is the module path or a
    dotted suffix of it (PEFT's ``get_pattern_key`` on a literal key), else ``lora_alpha``."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return value
    return config.get("lora_alpha")


def parse_lora_state(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                     source: str = "LoRA") -> tuple[str, list[LoraPair]]:
    """(format, pairs) of a LoRA state dict; ``source`` names the file in errors."""
    if not state:
        raise CheckpointError(f"LoRA {source}: the file holds no tensors")
    groups: dict[tuple[str, str, str, str], dict[str, torch.Tensor]] = {}
    formats: set[str] = set()
    unknown: list[str] = []
    for key, value in state.items():
        found = _classify(key)
        if found is None:
            unknown.append(key)
            continue
        fmt, side, module, stem, part = found
        formats.add(fmt)
        groups.setdefault((fmt, side, module, stem), {})[part] = value
    if unknown:
        for pattern, what in _OTHER_ADAPTERS:
            hits = [k for k in unknown if re.search(pattern, k)]
            if hits:
                raise CheckpointError(f"LoRA {source}: key '{hits[0]}' is a {what}; only plain LoRA "
                                      "(down/up or lora_A/lora_B pairs) is supported")
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        if not formats:
            raise CheckpointError(f"LoRA {source}: cannot tell the LoRA format: looked for {_LOOKED_FOR}; "
                                  f"first keys found: {sorted(state)[:8]}")
        raise CheckpointError(f"LoRA {source}: key(s) {sorted(unknown)[:8]}{more} fit no supported pattern "
                              f"(looked for {_LOOKED_FOR})")
    peft_configs = _peft_alphas(metadata or {}, source)
    pairs: list[LoraPair] = []
    for (fmt, side, module, stem), parts in groups.items():
        kohya = fmt == "kohya"
        if "down" not in parts or "up" not in parts:
            missing = "down" if "down" not in parts else "up"
            name = {"down": "lora_down.weight" if kohya else "lora_A.weight",
                    "up": "lora_up.weight" if kohya else "lora_B.weight"}[missing]
            raise CheckpointError(f"LoRA {source}: '{stem}' has no '{name}' (every module needs both matrices)")
        down, up = parts["down"], parts["up"]
        _check_pair(stem, down, up, source)
        alpha = None
        rslora = False
        if "alpha" in parts:
            if parts["alpha"].numel() != 1:
                raise CheckpointError(f"LoRA {source}: '{stem}.alpha' has shape {tuple(parts['alpha'].shape)}; "
                                      "expected a scalar")
            alpha = float(parts["alpha"].float().item())
            if not math.isfinite(alpha):
                raise CheckpointError(f"LoRA {source}: '{stem}.alpha' is {alpha}; expected a finite number")
        elif not kohya and side in peft_configs:
            alpha = _config_alpha(peft_configs[side], module)
            rslora = bool(peft_configs[side].get("use_rslora", False))
        pairs.append(LoraPair(stem, side, module, kohya, down, up, alpha, rslora))
    return "+".join(sorted(formats)), pairs


def _check_pair(stem: str, down: torch.Tensor, up: torch.Tensor, source: str) -> None:
    ok = (down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0]
          and (up.ndim == 2 or tuple(up.shape[2:]) == (1, 1)))
    if not ok:
        raise CheckpointError(f"LoRA {source}: '{stem}' has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                              "expected down (rank, in[, kh, kw]) and up (out, rank[, 1, 1])")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise CheckpointError(f"LoRA {source}: '{stem}' is not floating point ({down.dtype}, {up.dtype})")
    if down.shape[0] == 0 or 0 in down.shape or 0 in up.shape:
        raise CheckpointError(f"LoRA {source}: '{stem}' has down {tuple(down.shape)} and up {tuple(up.shape)}: "
                              "a rank-0 (empty) update; every module needs rank >= 1")
    for name, tensor in (("down", down), ("up", up)):  # NaN / inf would be fused into the weights
        values = tensor if tensor.dtype in _FINITE_CHECK_DTYPES else tensor.float()
        if not bool(torch.isfinite(values).all()):
            raise CheckpointError(f"LoRA {source}: '{stem}' {name} matrix holds NaN or infinite values")


# --------------------------------------------------------------------------------------------
# Where each pair lands in the model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """A parameter a LoRA module updates: ``rule`` (a single_file rule, None for same-name
    targets) turns the file's ``up`` into this parameter's rows (its output ``part``)."""

    param: str
    rule: Any = None
    part: int = 0


class _Index:
    """LoRA module names -> parameters of one component (diffusers names and original layout)."""

    def __init__(self, component: str, module: torch.nn.Module):
        self.component = component
        self.params = {name: p for name, p in module.named_parameters() if name.endswith(".weight") and p.ndim >= 2}
        self.dotted: dict[str, list[_Target]] = {}
        for name in self.params:
            stem = name[: -len(".weight")]
            for alias in self._aliases(stem):
                self.dotted.setdefault(alias, [_Target(name)])
        self.original: dict[str, list[_Target]] = self._original_layout(module)
        self.underscored = self._underscore(self.dotted)
        self.original_underscored = self._underscore(self.original)

    def _aliases(self, stem: str) -> Iterable[str]:
        yield stem
        if self.component.startswith("text_encoder"):  # CLIP's text_model. level: files have it or not
            yield stem.removeprefix("text_model.") if stem.startswith("text_model.") else "text_model." + stem

    @staticmethod
    def _underscore(table: dict[str, list[_Target]]) -> dict[str, list[_Target] | None]:
        out: dict[str, list[_Target] | None] = {}
        for name, targets in table.items():
            key = name.replace(".", "_")
            out[key] = None if key in out and out[key] != targets else targets  # None: ambiguous
        return out

    def _original_layout(self, module: torch.nn.Module) -> dict[str, list[_Target]]:
        from . import single_file as sf

        kind = _ORIGINAL_LAYOUT_KINDS.get(type(module).__name__)
        if kind is None or self.component not in ("unet", "transformer"):
            return {}
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        rules = sf._rules_for(kind, shapes, "diffusers")
        parts_of = {name: (rule, i) for rule in rules if rule.op != "prefix" for i, name in enumerate(rule.dst)}
        prefixes = {r.dst[0]: r for r in rules if r.op == "prefix"}
        out: dict[str, list[_Target]] = {}
        for name in self.params:
            if name in parts_of:
                rule, i = parts_of[name]
                if rule.op not in ("copy", "split", "swap") or not rule.src.endswith(".weight"):
                    continue  # norm scales, transposed projections: no LoRA targets these
                out.setdefault(rule.src[: -len(".weight")], []).append(
                    _Target(name, None if rule.op == "copy" else rule, i))
                continue
            found = sf._longest_prefix(name, prefixes)
            if found is None:
                continue
            original = sf._swap_prefix(name, found, prefixes[found].src)
            if original.endswith(".weight"):
                out.setdefault(original[: -len(".weight")], []).append(_Target(name))
        return out

    def lookup(self, pair: LoraPair) -> list[_Target] | None:
        tables = (self.underscored, self.original_underscored) if pair.underscored else (self.dotted, self.original)
        for table in tables:
            targets = table.get(pair.module)
            if targets:
                return targets
        return None


def lora_components(parts: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The modules of a loaded model a LoRA may target (``family.parts`` -> {component: module})."""
    return {name: part for name, part in parts.items() if name in LORA_COMPONENTS and isinstance(part, torch.nn.Module)}


def _component_for(side: str, modules: Mapping[str, torch.nn.Module]) -> str:
    if side == "denoiser":
        return "unet" if "unet" in modules else "transformer"
    if side == "te1":
        return "text_encoder"
    if side == "te2":
        return "text_encoder_2"
    if side == "te3":  # the T5: SD3's third encoder, FLUX's second
        return "text_encoder_3" if "text_encoder_3" in modules else "text_encoder_2"
    return side


@dataclass(frozen=True)
class _Update:
    """One pair's contribution to one parameter, at one scale."""

    lora: int  # index in the LoRA set
    pair: LoraPair
    target: _Target
    factor: float  # alpha / rank * scale

    def signature(self, sha: str) -> tuple:
        return (sha, self.pair.key, self.target.part, self.factor)


def _resolve(lora: LoraFile, modules: Mapping[str, torch.nn.Module], indexes: dict[str, _Index],
             scale: float, index: int) -> dict[tuple[str, str], list[_Update]]:
    """Every (component, parameter) ``lora`` updates. Errors name unmatched keys and shape clashes."""
    updates: dict[tuple[str, str], list[_Update]] = {}
    unmatched: list[str] = []
    for pair in lora.pairs:
        component = _component_for(pair.side, modules)
        if component not in modules:
            unmatched.append(pair.key)
            continue
        if component not in indexes:
            indexes[component] = _Index(component, modules[component])
        targets = indexes[component].lookup(pair)
        if targets is None:
            unmatched.append(pair.key)
            continue
        for target in targets:
            param = indexes[component].params[target.param]
            _check_shape(lora, pair, target, component, param)
            updates.setdefault((component, target.param), []).append(
                _Update(index, pair, target, pair.factor * scale))
    if unmatched:
        have = ", ".join(f"{name} ({type(m).__name__})" for name, m in modules.items()) or "none"
        more = f" (and {len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
        what = "none" if len(unmatched) == len(lora.pairs) else f"{len(unmatched)} of {len(lora.pairs)}"
        raise CheckpointError(
            f"LoRA {lora.uri}: {what} of its modules match this model (components: {have}); unmatched: "
            f"{sorted(unmatched)[:10]}{more}. The LoRA was probably trained for another model family or size")
    return updates


def _up_rows(pair: LoraPair, target: _Target) -> torch.Tensor:
    """The rows of ``up`` that produce ``target`` (all of them unless the layouts differ)."""
    if target.rule is None:
        return pair.up
    from . import single_file as sf

    return sf._forward_op(target.rule, pair.up)[target.part]


def _delta_shape(pair: LoraPair, target: _Target) -> tuple[int, ...]:
    rows = _up_rows(pair, target).shape[0]
    return (rows, *pair.down.shape[1:])


def _check_shape(lora: LoraFile, pair: LoraPair, target: _Target, component: str, param: torch.Tensor) -> None:
    wrong = _shape_mismatch(pair, [target], {target.param: param}, component)
    if wrong is None:
        return
    if wrong["got"] is None:
        raise CheckpointError(f"LoRA {lora.uri}: '{pair.key}': {wrong['error']}")
    raise CheckpointError(
        f"LoRA {lora.uri}: '{pair.key}' makes a {tuple(wrong['got'])} update for {component} parameter "
        f"'{target.param}' of shape {tuple(wrong['expected'])}; the LoRA was trained for a model of another size")


def _shape_mismatch(pair: LoraPair, targets: Sequence[_Target], params: Mapping[str, torch.Tensor],
                    component: str) -> dict | None:
    """{key, parameter, expected, got} for the first target ``pair`` does not fit (``got`` None
    and an ``error`` when no update shape can be made), else None."""
    for target in targets:
        expected = tuple(params[target.param].shape)
        try:
            got = _delta_shape(pair, target)
        except CheckpointError as exc:
            return {"key": pair.key, "parameter": f"{component}.{target.param}", "expected": list(expected),
                    "got": None, "error": str(exc)}
        if got != expected and not _same_up_to_unit_kernel(got, expected):
            return {"key": pair.key, "parameter": f"{component}.{target.param}", "expected": list(expected),
                    "got": list(got)}
    return None


def _same_up_to_unit_kernel(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """A linear weight (out, in) and a 1x1 convolution (out, in, 1, 1) are the same update."""
    return a[:2] == b[:2] and all(d == 1 for d in a[2:]) and all(d == 1 for d in b[2:])


def _delta(pair: LoraPair, target: _Target, factor: float, device: torch.device) -> torch.Tensor:
    """``up @ down * factor`` in float32, as PEFT's ``get_delta_weight`` computes it (1x1 convs as a
    matmul, larger kernels as a convolution of down by up)."""
    up = _up_rows(pair, target).to(device=device, dtype=torch.float32)
    down = pair.down.to(device=device, dtype=torch.float32)
    if down.ndim == 2:
        return (up @ down) * factor
    if tuple(down.shape[2:]) == (1, 1):
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * factor
    return torch.nn.functional.conv2d(down.transpose(0, 1), up).transpose(0, 1) * factor


def _fused(original: torch.Tensor, updates: Sequence[_Update], device: torch.device,
           uris: Sequence[str]) -> torch.Tensor:
    """``original + delta_1 + delta_2 ...`` (LoRA order, float32), reshaped to the parameter.
    ``uris[u.lora]`` names an update's file when finite factors still overflow float32."""
    acc = original.to(device=device, dtype=torch.float32, copy=True)
    for update in updates:
        delta = _delta(update.pair, update.target, update.factor, device)
        acc += delta.reshape(acc.shape)
    if not bool(torch.isfinite(acc).all()):
        names = ", ".join(dict.fromkeys(f"{uris[u.lora]} '{u.pair.key}'" for u in updates))
        raise CheckpointError(f"LoRA {names}: fusing it into '{updates[0].target.param}' gives NaN or infinite "
                              "weights (alpha / scale too large for float32?)")
    return acc


def lora_deltas(lora: LoraFile | str | Path, modules: Mapping[str, torch.nn.Module], scale: float = 1.0,
                storage_config=None) -> dict[str, dict[str, torch.Tensor]]:
    """Per component, parameter name -> the float32 weight delta ``scale * alpha / rank * up @ down``
    of ``lora`` for ``modules`` ({component: module}, our diffusers / transformers names)."""
    if not isinstance(lora, LoraFile):
        lora = read_lora(lora, storage_config)
    indexes: dict[str, _Index] = {}
    updates = _resolve(lora, modules, indexes, float(scale), 0)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (component, name), ups in updates.items():
        param = indexes[component].params[name]
        zero = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        out.setdefault(component, {})[name] = _fused(zero, ups, param.device, [lora.uri])
    return out


def check_lora(lora: LoraFile | str | Path, modules: Mapping[str, torch.nn.Module], storage_config=None) -> int:
    """Match ``lora`` against ``modules`` by names and shapes only (modules may live on the meta
    device: a pre-flight); raises CheckpointError naming unmatched keys. Returns the number of
    parameters it would change."""
    if not isinstance(lora, LoraFile):
        lora = read_lora(lora, storage_config)
    return len(_resolve(lora, modules, {}, 1.0, 0))


# --------------------------------------------------------------------------------------------
# LoRA sets on a loaded model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """One entry of a LoRA set: where the file is and how strongly it applies."""

    uri: str
    scale: float = 1.0


def parse_lora_specs(loras) -> list[LoraSpec]:
    """``[{"uri": ..., "scale": ...}, ...]`` (scale defaults to 1.0; a bare URI string is scale 1.0)
    -> LoraSpecs; ValueError naming the bad entry."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike, Mapping, LoraSpec)):
        raise ValueError("loras: expected a list of {'uri': ..., 'scale': ...} entries, got a single value "
                         "(wrap it in a list)")
    out = []
    for i, entry in enumerate(loras):
        if isinstance(entry, LoraSpec):
            uri, scale = entry.uri, entry.scale
        elif isinstance(entry, (str, os.PathLike)):
            uri, scale = os.fspath(entry), 1.0
        elif isinstance(entry, Mapping):
            extra = sorted(set(entry) - {"uri", "scale"})
            if extra:
                raise ValueError(f"loras[{i}]: unknown key(s) {extra} (expected 'uri' and 'scale')")
            if "uri" not in entry:
                raise ValueError(f"loras[{i}]: missing 'uri'")
            uri, scale = entry["uri"], entry.get("scale", 1.0)
            uri = os.fspath(uri) if isinstance(uri, os.PathLike) else uri
        else:
            raise ValueError(f"loras[{i}]: expected {{'uri': ..., 'scale': ...}}, got {type(entry).__name__}")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"loras[{i}].uri: expected a path, file:// or s3:// URI, got {uri!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"loras[{i}].scale: expected a finite number, got {scale!r}")
        out.append(LoraSpec(uri, float(scale)))
    return out


class LoraFuser:
    """Fuses a LoRA set into a model's weights in place and swaps sets exactly.

    ``modules``: {component: module} (see :func:`lora_components`). :meth:`set` validates the
    whole new set against the model before touching a weight; then parameters the old set touched
    and the new one does not are restored from their kept originals, and every parameter the new
    set touches is recomputed as ``original + deltas`` unless its updates are unchanged. Originals
    are kept on the CPU (exact copies), so memory on the accelerator does not grow.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], storage_config=None):
        self.modules = dict(modules)
        self.storage_config = storage_config
        self._indexes: dict[str, _Index] = {}
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self._applied: dict[tuple[str, str], tuple] = {}  # (component, param) -> update signatures
        self._key: tuple = ()
        self._info: list[dict] = []
        self._cache: dict[tuple, LoraFile] = {}

    @property
    def info(self) -> list[dict]:
        """The applied set: [{uri, sha256, scale, format}] in order."""
        return [dict(entry) for entry in self._info]

    @property
    def touched(self) -> set[tuple[str, str]]:
        """(component, parameter) pairs that currently differ from the base model."""
        return set(self._originals)

    def load(self, uri: str) -> LoraFile:
        """The parsed LoRA at ``uri`` (cached by local path, size and mtime)."""
        path = _local_path(uri, self.storage_config)
        try:
            stat = path.stat()
        except OSError as exc:
            raise CheckpointError(f"LoRA {uri}: cannot read the file ({exc.strerror or exc})") from None
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        lora = self._cache.get(key)
        if lora is None:
            lora = read_lora(uri, self.storage_config)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = lora
        return lora

    def set(self, loras) -> list[dict]:
        """Make ``loras`` (see :func:`parse_lora_specs`; [] or None: none) the applied set; returns :attr:`info`."""
        specs = parse_lora_specs(loras)
        files = [self.load(spec.uri) for spec in specs]
        key = tuple((f.sha256, s.scale) for f, s in zip(files, specs))
        if key == self._key:
            return self.info
        plan: dict[tuple[str, str], list[_Update]] = {}
        for i, (lora, spec) in enumerate(zip(files, specs)):
            for target, ups in _resolve(lora, self.modules, self._indexes, spec.scale, i).items():
                if spec.scale != 0.0:  # scale 0 is checked against the model but changes nothing
                    plan.setdefault(target, []).extend(ups)
        signatures = {target: tuple(u.signature(files[u.lora].sha256) for u in ups) for target, ups in plan.items()}
        try:
            with torch.no_grad():
                for target in [t for t in self._originals if t not in plan]:
                    self._param(target).copy_(self._originals.pop(target))
                    self._applied.pop(target, None)
                for target, ups in plan.items():
                    if self._applied.get(target) == signatures[target]:
                        continue
                    param = self._param(target)
                    if target not in self._originals:
                        self._originals[target] = param.detach().to("cpu", copy=True)
                    param.copy_(_fused(self._originals[target], ups, param.device,
                                       [f.uri for f in files]).reshape(param.shape))
                    self._applied[target] = signatures[target]
        except BaseException:
            self._restore_all()
            raise
        self._key = key
        self._info = [{"uri": s.uri, "sha256": f.sha256, "scale": s.scale, "format": f.format}
                      for f, s in zip(files, specs)]
        if specs:
            log.info("LoRA set: %s (%d parameters fused)",
                     ", ".join(f"{s.uri} x{s.scale:g}" for s in specs), len(self._originals))
        return self.info

    def clear(self) -> None:
        """Remove every LoRA: the base weights, bit for bit."""
        self.set([])

    def _param(self, target: tuple[str, str]) -> torch.Tensor:
        component, name = target
        if component not in self._indexes:
            self._indexes[component] = _Index(component, self.modules[component])
        return self._indexes[component].params[name]

    def _restore_all(self) -> None:
        with torch.no_grad():
            for target, original in self._originals.items():
                self._param(target).copy_(original)
        self._originals.clear()
        self._applied.clear()
        self._key = ()
        self._info = []


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------

_KOHYA_METADATA = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                   "ss_output_name", "modelspec.architecture")


def _layout(pairs: Sequence[LoraPair]) -> str:
    names = {p.module for p in pairs if p.side in ("denoiser", "unet", "transformer")}
    if any(re.match(r"(double_blocks|single_blocks)[._]", n) for n in names):
        return "bfl"
    if any(re.match(r"joint_blocks[._]", n) for n in names):
        return "mmdit"
    if any(re.match(r"(input_blocks|output_blocks|middle_block)[._]", n) for n in names):
        return "sgm"
    return "diffusers"


def inspect_lora(uri, model=None, storage_config=None) -> dict[str, Any]:
    """What a LoRA file holds: format, layout, components, module count, rank / alpha summary, the
    kohya training metadata; with ``model`` (a Pipeline or {component: module}) also how many
    modules match it and which do not (no weights are changed)."""
    lora = read_lora(uri, storage_config)
    ranks = sorted({p.rank for p in lora.pairs})
    alphas = sorted({p.alpha for p in lora.pairs if p.alpha is not None})
    layout = _layout(lora.pairs)
    nominal = {"unet": "unet", "transformer": "transformer", "text_encoder": "text_encoder",
               "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3", "te1": "text_encoder",
               "te2": "text_encoder_2", "te3": "text_encoder_2" if layout == "bfl" else "text_encoder_3",
               "denoiser": "transformer" if layout in ("bfl", "mmdit") else "unet"}
    info: dict[str, Any] = {
        "uri": lora.uri,
        "sha256": lora.sha256,
        "format": lora.format,
        "layout": layout,
        "components": sorted({nominal[p.side] for p in lora.pairs}),
        "modules": len(lora.pairs),
        "ranks": ranks,
        "alphas": alphas,
        "without_alpha": sum(p.alpha is None for p in lora.pairs),
        "dtypes": sorted({str(p.down.dtype).removeprefix("torch.") for p in lora.pairs}),
        "metadata": {k: lora.metadata[k] for k in _KOHYA_METADATA if k in lora.metadata},
    }
    if model is not None:
        modules = lora_components(model.family.parts) if hasattr(model, "family") else dict(model)
        info["components"] = sorted({_component_for(p.side, modules) for p in lora.pairs})
        indexes: dict[str, _Index] = {}
        matched, unmatched, mismatched, params = 0, [], [], 0
        for pair in lora.pairs:
            component = _component_for(pair.side, modules)
            if component in modules:
                indexes.setdefault(component, _Index(component, modules[component]))
                targets = indexes[component].lookup(pair)
            else:
                targets = None
            if targets is None:
                unmatched.append(pair.key)
                continue
            wrong = _shape_mismatch(pair, targets, indexes[component].params, component)
            if wrong:  # the name matches, the shape does not: the job's pre-flight refuses it
                mismatched.append(wrong)
            else:
                matched += 1
                params += len(targets)
        info.update(matched=matched, matched_parameters=params, unmatched=sorted(unmatched),
                    mismatched=sorted(mismatched, key=lambda m: m["key"]))
    return info
