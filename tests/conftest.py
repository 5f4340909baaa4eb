"""Shared fixtures: the tiny preset with seeded random weights, as a model and as a CompVis state dict."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch

from stable_diffusion.config import TINY
from stable_diffusion.model import LatentDiffusion, init_weights

torch.set_num_threads(2)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """The project's parity tolerance: max |ours - ref| <= rel * max |ref|."""
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * scale, f"max|diff| {err:.3g} > {rel:g} * max|ref| {scale:.3g}"


@pytest.fixture(scope="session")
def tiny_model() -> LatentDiffusion:
    return init_weights(LatentDiffusion(TINY), seed=0).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_state_dict(tiny_model: LatentDiffusion) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many small tiny-model calls: one thread is several times faster than two on a loaded,
    shared CPU (two threads mostly wait for each other). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


# A tiny open_clip architecture with seeded weights: a stand-in CLIP for metric and protocol tests.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    (folder / "sdbench-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "sdbench-tiny-clip.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = open_clip.create_model("sdbench-tiny-clip", force_quick_gelu=True).state_dict()
        # Share a dominant direction between the towers so every cosine is positive (torchmetrics clamps the
        # mean at 0; random towers would make that clamp, not the math, decide the comparison).
        bias = 3 * torch.randn(32)
        state["ln_final.bias"], state["visual.ln_post.bias"] = bias, bias.clone()
        state["text_projection"] = state["visual.proj"].clone()
    path = folder / "tiny-clip.pt"
    torch.save(state, path)
    return path
