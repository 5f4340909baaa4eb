"""Third-party reference models (diffusers / transformers) built from *our* CompVis-layout state dict.

The conversion uses diffusers' own single-file helpers, so a match between our modules and these models
vouches for both our maths and our checkpoint key names. Used by tests and benchmarks only.
"""

from __future__ import annotations

import torch

from stable_diffusion.config import SDConfig

CLIP_PREFIX = "cond_stage_model.transformer."


def diffusers_unet(cfg: SDConfig, state_dict: dict[str, torch.Tensor]):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(cfg.to_ldm_config(), state_dict)
    config["norm_num_groups"] = cfg.unet.groups
    model = UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint(state_dict, config), strict=True)
    return model.eval()


def diffusers_vae(cfg: SDConfig, state_dict: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(cfg.to_ldm_config(), state_dict)
    config["norm_num_groups"] = cfg.vae.groups
    model = AutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(state_dict, config), strict=True)
    return model.eval()


def transformers_clip(cfg: SDConfig, state_dict: dict[str, torch.Tensor]):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    c = cfg.clip
    config = CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.width,
        intermediate_size=c.width * c.mlp_ratio,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        max_position_embeddings=c.max_length,
        hidden_act="quick_gelu",
        layer_norm_eps=c.eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = CLIPTextModel(config)
    converted = convert_ldm_clip_checkpoint(state_dict)
    # transformers 5 keys have no `text_model.` prefix; position_ids is a buffer, not a weight.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")}
    model.load_state_dict(converted, strict=True)
    return model.eval()


def diffusers_pipeline(cfg: SDConfig, state_dict: dict[str, torch.Tensor], scheduler, tokenizer):
    """A diffusers `StableDiffusionPipeline` assembled from the same weights."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=diffusers_vae(cfg, state_dict),
        text_encoder=transformers_clip(cfg, state_dict),
        tokenizer=tokenizer,
        unet=diffusers_unet(cfg, state_dict),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
