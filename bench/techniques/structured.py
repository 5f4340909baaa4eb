"""Structured compression (`--sweep structured`): the UNet gets a new, smaller architecture, so it really
runs faster on dense kernels -- unlike unstructured pruning -- and can be recovered by training.

structure  channels   torch-pruning of conv channels / attention heads / FFN units (`bench/structured/channels.py`)
           bk-base, bk-small, bk-tiny   BK-SDM block removal (`bench/structured/blocks.py`)
           separable  3x3 convs -> depthwise 3x3 + pointwise 1x1, low-rank fitted
recovery   none, kd, lora (`bench/recovery.py`), `recovery_steps` training steps (15 min wall cap)
compile    eager, compile: the compressed UNet as is, or torch.compile'd (inductor) -- on a small UNet eager
           dispatch overhead hides much of the FLOPs cut; compare with `precision`'s compiled dense rows

A compiled row and its eager sibling share one compression: the recovery state and the saved UNet live
under the eager setting's slug, so the second of them resumes a finished training instead of training again.

Every compressed UNet is saved under `<run>/unets/<setting>.safetensors` (CompVis layout + architecture
record), loadable with `main.py generate --unet FILE`. A recovered row names its un-recovered sibling in
`before_recovery` and copies that row's quality (if this run has it already: the grid puts it first) into the
`*_before_recovery` columns; the runner knows nothing of this.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.accel.compile import AXIS as COMPILE_CHOICES
from bench.accel.compile import compile_for_row
from stable_diffusion.checkpoint import save_checkpoint
from stable_diffusion.errors import InputError

from ..cost import count_params, dense_size_bytes
from ..recovery import KINDS, DenoisingData, RecoveryConfig, before_recovery_fields, recover
from ..registry import TECHNIQUES, Axis, Column, positive_int, text
from ..results import read_rows
from ..structured import blocks
from ..structured.channels import IMPORTANCES, parse_parts, prune_channels
from .base import Calibration, Compressed, Setting, Technique, check_choice, grid
from .precision import COMPILE, COMPILE_S, with_compile
from .prune import parse_ratio

log = logging.getLogger(__name__)

STRUCTURES = ["channels", *blocks.PRESETS, "separable"]
TAYLOR_BATCHES = 4  # calibration batches of the denoising loss for Taylor importance


def _parts(value: object) -> str:
    return "+".join(parse_parts(text(value)))


@TECHNIQUES.register
class Structured(Technique):
    name = "structured"
    summary = "structured compression (channel/head/FFN pruning, BK-SDM block removal, separable convs) + recovery"
    order = 60
    axes = (
        Axis("structure", ["channels", "bk-tiny", "separable"], text, "structured kind", choices=STRUCTURES),
        Axis("ratio", [0.5], parse_ratio, "fraction of channels / heads / FFN units removed (structure=channels)"),
        Axis("importance", ["taylor"], text, "channel importance (structure=channels)", choices=list(IMPORTANCES)),
        Axis("parts", ["conv+heads+ffn"], _parts, "what channel pruning removes: conv, heads, ffn (+-joined)"),
        Axis("recovery", ["none", "kd"], text, "recovery training after compression", choices=list(KINDS)),
        Axis("recovery_steps", [600], positive_int, "recovery training steps (recovery=kd/lora)"),
        Axis("compile", ["eager", "compile"], text, "torch.compile (inductor) of the compressed UNet",
             list(COMPILE_CHOICES)),
    )  # fmt: skip
    columns = (
        Column("structure", "structured kind", label="Structure", better=None),
        Column("recovery", "recovery training (none, kd, lora)", label="Recovery", better=None),
        Column("recovery_steps", "recovery steps trained", label="Recovery steps", better=None),
        Column("recovery_cpu_min", "CPU minutes of recovery training", label="Recovery CPU min", better="lower"),
        Column("psnr_before_recovery", "PSNR of the same UNet before recovery", label="PSNR before", better="higher"),
        Column("unet_params_ratio", "UNet parameters / the uncompressed UNet's", label="UNet params ratio",
               better="lower"),
        COMPILE,
        COMPILE_S,
    )  # fmt: skip
    plot_x = "ratio"
    needs_calibration = False
    devices = ("cpu", "cuda")

    def __init__(self) -> None:
        self.model = None  # the loaded LatentDiffusion (VAE + text encoder for training data), see bind()
        self.run_dir: Path | None = None
        self._data: DenoisingData | None = None

    def bind(self, model: nn.Module, run_dir: Path | None = None) -> None:
        """The full model (training data; its UNet layout for `unsupported`) and the run folder (outputs).

        The plan binds the model before it asks `unsupported`; the runner binds both before `apply`.
        """
        self.model, self.run_dir = model, run_dir or self.run_dir

    def settings(self, axes: Mapping[str, list[Any]]) -> list[Setting]:
        values = self.axis_values(axes)
        out: dict[str, Setting] = {}
        for p in grid(values):
            params: dict[str, Any] = {"structure": p["structure"]}
            if p["structure"] == "channels":
                params.update(ratio=p["ratio"], importance=p["importance"], parts=p["parts"])
            if p["recovery"] != "none":  # the modifier at its default adds nothing to the id
                params.update(recovery=p["recovery"], recovery_steps=p["recovery_steps"])
            s = Setting(self.name, with_compile(params, p["compile"]))
            out.setdefault(s.id, s)
        return list(out.values())

    def unsupported(self, setting: Setting, device: torch.device | str) -> str | None:
        if reason := super().unsupported(setting, device):
            return reason
        structure = setting.params["structure"]
        if structure in blocks.PRESETS and self.model is not None:
            return blocks.unsupported(self.model.unet.cfg, structure)
        return None

    @property
    def data(self) -> DenoisingData:
        if self.model is None:
            raise InputError("structured: Taylor importance and recovery need the model (run it through the sweep)")
        if self._data is None:
            self._data = DenoisingData(self.model)
        return self._data

    def _taylor_losses(self, unet: nn.Module) -> Iterator[torch.Tensor]:
        for i in range(TAYLOR_BATCHES):
            xt, t, ctx, noise = self.data.batch(10_000 + i, 16)
            yield F.mse_loss(unet(xt, t, ctx), noise)

    def compress(self, unet: nn.Module, params: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        """The structurally compressed UNet (no recovery) and its fields."""
        structure = params["structure"]
        if structure == "channels":
            prune_channels(
                unet, float(params["ratio"]), parse_parts(params["parts"]), params["importance"],
                lambda: self._taylor_losses(unet),
            )  # fmt: skip
            return unet, {}
        if structure == "separable":
            return unet, {"separable_convs": len(blocks.make_separable(unet))}
        if reason := blocks.unsupported(unet.cfg, structure):
            raise InputError(reason)
        return blocks.remove_blocks(unet, structure), {}

    def apply(self, unet: nn.Module, setting: Setting, calibration: Calibration | None = None) -> Compressed:
        p = dict(setting.params)
        check_choice("structure", p["structure"], STRUCTURES)
        compile = self.axis("compile").check(p.pop("compile", "eager"))
        slug = Setting(self.name, p).slug  # the eager sibling's: one training and one file for both
        teacher = copy.deepcopy(unet)
        base_params = count_params(unet)[0]
        unet, fields = self.compress(unet, p)
        kind = p.get("recovery", "none")
        fields.update(structure=p["structure"], recovery=kind, recovery_steps=0, recovery_cpu_min=0.0)
        fields["psnr_before_recovery"] = None  # a recovered row fills it from its sibling, when the run has one
        if kind != "none":
            kept = {k: v for k, v in p.items() if not k.startswith("recovery")}
            unrecovered = Setting(self.name, with_compile(kept, compile))
            work = self.run_dir / "recovery" / slug if self.run_dir else None
            rc = RecoveryConfig(kind=kind, steps=int(p["recovery_steps"]), work_dir=work, data=self.data)
            if kind == "lora":
                rc.lr = 1e-3
            unet, stats = recover(unet, teacher, rc)
            fields.update(stats, before_recovery=unrecovered.id)
            results = self.run_dir / "results.csv" if self.run_dir else None
            if results is not None and results.is_file():
                fields.update(before_recovery_fields(read_rows(results), unrecovered.id))
        params = count_params(unet)[0]
        fields.update(
            kernels="dense fp32 (smaller architecture)",
            unet_params_ratio=params / base_params,  # unet_params / nonzeros: the runner measures them
            size_bytes=dense_size_bytes(unet.state_dict()),
        )
        if self.run_dir is not None and self.model is not None:
            path = self.run_dir / "unets" / f"{slug}.safetensors"
            save_checkpoint(unet, path, self.model.cfg, component="unet")
            fields["unet_file"] = str(path)
        return Compressed(compile_for_row(unet.eval(), compile, None, fields), fields)
