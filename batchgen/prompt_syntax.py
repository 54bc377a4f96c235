"""A1111 (stable-diffusion-webui) prompt syntax for CLIP text encoders: attention weights,
``BREAK`` and prompts longer than 75 tokens.

Why: many users' prompts are written for the A1111 webui: ``(word:1.2)``, ``(word)``,
``[word]``, ``BREAK``, and prompts far over CLIP's 77 tokens. Encoded as plain text (diffusers'
way) the brackets become tokens and the tail is cut off, so the images differ from what the
prompt's author saw. This module reproduces the webui's arithmetic, opt-in (job setting
``sampling.prompt_syntax: a1111``; the default ``plain`` stays diffusers-equal). It is our own
implementation of the webui's algorithm (modules/prompt_parser.py ``parse_prompt_attention``,
modules/sd_hijack_clip.py ``tokenize_line`` / ``process_tokens``, modules/sd_emphasis.py):

1. :func:`parse_prompt_attention`: text -> ``[(text, weight), ...]``. ``(x)`` multiplies by 1.1,
   ``[x]`` divides by 1.1, ``(x:w)`` multiplies by w; brackets nest (multipliers multiply, inner
   first), unclosed brackets apply to the end, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal,
   a lone backslash is dropped, ``BREAK`` (a whole word, in capitals) becomes ``("BREAK", -1)``,
   and neighbours with equal weights merge.
2. :func:`tokenize_chunks`: each piece is tokenized on its own (no BOS/EOS); tokens fill 75-token
   chunks with the piece's weight per token. ``BREAK`` closes the current chunk. When a chunk is
   full and the last comma is at most ``comma_backtrack`` (20) tokens back, the tokens after
   that comma move to the next chunk. Each chunk becomes ``[BOS] + 75 tokens (EOS-padded) + [EOS]``
   = 77 ids with weight 1.0 on BOS/EOS/padding; an empty prompt is one empty chunk. Where the
   tokenizer's pad id differs from EOS (SD2 / SDXL's OpenCLIP tokenizer: ``!`` = 0), every id
   after the first EOS of a chunk becomes the pad id, as the webui's OpenCLIP wrapper does.
3. :func:`encode_prompts`: every chunk goes through the text encoder on its own (77 positions),
   then the emphasis: ``original`` (the webui default) multiplies the hidden states by the
   token weights and rescales so the chunk's mean is unchanged; ``no_norm`` skips the rescale;
   ``none`` neither parses brackets nor weights (plain text, but still chunked). Chunks are
   concatenated along the sequence: (B, 77 * chunks, width). Prompts with fewer chunks than the
   longest in the list get empty-prompt chunks (the webui's ``empty_chunk``), so put a batch's
   prompts and negative prompts in one call to get equal lengths. The pooled vector, when the
   encoder returns one, is the first chunk's (as the webui's SDXL wrapper returns ``zs[0].pooled``).

One deliberate difference: the webui computes the emphasis mean over all prompts it encodes
together (one call per chunk index), which makes a prompt's embedding depend on its batch
neighbours. Here the mean is per prompt and chunk, so an item renders the same in any batch;
both agree whenever the batch holds one distinct prompt (the webui's usual batch_size copies).
Textual-inversion embeddings and scheduled prompts (``[a:b:10]``, ``[a|b]``) are not part of this
module: they are passed to the tokenizer as text, as the webui does with brackets it does not parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import InputError

CHUNK_LENGTH = 75  # tokens per chunk, BOS and EOS excluded
COMMA_BACKTRACK = 20  # the webui's default opts.comma_padding_backtrack
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
EMPHASIS_MODES = ("original", "no_norm", "none")
SYNTAXES = ("plain", "a1111")

# Alternatives in the webui's order: escaped brackets / backslash, a lone backslash, openers,
# ":weight)" closers, closers, plain text runs, a lone colon.
_ATTENTION_RE = re.compile(
    r"""
    \\\(|
    \\\)|
    \\\[|
    \\]|
    \\\\|
    \\|
    \(|
    \[|
    :\s*([+-]?[.\d]+)\s*\)|
    \)|
    ]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = ("BREAK", -1.0)


class PromptSyntaxError(InputError):
    """A prompt the A1111 syntax cannot weight (e.g. a malformed ``(word:1.2.3)`` weight)."""


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``[(text, weight), ...]`` for an A1111-syntax prompt; ``("BREAK", -1.0)`` marks a BREAK.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION_RE.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:
                raise PromptSyntaxError(f"prompt {text[:80]!r}: bad attention weight {weight!r} in {piece!r} "
                                        "(write (word:1.2))") from None
            multiply_from(round_open.pop(), value)
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_RE.split(piece)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for pos in round_open:
        multiply_from(pos, ROUND_MULTIPLIER)
    for pos in square_open:
        multiply_from(pos, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    i = 0  # merge neighbours with equal weights (two BREAKs merge too, as in the webui)
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in res]


@dataclass
class PromptChunk:
    """77 token ids (BOS, 75 tokens or padding, EOS) and one weight per id."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Ids:
    bos: int
    eos: int
    pad: int
    comma: int | None


def _special_ids(tokenizer) -> _Ids:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise InputError(f"prompt_syntax a1111 needs a CLIP tokenizer with BOS and EOS tokens, got "
                         f"{type(tokenizer).__name__}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return _Ids(int(bos), int(eos), int(pad), tokenizer.get_vocab().get(",</w>"))


def tokenize_chunks(tokenizer, prompt: str, *, emphasis: str = "original", chunk_length: int = CHUNK_LENGTH,
                    comma_backtrack: int = COMMA_BACKTRACK) -> tuple[list[PromptChunk], int]:
    """(chunks, token count) of one prompt, as the webui's ``tokenize_line`` builds them."""
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis {emphasis!r}: use one of {', '.join(EMPHASIS_MODES)}")
    ids = _special_ids(tokenizer)
    parsed = parse_prompt_attention(prompt) if emphasis != "none" else [(prompt, 1.0)]
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False,
                          verbose=False)["input_ids"]

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else chunk_length
        to_add = chunk_length - len(chunk.tokens)
        if to_add > 0:
            chunk.tokens += [ids.eos] * to_add
            chunk.multipliers += [1.0] * to_add
        chunk.tokens = [ids.bos] + chunk.tokens + [ids.eos]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
        if ids.pad != ids.eos:
            first_eos = chunk.tokens.index(ids.eos)
            chunk.tokens[first_eos + 1:] = [ids.pad] * (len(chunk.tokens) - first_eos - 1)
        last_comma = -1
        chunks.append(chunk)
        chunk = PromptChunk()

    for tokens, (text, weight) in zip(tokenized, parsed):
        if (text, weight) == BREAK:
            next_chunk()
            continue
        for token in tokens:
            if token == ids.comma:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack != 0 and len(chunk.tokens) == chunk_length and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_backtrack):
                # the chunk is full and a comma is near: move the words after it to the next chunk
                cut = last_comma + 1
                moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                next_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
            if len(chunk.tokens) == chunk_length:
                next_chunk()
            chunk.tokens.append(int(token))
            chunk.multipliers.append(float(weight))
    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


def empty_chunk(tokenizer, chunk_length: int = CHUNK_LENGTH) -> PromptChunk:
    """The chunk the webui appends to prompts shorter than their batch's longest: the empty prompt."""
    return tokenize_chunks(tokenizer, "", emphasis="none", chunk_length=chunk_length)[0][0]


def apply_emphasis(z, multipliers, emphasis: str = "original"):
    """Weighted hidden states: ``z`` (N, 77, D) times ``multipliers`` (N, 77); ``original``
    rescales each row so its mean over (77, D) is unchanged (the webui's EmphasisOriginal, per chunk)."""
    import torch

    if emphasis == "none":
        return z
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis {emphasis!r}: use one of {', '.join(EMPHASIS_MODES)}")
    # The webui multiplies half-precision z by float32 weights (so the product is float32) and
    # takes the original mean in z's own dtype; the result is cast back to z's dtype here.
    w = multipliers.to(device=z.device, dtype=torch.float32).unsqueeze(-1)
    if emphasis == "no_norm":
        return (z * w).to(z.dtype)
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * w
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # A chunk whose weighted mean is exactly 0 (the webui would return NaN) keeps factor 1.
    factor = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    return (weighted * factor).to(z.dtype)


def chunk_count(tokenizer, prompt: str, *, chunk_length: int = CHUNK_LENGTH,
                comma_backtrack: int = COMMA_BACKTRACK) -> int:
    """How many 77-token chunks ``prompt`` needs (at least 1)."""
    return len(tokenize_chunks(tokenizer, prompt, chunk_length=chunk_length, comma_backtrack=comma_backtrack)[0])


def encode_prompts(tokenizer, encode: Callable, prompts: Sequence[str], *, emphasis: str = "original",
                   chunk_length: int = CHUNK_LENGTH, comma_backtrack: int = COMMA_BACKTRACK, device=None,
                   n_chunks: int | None = None):
    """(hidden (B, 77 * chunks, D), pooled (B, P) or None) for A1111-syntax ``prompts``.

    ``encode(ids)`` takes a LongTensor (N, 77) and returns the hidden states (N, 77, D), or a
    tuple (hidden states, pooled (N, P)); it decides which layer (last, penultimate, ...) is used.
    Every chunk is encoded as its own 77-token sequence; shorter prompts are padded with
    empty-prompt chunks up to ``n_chunks`` (default: the longest prompt's chunk count). Pass a
    fixed ``n_chunks`` to make an item's embedding independent of the other prompts in the call.
    """
    import torch

    if not prompts:
        raise ValueError("encode_prompts: no prompts")
    per_prompt = [tokenize_chunks(tokenizer, p, emphasis=emphasis, chunk_length=chunk_length,
                                  comma_backtrack=comma_backtrack)[0] for p in prompts]
    longest = max(len(c) for c in per_prompt)
    if n_chunks is not None and n_chunks < longest:
        raise ValueError(f"encode_prompts: a prompt needs {longest} chunks, more than n_chunks={n_chunks}")
    n_chunks = n_chunks or longest
    filler = empty_chunk(tokenizer, chunk_length)
    rows = [c[i] if i < len(c) else filler for i in range(n_chunks) for c in per_prompt]  # chunk-major
    ids = torch.tensor([r.tokens for r in rows], dtype=torch.long, device=device)
    weights = torch.tensor([r.multipliers for r in rows], dtype=torch.float32)
    out = encode(ids)
    hidden, pooled = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
    if hidden.ndim != 3 or hidden.shape[:2] != ids.shape:
        raise ValueError(f"encode returned hidden states of shape {tuple(hidden.shape)}, expected "
                         f"({ids.shape[0]}, {ids.shape[1]}, width)")
    hidden = apply_emphasis(hidden, weights, emphasis)
    b = len(prompts)
    hidden = hidden.reshape(n_chunks, b, *hidden.shape[1:]).permute(1, 0, 2, 3).reshape(b, -1, hidden.shape[-1])
    if pooled is not None:
        pooled = pooled[:b]  # the first chunk of every prompt
    return hidden, pooled


__all__ = ["parse_prompt_attention", "tokenize_chunks", "empty_chunk", "apply_emphasis", "encode_prompts", "chunk_count",
           "PromptChunk", "PromptSyntaxError", "CHUNK_LENGTH", "COMMA_BACKTRACK", "EMPHASIS_MODES", "SYNTAXES"]
