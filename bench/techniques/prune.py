"""Unstructured magnitude pruning of the UNet's Linear and Conv2d weights, with exact counts.

Only weights are pruned. Biases and norm parameters are left alone: an earlier study zeroed biases too,
which inflates the damage and is not what pruning papers measure. Pruning is permanent: zeros are written
into the weights and no masks, hooks or reparametrisations are left behind.

Targets (which weights compete for pruning):
  all, linear, conv   every Linear+Conv2d weight / Linear only / Conv2d only
  attn                attention projections only: attn1/attn2 `.to_q .to_k .to_v .to_out.0`
  down, mid, up       input_blocks / middle_block / output_blocks
  inner, outer        middle vs ends of the U, as small-DDPM pruning studies split it. With L =
                      len(channel_mult) resolution levels, each input/output block belongs to the level of
                      its ResBlock (the Downsample or Upsample closing a level counts with that level).
                      `inner` = blocks of the deepest ceil(L/2) levels (level >= L // 2) + middle_block;
                      `outer` = blocks of the other levels + time_embed, the stem conv (input_blocks.0) and
                      `out`. They split the layers in two. v1-5 (L=4): inner = input_blocks.7-11,
                      middle_block, output_blocks.0-5; outer = time_embed, input_blocks.0-6,
                      output_blocks.6-11, out.

Exact counts without materialising everything (the full v1-5 UNet has 860 M weights in 282 layers):
the k-th smallest score is bracketed by quantiles of a sample (z = 6 margin), one counting pass
checks that the bracket holds it (else a wider one is tried, down to "everything"), and the pruning pass
zeroes everything below the bracket and keeps the few elements inside it as candidates, of which exactly
the missing number of lowest-scored is zeroed (ties: earlier layer, then lower index). Scope `layer`
does this per layer with k = round(ratio * numel); scope `global` once over all targeted weights. Layers
are processed in cache-sized chunks on one thread: the work is memory-bound, and on a shared 2-core
machine OpenMP barriers stall more than the second thread helps.

Unstructured sparsity runs on the same dense kernels, so it does not change latency (`kernels="dense"`);
its gain is storage, measured with `save_sparse` (a bitmask plus the non-zero values per weight).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from stable_diffusion.errors import InputError

from ..calibration import Calibration
from ..cost import dense_size_bytes
from ..registry import TECHNIQUES, Axis, Column, text
from ..schema import CORE
from . import layers
from .base import Compressed, Setting, Technique, check_choice, grid

METHODS = ["l1", "random"]
SCOPES = ["layer", "global"]
TARGETS = ["all", "linear", "conv", "attn", "down", "mid", "up", "inner", "outer"]
CHUNK = 1 << 19  # elements per step: the 2 MB score buffer and its indicators stay in cache
EXACT_MAX = 1 << 18  # at most this many elements: take the exact k-th score, no sampling
SAMPLE_MIN, SAMPLE_MAX = 1 << 16, 1 << 22
Z_TRIES = (6.0, 60.0, math.inf)  # bracket margins in standard errors; inf = every element is a candidate


def parse_ratio(value: Any) -> float:
    """A pruning ratio in [0, 1): the fraction of targeted weights set to zero."""
    try:
        ratio = float(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else math.nan
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio < 1.0:
        raise InputError(f"pruning ratio must be a number in [0, 1) (0 = dense, 0.9 = 90% zeros), got {value!r}")
    return ratio


def parse_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).lstrip("-").isdigit():
        raise InputError(f"pruning seed must be an integer, got {value!r}")
    return int(value)


prunable_layers = layers.linear_and_conv  # every Linear and Conv2d weight can be pruned


def block_levels(cfg: Any) -> tuple[list[int], list[int]]:
    """Resolution level of each input block and output block (the stem, input_blocks.0, gets -1)."""
    n = len(cfg.channel_mult)
    down = [-1] + [lvl for lvl in range(n) for _ in range(cfg.num_res_blocks + (lvl != n - 1))]
    up = [lvl for lvl in reversed(range(n)) for _ in range(cfg.num_res_blocks + 1)]
    return down, up


def _is_inner(name: str, cfg: Any) -> bool:
    part, _, rest = name.partition(".")
    if part == "middle_block":
        return True
    if part not in ("input_blocks", "output_blocks"):
        return False  # time_embed, out
    down, up = block_levels(cfg)
    level = (down if part == "input_blocks" else up)[int(rest.split(".")[0])]
    return level >= len(cfg.channel_mult) // 2


def target_layers(module: nn.Module, target: str) -> list[tuple[int, str, nn.Module]]:
    """(position among all prunable layers, name, layer) of the layers `target` selects."""
    check_choice("target", target, TARGETS)
    cfg = getattr(module, "cfg", None)
    if target in ("inner", "outer") and not hasattr(cfg, "channel_mult"):
        raise InputError(f"target {target!r} needs a UNet (with .cfg); choose from: {', '.join(TARGETS[:4])}")
    keep = {
        **{kind: lambda n, m, kind=kind: layers.is_kind(n, m, kind) for kind in layers.KINDS},
        "down": lambda n, m: n.startswith("input_blocks."),
        "mid": lambda n, m: n.startswith("middle_block."),
        "up": lambda n, m: n.startswith("output_blocks."),
        "inner": lambda n, m: _is_inner(n, cfg),
        "outer": lambda n, m: not _is_inner(n, cfg),
    }[target]
    selected = [(i, n, m) for i, (n, m) in enumerate(prunable_layers(module)) if keep(n, m)]
    if not selected:
        raise InputError(f"target {target!r} selects no Linear/Conv2d layer of this module")
    return selected


class _Scores:
    """Per-element pruning scores (lower = pruned first), made chunk by chunk in reused buffers.

    Comparisons write float 0/1 indicators (`out=` float buffers): on CPU these are vectorised, while
    bool outputs and `masked_fill_` run several times slower.
    """

    def __init__(self, method: str, device: torch.device) -> None:
        self.method = method
        self.buf, self.keep, self.near = (torch.empty(CHUNK, device=device) for _ in range(3))

    def chunks(self, flat: torch.Tensor, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, scores of flat[start:start + len]); the scores view is only valid until the next step."""
        gen = torch.Generator().manual_seed(seed) if self.method == "random" else None
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start : start + CHUNK]
            out = self.buf[: part.numel()]
            if gen is not None:  # drawn on the CPU, so masks do not depend on the device
                out.copy_(torch.rand(part.numel(), generator=gen))
            elif part.dtype == torch.float32:
                torch.abs(part, out=out)
            else:
                out.copy_(part).abs_()
            yield start, out

    def every(self, flat: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """Scores of every step-th element, from step // 2 on (step 1: all of them)."""
        if self.method == "l1":
            return flat[step // 2 :: step].abs().float()
        return torch.cat([s[(step // 2 - start) % step :: step].clone() for start, s in self.chunks(flat, seed)])


def _bracket(sample: torch.Tensor, k: int, n: int, z: float, exact: bool) -> tuple[float, float]:
    """Scores (lo, hi) that hold the k-th smallest of n with z standard errors of margin on each side."""
    m = sample.numel()
    if exact:  # the sample is every score: take the k-th one
        v = sample.kthvalue(k).values.item()
        return v, v
    if math.isinf(z):
        return -math.inf, math.inf
    q = k / n
    d = z * math.sqrt(q * (1 - q) / m) + 2 / m
    lo_rank, hi_rank = math.floor((q - d) * m), math.ceil((q + d) * m)
    lo = sample.kthvalue(lo_rank).values.item() if lo_rank >= 1 else -math.inf
    hi = sample.kthvalue(hi_rank).values.item() if hi_rank <= m else math.inf
    return lo, hi


def _smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of exactly `count` lowest scores; ties go to the lower index."""
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    v = scores.kthvalue(count).values
    chosen = scores < v
    ties = (scores == v).nonzero().view(-1)[: count - int(chosen.sum())]
    chosen[ties] = True
    return chosen


def _prune_lowest(layers: list[tuple[torch.Tensor, int]], k: int, scores: _Scores) -> None:
    """Zero exactly the k lowest-scored elements over `layers` (flat weight, score seed) in place."""
    n = sum(flat.numel() for flat, _ in layers)
    if k <= 0:
        return
    # A systematic sample (step coprime to 2, 3 and 5, the factors of every row length here, so rows are
    # not sampled at the same columns); it only decides the speed, the counts below make the result exact.
    exact = n <= EXACT_MAX
    step = 1 if exact else n // min(SAMPLE_MAX, max(SAMPLE_MIN, n // 128))
    while math.gcd(step, 30) != 1:
        step += 1
    sample = torch.cat([scores.every(f, seed, step) for f, seed in layers])
    for z in Z_TRIES:
        lo, hi = _bracket(sample, k, n, z, exact)
        if exact:
            break
        n_lo = n_le = 0  # counting pass: does [lo, hi] hold the k-th score? (float sums of 0/1 are exact)
        for _, s in (c for f, seed in layers for c in scores.chunks(f, seed)):
            n_lo += int(torch.lt(s, lo, out=scores.keep[: s.numel()]).sum())
            n_le += int(torch.le(s, hi, out=scores.keep[: s.numel()]).sum())
        if n_lo <= k <= n_le:
            break
    n_lo, cand_idx, cand_scores = 0, [], []
    for flat, seed in layers:  # pruning pass: zero scores < lo, keep lo <= score <= hi as candidates
        idx_parts = []
        for start, s in scores.chunks(flat, seed):
            keep, near = scores.keep[: s.numel()], scores.near[: s.numel()]
            torch.ge(s, lo, out=keep)
            hits = torch.le(s, hi, out=near).mul_(keep).bool().nonzero().view(-1)
            idx_parts.append(hits + start)
            cand_scores.append(s[hits])
            n_lo += s.numel() - int(keep.sum())
            flat[start : start + s.numel()].mul_(keep).add_(0.0)  # + 0.0 turns the -0.0 of w * 0 into 0.0
        cand_idx.append(torch.cat(idx_parts))
    chosen = _smallest(torch.cat(cand_scores), k - n_lo)
    for (flat, _), idx, pick in zip(layers, cand_idx, chosen.split([len(i) for i in cand_idx]), strict=True):
        flat[idx[pick]] = 0


@torch.no_grad()
def prune(
    module: nn.Module, ratio: float, method: str = "l1", scope: str = "global", target: str = "all", seed: int = 0
) -> list[str]:
    """Zero round(ratio * n) targeted weights in place (n per layer, or over all of them); names them.

    Weights that are already zero score lowest and count among the pruned (so if there were more of them
    than the count, they all stay zero).

    `random` scores come from a torch.Generator seeded with seed * 1_000_003 + the layer's position, so a
    layer's mask depends on the seed only, not on the target or scope.
    """
    ratio, seed = parse_ratio(ratio), parse_seed(seed)
    check_choice("method", method, METHODS)
    check_choice("scope", scope, SCOPES)
    selected = target_layers(module, target)
    for _, _, layer in selected:
        if not layer.weight.is_contiguous():
            layer.weight.data = layer.weight.data.contiguous()
    layers = [(layer.weight.detach().view(-1), seed * 1_000_003 + pos) for pos, _, layer in selected]
    scores, threads = _Scores(method, layers[0][0].device), torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    try:
        if scope == "global":
            _prune_lowest(layers, round(ratio * sum(f.numel() for f, _ in layers)), scores)
        else:
            for flat, s in layers:
                _prune_lowest([(flat, s)], round(ratio * flat.numel()), scores)
    finally:
        torch.set_num_threads(threads)
    return [name for _, name, _ in selected]


def _encoded(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed bitmask, non-zero values) if that is smaller than the dense tensor, else None.

    The mask marks non-zero *bit patterns*, so -0.0 is kept as a value and the round trip is bit-exact.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    bits = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    nonzero = bits != 0
    count = int(nonzero.sum())
    if (flat.numel() + 7) // 8 + count * flat.element_size() >= flat.numel() * flat.element_size():
        return None
    return torch.from_numpy(np.packbits(nonzero.numpy())), flat[nonzero]


def save_sparse(unet_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors where every tensor that is mostly zeros is stored as
    `<name>::mask` (uint8, np.packbits of "non-zero", big-endian bit order) + `<name>::values` (its non-zero
    values, same dtype); the metadata key `sparse` maps those names to their shapes (JSON)."""
    sd = unet_or_state_dict.state_dict() if isinstance(unet_or_state_dict, nn.Module) else unet_or_state_dict
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in sd.items():
        enc = _encoded(t.cpu())
        if enc is None:
            tensors[name] = t.detach().cpu().contiguous()
        else:
            tensors[f"{name}::mask"], tensors[f"{name}::values"] = enc
            shapes[name] = list(t.shape)
    save_file(tensors, str(path), metadata={"format": "sdbench-sparse", "sparse": json.dumps(shapes)})


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `save_sparse` file back into a plain state dict (bit-exact)."""
    with safe_open(str(path), framework="pt") as f:
        shapes = json.loads((f.metadata() or {}).get("sparse", "{}"))
        raw = {k: f.get_tensor(k) for k in f.keys()}
    sd = {k: v for k, v in raw.items() if "::" not in k}
    for name, shape in shapes.items():
        values = raw[f"{name}::values"]
        numel = math.prod(shape)
        nonzero = torch.from_numpy(np.unpackbits(raw[f"{name}::mask"].numpy(), count=numel).astype(bool))
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[nonzero] = values
        sd[name] = dense.view(shape)
    return sd


def measure(unet: nn.Module, targeted: list[str]) -> dict[str, Any]:
    """Recounted row fields: sparsity of the targeted weights and of all UNet Linear/Conv2d weights, parameter
    counts, `pruned_layers` (targeted layers holding a zero) and sizes: the plain safetensors file (computed)
    and the `save_sparse` file (written to a temporary folder and deleted)."""
    weights = {name: m.weight for name, m in prunable_layers(unet)}
    zeros = {name: layers.zeros(w) for name, w in weights.items()}
    n_target = sum(weights[n].numel() for n in targeted)
    sd = unet.state_dict()
    with tempfile.TemporaryDirectory(prefix="sdbench-prune-") as tmp:
        save_sparse(sd, Path(tmp) / "unet.sparse.safetensors")
        sparse_bytes = (Path(tmp) / "unet.sparse.safetensors").stat().st_size
    return {
        "sparsity": sum(zeros[n] for n in targeted) / n_target,
        "sparsity_unet": sum(zeros.values()) / sum(w.numel() for w in weights.values()),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "nonzeros": sum(int(torch.count_nonzero(p)) for p in unet.parameters()),
        "pruned_layers": sum(zeros[n] > 0 for n in targeted),
        "target_layers": len(targeted),
        "size_dense_bytes": dense_size_bytes(sd),
        "size_bytes": sparse_bytes,  # this setting's storage format: bitmask + values
        "kernels": "dense",
    }


@TECHNIQUES.register
class Pruning(Technique):
    """Unstructured pruning sweep: ratio x method x scope x target. Setting param `seed` (default 0,
    left out of ids when 0) seeds `random`; it is no sweep axis because `--seed` is the image seed."""

    name = "prune"
    summary = "unstructured magnitude (L1) or random pruning of UNet Linear+Conv2d weights, exact counts"
    order = 20
    axes = (
        Axis("ratio", [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9], parse_ratio, "fraction of targeted weights set to zero"),
        Axis("method", ["l1"], text, "which weights go: smallest |w| (l1) or random", METHODS),
        Axis("scope", ["global"], text, "one threshold over all targeted weights, or per layer", SCOPES),
        Axis("target", ["all"], text, "which layers compete (inner/outer: middle vs ends of the U)", TARGETS),
    )
    columns = (
        Column("ratio", "pruning ratio asked for", label="ratio asked for (fraction of targeted weights)", plot=False),
        Column("sparsity", "measured fraction of zeros among the targeted weights",
               label="sparsity of targeted weights (fraction)"),
        Column("sparsity_unet", "measured fraction of zeros among all UNet Linear/Conv weights",
               label="sparsity of all UNet weights (fraction)"),
        *(CORE[c] for c in ("unet_params", "nonzeros", "size_dense_bytes")),  # recounted after pruning
    )  # fmt: skip
    plot_x = "ratio"

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        vals = self.axis_values(axes)
        out: dict[str, Setting] = {}
        for p in grid({axis: vals[axis] for axis in ("target", "ratio", "method", "scope")}):
            if p["ratio"] == 0.0:  # unpruned: method and scope make no difference, keep one row per target
                p.update(method=vals["method"][0], scope=vals["scope"][0])
            s = Setting(self.name, p)
            out.setdefault(s.id, s)
        return list(out.values())

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        params = {"ratio": 0.0, **setting.params}
        known = [a.name for a in self.axes]
        if unknown := set(params) - {*known, "seed"}:
            raise InputError(f"unknown prune parameters {sorted(unknown)}; known: {', '.join(known)}, seed")
        targeted = prune(unet, **params)
        return Compressed(unet, measure(unet, targeted))
