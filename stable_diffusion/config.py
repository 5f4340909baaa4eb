"""Model configs as small dataclasses. A preset fully determines every module shape.

`v1-5` is the real Stable Diffusion v1 architecture (as in CompVis' v1-inference.yaml); `tiny` is the
same family shrunk so that a 64x64 image samples in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class CLIPConfig:
    """CLIP ViT-L/14 text tower (quick-GELU, causal mask, 77 positions)."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    eps: float = 1e-5


@dataclass(frozen=True)
class VAEConfig:
    """KL autoencoder (CompVis `ddconfig`)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """CompVis `openaimodel.UNetModel` parameters. attention_resolutions are downsample factors."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    context_dim: int = 768
    transformer_depth: int = 1
    groups: int = 32


@dataclass(frozen=True)
class SDConfig:
    """A whole latent diffusion model: text encoder, VAE, UNet and the v1 noise schedule."""

    name: str
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scale_factor: float = 0.18215
    resolution: int = 512
    # v1 noise schedule: scaled_linear betas, 1000 training steps
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.clip.width != self.unet.context_dim:
            raise ConfigError(f"{self.name}: text width {self.clip.width} != UNet context_dim {self.unet.context_dim}")
        if self.vae.z_channels != self.unet.in_channels:
            raise ConfigError(f"{self.name}: VAE z_channels must equal UNet in_channels")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_ldm_config(self) -> dict:
        """The CompVis `v1-inference.yaml` equivalent, for third-party converters (diffusers)."""
        u, v = self.unet, self.vae
        return {
            "model": {
                "params": {
                    "linear_start": self.beta_start,
                    "linear_end": self.beta_end,
                    "timesteps": self.num_train_timesteps,
                    "scale_factor": self.scale_factor,
                    "unet_config": {
                        "params": {
                            "image_size": self.resolution // v.downsample,
                            "in_channels": u.in_channels,
                            "out_channels": u.out_channels,
                            "model_channels": u.model_channels,
                            "attention_resolutions": list(u.attention_resolutions),
                            "num_res_blocks": u.num_res_blocks,
                            "channel_mult": list(u.channel_mult),
                            "num_heads": u.num_heads,
                            "transformer_depth": u.transformer_depth,
                            "context_dim": u.context_dim,
                            "use_linear_in_transformer": False,
                        }
                    },
                    "first_stage_config": {
                        "params": {
                            "embed_dim": v.z_channels,
                            "ddconfig": {
                                "double_z": True,
                                "z_channels": v.z_channels,
                                "resolution": self.resolution,
                                "in_channels": v.in_channels,
                                "out_ch": v.out_ch,
                                "ch": v.ch,
                                "ch_mult": list(v.ch_mult),
                                "num_res_blocks": v.num_res_blocks,
                                "attn_resolutions": [],
                                "dropout": 0.0,
                            },
                        }
                    },
                }
            }
        }


V1_5 = SDConfig(name="v1-5")

TINY = SDConfig(
    name="tiny",
    clip=CLIPConfig(width=64, layers=2, heads=2),
    # 8 groups (4 channels each, as in v1): with 32 groups of one channel, GroupNorm erases absolute colour
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, groups=8),
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 1),
        num_heads=4,
        context_dim=64,
        groups=8,
    ),
    resolution=64,
)

PRESETS: dict[str, SDConfig] = {c.name: c for c in (V1_5, TINY)}


def get_config(name: str) -> SDConfig:
    """Look up a preset by name, failing with the list of valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; choose one of: {', '.join(PRESETS)}") from None
