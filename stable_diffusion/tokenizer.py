"""CLIP byte-level BPE tokenizer, as used to condition Stable Diffusion v1, written from scratch.

It reproduces transformers' `CLIPTokenizer` (tokenizers-backed), which is what the diffusers SD v1 pipeline
uses. That differs from OpenAI's original `simple_tokenizer.py` in how text is cleaned: there is no
`ftfy.fix_text` and no `html.unescape` (so "&amp;" stays "&amp;"), only NFC + whitespace collapsing +
per-character lowercasing. We follow transformers.
"""

from __future__ import annotations

import gzip
import logging
import unicodedata
from collections.abc import Sequence
from functools import cached_property, lru_cache
from itertools import pairwise
from pathlib import Path

import regex
import torch

from .errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_BPE_PATH = Path(__file__).resolve().parent.parent / "data" / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges: 512 byte symbols + merges + 2 specials = 49,408 ids
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

# Special tokens are matched on the raw text, before normalization (tokenizers' "added tokens").
_SPECIAL_RE = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_SPACE_RE = regex.compile(r"\s+")  # Unicode White_Space, as in tokenizers' Oniguruma regex
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, so BPE symbols never contain whitespace/control bytes.

    Insertion order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def normalize(text: str) -> str:
    """NFC, collapse whitespace runs to one space, then lowercase (the tokenizers normalizer of CLIP).

    Lowercasing is per character like Rust's: `str.lower()` maps a word-final capital sigma to the final form,
    tokenizers to the ordinary small sigma (different token ids).
    """
    text = _SPACE_RE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


class CLIPTokenizer:
    """Text -> CLIP token ids: `encode` for raw BPE ids, calling it for padded [B, max_length] model input."""

    bos_id: int = 49406  # <|startoftext|>
    eos_id: int = 49407  # <|endoftext|>
    pad_id: int = 49407  # SD v1 pads with <|endoftext|>, not with a dedicated pad token

    def __init__(self, bpe_path: str | Path | None = None, max_length: int = 77) -> None:
        if max_length < 2:
            raise ConfigError(f"max_length must leave room for <|startoftext|> and <|endoftext|>, got {max_length}")
        self.bpe_path = Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        self.max_length = max_length
        self._cache: dict[str, list[int]] = {}  # byte-encoded word -> ids

    @cached_property
    def _vocab(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """Read the merges file once, on first use: (symbol -> id, merge pair -> rank)."""
        with gzip.open(self.bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
        symbols = list(bytes_to_unicode().values())
        symbols += [s + "</w>" for s in symbols]
        symbols += ["".join(pair) for pair in merges]
        symbols += SPECIAL_TOKENS
        encoder = {s: i for i, s in enumerate(symbols)}
        if (encoder["<|startoftext|>"], encoder["<|endoftext|>"]) != (self.bos_id, self.eos_id):
            raise ConfigError(f"{self.bpe_path} is not the CLIP BPE vocabulary ({len(encoder)} symbols)")
        return encoder, {pair: rank for rank, pair in enumerate(merges)}

    @cached_property
    def _decoder(self) -> dict[int, str]:
        return {i: s for s, i in self._vocab[0].items()}

    def _bpe(self, word: str) -> list[int]:
        """Apply the lowest-ranked merge until none applies; the word's last symbol carries the `</w>` marker."""
        if (cached := self._cache.get(word)) is not None:
            return cached
        encoder, ranks = self._vocab
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(pairwise(parts), key=lambda pair: ranks.get(pair, NUM_MERGES))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = self._cache[word] = [encoder[p] for p in parts]
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without <|startoftext|>/<|endoftext|> framing and without truncation."""
        encoder = self._vocab[0]
        byte_map = bytes_to_unicode()
        ids: list[int] = []
        for segment in _SPECIAL_RE.split(text):  # the capture group keeps exact special tokens as segments
            if segment in SPECIAL_TOKENS:
                ids.append(encoder[segment])
                continue
            for word in _WORD_RE.findall(normalize(segment)):
                # A special token that only matches after lowercasing ("<|ENDOFTEXT|>") is not special; the
                # tokenizers ByteLevel step then re-splits it GPT-2 style. Every other word stays whole there.
                pieces = ("<|", word[2:-2], "|>") if word in SPECIAL_TOKENS else (word,)
                for piece in pieces:
                    ids += self._bpe("".join(byte_map[b] for b in piece.encode("utf-8")))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text (lowercased, whitespace normalized); used to report truncated text."""
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        text = "".join(self._decoder[i] for i in ids)  # special tokens are plain ASCII, they decode as written
        words = (bytes(byte_of[c] for c in w).decode("utf-8", errors="replace") for w in text.split("</w>"))
        return " ".join(words).strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """int64 [B, max_length] of <|startoftext|> + ids + <|endoftext|>, padded with pad_id.

        Like transformers with truncation=True, the content is cut to max_length - 2 and both markers are kept.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.int64)
        keep = self.max_length - 2
        dropped = []
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > keep:
                dropped.append(self.decode(ids[keep:]))
            ids = [self.bos_id, *ids[:keep], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        if dropped:
            logger.warning(
                "The following part of your input was truncated because CLIP can only handle sequences up to"
                " %d tokens: %s",
                self.max_length,
                " | ".join(dropped),
            )
        return out
