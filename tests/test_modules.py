"""Our text encoder, UNet and VAE against transformers/diffusers built from the same CompVis weights.

Tolerance everywhere: max |ours - ref| <= 1e-4 * max |ref| (fp32, CPU).
"""

from __future__ import annotations

import gc

import pytest
import torch

from bench import reference
from stable_diffusion.clip import FrozenCLIPEmbedder
from stable_diffusion.config import TINY, V1_5
from stable_diffusion.model import COMPONENT_PREFIXES
from stable_diffusion.tokenizer import CLIPTokenizer
from stable_diffusion.unet import UNetModel
from stable_diffusion.vae import AutoencoderKL
from tests.conftest import assert_close

PROMPTS = ["a photograph of an astronaut riding a horse", "", "two red cubes on a blue table, studio light"]


def prefixed(module: torch.nn.Module, component: str) -> dict[str, torch.Tensor]:
    return {COMPONENT_PREFIXES[component] + k: v for k, v in module.state_dict().items()}


def test_tiny_text_encoder(tiny_model, tiny_state_dict):
    ref = reference.transformers_clip(TINY, tiny_state_dict)
    ids = CLIPTokenizer()(PROMPTS)
    with torch.no_grad():
        assert_close(tiny_model.text_encoder(ids), ref(ids).last_hidden_state)


@pytest.mark.parametrize("t", [0, 1, 999])
def test_tiny_unet(tiny_model, tiny_state_dict, t):
    ref = reference.diffusers_unet(TINY, tiny_state_dict)
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(2, 4, 8, 16, generator=gen)
    ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=gen)
    with torch.no_grad():
        assert_close(tiny_model.unet(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample)
        ts = torch.tensor([3, 700])  # one timestep per batch item
        assert_close(tiny_model.unet(x, ts, ctx), ref(x, ts, encoder_hidden_states=ctx).sample)


def test_tiny_vae(tiny_model, tiny_state_dict):
    ref = reference.diffusers_vae(TINY, tiny_state_dict)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 48, generator=gen) * 2 - 1
    z = torch.randn(2, 4, 16, 12, generator=gen)
    with torch.no_grad():
        mean, std = tiny_model.vae.encode(image)
        dist = ref.encode(image).latent_dist
        assert_close(mean, dist.mean)
        assert_close(std, dist.std)
        assert_close(tiny_model.vae.decode(z), ref.decode(z).sample)


def test_v15_text_encoder():
    torch.manual_seed(0)
    ours = FrozenCLIPEmbedder(V1_5.clip).eval()
    ref = reference.transformers_clip(V1_5, prefixed(ours, "clip"))
    ids = CLIPTokenizer()(PROMPTS)
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).last_hidden_state)


def test_v15_unet_32x32_latents():
    torch.manual_seed(0)
    ours = UNetModel(V1_5.unet).eval()
    ref = reference.diffusers_unet(V1_5, prefixed(ours, "unet"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=gen)
    ctx = torch.randn(1, 77, 768, generator=gen)
    with torch.no_grad():
        assert_close(ours(x, 500, ctx), ref(x, 500, encoder_hidden_states=ctx).sample)
    del ours, ref
    gc.collect()


def test_v15_vae_decoder_32x32_latent():
    torch.manual_seed(0)
    ours = AutoencoderKL(V1_5.vae).eval()
    ref = reference.diffusers_vae(V1_5, prefixed(ours, "vae"))
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours.decode(z), ref.decode(z).sample)
