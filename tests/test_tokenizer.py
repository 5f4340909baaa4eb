"""Our hand-written CLIP tokenizer must give the same ids as transformers' CLIPTokenizer (used by diffusers)."""

from __future__ import annotations

import csv
import gzip
import json
import logging
from pathlib import Path

import pytest
import torch

from stable_diffusion.tokenizer import CLIPTokenizer

DATA = Path(__file__).resolve().parent.parent / "data"
HF_DIR = DATA / "clip_tokenizer"

LONG_PROMPT = ", ".join(f"a highly detailed painting of castle number {i}" for i in range(20))
EDGE_CASES = [
    "",
    " ",
    LONG_PROMPT,
    "café, naïve façade, Ångström, Σίσυφος ΟΔΟΣ, İstanbul, straße",
    "e\u0301 (combining accent), ﬁ ligature, full-width ＡＢＣ",
    "a cat 😀👍🏽 🇫🇷 on a mat 🐈‍⬛",
    "日本語のテキスト and 中文",
    "  lots   of\n\nwhite\tspace\r\n and\u00a0nbsp\u2003em  ",
    "\u200bzero width\x1cfile separator",
    "A PHOTO OF A CAT, Mixed CaSe",
    "&amp; &lt;b&gt; &#39;html&#39; entities",
    "pi is 3.14, 1,000,000 people, 42nd street, 1/2 cup",
    "don't, it's, we'll, they're, I've, I'm, he'd, DON'T, it''s, rock 'n' roll",
    "punctuation!!! ... ?!? -- (brackets) [x] {y} #hashtag @user",
    "a <|endoftext|> b<|startoftext|>c",
    "<|ENDOFTEXT|> <|StartOfText|>'s",
]


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    # transformers 5 silently ignores `vocab_file=`; the files must be passed as `vocab=`/`merges=`.
    return transformers.CLIPTokenizer(
        vocab=str(HF_DIR / "vocab.json"), merges=str(HF_DIR / "merges.txt"), model_max_length=77
    )


def reference_ids(reference, texts: list[str], batch: int = 4096) -> torch.Tensor:
    chunks = [
        reference(
            texts[i : i + batch], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        for i in range(0, len(texts), batch)
    ]
    return torch.cat(chunks)


def assert_same_ids(ours: CLIPTokenizer, reference, texts: list[str]) -> None:
    got, want = ours(texts), reference_ids(reference, texts)
    assert got.dtype == torch.int64 and got.shape == want.shape == (len(texts), 77)
    bad = (got != want).any(dim=1).nonzero().flatten().tolist()
    details = [f"{texts[i]!r}: ours {got[i].tolist()} vs ref {want[i].tolist()}" for i in bad[:5]]
    assert not bad, f"{len(bad)}/{len(texts)} mismatches, first ones:\n" + "\n".join(details)


def test_partiprompts_match_transformers(ours, reference):
    with open(DATA / "prompts" / "PartiPrompts.tsv", encoding="utf-8", newline="") as f:
        prompts = [row["Prompt"] for row in csv.DictReader(f, delimiter="\t")]
    assert len(prompts) > 1000
    assert_same_ids(ours, reference, prompts)


def test_coco_captions_match_transformers(ours, reference):
    with gzip.open(DATA / "coco" / "captions_val2017.json.gz", "rt", encoding="utf-8") as f:
        captions = [a["caption"] for a in json.load(f)["annotations"]]
    assert len(captions) > 20000
    assert_same_ids(ours, reference, captions)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_transformers(ours, reference, text):
    assert_same_ids(ours, reference, [text])
    want = reference(text).input_ids  # untruncated: encode() must not truncate
    assert [ours.bos_id, *ours.encode(text), ours.eos_id] == want


def test_truncation_warns_once_with_dropped_text(ours, reference, caplog):
    assert len(ours.encode(LONG_PROMPT)) > 75
    with caplog.at_level(logging.WARNING, logger="stable_diffusion.tokenizer"):
        ids = ours([LONG_PROMPT, "a short one", LONG_PROMPT])
    assert torch.equal(ids, reference_ids(reference, [LONG_PROMPT, "a short one", LONG_PROMPT]))
    assert ids[0, 0] == ours.bos_id and ids[0, -1] == ours.eos_id
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in message
    assert message.endswith("painting of castle number 1 9")  # the dropped tail (digits are single tokens)
    assert message.count("castle number 1 9") == 2  # both truncated prompts are named in the one warning


def test_no_warning_without_truncation(ours, caplog):
    with caplog.at_level(logging.WARNING, logger="stable_diffusion.tokenizer"):
        ours(["a photo of a cat", ""])
    assert not caplog.records


def test_known_vocab_ids(ours):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (49406, 49407, 49407)
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]  # a</w> photo</w> of</w> a</w> cat</w>
    ids = ours("a photo of a cat")
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == ours.pad_id).all()
    assert ours("").tolist()[0][:3] == [49406, 49407, 49407]


def test_short_max_length_and_explicit_path(ours):
    tok = CLIPTokenizer(HF_DIR / "bpe_simple_vocab_16e6.txt.gz", max_length=4)
    assert tok("a photo of a cat").tolist() == [[49406, 320, 1125, 49407]]
