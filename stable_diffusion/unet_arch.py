"""Architecture records for UNets whose shapes no longer match a preset (structured compression).

A structurally compressed UNet (pruned channels / heads / FFN units, removed blocks, depthwise-separable convs)
is saved in the CompVis key layout with an `sdbench_arch` JSON record in the safetensors metadata: the block
layout (a `UNetConfig`, whether the middle block is kept), the attention head count of every attention whose
heads were pruned, and which convs are depthwise-separable. Every width is then inferred from the file's
tensor shapes, so the record stays small and cannot disagree with the weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from .config import UNetConfig
from .errors import CheckpointError
from .unet import CrossAttention, TimestepEmbedSequential, UNetModel

ARCH_KEY = "sdbench_arch"


class SeparableConv2d(nn.Sequential):
    """Depthwise kxk conv (`rank` filters per input channel) then a pointwise 1x1 conv: `.0` and `.1` keys."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, rank: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cin * rank, kernel, stride=stride, padding=padding, groups=cin, bias=False),
            nn.Conv2d(cin * rank, cout, 1),
        )

    @classmethod
    def fit(cls, conv: nn.Conv2d, rank: int = 1) -> SeparableConv2d:
        """Low-rank fit of a dense conv: per input channel i, W[:, i] (cout x k*k) ~ its best rank-`rank` SVD."""
        cout, cin, kh, kw = conv.weight.shape
        sep = cls(cin, cout, kh, conv.stride[0], conv.padding[0], rank).to(conv.weight.device)
        w = conv.weight.detach().float().permute(1, 0, 2, 3).reshape(cin, cout, kh * kw)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # [cin, cout, r], [cin, r], [cin, r, k*k]
        r = min(rank, s.shape[1])
        depth = torch.zeros(cin, rank, kh * kw)
        point = torch.zeros(cout, cin, rank)
        depth[:, :r] = vh[:, :r]
        point[:, :, :r] = (u[:, :, :r] * s[:, None, :r]).permute(1, 0, 2)
        with torch.no_grad():
            sep[0].weight.copy_(depth.reshape(cin * rank, 1, kh, kw))
            sep[1].weight.copy_(point.reshape(cout, cin * rank, 1, 1))
            sep[1].bias.copy_(conv.bias if conv.bias is not None else torch.zeros(cout))
        return sep


def arch_record(unet: UNetModel) -> dict[str, Any]:
    """What `unet_from_weights` needs beyond the tensor shapes to rebuild `unet`."""
    cfg = unet.cfg
    return {
        "unet": asdict(cfg),
        "mid": len(unet.middle_block) > 0,
        "heads": {
            n: m.heads for n, m in unet.named_modules() if isinstance(m, CrossAttention) and m.heads != cfg.num_heads
        },
        "separable": {
            n: m[0].out_channels // m[0].in_channels for n, m in unet.named_modules() if isinstance(m, SeparableConv2d)
        },
    }


def config_from_record(record: dict[str, Any]) -> UNetConfig:
    fields = dict(record["unet"])
    for k in ("channel_mult", "attention_resolutions"):
        fields[k] = tuple(fields[k])
    return UNetConfig(**fields)


def skeleton(record: dict[str, Any]) -> UNetModel:
    """The block layout of a record on the meta device, at preset widths (shapes are fixed by `fit_shapes`)."""
    with torch.device("meta"):
        unet = UNetModel(config_from_record(record))
        if not record.get("mid", True):
            unet.middle_block = TimestepEmbedSequential([])
        for name, rank in record.get("separable", {}).items():
            conv = unet.get_submodule(name)
            parent, _, child = name.rpartition(".")
            sep = SeparableConv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0], rank
            )
            setattr(unet.get_submodule(parent), child, sep)
    for name, heads in record.get("heads", {}).items():
        unet.get_submodule(name).heads = int(heads)
    return unet


def _resized(m: nn.Module, shapes: dict[str, torch.Size]) -> nn.Module | None:
    """A copy of layer `m` with the parameter shapes of the file (None when they already agree)."""
    w = shapes.get("weight")
    if w is None or w == m.weight.shape:
        return None
    bias = "bias" in shapes
    with torch.device("meta"):
        if isinstance(m, nn.Conv2d):
            groups = m.groups if m.groups == 1 else w[0] // (m.out_channels // m.groups)
            return nn.Conv2d(w[1] * groups, w[0], m.kernel_size, m.stride, m.padding, groups=groups, bias=bias)
        if isinstance(m, nn.Linear):
            return nn.Linear(w[1], w[0], bias=bias)
        if isinstance(m, nn.GroupNorm):
            return nn.GroupNorm(m.num_groups, w[0], eps=m.eps)
        if isinstance(m, nn.LayerNorm):
            return nn.LayerNorm(w[0], eps=m.eps)
    raise CheckpointError(f"cannot infer the shape of a {type(m).__name__} from the file")


def fit_shapes(unet: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Replace every layer whose parameter shapes differ from the file's with one of the file's shapes."""
    by_module: dict[str, dict[str, torch.Size]] = {}
    for key, v in weights.items():
        mod, _, leaf = key.rpartition(".")
        by_module.setdefault(mod, {})[leaf] = v.shape
    for name, m in list(unet.named_modules()):
        if name not in by_module or not isinstance(m, nn.Conv2d | nn.Linear | nn.GroupNorm | nn.LayerNorm):
            continue
        new = _resized(m, by_module[name])
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, new)


def unet_from_weights(weights: dict[str, torch.Tensor], record: dict[str, Any]) -> UNetModel:
    """Build the UNet a record describes with the shapes of `weights` (UNet-relative keys), strictly loaded."""
    unet = skeleton(record)
    fit_shapes(unet, weights)
    unet.load_state_dict(weights, strict=True, assign=True)
    return unet


def with_config(unet: UNetModel, **changes: Any) -> UNetModel:
    """Record a changed block layout (e.g. fewer ResBlocks per level) on the module."""
    unet.cfg = replace(unet.cfg, **changes)
    return unet


def encode_record(unet: UNetModel) -> str:
    return json.dumps(arch_record(unet), sort_keys=True)


def is_preset_shaped(unet: nn.Module) -> bool:
    """True when `unet` has exactly the shapes its config builds (no record needed to load it)."""
    cfg = getattr(unet, "cfg", None)
    if not isinstance(unet, UNetModel) or cfg is None:
        return False
    with torch.device("meta"):
        ref = UNetModel(cfg).state_dict()
    sd = unet.state_dict()
    return set(ref) == set(sd) and all(ref[k].shape == sd[k].shape for k in ref) and arch_record(unet)["heads"] == {}
