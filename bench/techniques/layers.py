"""Which UNet layers a technique works on: one definition shared by prune, quant and onnx.

`kind` selects among the Linear and Conv2d layers: all, linear, conv, or attn (the attention projections
`attn1`/`attn2` `.to_q .to_k .to_v .to_out.0`). Zero counts live here too, so sparsity is measured one way.
"""

from __future__ import annotations

import re

import torch
from torch import nn

KINDS = ["all", "linear", "conv", "attn"]
ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def linear_and_conv(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear and Conv2d of `module`, in registration order (their position seeds random scores)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def is_kind(name: str, layer: nn.Module, kind: str) -> bool:
    """Whether the Linear/Conv2d `layer` called `name` is of `kind` (one of KINDS)."""
    return {
        "all": lambda: True,
        "linear": lambda: isinstance(layer, nn.Linear),
        "conv": lambda: isinstance(layer, nn.Conv2d),
        "attn": lambda: ATTN.search(f".{name}") is not None,
    }[kind]()


def select(module: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in linear_and_conv(module) if is_kind(n, m, kind)]


def zeros(weight: torch.Tensor) -> int:
    return weight.numel() - int(torch.count_nonzero(weight))


def zero_fraction(weights: list[torch.Tensor]) -> float:
    """Measured fraction of zeros among `weights` together."""
    return sum(zeros(w) for w in weights) / sum(w.numel() for w in weights)
