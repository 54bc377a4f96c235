"""A1111 prompt syntax: attention parsing (the webui's documented examples), 75-token chunking
with BREAK and the comma backtrack (expected chunks written out by hand from the rules), SD2
padding, the original emphasis, and equality with the plain encoder when there is nothing to weight.

The tiny CLIP tokenizer (batchgen.tiny.common) has one-token words: "a" = 320, "cat" = 789,
"dog" = 782, "," = 267; BOS = 812, EOS = 813.
"""

from __future__ import annotations

import pytest
import torch

from batchgen.prompt_syntax import (
    apply_emphasis,
    empty_chunk,
    encode_prompts,
    parse_prompt_attention,
    tokenize_chunks,
    PromptSyntaxError,
)

A, CAT, DOG, COMMA, BOS, EOS = 320, 789, 782, 267, 812, 813


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from batchgen.tiny.common import clip_tokenizer_files

    d = tmp_path_factory.mktemp("tok")
    for name, text in clip_tokenizer_files().items():
        (d / name).write_text(text, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    ids = [tok(w, add_special_tokens=False).input_ids for w in ("a", "cat", "dog", ",")]
    assert ids == [[A], [CAT], [DOG], [COMMA]] and (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    return tok


@pytest.fixture(scope="module")
def text_model(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    from batchgen.tiny.common import clip_text_config

    cfg = clip_text_config(tokenizer.get_vocab(), hidden=32, layers=2, heads=4)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb: a fresh model's final LayerNorm gives chunk means of ~0
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


# ----------------------------------------------------------------------------- parsing

WEBUI_EXAMPLES = [  # the docstring of the webui's modules/prompt_parser.py parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text,expected", WEBUI_EXAMPLES)
def test_parse_matches_the_webui_examples_exactly(text, expected):
    assert parse_prompt_attention(text) == expected  # exact floats: same multiplication order


def test_parse_rules_from_the_algorithm():
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("[x]") == [("x", 1 / 1.1)]
    assert parse_prompt_attention("[[x]]") == [("x", 1 / 1.1 / 1.1)]
    assert parse_prompt_attention("(x:0.5) (y : 2 )") == [("x", 0.5), (" ", 1.0), ("y ", 2.0)]
    assert parse_prompt_attention("a:b") == [("a:b", 1.0)]  # a colon outside a weight is text
    assert parse_prompt_attention("x:1.5)") == [("x:1.5)", 1.0)]  # no open bracket: literal
    assert parse_prompt_attention("a ]b)") == [("a ]b)", 1.0)]  # unmatched closers are text
    assert parse_prompt_attention("a\\\\b") == [("a\\b", 1.0)]  # \\ -> a literal backslash
    assert parse_prompt_attention("a\\b") == [("ab", 1.0)]  # a lone backslash is dropped
    assert parse_prompt_attention("(a [b] c)") == [("a ", 1.1), ("b", 1.1 * (1 / 1.1)), (" c", 1.1)]
    with pytest.raises(PromptSyntaxError, match="bad attention weight '1.2.3'"):
        parse_prompt_attention("(x:1.2.3)")


def test_parse_break():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_prompt_attention("aBREAK b") == [("aBREAK b", 1.0)]  # a whole word only
    assert parse_prompt_attention("a break b") == [("a break b", 1.0)]  # capitals only
    # inside brackets the marker's -1 is multiplied too, so the webui no longer treats it as BREAK
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


# ----------------------------------------------------------------------------- chunks


def _chunk(tokens, weights=None):
    """BOS + tokens + EOS padding to 75 + EOS, with weights for the tokens (1.0 elsewhere)."""
    weights = weights or [1.0] * len(tokens)
    pad = 75 - len(tokens)
    return [BOS] + tokens + [EOS] * pad + [EOS], [1.0] + weights + [1.0] * pad + [1.0]


def _as_lists(chunks):
    return [(c.tokens, c.multipliers) for c in chunks]


def test_weights_per_token(tokenizer):
    chunks, count = tokenize_chunks(tokenizer, "a (cat:1.5), [dog]")
    assert count == 4
    assert _as_lists(chunks) == [_chunk([A, CAT, COMMA, DOG], [1.0, 1.5, 1.0, 1 / 1.1])]
    assert all(len(c.tokens) == 77 and len(c.multipliers) == 77 for c in chunks)


def test_empty_prompt_is_one_empty_chunk(tokenizer):
    chunks, count = tokenize_chunks(tokenizer, "")
    assert count == 0 and _as_lists(chunks) == [_chunk([])]
    assert (empty_chunk(tokenizer).tokens, empty_chunk(tokenizer).multipliers) == _chunk([])


def test_long_prompt_splits_into_75_token_chunks(tokenizer):
    chunks, count = tokenize_chunks(tokenizer, " ".join(["cat"] * 80))
    assert count == 80
    assert _as_lists(chunks) == [_chunk([CAT] * 75), _chunk([CAT] * 5)]
    chunks, _ = tokenize_chunks(tokenizer, " ".join(["cat"] * 75))
    assert _as_lists(chunks) == [_chunk([CAT] * 75)]  # exactly full: no extra chunk


def test_break_starts_a_new_chunk(tokenizer):
    chunks, count = tokenize_chunks(tokenizer, "a cat BREAK (dog)")
    assert _as_lists(chunks) == [_chunk([A, CAT]), _chunk([DOG], [1.1])]
    assert count == 75 + 1  # a closed chunk counts 75, the last its own length (the webui's count)
    chunks, _ = tokenize_chunks(tokenizer, "BREAK cat")
    assert _as_lists(chunks) == [_chunk([]), _chunk([CAT])]


def test_comma_backtrack_moves_the_words_after_a_near_comma(tokenizer):
    # 60 cats, a comma (token 61), 20 dogs. When the chunk is full (60 cats, comma, 14 dogs) and
    # the 15th dog arrives, the comma is 15 <= 20 tokens back: the 14 dogs move to chunk 2.
    text = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 20)
    chunks, _ = tokenize_chunks(tokenizer, text)
    assert _as_lists(chunks) == [_chunk([CAT] * 60 + [COMMA]), _chunk([DOG] * 20)]
    # the same with backtracking off (the webui setting 0): a hard cut at 75
    chunks, _ = tokenize_chunks(tokenizer, text, comma_backtrack=0)
    assert _as_lists(chunks) == [_chunk([CAT] * 60 + [COMMA] + [DOG] * 14), _chunk([DOG] * 6)]


def test_comma_too_far_back_is_ignored(tokenizer):
    # comma at position 50: 75 - 50 = 25 > 20, so the chunk is cut at 75 tokens
    text = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 40)
    chunks, _ = tokenize_chunks(tokenizer, text)
    assert _as_lists(chunks) == [_chunk([CAT] * 50 + [COMMA] + [DOG] * 24), _chunk([DOG] * 16)]


def test_comma_as_76th_token_opens_the_next_chunk(tokenizer):
    chunks, _ = tokenize_chunks(tokenizer, " ".join(["cat"] * 75) + ", dog")
    assert _as_lists(chunks) == [_chunk([CAT] * 75), _chunk([COMMA, DOG])]


def test_moved_words_keep_their_weights(tokenizer):
    text = " ".join(["cat"] * 70) + ", (dog dog dog dog dog:1.3) dog"
    chunks, _ = tokenize_chunks(tokenizer, text)
    # full at 70 cats + comma + 4 weighted dogs; the 5th weighted dog triggers the move (75 - 70 = 5 <= 20)
    assert _as_lists(chunks) == [_chunk([CAT] * 70 + [COMMA]), _chunk([DOG] * 6, [1.3] * 5 + [1.0])]


def test_emphasis_none_keeps_brackets_as_text(tokenizer):
    chunks, _ = tokenize_chunks(tokenizer, "(cat:1.5)", emphasis="none")
    plain = tokenizer("(cat:1.5)", add_special_tokens=False).input_ids
    assert _as_lists(chunks) == [_chunk(plain)]


def test_sd2_style_pad_token_after_first_eos(tok_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True, pad_token="!")
    assert tok.pad_token_id == 0
    chunks, _ = tokenize_chunks(tok, "a cat")
    assert chunks[0].tokens == [BOS, A, CAT, EOS] + [0] * 73
    assert chunks[0].multipliers == [1.0] * 77


# ----------------------------------------------------------------------------- emphasis, encoding


def test_original_emphasis_keeps_the_mean_and_scales_tokens():
    torch.manual_seed(1)
    z = torch.randn(2, 77, 8) + 0.5
    w = torch.ones(2, 77)
    w[0, 3] = 1.5
    w[1, 5:9] = 1 / 1.1
    out = apply_emphasis(z, w, "original")
    for b in range(2):
        factor = z[b].mean() / (z[b] * w[b, :, None]).mean()  # the webui's rescale, per chunk
        torch.testing.assert_close(out[b], z[b] * w[b, :, None] * factor, rtol=0, atol=1e-6)
        torch.testing.assert_close(out[b].mean(), z[b].mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 3] / out[0, 2], 1.5 * z[0, 3] / z[0, 2], rtol=1e-5, atol=0)
    torch.testing.assert_close(apply_emphasis(z, w, "no_norm"), z * w[..., None])
    assert torch.equal(apply_emphasis(z, torch.ones(2, 77), "original"), z)  # all 1: untouched
    zero = torch.zeros(1, 77, 8)
    assert torch.equal(apply_emphasis(zero, w[:1], "original"), zero)  # mean 0: no NaN


def test_encode_prompts_chunks_pads_and_weights(tokenizer, text_model):
    def encode(ids):
        with torch.no_grad():
            out = text_model(ids)
        return out.last_hidden_state, out.pooler_output

    long_prompt = " ".join(["cat"] * 80)
    hidden, pooled = encode_prompts(tokenizer, encode, [long_prompt, "a (dog:1.2)"])
    assert hidden.shape == (2, 154, 32) and pooled.shape == (2, 32)

    def ids(tokens):
        return torch.tensor([_chunk(tokens)[0]])

    with torch.no_grad():
        z_cat75, z_cat5 = text_model(ids([CAT] * 75))[0][0], text_model(ids([CAT] * 5))[0][0]
        z_empty = text_model(ids([]))[0][0]
        out = text_model(ids([A, DOG]))
        z_dog, pooled_dog = out.last_hidden_state, out.pooler_output
    torch.testing.assert_close(hidden[0, :77], z_cat75, rtol=0, atol=1e-6)  # weights 1: unchanged
    torch.testing.assert_close(hidden[0, 77:], z_cat5, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden[1, 77:], z_empty, rtol=0, atol=1e-6)  # the short prompt's filler
    w = torch.ones(77)
    w[2] = 1.2
    expected = z_dog[0] * w[:, None] * (z_dog[0].mean() / (z_dog[0] * w[:, None]).mean())
    torch.testing.assert_close(hidden[1, :77], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[1], pooled_dog[0], rtol=0, atol=1e-6)  # first chunk's pooled

    # batch invariance: the per-prompt mean makes an item independent of its neighbours
    alone, _ = encode_prompts(tokenizer, encode, ["a (dog:1.2)", "cat BREAK dog"])
    torch.testing.assert_close(alone[0, :77], hidden[1, :77], rtol=0, atol=1e-6)


def test_plain_prompt_equals_the_plain_clip_encoder(tokenizer, text_model):
    from batchgen.models.text import ClipEncoder

    prompts = ["a cat, a dog", "portrait of a cat"]
    plain, _ = ClipEncoder(tokenizer, text_model)(prompts, "cpu")
    with torch.no_grad():
        weighted, _ = encode_prompts(tokenizer, lambda ids: text_model(ids)[0], prompts)
    assert weighted.shape == plain.shape
    assert torch.equal(weighted, plain)  # nothing to weight: bitwise the diffusers-style encoding


def test_encode_rejects_a_wrong_shape(tokenizer):
    with pytest.raises(ValueError, match="expected"):
        encode_prompts(tokenizer, lambda ids: torch.zeros(ids.shape[0], 5), ["cat"])
