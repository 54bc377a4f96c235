"""CLIP tokenizers offline: the BPE vocabulary the ``open_clip`` package ships, as transformers reads it.

A single-file checkpoint carries no tokenizer, and batchgen never downloads one in the middle of a
job. Every CLIP text encoder of the SD families (OpenAI CLIP-L, OpenCLIP ViT-H and bigG) uses the
same byte-level BPE: the 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``, which OpenAI's CLIP
and ``open_clip`` ship. We read that file from the installed ``open_clip_torch`` package (located
with ``importlib.util.find_spec``, never imported: importing open_clip needs torchvision) and
rebuild the vocabulary exactly as CLIP's ``SimpleTokenizer`` does (256 byte characters, the same
with ``</w>``, one entry per merge, ``<|startoftext|>`` / ``<|endoftext|>``: 49,408 ids), then
write the ``vocab.json`` / ``merges.txt`` / config files of a diffusers tokenizer folder and load
them with the same code as a folder's tokenizer.

What differs between the SD tokenizers is only the padding token: OpenAI CLIP-L pads with
``<|endoftext|>``; the OpenCLIP encoders (SD 2.x's tokenizer, SDXL's and SD3's ``tokenizer_2``)
pad with id 0, which diffusers' tokenizer configs spell ``"!"`` (a special token there, so a ``!``
in a prompt also becomes id 0, as diffusers tokenizes it). :data:`PAD_TOKENS` holds that table.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from ..errors import CheckpointError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file

# Single-file family -> tokenizer component -> pad token (diffusers' tokenizer configs of the real repos).
PAD_TOKENS: dict[str, dict[str, str]] = {
    "sd1": {"tokenizer": EOT},
    "sd2": {"tokenizer": "!"},
    "sdxl": {"tokenizer": EOT, "tokenizer_2": "!"},
    "sdxl_refiner": {"tokenizer_2": "!"},
    "sd3": {"tokenizer": EOT, "tokenizer_2": "!"},
    "flux": {"tokenizer": EOT},
}


def open_clip_bpe_path() -> Path | None:
    """The BPE file inside the installed ``open_clip`` package, or None (package or file missing)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / BPE_FILE
        if path.is_file():
            return path
    return None


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character table, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.lru_cache(maxsize=4)
def clip_vocab(bpe_path: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token -> id, merges) of CLIP's tokenizer from its BPE merges file."""
    try:
        text = gzip.open(bpe_path).read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{bpe_path}: cannot read the CLIP BPE vocabulary ({exc})") from None
    lines = text.split("\n")[1:MERGES + 1]  # the first line is a version header
    merges = tuple(tuple(line.split()) for line in lines)
    if len(merges) != MERGES or any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{bpe_path}: expected {MERGES} BPE merges (two symbols per line)")
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise CheckpointError(f"{bpe_path}: the vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def clip_tokenizer_files(pad_token: str = EOT, bpe_path: str | Path | None = None) -> dict[str, str]:
    """The files of a diffusers CLIP tokenizer folder (``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json``, ``special_tokens_map.json``) with ``pad_token``, as the SD repos have them."""
    path = Path(bpe_path) if bpe_path is not None else require_bpe_path()
    vocab, merges = clip_vocab(str(path))
    if pad_token not in vocab:
        raise CheckpointError(f"CLIP pad token {pad_token!r} is not in the vocabulary")
    added = {str(vocab[SOT]): {"content": SOT, "lstrip": False, "normalized": True, "rstrip": False,
                               "single_word": False, "special": False},
             str(vocab[EOT]): {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": False}}
    if pad_token not in (SOT, EOT):
        added = {str(vocab[pad_token]): {"content": pad_token, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True}, **added}
    config = {"add_prefix_space": False, "added_tokens_decoder": added, "bos_token": SOT, "eos_token": EOT,
              "pad_token": pad_token, "unk_token": EOT, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    special = {"bos_token": SOT, "eos_token": EOT, "pad_token": pad_token, "unk_token": EOT}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


def require_bpe_path(hint: str = "") -> Path:
    """:func:`open_clip_bpe_path`, or a CheckpointError saying how to get a CLIP tokenizer."""
    path = open_clip_bpe_path()
    if path is None:
        raise CheckpointError(
            f"no CLIP tokenizer vocabulary: batchgen reads CLIP's BPE file '{BPE_FILE}' from the open_clip_torch "
            f"package, which is not installed (pip install --no-deps open_clip_torch){hint}")
    return path


def tokenizer_from_files(files: dict[str, str], cls_name: str = "CLIPTokenizer"):
    """A tokenizer from in-memory folder files (written to a temporary folder and loaded from there)."""
    from ..models.text import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="batchgen-tokenizer-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return load_tokenizer(Path(tmp), cls_name)


def clip_tokenizer(pad_token: str = EOT, bpe_path: str | Path | None = None):
    """A transformers ``CLIPTokenizer`` with CLIP's real vocabulary (offline) and ``pad_token``."""
    return tokenizer_from_files(clip_tokenizer_files(pad_token, bpe_path))
