"""The real CLIP BPE tokenizer, built offline, and the token positions attnmem reasons about.

Stable Diffusion's text encoders (SD1.x, SD2.x, both SDXL encoders) share OpenAI's CLIP BPE
vocabulary of 49408 tokens. attnmem ships OpenAI's merge list, ``bpe_simple_vocab_16e6.txt.gz``
(MIT, see ``attnmem/data/NOTICE.txt``), in ``attnmem/data``; :func:`clip_tokenizer` turns it
into a ``transformers.CLIPTokenizer`` that gives the same ids as the one diffusers pipelines
load from the hub, without the hub.

Positions (docs/method.md §1): BOS at 0, prompt tokens at 1 … L−2, EOS at L−1, padding at L … 76, where
**L is the index of the first EOS + 1**. Counting non-padding ids is wrong for both paddings:
SD1 pads with EOS itself (the count misses the EOS), SD2 pads with ``!`` (id 0), which a prompt
can also contain.

Two known, deliberate divergences from OpenAI's ``simple_tokenizer``, both kept because they are
what a diffusers pipeline feeds its text encoder, and attnmem's positions must line up with the
pipeline's keys:

- OpenAI runs ``ftfy.fix_text`` and ``html.unescape`` before BPE; transformers' tokenizer only
  applies NFC, whitespace folding and lower-casing. So ``&amp;`` or curly quotes differ.
- With the SD2 padding, ``!`` is a special token, so every ``!`` in a prompt becomes id 0
  instead of its BPE piece (``"a cat!"`` → ``… 2368, 0, 49407`` rather than ``… 2368, 256,
  49407``). The hub's SD2.x tokenizer and SDXL's ``tokenizer_2`` do the same (diffusers#4153).

Otherwise prompts tokenize identically: all 1064 prompts of ``tests/data/memattn-prompts`` with the
SD1 padding, all but the one holding ``!`` with the SD2 padding (``tests/test_tokenizer.py``).
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "SD2_PAD_ID",
    "CONTEXT_LENGTH",
    "Encoded",
    "bpe_vocab_path",
    "clip_tokenizer",
    "encode_prompts",
    "lengths_from_ids",
]

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
SD2_PAD_ID = 0  # "!": SD2.x (OpenCLIP) and SDXL's second tokenizer pad with it
CONTEXT_LENGTH = 77

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_BUNDLED_BPE = Path(__file__).resolve().parent / "data" / _BPE_FILE
# OpenAI's vocabulary: 256 byte symbols, the same with the end-of-word mark, 48894 merges,
# 2 specials = 49408. The file holds more merges than the vocabulary uses.
_NUM_MERGES = 49408 - 2 * 256 - 2

Style = Literal["sd1", "sd2"]


def bpe_vocab_path() -> Path:
    """Path of the bundled ``bpe_simple_vocab_16e6.txt.gz`` (``attnmem/data``).

    Raises:
        FileNotFoundError: the file is missing from the installation (a damaged or partial
            install); the message says so and how to repair it.
    """
    if not _BUNDLED_BPE.is_file():
        raise FileNotFoundError(
            f"attnmem's CLIP vocabulary {_BUNDLED_BPE} is missing: the installation is "
            "incomplete; reinstall attnmem (pip install --force-reinstall --no-deps attnmem, or "
            "pip install -e . in a checkout), or pass bpe_path= to clip_tokenizer"
        )
    return _BUNDLED_BPE


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> dict[int, str]:
    """Byte → the printable stand-in character byte-level BPE uses for it, in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other 68 bytes (controls,
    space, soft hyphen, …) map to code points from U+0100 up, in byte order, and come after.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(0x100 + i) for i, b in enumerate(others)})
    return table


@functools.lru_cache(maxsize=1)
def _symbol_bytes() -> dict[str, int]:
    return {c: b for b, c in _byte_symbols().items()}


def _piece_text(piece: str) -> str:
    """Readable text of one BPE piece: ``"cat</w>"`` → ``"cat"``.

    A multi-byte character can be split over pieces; the stray bytes are shown as ``\\xNN``
    rather than as U+FFFD, so a per-token view still says which bytes a piece holds.
    """
    if piece in ("<|startoftext|>", "<|endoftext|>"):
        return piece
    body = piece.removesuffix("</w>")
    table = _symbol_bytes()
    if not all(c in table for c in body):  # not byte-level BPE: show the piece as it is
        return body
    return bytes(table[c] for c in body).decode("utf-8", errors="backslashreplace")


@functools.lru_cache(maxsize=4)
def _load_bpe(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token → id) and ranked merges from the gzipped merge list."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; the vocabulary uses the first _NUM_MERGES merges only.
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE merge list ({_NUM_MERGES} pairs expected)")
    symbols = list(_byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _build(style: Style, path: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    vocab, merges = _load_bpe(path)
    pad = "<|endoftext|>" if style == "sd1" else "!"
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=CONTEXT_LENGTH)


def clip_tokenizer(
    style: Style = "sd1", bpe_path: str | os.PathLike | None = None
) -> CLIPTokenizer:
    """The CLIP tokenizer used by Stable Diffusion, built without the hub.

    Args:
        style: ``"sd1"`` pads with EOS (id 49407), like SD1.x and SDXL's first tokenizer;
            ``"sd2"`` pads with ``!`` (id 0), like SD2.x (OpenCLIP) and SDXL's ``tokenizer_2``.
        bpe_path: the merge list; default: the bundled one (:func:`bpe_vocab_path`).

    The instance is cached per (style, file) and shared: treat it as read-only.
    """
    if style not in ("sd1", "sd2"):
        raise ValueError(f"style must be 'sd1' or 'sd2', got {style!r}")
    path = Path(bpe_path) if bpe_path is not None else bpe_vocab_path()
    return _build(style, str(path.resolve()))


@dataclass(frozen=True)
class Encoded:
    """Prompts tokenized exactly as a diffusers pipeline tokenizes them, plus positions.

    Attributes:
        input_ids: (N, 77) int64, what the text encoder receives.
        lengths: (N,) int64, L per prompt = index of the first EOS + 1 (BOS and EOS included).
        truncated: per prompt, whether it had more than 75 word-pieces and was cut (then L = 77).
        num_pieces: per prompt, its word-piece count before truncation (BOS/EOS excluded).
        tokens: per prompt, the 77 decoded word-pieces (``"<|startoftext|>"``, ``"cat"``, …,
            padding included) for per-token views.
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    truncated: list[bool]
    num_pieces: list[int]
    tokens: list[list[str]]


def lengths_from_ids(ids: torch.Tensor | Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    """L per row of token ids: index of the first ``eos_id`` + 1.

    Works for any CLIP-style tokenizer (the pipeline controller uses it when the pipeline's
    tokenizer is not attnmem's). Padding is irrelevant: only the first EOS counts.

    Args:
        ids: (N, T) integer ids.
        eos_id: the tokenizer's EOS id.

    Returns:
        (N,) int64 on the device of ``ids``.

    Raises:
        ValueError: a row has no EOS, so L is undefined (ids not from a CLIP-style tokenizer,
            or cut without re-appending EOS).
    """
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"ids must be an (N, T) integer tensor, got {tuple(ids.shape)} {ids.dtype}"
        )
    is_eos = ids == eos_id
    has_eos = is_eos.any(dim=1)
    if not bool(has_eos.all()):
        rows = (~has_eos).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} of ids contain no EOS (id {eos_id}); L is undefined")
    # argmax returns the first maximal index: the first EOS.
    return is_eos.to(torch.uint8).argmax(dim=1).to(torch.int64) + 1


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str]) -> Encoded:
    """Tokenize prompts the way diffusers' pipelines do, and report L, truncation and tokens.

    ``input_ids`` come from the same call the pipelines make (``padding="max_length"``,
    ``max_length=tokenizer.model_max_length``, ``truncation=True``), so positions here are the
    keys the UNet attends over. Truncation is reported rather than hidden (docs/method.md §1).

    Args:
        tokenizer: a CLIP tokenizer, e.g. :func:`clip_tokenizer` or ``pipe.tokenizer``.
        prompts: one prompt or a list.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    max_length = int(tokenizer.model_max_length)
    if max_length > 1024:  # transformers' "unset" sentinel is ~1e30
        raise ValueError(
            "tokenizer.model_max_length is unset; build the tokenizer with model_max_length=77"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; L (index of first EOS + 1) is undefined")
    batch = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )
    input_ids = batch.input_ids.to(torch.int64)
    # Second pass without specials or truncation: the true piece count. verbose=False silences
    # the "sequence longer than the maximum" warning, which is exactly what we are measuring.
    pieces = tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids
    num_pieces = [len(p) for p in pieces]
    truncated = [n > max_length - 2 for n in num_pieces]

    unique = sorted(set(input_ids.flatten().tolist()))
    text = {
        i: _piece_text(t)
        for i, t in zip(unique, tokenizer.convert_ids_to_tokens(unique), strict=True)
    }
    tokens = [[text[i] for i in row] for row in input_ids.tolist()]
    return Encoded(
        input_ids=input_ids,
        lengths=lengths_from_ids(input_ids, tokenizer.eos_token_id),
        truncated=truncated,
        num_pieces=num_pieces,
        tokens=tokens,
    )
