"""Block removal in the style of BK-SDM, generalised to any UNet depth, and depthwise-separable convs.

BK-SDM (Kim et al. 2023) removes from SD v1.4: one ResBlock+transformer pair of every down level and of
every up level (`bk-base`), then also the middle block (`bk-small`), then also the innermost level
(`bk-tiny`). Generalised: `bk-base` keeps num_res_blocks - 1 pairs per down level and that many + the last
one per up level (a UNet with one pair per level, like `tiny`, keeps it: bk-base is then unsupported, and
bk-small / bk-tiny only drop the middle block / innermost level). The up level's last block is kept (its
middle one dropped) because it takes the skip from the level above, with that level's channel count:
keeping the first blocks would not fit (so the issue's "third of each up level" cannot be the one
dropped). The result is exactly the preset's UNet with num_res_blocks - 1, so it saves and loads like one.
`bk-tiny` drops the innermost level's blocks and the downsample into it, and needs the two innermost levels
to have the same width (true for v1 and tiny). Presets a UNet cannot take say why (`unsupported`).
"""

from __future__ import annotations

import torch
from torch import nn

from stable_diffusion.config import UNetConfig
from stable_diffusion.unet import TimestepEmbedSequential, UNetModel
from stable_diffusion.unet_arch import SeparableConv2d, with_config

PRESETS = {"bk-base": (True, False, False), "bk-small": (True, True, False), "bk-tiny": (True, True, True)}


def _plan(cfg: UNetConfig, preset: str) -> tuple[int, int, bool]:
    """(ResBlocks per level, levels, keep middle) after `preset`; one pair per level goes only if 2+ are there."""
    fewer, no_mid, no_inner = PRESETS[preset]
    n = cfg.num_res_blocks - (fewer and cfg.num_res_blocks > 1)
    return n, len(cfg.channel_mult) - no_inner, not no_mid


def unsupported(cfg: UNetConfig, preset: str) -> str | None:
    """Why `preset` cannot be applied to a UNet of this layout (None if it can)."""
    n, levels, _ = _plan(cfg, preset)
    if preset == "bk-base" and n == cfg.num_res_blocks:
        return "bk-base drops one of 2+ ResBlocks per level; this UNet has 1 (bk-small/bk-tiny still apply)"
    if levels < len(cfg.channel_mult) and (levels < 2 or cfg.channel_mult[-1] != cfg.channel_mult[-2]):
        return f"{preset} drops the innermost level, which needs its width to equal the next one's"
    return None


def remove_blocks(unet: UNetModel, preset: str) -> UNetModel:
    """The UNet of `preset` made of `unet`'s kept blocks (their trained weights; nothing re-initialised)."""
    cfg = unet.cfg
    if reason := unsupported(cfg, preset):
        raise ValueError(reason)
    n, levels, mid = _plan(cfg, preset)
    nrb, total = cfg.num_res_blocks, len(cfg.channel_mult)
    keep_in, i = [0], 1
    for level in range(total):
        keep_in += [i + j for j in range(nrb) if level < levels and j < n]
        i += nrb
        if level != total - 1:
            if level < levels - 1:
                keep_in.append(i)  # the downsample into a kept level
            i += 1
    keep_out, i = [], 0
    for level in reversed(range(total)):
        keep_out += [i + j for j in range(nrb + 1) if level < levels and (j < n or j == nrb)]
        i += nrb + 1
    unet.input_blocks = nn.ModuleList(unet.input_blocks[k] for k in keep_in)
    unet.output_blocks = nn.ModuleList(unet.output_blocks[k] for k in keep_out)
    if not mid:
        unet.middle_block = TimestepEmbedSequential([])
    with_config(unet, num_res_blocks=n, channel_mult=cfg.channel_mult[:levels])
    with torch.device("meta"):
        ref = UNetModel(unet.cfg).state_dict()
    got = unet.state_dict()
    bad = [k for k in got if k not in ref or ref[k].shape != got[k].shape]
    if bad:
        raise RuntimeError(f"{preset}: kept blocks do not fit the reduced layout ({', '.join(bad[:3])})")
    return unet


def make_separable(unet: nn.Module, rank: int = 1) -> list[str]:
    """Replace every 3x3 conv between the stem and the output conv by a low-rank-fitted separable one."""
    stem, out = unet.input_blocks[0][0], unet.out[-1]
    names = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1 and m not in (stem, out)
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, SeparableConv2d.fit(unet.get_submodule(name), rank))
    return names
