"""Shared fixtures: the tiny preset with seeded random weights, as a model and as a CompVis state dict."""

from __future__ import annotations

import logging

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
