"""`torch.compile` (inductor) of a UNet-like module, with its compile time measured by a warm call.

Inductor's `freezing` folds the (frozen, inference-only) weights into the graph as constants; it is what
lets the PT2E int8 patterns and oneDNN weight prepacking fire on CPU, so it is on by default. The module is
compiled with `dynamic=False`: shapes are fixed per sweep, and the timestep is a tensor input, so one
graph serves every sampling step (no recompilation per step; `tests/test_accel.py` checks the counters).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

MODES = ("default", "max-autotune")
AXIS = ("eager", "compile", "max-autotune")  # the `compile` sweep axis


@contextlib.contextmanager
def inductor_freezing(enabled: bool) -> Iterator[None]:
    """Inductor's freezing flag is global and read when a graph is compiled (the first call)."""
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = enabled
    try:
        yield
    finally:
        inductor_config.freezing = old


@contextlib.contextmanager
def captured_output_code(sink: list[str]) -> Iterator[None]:
    """Collect the wrapper code of every graph inductor compiles or loads from its cache meanwhile."""
    from torch._inductor.graph import GraphLowering

    old = GraphLowering.save_output_code
    GraphLowering.save_output_code = sink.append
    try:
        yield
    finally:
        GraphLowering.save_output_code = old


def extern_ops(code: list[str]) -> dict[str, int]:
    """How often each `torch.ops.<ns>.<op>` extern kernel is called in inductor output code (e.g.
    `onednn.qconv_pointwise`: a fused oneDNN int8 conv). Generated C++/Triton kernels are not listed."""
    found = Counter(f"{ns}.{op}" for text in code for ns, op in re.findall(r"torch\.ops\.(\w+)\.(\w+)", text))
    return dict(sorted(found.items()))


class CompiledUNet(nn.Module):
    """A compiled module; the first call compiles (under the freezing setting) and its time is `compile_s`."""

    def __init__(
        self, module: nn.Module, mode: str = "default", freezing: bool = True, fields: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown compile mode {mode!r}")
        self.inner = module
        self.freezing = freezing
        self.compiled = torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)
        self.compile_s: float | None = None
        self.kernel_ops: dict[str, int] = {}
        self.fields = fields  # row fields to fill in once compiled

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # A tensor (a Python number would be specialised on: one graph per step), always float32 (the UNet
        # embeds t in float32 anyway), so int (DDIM) and float (Euler) timesteps share one graph.
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if _get_current_dispatch_mode() is not None:
            return self.inner(x, t, context)  # e.g. FLOP counting: same maths, and no recompile under the mode
        if self.compile_s is not None:
            return self.compiled(x, t, context)
        code: list[str] = []
        start = time.perf_counter()
        with inductor_freezing(self.freezing), captured_output_code(code), torch.no_grad():
            out = self.compiled(x, t, context)
        self.compile_s = time.perf_counter() - start
        self.kernel_ops = extern_ops(code)
        log.info("compiled in %.1f s; extern kernels: %s", self.compile_s, self.kernel_ops)
        if self.fields is not None:
            self.fields.update(compile_s=self.compile_s, compiled_extern_ops=self.kernel_ops)
        return out


def compile_unet(
    module: nn.Module, example: tuple[Any, ...] | None = None, mode: str = "default", freezing: bool = True
) -> tuple[CompiledUNet, float | None]:
    """(compiled module, compile seconds). With `example` inputs the warm call happens now and is timed
    (compile plus one run); without, the first real call compiles and `.compile_s` is set then."""
    compiled = CompiledUNet(module, mode, freezing)
    if example is not None:
        compiled(*example)
    return compiled, compiled.compile_s


def compile_for_row(
    module: nn.Module, compile: str, example: tuple[Any, ...] | None, fields: dict[str, Any]
) -> nn.Module:
    """`module` as the `compile` axis says (`eager`: unchanged). `compile_s` and the extern kernels the
    graph calls go into `fields`: now when `example` inputs are given, else on the first real call (the
    runner reads a row's fields after sampling)."""
    fields["compile"] = compile
    if compile == "eager":
        fields["compile_s"] = None  # nothing compiled
        return module
    if compile not in AXIS:
        raise ValueError(f"unknown compile value {compile!r}")
    compiled = CompiledUNet(module, "default" if compile == "compile" else compile, fields=fields)
    if example is not None:
        compiled(*example)
    return compiled
