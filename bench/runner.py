"""The sweep runner: for each setting, compress a copy of the UNet, sample, measure, write one CSV row.

It knows no technique's or metric's internals (see `techniques/base.py`, `metrics/base.py`). Rows are
appended and fsync'ed as each setting finishes; re-running the same command (or `--resume`) skips
finished rows, so a killed sweep loses at most the row in progress and never duplicates one.

Under `accelerate launch` the prompts of every setting are sharded across processes; images are gathered
on the main process, which alone measures cost, computes metrics and writes the row.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from stable_diffusion.pipeline import StableDiffusion

from . import cost, protocols, report, stats
from .metrics.base import PER_IMAGE, interval_fields
from .results import ResultsFile
from .sweep import SweepPlan
from .techniques.base import Calibration, Compressed, Setting, UNetCall

log = logging.getLogger(__name__)


@dataclass
class Sampled:
    images: list[np.ndarray]  # uint8 HxWx3, in prompt order
    seconds: list[float]  # wall time per image
    nonfinite: int


class Recorder(torch.nn.Module):
    """Wraps the FP32 UNet and records every call's inputs: real trajectories for calibration."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.calls: list[UNetCall] = []
        self.prompt_of_call: list[int] = []
        self.prompt = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append(UNetCall(x.detach().cpu().clone(), torch.as_tensor(t).cpu().clone(), context.cpu().clone()))
        self.prompt_of_call.append(self.prompt)
        return self.unet(x, t, context)


class Runner:
    def __init__(self, plan: SweepPlan, state: PartialState | None = None) -> None:
        self.plan = plan
        self.state = state or PartialState()
        self.main = self.state.is_main_process
        self.sd: StableDiffusion = plan.pipeline
        self.base_unet = self.sd.model.unet
        self.calibration: Calibration | None = None
        self.baseline: list[np.ndarray] | None = None
        self.baseline_per_image: dict[str, list[float]] | None = None

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, prompts: list[str], seeds: list[int], desc: str) -> Sampled:
        """Sample this process's shard of the prompts (one image per prompt, its own seed); gather all."""
        p = self.plan.options
        indices = list(range(len(prompts)))
        local: list[tuple[int, np.ndarray, float, bool]] = []
        with self.state.split_between_processes(indices) as shard:
            for i in tqdm(shard, desc=desc, leave=False, disable=not self.main):
                t0 = time.perf_counter()
                out = self.sd(
                    prompts[i], steps=p.steps, sampler=p.sampler, guidance=p.guidance, seed=seeds[i],
                    height=p.height, width=p.width, progress=False,
                )  # fmt: skip
                finite = bool(torch.isfinite(out.latents).all() and torch.isfinite(out.pixels).all())
                pixels = torch.nan_to_num(out.pixels, nan=0.0)
                arr = (pixels[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
                local.append((i, arr, time.perf_counter() - t0, finite))
        gathered = sorted(gather_object(local), key=lambda r: r[0])
        return Sampled([g[1] for g in gathered], [g[2] for g in gathered], sum(not g[3] for g in gathered))

    def calibrate(self) -> Calibration:
        """Record UNet inputs while the FP32 model samples the calibration prompts (never eval prompts)."""
        if self.calibration is None:
            p, prompts = self.plan.options, self.plan.calibration_prompts
            recorder = Recorder(self.base_unet)
            self.sd.model.swap_unet(recorder)
            try:
                for i, prompt in enumerate(tqdm(prompts, desc="calibration", leave=False, disable=not self.main)):
                    recorder.prompt = i
                    self.sd(
                        prompt, steps=p.steps, sampler=p.sampler, guidance=p.guidance, seed=p.seed + 100_000 + i,
                        height=p.height, width=p.width, progress=False,
                    )  # fmt: skip
            finally:
                self.sd.model.swap_unet(self.base_unet)
            self.calibration = Calibration(recorder.calls, recorder.prompt_of_call)
        return self.calibration

    # -- one setting ------------------------------------------------------------------------------
    def compress(self, setting: Setting) -> Compressed:
        if setting.technique == "baseline":
            return Compressed(self.base_unet, {"kernels": "dense fp32"})
        technique = self.plan.techniques[setting.technique]
        calibration = self.calibrate() if technique.needs_calibration else None
        return technique.apply(copy.deepcopy(self.base_unet), setting, calibration)

    def measure_cost(self, module: torch.nn.Module) -> dict[str, float | int]:
        p, cfg = self.plan.options, self.sd.cfg
        f = cfg.vae.downsample
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, cfg.unet.in_channels, p.height // f, p.width // f, generator=gen).to(self.sd.device)
        x = x.to(self.sd.dtype)
        ctx = self.sd.encode_prompt(["a photo", ""])
        t = torch.tensor(500, device=self.sd.device)

        def call() -> torch.Tensor:
            with torch.no_grad():
                return module(x, t, ctx)

        step = cost.time_calls(call, warmup=1, repeats=p.latency_repeats)
        p50, p90 = cost.percentiles(step)
        params, nonzeros = cost.count_params(module)
        base_params, _ = self.base_counts
        return {
            "latency_step_p50_ms": p50 * 1e3,
            "latency_step_p90_ms": p90 * 1e3,
            "unet_params": base_params,
            # zeros are countable only while the weights stay dense float tensors (not int8-packed)
            "nonzeros": nonzeros if params == base_params else None,
            "size_dense_bytes": self.base_counts[1],
            "gflops_per_step": cost.flops_per_call(call) / 1e9,
        }

    @functools.cached_property
    def base_counts(self) -> tuple[int, int]:
        """(parameters, dense safetensors bytes) of the uncompressed UNet."""
        return cost.count_params(self.base_unet)[0], cost.dense_size_bytes(self.base_unet.state_dict())

    def quality(self, images: list[np.ndarray], is_baseline: bool = False) -> tuple[dict[str, object], dict]:
        """(row values incl. intervals and paired tests vs the baseline, per-image values by column)."""
        pixels, base = (
            torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous() / 255 for a in (images, self.baseline)
        )
        values: dict[str, object] = {}
        per_image: dict[str, list[float]] = {}
        for metric in self.plan.metrics:
            if metric.unavailable() is None:
                out = metric.compute(pixels, self.plan.prompts, base)
                mine = {k: [float(x) for x in v] for k, v in out.pop(PER_IMAGE, {}).items()}
                per_image.update(mine)
                values.update(out)
                values.update(interval_fields(metric.intervals, mine, None if is_baseline else self.baseline_per_image))
        differs = sorted(
            k[: -len("_p")] for k, v in values.items() if k.endswith("_p") and v is not None and v < stats.ALPHA
        )
        if not is_baseline:
            values["differs"] = ",".join(differs)
        o = self.plan.options
        values["in_accuracy_window"] = protocols.in_window(values, o.accuracy_window, o.clip_window)
        return values, per_image

    def _per_image_path(self, setting: Setting) -> Path:
        return self.plan.run_dir / "per_image" / f"{setting.slug}.json"

    def save_per_image(self, setting: Setting, per_image: dict[str, list[float]]) -> None:
        """Per-image metric values of a finished setting (JSON; NaN = not applicable): the baseline's pair them."""
        path = self._per_image_path(setting)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"setting_id": setting.id, "n": len(self.plan.prompts), "values": per_image}))
        os.replace(tmp, path)

    def load_baseline_per_image(self, setting: Setting) -> dict[str, list[float]]:
        """The baseline's per-image values on resume; recomputed from its saved images when the file is missing."""
        path = self._per_image_path(setting)
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("n") == len(self.plan.prompts):
                return data["values"]
        _, per_image = self.quality(self.baseline or [], is_baseline=True)
        self.save_per_image(setting, per_image)
        return per_image

    def run_setting(self, setting: Setting, results: ResultsFile) -> None:
        compressed = self.compress(setting)
        self.sd.model.swap_unet(compressed.module)
        try:
            with cost.PeakRSS() as mem:
                sampled = self.sample(self.plan.prompts, self.plan.seeds, desc=setting.id)
            is_baseline = setting.technique == "baseline"
            if is_baseline:
                self.baseline = sampled.images
            if not self.main:
                return
            self.save_images(setting, sampled.images)
            p50, p90 = cost.percentiles(sampled.seconds)
            fields = {
                **self.plan.row_protocol(),
                "setting_id": setting.id,
                "technique": setting.technique,
                "params": dict(setting.params),
                "backend": "pytorch",
                "status": "ok" if sampled.nonfinite == 0 else "nonfinite",
                "nonfinite_images": sampled.nonfinite,
                "latency_image_p50_s": p50,
                "latency_image_p90_s": p90,
                "peak_rss_mb": mem.peak / 2**20,
                **setting.params,
                **self.measure_cost(compressed.module),
                **compressed.fields,
            }
            quality, per_image = self.quality(sampled.images, is_baseline)
            fields.update(quality)
            fields.setdefault("size_bytes", fields["size_dense_bytes"])
            self.save_per_image(setting, per_image)
            if is_baseline:
                self.baseline_per_image = per_image
            results.append(fields)
        finally:
            self.sd.model.swap_unet(self.base_unet)

    def save_images(self, setting: Setting, images: list[np.ndarray]) -> None:
        folder = self.plan.run_dir / "images" / setting.slug
        folder.mkdir(parents=True, exist_ok=True)
        pil = [Image.fromarray(a) for a in images]
        for i, image in enumerate(pil):
            image.save(folder / f"{i:04d}.png")
        report.make_grid(pil, cols=min(8, len(pil))).save(self.plan.run_dir / "images" / f"{setting.slug}-grid.png")

    def load_images(self, setting: Setting) -> list[np.ndarray]:
        folder = self.plan.run_dir / "images" / setting.slug
        return [np.asarray(Image.open(folder / f"{i:04d}.png").convert("RGB")) for i in range(len(self.plan.prompts))]

    # -- the sweep --------------------------------------------------------------------------------
    def run(self) -> Path:
        plan = self.plan
        results = ResultsFile(plan.run_dir / "results.csv", plan.run_id, writer=self.main)
        self.state.wait_for_everyone()  # everyone reads the finished rows before anyone appends
        done = results.finished()
        todo = [s for s in plan.settings if s.id not in done]
        n = len(plan.settings)
        log.info("run %s: %d settings, %d already finished, %d to go", plan.run_id, n, n - len(todo), len(todo))
        for metric in plan.metrics:
            for hint in [metric.unavailable()] if metric.unavailable() else metric.hints():
                log.warning("%s: column(s) left empty: %s", metric.name, hint)
        for setting in tqdm(plan.settings, desc="sweep", disable=not self.main):
            if setting.id in done:
                if setting.technique == "baseline":
                    self.baseline = self.load_images(setting)
                    if self.main:
                        self.baseline_per_image = self.load_baseline_per_image(setting)
                continue
            self.run_setting(setting, results)
            self.state.wait_for_everyone()
        if self.main:
            rows = report.read_rows(results.path)
            plots = report.write_report(plan.run_dir, rows)
            plan.finish(rows, plots)
        self.state.wait_for_everyone()
        return plan.run_dir


def set_threads(state: PartialState) -> None:
    """Split the cores between processes when several share one CPU."""
    if state.num_processes > 1 and state.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
