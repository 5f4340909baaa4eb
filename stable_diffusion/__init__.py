"""Stable Diffusion v1 written from scratch: CLIP text encoder, KL-VAE, UNet, samplers, pipeline."""

from .config import PRESETS, TINY, V1_5, SDConfig, get_config
from .errors import CheckpointError, ConfigError, InputError, SDBenchError

__all__ = [
    "PRESETS",
    "TINY",
    "V1_5",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "SDBenchError",
    "SDConfig",
    "get_config",
]
