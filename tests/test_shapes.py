"""The procedural shapes dataset: determinism, captions <-> labels, held-out split."""

from __future__ import annotations

import numpy as np
import pytest

from stable_diffusion.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    VOCAB,
    ShapesDataset,
    caption_of,
    captions,
    pairs,
    parse_caption,
    sample_labels,
)


def test_sample_is_a_pure_function_of_seed_and_index():
    a, b = ShapesDataset("train", seed=3), ShapesDataset("train", seed=3)
    for i in (0, 1, 17, 999_999):
        img_a, cap_a, lab_a = a[i]
        img_b, cap_b, lab_b = b[i]
        assert img_a.tobytes() == img_b.tobytes() and cap_a == cap_b and lab_a == lab_b
    # order of access does not matter
    assert a[5][0].tobytes() == ShapesDataset("train", seed=3)[5][0].tobytes()


def test_different_seed_or_index_differs():
    imgs0 = [ShapesDataset("train", 0)[i][0].tobytes() for i in range(8)]
    imgs1 = [ShapesDataset("train", 1)[i][0].tobytes() for i in range(8)]
    assert all(x != y for x, y in zip(imgs0, imgs1, strict=True))
    assert len(set(imgs0)) == 8


def test_image_format_and_size():
    img = ShapesDataset("heldout", 0)[0][0]
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert ShapesDataset("train", 0, size=32)[0][0].shape == (32, 32, 3)
    with pytest.raises(ValueError):
        ShapesDataset("test", 0)
    with pytest.raises(IndexError):
        ShapesDataset("train", 0)[-1]


def test_captions_agree_with_labels():
    ds = ShapesDataset("train", 0)
    for i in range(200):
        _, cap, labels = ds[i]
        assert cap == caption_of(labels)
        assert parse_caption(cap) == labels
        assert set(labels) == set(VOCAB) and all(labels[k] in VOCAB[k] for k in VOCAB)
        assert labels["colour"] != labels["background"]
    assert captions("train", 5, seed=0) == [ds[i][1] for i in range(5)]
    assert parse_caption("a photo of a cat") is None


def test_pixels_show_the_named_colours():
    """The background colour fills the corners' majority; the shape colour is present in the image."""
    ds = ShapesDataset("train", 0)
    for i in range(40):
        img, _, labels = ds[i]
        px = img.reshape(-1, 3).astype(int)
        bg = np.array(BACKGROUNDS[labels["background"]])
        fg = np.array(COLOURS[labels["colour"]])
        assert (np.abs(px - bg).sum(1) < 10).mean() > 0.5
        assert (np.abs(px - fg).sum(1) < 10).sum() >= 20


def test_heldout_pairs_never_in_train():
    assert set(pairs("heldout")) == set(HELDOUT_PAIRS)
    assert not set(pairs("train")) & HELDOUT_PAIRS
    seen = {
        (lab["shape"], lab["colour"]) for lab in (sample_labels("train", s, i) for s in (0, 1) for i in range(3000))
    }
    assert not seen & HELDOUT_PAIRS
    assert len(seen) == len(pairs("train"))  # every training pair does occur
    held = {(lab["shape"], lab["colour"]) for lab in (sample_labels("heldout", 0, i) for i in range(500))}
    assert held == set(HELDOUT_PAIRS)
