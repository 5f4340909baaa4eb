"""Real static W8A8 in PyTorch: the PT2E flow with the X86 Inductor quantizer, lowered by inductor.

`torch.export` captures the UNet, `prepare_pt2e` inserts observers where the quantizer annotates
(Conv2d and Linear, per-channel symmetric int8 weights, per-tensor uint8 activations), the runner's real
calibration calls (`Calibration.calls`, same sampler, prompts and resolution as the sweep) run through it,
and `convert_pt2e` turns the observers into quantize/dequantize pairs. That graph is only a recipe: eager
it runs reference q/dq maths in fp32. Compiled by inductor with freezing on, the q/dq patterns fuse into
oneDNN int8 kernels (`onednn.qconv_pointwise` / `qlinear_pointwise`), which is what the row times.

Activation ranges: `minmax` (default) or `histogram` (PyTorch's default x86 observer, which searches the
range minimising the quantization error; ~8 s per calibration call even on the tiny model on this CPU,
so minmax is the default for the ~80 calls of a real calibration set).

No timestep-aware grouping: PT2E bakes one scale per q/dq node into the graph, so one range per timestep
group would need one exported, calibrated and compiled graph per group, each a full UNet copy and a full
inductor compile (about 3-4 minutes for v1-5 on this CPU); with four groups that is 4x the memory and
compile time for one row. The simulated `static-w8a8-timestep` mode measures what grouping buys in quality.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.calibration import UNetCall

log = logging.getLogger(__name__)


def _inputs(call: UNetCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return call.x, torch.as_tensor(call.t, dtype=torch.float32), call.context  # as `CompiledUNet` passes t


OBSERVERS = ("minmax", "histogram")


def x86_static_config(observer: str = "minmax") -> object:
    """The X86 Inductor quantizer's static config (int8 per-channel weights, uint8 per-tensor activations),
    with the activation observer swapped for MinMax unless `histogram` is asked for."""
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    if observer not in OBSERVERS:
        raise ValueError(f"unknown PT2E observer {observer!r}")
    config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=False)
    if observer == "histogram":
        return config
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return dataclasses.replace(config, input_activation=act, output_activation=act)


def quantize_pt2e_x86(unet: nn.Module, calls: Sequence[UNetCall], observer: str = "minmax") -> nn.Module:
    """Export, annotate (X86 Inductor quantizer, static), calibrate on `calls`, convert. Compile it next."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    if not calls:
        raise ValueError("PT2E static quantization needs at least one calibration call")
    device = next(unet.parameters()).device
    example = tuple(a.to(device) for a in _inputs(calls[0]))
    with torch.no_grad():
        exported = torch.export.export(unet.eval(), example).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(x86_static_config(observer))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\.quantization\.pt2e")
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for call in tqdm(calls, desc="PT2E calibration", leave=False):
                prepared(*(a.to(device) for a in _inputs(call)))
        converted = convert_pt2e(prepared)
    log.info("PT2E: calibrated on %d calls", len(calls))
    return converted


def int8_op_counts(graph_module: nn.Module) -> dict[str, int]:
    """quantize/dequantize nodes in a converted PT2E graph (what inductor will fuse into int8 kernels)."""
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        name = str(node.target)
        if "quantize_per" in name:
            key = "dequantize" if "dequantize" in name else "quantize"
            counts[key] = counts.get(key, 0) + 1
    return counts
