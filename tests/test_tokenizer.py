"""The offline CLIP tokenizer: ids, L, truncation, token strings, and agreement with OpenAI's BPE."""

from __future__ import annotations

import gzip
import html
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import torch

import attnmem.tokenizer as tk
from attnmem.tokenizer import (
    BOS_ID,
    EOS_ID,
    SD2_PAD_ID,
    bpe_vocab_path,
    clip_tokenizer,
    encode_prompts,
    lengths_from_ids,
)

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# Prompts with capitals, punctuation, digits, quotes and non-ASCII, from tests/data/memattn-prompts.
SAMPLE_PROMPTS = [
    "The No Limits Business Woman Podcast",
    "Full body U-Zip main opening - Full body U-Zip main opening on front of bag for easy "
    "unloading when you get to camp",
    '"Watch: Passion Pit\'s New Video, ""Lifted Up (1985)"""',
    "Shaw Floors Couture' Collection Ultimate Expression 15′ Sahara 00205_19829",
    "A street scene in Paris with cafes, artists, and the Sacré-Cœur in the distance.",
    "Gary Ryan Moving Beyond Being Good®",
    "The Health Mastery Café with Dr. Dave",
    "it's   don't I'M  can't we'll you'd they've",
    "Tab\tand\nnewline, 100% emoji 🙂 & ampersand",
]


PROMPT_FILES = sorted((Path(__file__).parent / "data" / "memattn-prompts").glob("*.txt"))


# --- an independent re-implementation of OpenAI's simple_tokenizer (the oracle) -------------


@lru_cache(maxsize=1)
def _openai_bpe() -> tuple[dict[str, int], dict[tuple[str, str], int], dict[int, str]]:
    # Bytes that are printable Latin-1 stand for themselves; the rest take U+0100, U+0101, ...
    keep = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 255 and b != 173)]
    rest = [b for b in range(256) if b not in keep]
    byte_char = {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(rest)}
    alphabet = [byte_char[b] for b in keep + rest]
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, {m: r for r, m in enumerate(merges)}, byte_char


_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def _merge(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def openai_encode(text: str) -> list[int]:
    """OpenAI CLIP's encoding with BOS/EOS, ftfy's default NFC standing in for ftfy."""
    vocab, ranks, byte_char = _openai_bpe()
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
    text = " ".join(text.split()).lower()
    ids = [BOS_ID]
    for piece in _SPLIT.findall(text):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[piece])
            continue
        chars = [byte_char[b] for b in piece.encode("utf-8")]
        chars[-1] += "</w>"
        ids += [vocab[t] for t in _merge(chars, ranks)]
    return ids + [EOS_ID]


# --- ids and positions ---------------------------------------------------------------------


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_photo_of_a_cat(style: str) -> None:
    tok = clip_tokenizer(style)
    assert tok("a photo of a cat").input_ids == CAT
    assert tok.model_max_length == 77
    assert len(tok) == 49408


def test_paddings() -> None:
    sd1 = encode_prompts(clip_tokenizer("sd1"), "a photo of a cat")
    sd2 = encode_prompts(clip_tokenizer("sd2"), "a photo of a cat")
    assert sd1.input_ids.shape == sd2.input_ids.shape == (1, 77)
    assert sd1.input_ids.dtype == torch.int64
    assert sd1.input_ids[0, :7].tolist() == sd2.input_ids[0, :7].tolist() == CAT
    assert (sd1.input_ids[0, 7:] == EOS_ID).all()
    assert (sd2.input_ids[0, 7:] == SD2_PAD_ID).all()
    assert sd1.lengths.tolist() == sd2.lengths.tolist() == [7]


def test_sd1_length_is_not_a_pad_count() -> None:
    enc = encode_prompts(clip_tokenizer("sd1"), ["a photo of a cat", "a dog"])
    naive = (enc.input_ids != EOS_ID).sum(dim=1)  # SD1 pads with EOS: misses the EOS itself
    assert enc.lengths.tolist() == [7, 4]
    assert naive.tolist() == [6, 3]


def test_sd2_length_is_not_a_pad_count() -> None:
    # Like the hub's SD2 / SDXL tokenizer_2, every "!" becomes the pad id 0 (diffusers#4153),
    # so a prompt can hold pad ids before its EOS.
    tok = clip_tokenizer("sd2")
    enc = encode_prompts(tok, ["! !! !!!", "wow!! a cat!", "a cat"])
    assert enc.input_ids[0, :9].tolist() == [BOS_ID, 0, 0, 0, 0, 0, 0, EOS_ID, 0]
    naive = (enc.input_ids != SD2_PAD_ID).sum(dim=1)
    assert enc.lengths.tolist() == [8, 8, 4]
    assert naive.tolist() == [2, 5, 4]
    assert enc.tokens[1][:7] == ["<|startoftext|>", "wow", "!", "!", "a", "cat", "!"]


def test_truncation_is_reported() -> None:
    tok = clip_tokenizer("sd1")
    prompts = [" ".join(["cat"] * n) for n in (74, 75, 76, 80)]
    enc = encode_prompts(tok, prompts)
    assert enc.num_pieces == [74, 75, 76, 80]
    assert enc.truncated == [False, False, True, True]
    assert enc.lengths.tolist() == [76, 77, 77, 77]
    for row in enc.input_ids[2:]:
        assert row[0] == BOS_ID and row[76] == EOS_ID and (row[1:76] == 2368).all()


def test_truncated_real_prompt_keeps_first_pieces() -> None:
    tok = clip_tokenizer("sd1")
    prompt = ", ".join(SAMPLE_PROMPTS)
    full = openai_encode(prompt)
    assert len(full) > 77
    enc = encode_prompts(tok, prompt)
    assert enc.truncated == [True] and enc.num_pieces == [len(full) - 2]
    assert enc.input_ids[0].tolist() == full[:76] + [EOS_ID]


def test_token_strings() -> None:
    enc = encode_prompts(clip_tokenizer("sd1"), ["A photo of a CAT.", "Sacré-Cœur ’s"])
    assert len(enc.tokens) == 2 and all(len(t) == 77 for t in enc.tokens)
    assert enc.tokens[0][:8] == [
        "<|startoftext|>",
        "a",
        "photo",
        "of",
        "a",
        "cat",
        ".",
        "<|endoftext|>",
    ]
    assert enc.tokens[0][8:] == ["<|endoftext|>"] * 69
    # A multi-byte character split over two pieces shows its bytes, not U+FFFD twice.
    pieces = enc.tokens[1][1 : enc.lengths[1] - 1]
    assert pieces == ["sac", "r", "é", "-", "c", "\\xc5", "\\x93", "ur", "\\xe2\\x80", "\\x99", "s"]
    sd2 = encode_prompts(clip_tokenizer("sd2"), "a cat")
    assert sd2.tokens[0][3:5] == ["<|endoftext|>", "!"]


def test_single_prompt_and_encoder_agree() -> None:
    tok = clip_tokenizer("sd1")
    one = encode_prompts(tok, "a photo of a cat")
    many = encode_prompts(tok, ["a photo of a cat"])
    assert torch.equal(one.input_ids, many.input_ids)
    assert one.truncated == [False] and one.num_pieces == [5]


# --- lengths_from_ids ----------------------------------------------------------------------


def test_lengths_from_ids() -> None:
    ids = [[BOS_ID, 5, EOS_ID, EOS_ID], [BOS_ID, EOS_ID, 0, 0], [BOS_ID, 1, 2, EOS_ID]]
    assert lengths_from_ids(ids, EOS_ID).tolist() == [3, 2, 4]
    as_int32 = lengths_from_ids(torch.tensor(ids, dtype=torch.int32), EOS_ID)
    assert as_int32.dtype == torch.int64 and as_int32.tolist() == [3, 2, 4]
    # A foreign tokenizer with another EOS id.
    assert lengths_from_ids(torch.tensor([[0, 7, 2, 1, 1]]), eos_id=2).tolist() == [3]


def test_lengths_from_ids_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"rows \[1\].*no EOS"):
        lengths_from_ids([[BOS_ID, EOS_ID], [BOS_ID, 5]], EOS_ID)
    with pytest.raises(ValueError, match=r"\(N, T\) integer"):
        lengths_from_ids(torch.zeros(77), EOS_ID)
    with pytest.raises(ValueError, match=r"\(N, T\) integer"):
        lengths_from_ids(torch.zeros(1, 77), EOS_ID)


# --- locating the vocabulary ---------------------------------------------------------------


def test_the_vocabulary_ships_with_attnmem() -> None:
    import hashlib

    path = bpe_vocab_path()
    assert path == Path(tk.__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
    # OpenAI CLIP's file, byte for byte (the copy in open-clip-torch is the same).
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BPE_SHA256
    notice = (path.parent / "NOTICE.txt").read_text(encoding="utf-8")
    assert "bpe_simple_vocab_16e6.txt.gz" in notice and "Copyright (c) 2021 OpenAI" in notice


def test_missing_vocab_says_the_install_is_incomplete(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(tk, "_BUNDLED_BPE", tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(FileNotFoundError, match="installation is incomplete; reinstall"):
        bpe_vocab_path()
    # The tokenizer cache must not hide a missing file.
    with pytest.raises(FileNotFoundError, match="installation is incomplete"):
        clip_tokenizer("sd1")


def test_explicit_bpe_path(monkeypatch, tmp_path) -> None:
    path = bpe_vocab_path()
    monkeypatch.setattr(tk, "_BUNDLED_BPE", tmp_path / "missing.gz")
    assert clip_tokenizer("sd1", bpe_path=path)("a photo of a cat").input_ids == CAT


def test_bad_style() -> None:
    with pytest.raises(ValueError, match="style"):
        clip_tokenizer("sd3")  # type: ignore[arg-type]


def test_unset_model_max_length() -> None:
    from transformers import CLIPTokenizer

    vocab, merges = tk._load_bpe(str(bpe_vocab_path()))
    with pytest.raises(ValueError, match="model_max_length"):
        encode_prompts(CLIPTokenizer(vocab=vocab, merges=merges), "a cat")


# --- agreement with OpenAI's BPE -----------------------------------------------------------


def test_oracle_sanity() -> None:
    assert openai_encode("a photo of a cat") == CAT


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("prompt", SAMPLE_PROMPTS, ids=range(len(SAMPLE_PROMPTS)))
def test_matches_openai_bpe(style: str, prompt: str) -> None:
    assert clip_tokenizer(style)(prompt).input_ids == openai_encode(prompt)


def test_matches_openai_bpe_on_prompt_files() -> None:
    files = PROMPT_FILES
    assert [f.name for f in files] == ["group_nomem500.txt", "sd1_mem345.txt", "sd2_mem219.txt"]
    sd1, sd2 = clip_tokenizer("sd1"), clip_tokenizer("sd2")
    prompts = [p for f in files for p in f.read_text(encoding="utf-8").splitlines() if p]
    assert len(prompts) == 345 + 219 + 500
    mismatched = [p for p in prompts if sd1(p).input_ids != openai_encode(p)]
    assert mismatched == []
    # SD2 style differs exactly on the prompts holding "!" (see test_known_divergences).
    sd2_mismatched = [p for p in prompts if sd2(p).input_ids != openai_encode(p)]
    assert all("!" in p for p in sd2_mismatched)


def test_known_divergences() -> None:
    """Pinned on purpose: these follow what diffusers' hub tokenizers do, not OpenAI's.

    OpenAI unescapes HTML (and runs ftfy); transformers' CLIPTokenizer does neither. The SD2
    tokenizer's pad token ``!`` is a special token, so each ``!`` in a prompt becomes id 0.
    If transformers changes either behaviour, this test says so.
    """
    sd1, sd2 = clip_tokenizer("sd1"), clip_tokenizer("sd2")
    assert sd1("Tom &amp; Jerry").input_ids != openai_encode("Tom &amp; Jerry")
    assert sd1("Tom & Jerry").input_ids == openai_encode("Tom & Jerry")
    assert sd1("a cat!").input_ids == openai_encode("a cat!") == [BOS_ID, 320, 2368, 256, EOS_ID]
    assert sd2("a cat!").input_ids == [BOS_ID, 320, 2368, 0, EOS_ID]
