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
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from stable_diffusion.errors import InputError, first_line
from stable_diffusion.pipeline import Generation, StableDiffusion

from . import cost, protocols, report, schema, stats, wandb_report
from .accel.speedup import rewrite_with_speedups
from .calibration import Calibration, Recorder
from .cli import agent_args
from .metrics.base import PER_IMAGE, interval_fields
from .modifiers.base import ApplyContext, modifiers_for, technique_setting
from .results import ResultsFile, write_atomic
from .sweep import SweepPlan
from .techniques.base import BASELINE, Compressed, Setting

log = logging.getLogger(__name__)


@dataclass
class Sampled:
    images: list[np.ndarray]  # uint8 HxWx3, in prompt order
    seconds: list[float]  # wall time per image (its chunk's time / chunk size)
    nonfinite: int
    wall: float  # seconds for all images, all processes (sharding, batching, gathering included)


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
    def sample(
        self, prompts: list[str], seeds: list[int], desc: str, sampling: dict[str, Any] | None = None
    ) -> Sampled:
        """Sample this process's shard of the prompts, `--batch-size` per UNet call; gather all.

        Each image has its own seed (its own generator), so the images do not depend on the batch size or
        the number of processes; an image's time is its chunk's time over the chunk size. `sampling`
        overrides the plan's sampling options (a technique's `Compressed.sampling`); a UNet with
        `reset_sampling_state()` (a stateful cache) is reset before every call.
        """
        options = {**self.plan.sampling(), **(sampling or {})}
        reset = getattr(self.sd.model.unet, "reset_sampling_state", None)
        n = self.plan.options.batch_size
        start = time.perf_counter()
        local: list[tuple[int, np.ndarray, float, bool]] = []
        with self.state.split_between_processes(list(range(len(prompts)))) as shard:
            bar = tqdm(total=len(shard), desc=desc, leave=False, disable=not self.main)
            for chunk in (shard[i : i + n] for i in range(0, len(shard), n)):
                if reset is not None:
                    reset()
                t0 = time.perf_counter()
                out = self._sample_chunk([prompts[i] for i in chunk], [seeds[i] for i in chunk], options)
                finite = torch.isfinite(out.latents).flatten(1).all(1) & torch.isfinite(out.pixels).flatten(1).all(1)
                pixels = torch.nan_to_num(out.pixels, nan=0.0)
                arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
                per_image = (time.perf_counter() - t0) / len(chunk)
                local += [(i, arrays[j], per_image, bool(finite[j])) for j, i in enumerate(chunk)]
                bar.update(len(chunk))
            bar.close()
        gathered = sorted(gather_object(local), key=lambda r: r[0])
        wall = time.perf_counter() - start
        return Sampled([g[1] for g in gathered], [g[2] for g in gathered], sum(not g[3] for g in gathered), wall)

    def _sample_chunk(self, prompts: list[str], seeds: list[int], options: dict[str, Any]) -> Generation:
        """One batched pipeline call; running out of device memory becomes one clear InputError."""
        try:
            return self.sd(prompts, seeds=seeds, progress=False, **options)
        except torch.OutOfMemoryError:
            if self.sd.device.type == "cuda":
                torch.cuda.empty_cache()
            hint = (
                f"try --batch-size {max(1, len(prompts) // 2)}" if len(prompts) > 1
                else "even one image does not fit: lower --resolution or use another device"
            )  # fmt: skip
            raise InputError(
                f"out of {self.sd.device} memory sampling {len(prompts)} images per call (--batch-size "
                f"{self.plan.options.batch_size}, {options['width']}x{options['height']}); {hint}"
            ) from None

    def calibrate(self) -> Calibration:
        """Record UNet inputs while the FP32 model samples the calibration prompts (never eval prompts)."""
        if self.calibration is None:
            p, prompts = self.plan.options, self.plan.calibration_prompts
            recorder = Recorder(self.base_unet)
            self.sd.model.swap_unet(recorder)
            try:
                for i, prompt in enumerate(tqdm(prompts, desc="calibration", leave=False, disable=not self.main)):
                    recorder.prompt = i
                    self.sd(prompt, seed=p.seed + 100_000 + i, progress=False, **self.plan.sampling())
            finally:
                self.sd.model.swap_unet(self.base_unet)
            self.calibration = Calibration(recorder.calls, recorder.prompt_of_call)
        return self.calibration

    # -- one setting ------------------------------------------------------------------------------
    def compress(self, setting: Setting) -> Compressed:
        """The technique's apply on a private copy of the UNet, then each modifier's, in order."""
        if setting.technique == BASELINE:
            return Compressed(self.base_unet, {"kernels": f"dense {self.plan.options.dtype}"})  # what really ran
        technique = self.plan.techniques[setting.technique]
        technique.bind(self.sd.model, self.plan.run_dir)  # a technique that trains needs data and a folder
        calibration = self.calibrate() if technique.needs_calibration else None
        compressed = technique.apply(copy.deepcopy(self.base_unet), technique_setting(setting), calibration)
        ctx = ApplyContext(self.sd.device, self.base_unet, self.calibrate, self.plan.options)
        for modifier in modifiers_for(technique):
            compressed = modifier.apply(compressed, setting, ctx)
        return compressed

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

        getattr(module, "reset_sampling_state", lambda: None)()  # a cache then times its real full/shallow cycle

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
        write_atomic(path, json.dumps({"setting_id": setting.id, "n": len(self.plan.prompts), "values": per_image}))

    def load_baseline_per_image(
        self, setting: Setting, images: list[np.ndarray] | None = None
    ) -> dict[str, list[float]] | None:
        """The baseline's per-image values on resume; recomputed from its images (`images`, else its saved PNGs)
        when the file is missing. None when neither is there (the rows then carry no paired tests)."""
        path = self._per_image_path(setting)
        try:
            data = json.loads(path.read_text())
            if data.get("n") == len(self.plan.prompts) and isinstance(data.get("values"), dict):
                return data["values"]
        except (OSError, ValueError) as e:  # missing (a run of an older version) or unreadable: recompute
            log.info("%s: %s; recomputing the baseline's per-image values", path, first_line(e))
        images = images if images is not None else self.load_images(setting)
        if images is None:  # --fp32-reference sampled the reference, the baseline row's PNGs are gone
            log.warning("%s: baseline images missing; rows run now carry no paired test", setting.id)
            return None
        _, per_image = self.quality(images, is_baseline=True)
        self.save_per_image(setting, per_image)
        return per_image

    def run_setting(self, setting: Setting, results: ResultsFile) -> None:
        compressed = self.compress(setting)
        self.sd.model.swap_unet(compressed.module)
        try:
            with cost.PeakRSS(self.sd.device) as mem:
                sampled = self.sample(self.plan.prompts, self.plan.seeds, setting.id, compressed.sampling)
            is_baseline = setting.technique == BASELINE
            if is_baseline and self.baseline is None:  # (--fp32-reference set it already)
                self.baseline = sampled.images
            if not self.main:
                return
            self.save_images(setting, sampled.images)
            p50, p90 = cost.percentiles(sampled.seconds)
            protocol = {
                **self.plan.row_protocol(compressed.sampling),
                **({"reference_steps": self.plan.options.steps} if compressed.sampling else {}),
                "setting_id": setting.id,
                "technique": setting.technique,
                "params": dict(setting.params),
                "backend": "pytorch",
                "status": "ok" if sampled.nonfinite == 0 else "nonfinite",
                "nonfinite_images": sampled.nonfinite,
            }
            measured = {
                "latency_image_p50_s": p50,
                "latency_image_p90_s": p90,
                "images_per_s": len(sampled.images) / sampled.wall,
                "peak_rss_mb": mem.peak / 2**20,
                "peak_mem_mb": mem.device_peak / 2**20,
                **self.measure_cost(compressed.module),
            }
            # NaN pixels were zeroed for the PNGs: comparing those would report a perfect match
            quality, per_image = self.quality(sampled.images, is_baseline) if sampled.nonfinite == 0 else ({}, {})
            technique = self.plan.techniques.get(setting.technique)
            declared = {c.name for c in technique.columns} if technique else set()
            fields = schema.assemble_row(protocol, dict(setting.params), measured, compressed.fields, quality, declared)
            fields.setdefault("size_bytes", fields["size_dense_bytes"])
            self.save_per_image(setting, per_image)
            if is_baseline:
                self.baseline_per_image = per_image
            results.append(fields)
        finally:
            self.sd.model.swap_unet(self.base_unet)

    def save_images(self, setting: Setting, images: list[np.ndarray]) -> None:
        """PNGs and a grid, each written atomically (another agent may be reading the baseline's)."""
        folder = self.plan.run_dir / "images" / setting.slug
        folder.mkdir(parents=True, exist_ok=True)
        pil = [Image.fromarray(a) for a in images]
        for i, image in enumerate(pil):
            write_atomic(folder / f"{i:04d}.png", _png(image))
        grid = report.make_grid(pil, cols=min(8, len(pil)))
        write_atomic(self.plan.run_dir / "images" / f"{setting.slug}-grid.png", _png(grid))

    def load_images(self, setting: Setting) -> list[np.ndarray] | None:
        """The saved images of a finished setting; None when some are missing or unreadable."""
        folder = self.plan.run_dir / "images" / setting.slug
        try:
            return [
                np.asarray(Image.open(folder / f"{i:04d}.png").convert("RGB")) for i in range(len(self.plan.prompts))
            ]
        except (OSError, ValueError) as e:  # deleted, truncated (PIL raises OSError), not an image
            log.warning("%s: images unreadable (%s); sampling them again (the row is kept)", folder, first_line(e))
            return None

    def baseline_images(self, setting: Setting) -> list[np.ndarray]:
        """The finished baseline's images, resampled (same seeds, same pixels) if they were lost."""
        images = self.load_images(setting)
        if images is None:
            images = self.sample(self.plan.prompts, self.plan.seeds, desc="baseline (again)").images
            if self.main:
                self.save_images(setting, images)
        return images

    def fp32_reference(self) -> list[np.ndarray]:
        """`--fp32-reference`: the images the model makes in FP32 (same prompts and seeds), sampled once per
        run folder by a second, FP32 copy of the pipeline and kept under images/reference-fp32/."""
        setting = Setting("reference-fp32")
        folder = self.plan.run_dir / "images" / setting.slug
        if len(list(folder.glob("*.png"))) == len(self.plan.prompts) and (images := self.load_images(setting)):
            return images
        sd, self.sd = self.sd, self.plan.load_pipeline("fp32")
        try:
            sampled = self.sample(self.plan.prompts, self.plan.seeds, desc="fp32 reference")
        finally:
            self.sd = sd
            if sd.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.main:
            self.save_images(setting, sampled.images)
        return sampled.images

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
        if plan.reference_dtype != plan.options.dtype and todo:
            self.baseline = self.fp32_reference()
        for setting in tqdm(plan.settings, desc="sweep", disable=not self.main):
            if setting.technique == BASELINE and setting.id in done:
                own = None
                if self.baseline is None:
                    own = self.baseline = self.baseline_images(setting)
                if self.main:
                    self.baseline_per_image = self.load_baseline_per_image(setting, own)
                continue
            if setting.id in done or (self.state.num_processes == 1 and setting.id in results.finished()):
                continue  # finished before, or meanwhile by another agent (sharded runs decide once, together)
            self.run_setting(setting, results)
            self.state.wait_for_everyone()
        if self.main:
            with results.lock:  # agents into one folder: one report at a time, from all rows
                self.report(results)
        self.state.wait_for_everyone()
        return plan.run_dir

    def report(self, results: ResultsFile) -> None:
        """Plots, W&B sweep files (spread settings over machines) and the W&B run, from the finished CSV."""
        plan, o = self.plan, self.plan.options
        rows = rewrite_with_speedups(results)  # needs every dense row, so once all are done
        plots = report.write_report(plan.run_dir, rows)
        for name in plan.techniques if not o.only else []:  # an agent's --setting must not shrink the grid
            ids = [s.id for s in plan.settings if s.technique == name]
            if ids:
                path = plan.run_dir / f"wandb_sweep_{name}.yaml"
                wandb_report.write_wandb_sweep(path, name, {"setting": ids}, agent_args(o, plan.run_id))
        grids = {s.id: plan.run_dir / "images" / f"{s.slug}-grid.png" for s in plan.settings}
        if o.wandb_mode != "disabled":
            where = wandb_report.log_wandb(
                plan.run_dir, o.wandb_project, o.wandb_mode, plan.manifest(), rows,
                {k: v for k, v in grids.items() if v.exists()}, plots, plan.run_id,
            )  # fmt: skip
            log.info("W&B run (%s): %s", o.wandb_mode, where)
        log.info("results: %s", results.path)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def set_threads(state: PartialState) -> None:
    """Split the cores between processes when several share one CPU."""
    if state.num_processes > 1 and state.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
