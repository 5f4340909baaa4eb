"""DeepCache-style feature caching (`bench.feature_cache`): exact at interval 1, really skips the deep blocks,
wires the shallow path right, and forgets its cache between images."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.feature_cache import CachedUNet
from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import StableDiffusion

PROMPT = "two small blue squares on a black background, left"
pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(model, unet=None, **kw):
    sd = StableDiffusion(model)
    old = model.swap_unet(unet) if unet is not None else None
    try:
        return sd(PROMPT, steps=6, sampler="ddim", guidance=7.5, seed=3, progress=False, **kw)
    finally:
        if old is not None:
            model.swap_unet(old)


def _inputs(model, batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, generator=gen)
    ctx = torch.randn(batch, 77, model.cfg.unet.context_dim, generator=gen)
    return x, torch.tensor(500), ctx


def test_interval_one_is_the_plain_sampler_bit_for_bit(tiny_model):
    plain = _generate(tiny_model)
    cached = _generate(tiny_model, CachedUNet(tiny_model.unet, interval=1, depth=1))
    assert torch.equal(plain.latents, cached.latents)
    assert torch.equal(plain.pixels, cached.pixels)


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_shallow_call_on_the_same_input_equals_the_full_call(tiny_model, depth):
    """Deep features cached from the very same input: the shallow path must rebuild the full output exactly."""
    m = CachedUNet(tiny_model.unet, interval=2, depth=depth)
    x, t, ctx = _inputs(tiny_model)
    with torch.no_grad():
        full, shallow = m(x, t, ctx), m(x, t, ctx)
        plain = tiny_model.unet(x, t, ctx)
    assert (m.full_calls, m.shallow_calls) == (1, 1)
    assert torch.equal(full, plain) and torch.equal(shallow, plain)


def test_shallow_path_skips_the_deep_blocks(tiny_model):
    unet = copy.deepcopy(tiny_model.unet)
    depth, n_in = 1, len(unet.input_blocks)
    counts = {"first": 0, "deep_in": 0, "middle": 0, "deep_out": 0, "last": 0}

    def counter(key):
        def hook(*_):
            counts[key] += 1

        return hook

    unet.input_blocks[0].register_forward_hook(counter("first"))
    for b in unet.input_blocks[depth:]:
        b.register_forward_hook(counter("deep_in"))
    unet.middle_block.register_forward_hook(counter("middle"))
    for b in unet.output_blocks[: len(unet.output_blocks) - depth]:
        b.register_forward_hook(counter("deep_out"))
    unet.output_blocks[-1].register_forward_hook(counter("last"))
    m = CachedUNet(unet, interval=3, depth=depth)
    x, t, ctx = _inputs(tiny_model)
    with torch.no_grad():
        for _ in range(7):  # full, shallow, shallow, full, shallow, shallow, full
            m(x, t, ctx)
    assert counts["first"] == counts["last"] == 7
    assert counts["middle"] == 3
    assert counts["deep_in"] == 3 * (n_in - depth)
    assert counts["deep_out"] == 3 * (len(unet.output_blocks) - depth)


def test_state_is_reset_between_images(tiny_model):
    """A second image after reset_sampling_state() equals that image made by a fresh cache; without reset it differs."""
    m = CachedUNet(tiny_model.unet, interval=3, depth=1)
    _generate(tiny_model, m)
    m.reset_sampling_state()
    second = _generate(tiny_model, m, negative_prompt="red")
    fresh = _generate(tiny_model, CachedUNet(tiny_model.unet, interval=3, depth=1), negative_prompt="red")
    assert torch.equal(second.latents, fresh.latents)
    m.reset_sampling_state()
    m(*_inputs(tiny_model))  # one call: the next image would start with a shallow call on stale features
    stale = _generate(tiny_model, m, negative_prompt="red")
    assert not torch.equal(stale.latents, fresh.latents)


def test_caching_changes_the_output_but_stays_close(tiny_model):
    plain = _generate(tiny_model)
    cached = _generate(tiny_model, CachedUNet(tiny_model.unet, interval=2, depth=1))
    assert not torch.equal(plain.latents, cached.latents)
    assert torch.isfinite(cached.pixels).all()


@pytest.mark.parametrize(("interval", "depth"), [(0, 1), (2, 0), (2, 7), (True, 1)])
def test_bad_settings(tiny_model, interval, depth):
    with pytest.raises(InputError):
        CachedUNet(tiny_model.unet, interval=interval, depth=depth)
