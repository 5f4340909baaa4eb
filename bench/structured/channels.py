"""Channel pruning with torch-pruning's dependency graph: ResBlock and stream channels, heads, FFN units.

torch-pruning traces our UNet as is (checked in tests/test_structured.py): it couples every conv with what
consumes its channels -- GroupNorms (pruned evenly within each group, so every GroupNorm keeps its groups),
skip convs, the channel concat of the up path, the time-embedding projections, the transformer's LayerNorms
and 1x1 projections -- and with `num_heads` it removes whole attention heads (q, k, v rows and the
out-projection columns together). So no dependency map is hand-written, with one exception: GEGLU's
`proj(x).chunk(2)` -- torch-pruning 1.6 maps it to both halves but counts the ratio on the doubled width
(ratio 0.25 removed 50 % of the units, 0.5 removed 98 %), so FFN hidden units are pruned here by hand
(rows j and j + hidden of `proj`, column j of the output Linear), before the graph is built. Parts:
  conv   every group rooted at a Conv2d: ResBlock hidden channels, the residual streams between blocks
         (with the skip concats), the transformers' token width.
  heads  attention heads of every attn1/attn2 (head width kept).
  ffn    GEGLU feed-forward hidden units.
The stem's input and the final conv's output (the latent channels) and the time embedding MLP are kept.

Importance: `l1` = group L1 norm of the weights (torch-pruning GroupMagnitudeImportance(p=1));
`taylor` = |w * dL/dw| summed over the group (GroupTaylorImportance, as Diff-Pruning), with the gradient
of the denoising loss over a few calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from stable_diffusion.errors import InputError
from stable_diffusion.unet import CrossAttention, FeedForward, UNetModel

PARTS = ("conv", "heads", "ffn")
IMPORTANCES = ("l1", "taylor")


def parse_parts(value: str) -> tuple[str, ...]:
    """'conv+heads+ffn' (or 'all') -> the parts, in canonical order."""
    parts = set(PARTS) if value == "all" else set(value.split("+"))
    if not parts or parts - set(PARTS):
        raise InputError(f"bad parts {value!r}: '+'-joined subset of {', '.join(PARTS)}, or all")
    return tuple(p for p in PARTS if p in parts)


def _example(unet: UNetModel, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = unet.cfg
    p = next(unet.parameters())
    side = 2 ** len(cfg.channel_mult)  # smallest latent every level can halve
    x = torch.zeros(batch, cfg.in_channels, side, side, device=p.device, dtype=p.dtype)
    ctx = torch.zeros(batch, 2, cfg.context_dim, device=p.device, dtype=p.dtype)
    return x, torch.full((batch,), 500, device=p.device), ctx


def prune_channels(
    unet: UNetModel,
    ratio: float,
    parts: Iterable[str] = PARTS,
    importance: str = "l1",
    loss_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
) -> UNetModel:
    """Remove `ratio` of the channels / heads / FFN units of `parts` from `unet` in place (by importance)."""
    parts = tuple(parts)
    if importance not in IMPORTANCES:
        raise InputError(f"unknown importance {importance!r}; choose from: {', '.join(IMPORTANCES)}")
    attns = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    unet.requires_grad_(True)  # torch-pruning traces the autograd graph; Taylor needs the gradients
    if importance == "taylor":
        if loss_batches is None:
            raise InputError("taylor importance needs calibration data (the denoising loss)")
        unet.zero_grad()
        for loss in loss_batches():
            loss.backward()
    ffns = [m for m in unet.modules() if isinstance(m, FeedForward)]
    if "ffn" in parts:
        for f in ffns:
            prune_ffn(f, ratio, importance)
    qkv = {lin for a in attns for lin in (a.to_q, a.to_k, a.to_v)}
    keep = {f.net[0].proj for f in ffns} | set(unet.time_embed) | {unet.out[-1]}
    if "heads" not in parts:
        keep |= qkv
    if "conv" not in parts:  # only q/k/v may root a group
        keep |= {m for m in unet.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m not in qkv}
    ignored = [m for m in unet.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m in keep]
    num_heads = {lin: a.heads for a in attns for lin in (a.to_q, a.to_k, a.to_v)}
    import torch_pruning as tp  # here: it pulls in wandb, and the GPU check's machine has neither

    imp = tp.importance.GroupMagnitudeImportance(p=1) if importance == "l1" else tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(
        unet,
        _example(unet),
        importance=imp,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads="heads" in parts,
        prune_head_dims=False,
        head_pruning_ratio=ratio if "heads" in parts else 0.0,
    )
    pruner.step()
    for a in attns:
        a.heads = pruner.num_heads.get(a.to_q, a.heads)
    unet.zero_grad(set_to_none=True)
    unet.requires_grad_(False)
    check_shapes(unet)
    return unet


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    """A fresh Linear holding `w` and `b`."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(w.device, w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def prune_ffn(ff: FeedForward, ratio: float, importance: str) -> None:
    """Remove round(ratio * hidden) GEGLU hidden units of least group importance (L1 or |w * grad|)."""
    proj, out = ff.net[0].proj, ff.net[2]
    hidden = out.in_features
    n_keep = hidden - round(ratio * hidden)
    if n_keep == hidden:
        return

    def score(p: torch.Tensor) -> torch.Tensor:
        s = p.detach().abs() if importance == "l1" else (p.detach() * p.grad).abs() if p.grad is not None else 0 * p
        return s

    ps, po = score(proj.weight), score(out.weight)
    units = ps[:hidden].sum(1) + ps[hidden:].sum(1) + po.sum(0)
    if proj.bias is not None:
        pb = score(proj.bias)
        units = units + pb[:hidden] + pb[hidden:]
    kept = torch.sort(torch.topk(units, n_keep).indices).values
    rows = torch.cat([kept, kept + hidden])
    new_proj = _linear(proj.weight[rows], proj.bias[rows] if proj.bias is not None else None)
    new_out = _linear(out.weight[:, kept], out.bias)
    for new, old, idx in ((new_proj, proj, (rows,)), (new_out, out, (slice(None), kept))):
        if old.weight.grad is not None:
            new.weight.grad = old.weight.grad[idx].clone()
        if old.bias is not None and old.bias.grad is not None:
            new.bias.grad = old.bias.grad[idx[0]].clone() if new is new_proj else old.bias.grad.clone()
    ff.net[0].proj, ff.net[2] = new_proj, new_out


def check_shapes(unet: nn.Module) -> None:
    """Every GroupNorm divides its channels, every attention its width into whole heads."""
    for name, m in unet.named_modules():
        if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups:
            raise RuntimeError(f"{name}: {m.num_channels} channels in {m.num_groups} groups")
        if isinstance(m, CrossAttention) and m.to_q.out_features % m.heads:
            raise RuntimeError(f"{name}: width {m.to_q.out_features} in {m.heads} heads")
