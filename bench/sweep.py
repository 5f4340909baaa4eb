"""What a sweep is: options (CLI or `--config-file sweep.toml`), and the plan built from them.

The run id is a digest of everything that changes the results, so re-running the same command lands in
the same `results/<run-id>/` and resumes it; a different sweep can never append to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from stable_diffusion.defaults import REPO_ROOT, embedded_checkpoint
from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import DTYPES, StableDiffusion, check_device, load_pipeline

from . import protocols
from .data import COCO_DIR, PromptSet, ReferenceSet, file_sha256, load_prompts, load_reference, prompts_key, shapes_set
from .manifest import git_sha, versions
from .metrics.base import Metric
from .modifiers.base import expand, modifier_axes, technique_setting
from .registry import METRICS, TECHNIQUES
from .results import run_lock, update_manifest
from .techniques.base import BASELINE, Setting, Technique, parse_setting_id

log = logging.getLogger(__name__)

# SweepOptions fields of the first version: they stay in the digest as they were, so run folders made then
# still resume; options added since enter it only when set to something other than their default.
DIGEST_V1 = {
    "techniques", "axes", "checkpoint", "config", "unet", "unsafe_load", "dtype", "device", "prompts", "num_images",
    "steps", "sampler", "guidance", "seed", "resolution", "only", "reference", "reference_captions", "fid_weights",
    "clip_weights", "clip_model", "lpips_weights", "allow_download", "latency_repeats",
}  # fmt: skip
RESOLVED = {"height", "width"}  # SweepOptions fields the plan fills in (not options: not in the digest)


@dataclass
class SweepOptions:
    techniques: list[str]
    axes: dict[str, list[Any]] = field(default_factory=dict)  # axis -> values, for every technique that has it
    checkpoint: Path | None = None
    config: str | None = None
    unet: Path | None = None
    unsafe_load: bool = False
    dtype: str = "fp32"
    device: str | None = None
    prompts: str = "shapes"  # = shapes-val: in-distribution validation captions (bench.data.SHAPES_SETS)
    num_images: int = 64
    steps: int = 20
    sampler: str = "ddim"
    guidance: float = 7.5
    seed: int = 0
    resolution: tuple[int, int] | None = None  # (height, width)
    out: Path = REPO_ROOT / "results"
    run_id: str | None = None
    only: list[str] = field(default_factory=list)  # run just these setting ids (W&B sweep agents)
    resume: bool = False
    reference: Path | None = None
    reference_captions: Path | None = None
    fid_weights: Path | None = None
    clip_weights: Path | None = None
    clip_model: str = "ViT-L-14"
    clip_tag: str = "openai"  # open_clip pretrained tag (what --allow-download fetches)
    clip_quick_gelu: bool = True  # OpenAI CLIP weights; False for LAION ones
    fid_size: int | None = None  # resize generated and reference images to this square size for FID
    protocol: str | None = None  # a bench.protocols preset (it filled the options above)
    protocol_overrides: list[str] = field(default_factory=list)  # options the user set against the preset
    accuracy_window: tuple[float, float] | None = None  # FID window: rows outside get in_accuracy_window=False
    clip_window: tuple[float, float] | None = None  # CLIP-score window, the same
    lpips_weights: Path | None = None
    allow_download: bool = False
    latency_repeats: int = 5
    batch_size: int = 1  # prompts per pipeline call (images do not depend on it: one seed per image)
    fp32_reference: bool = False  # fidelity vs FP32 images even when --dtype is fp16/bf16
    wandb_project: str = "sdbench"
    wandb_mode: str = "offline"
    height: int | None = None  # resolved by the plan: --resolution or the preset's
    width: int | None = None

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise InputError(f"--num-images must be >= 1, got {self.num_images}")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.fid_size is not None and self.fid_size < 1:
            raise InputError(f"--fid-size must be >= 1 pixel, got {self.fid_size}")
        if self.latency_repeats < 1:
            raise InputError(f"--latency-repeats must be >= 1, got {self.latency_repeats}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise InputError(f"--wandb-mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if self.run_id is not None and (self.run_id in ("", ".", "..") or any(c in self.run_id for c in "/\\\0")):
            raise InputError(f"--run-id {self.run_id!r} must be a plain folder name inside --out (no '/', no '..')")

    def digest(
        self, model_id: str, with_settings: bool = True, default_resolution: tuple[int, int] | None = None
    ) -> str:
        """Hash of everything that changes the rows (not output location, W&B or resume flags).

        Without settings it is the protocol digest: rows of several sweeps may share one run folder
        (`--run-id`, e.g. W&B sweep agents, each with its own `--setting`) only when they share the protocol.
        """
        skip = {"out", "run_id", "resume", "wandb_project", "wandb_mode", *RESOLVED}
        if not with_settings:
            skip |= {"techniques", "axes"}
        defaults = {
            f.name: f.default_factory() if f.default_factory is not MISSING else f.default  # [] or {} counts too
            for f in fields(self)
            if f.default is not MISSING or f.default_factory is not MISSING
        }
        keep = {
            k: v
            for k, v in asdict(self).items()
            if k not in skip and (k in DIGEST_V1 or v != defaults.get(k))  # a new option at its default: as before
        }
        if not with_settings:
            keep["only"] = []  # which rows (an agent's --setting), not how they are made
        if self.height is not None and default_resolution is not None:  # the preset's size given or not: one protocol
            given = (self.height, self.width)
            keep["resolution"] = None if given == default_resolution else list(given)
        if "prompts" in keep:  # the prompt set's meaning, spelled as the first version did where it had one
            keep["prompts"] = prompts_key(self.prompts)
        keep["model"] = model_id
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_metrics(o: SweepOptions, reference: ReferenceSet) -> list[Metric]:
    """Every registered metric, configured from the options."""
    return [cls.from_options(o, reference) for cls in METRICS.classes()]


def technique_settings(technique: Technique, axes: dict[str, list[Any]]) -> list[Setting]:
    """The technique's settings for the axis values it has, crossed with the given modifier values."""
    own = {a.name for a in technique.axes}
    return expand(technique.settings({k: v for k, v in axes.items() if k in own}), technique, axes)


class SweepPlan:
    """Everything resolved before the first row: settings, model, resolution, prompts, metrics, run folder.

    It plots nothing and logs nothing to W&B: the runner reports at the end (`Runner.report`).
    """

    def __init__(self, options: SweepOptions, device: torch.device | str | None = None, is_main: bool = True) -> None:
        o = self.options = options
        self.techniques: dict[str, Technique] = {name: TECHNIQUES.get(name)() for name in o.techniques}
        self.device = torch.device(check_device(device or o.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        self.settings = [Setting(BASELINE)]
        if o.only:
            self.settings += [self._one_setting(text) for text in o.only if text != BASELINE]
        for technique in self.techniques.values() if not o.only else []:
            for s in technique_settings(technique, o.axes):
                if s.id not in {x.id for x in self.settings}:
                    self.settings.append(s)
        if o.protocol:  # a preset's missing input fails here, before the model loads
            protocols.check_inputs(o.protocol, o.reference, o.fid_weights, o.clip_weights, o.allow_download)
        self.checkpoint = Path(o.checkpoint or embedded_checkpoint())
        self.pipeline = self.load_pipeline(o.dtype)
        for technique in self.techniques.values():
            technique.bind(self.pipeline.model)  # before `unsupported`, which may depend on the model's layout
        self.skipped = self._refuse_unsupported(is_main)

        cfg = self.pipeline.cfg
        self.default_resolution = (cfg.resolution, cfg.resolution)
        o.height, o.width = o.resolution or self.default_resolution
        self.pipeline.check(steps=o.steps, guidance=o.guidance, height=o.height, width=o.width, sampler=o.sampler)

        self.reference = load_reference(
            o.reference or COCO_DIR / "images", o.reference_captions, require_captions=not o.protocol
        )
        prompt_set: PromptSet = load_prompts(o.prompts, self.reference)
        if len(prompt_set.prompts) < o.num_images:
            raise InputError(
                f"--num-images {o.num_images} but {prompt_set.name} holds {len(prompt_set.prompts)} prompts"
            )
        self.prompt_set = prompt_set
        self.prompts = prompt_set.prompts[: o.num_images]
        self.seeds = [o.seed + i for i in range(o.num_images)]
        n_calib = max([int(s.params.get("calib_prompts", 0)) for s in self.settings] + [0])
        calib_source = "shapes" if shapes_set(o.prompts) else "coco"
        # a preset's reference folder has no captions: calibrate on the shipped COCO subset's second captions
        calib_reference = self.reference if all(self.reference.captions) else None
        self.calibration_prompts = load_prompts(calib_source, calib_reference, caption_index=1).prompts[:n_calib]
        self.metrics = build_metrics(o, self.reference)
        for metric in self.metrics:
            metric.prepare()  # bad weights fail here (exit 2), before anything is sampled or written

        self.model_sha256 = file_sha256(self.checkpoint)
        run_digest = o.digest(self.model_sha256, default_resolution=self.default_resolution)
        self.run_id = o.run_id or f"{'+'.join(o.techniques)}-{cfg.name}-{run_digest}"
        self.run_dir = o.out / self.run_id
        try:
            (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot write to output folder {self.run_dir}: {e}; pass a writable --out") from None
        if is_main:
            with run_lock(self.run_dir):
                update_manifest(self.run_dir / "manifest.json", self.manifest())

    def _one_setting(self, text: str) -> Setting:
        """The setting a `--setting ID` names, rebuilt through its technique (so it is validated)."""
        name, raw = parse_setting_id(text)
        if name not in self.techniques:
            raise InputError(f"--setting {text!r} is not a setting of --sweep {','.join(self.techniques)}")
        technique = self.techniques[name]
        known = {a.name: a for a in technique.axes} | modifier_axes()
        if unknown := set(raw) - set(known):
            raise InputError(f"{name} has no parameter {sorted(unknown)}; it has: {', '.join(known)}")
        axes = {k: known[k].values(v) for k, v in raw.items()}
        match = [s for s in technique_settings(technique, axes) if s.id == text]
        if not match:
            raise InputError(f"--setting {text!r} is not a valid {name} setting")
        for axis, value in match[0].params.items():  # axes given for this sweep bound what --setting may ask
            given = self.options.axes.get(axis)
            if axis in {a.name for a in technique.axes} and given is not None and value not in given:
                raise InputError(f"--setting {text!r}: {axis}={value} is outside this sweep's {axis} {given}")
        return match[0]

    def refusal(self, setting: Setting) -> str | None:
        """Why this setting cannot run on the plan's device and dtype (its technique's `unsupported`, then its
        `dtypes`), or None: the one check behind every plan-time skip."""
        technique = self.techniques[setting.technique]
        reason = technique.unsupported(technique_setting(setting), self.device)
        if reason is None and self.options.dtype not in technique.dtypes:
            reason = f"{technique.name} runs with --dtype {' or '.join(technique.dtypes)} only"
        return reason

    def _refuse_unsupported(self, log_them: bool) -> dict[str, str]:
        """Leave out the settings that cannot run on this device or dtype; list them once, with the reason."""
        skipped = {s.id: r for s in self.settings if s.technique != BASELINE and (r := self.refusal(s))}
        self.settings = [s for s in self.settings if s.id not in skipped]
        if log_them and skipped:
            log.warning(
                "planned %d setting(s) on %s (%s); skipped %d:\n%s", len(self.settings), self.device.type,
                self.options.dtype, len(skipped), "\n".join(f"  skipped: {k} — {v}" for k, v in skipped.items()),
            )  # fmt: skip
        return skipped

    def load_pipeline(self, dtype: str) -> StableDiffusion:
        """The model of this sweep (checkpoint, preset, --unet) on its device, in `dtype`."""
        o = self.options
        return load_pipeline(self.checkpoint, o.config, o.unet, dtype, self.device, o.unsafe_load)

    def sampling(self) -> dict[str, Any]:
        """Sampling options of every image (a row's `Compressed.sampling` may override some)."""
        o = self.options
        return {"steps": o.steps, "sampler": o.sampler, "guidance": o.guidance, "height": o.height, "width": o.width}

    def row_protocol(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The protocol columns of a row sampled with these overrides of `sampling()`."""
        s = {**self.sampling(), **(overrides or {})}
        return {
            "model": f"{self.pipeline.cfg.name}:{self.checkpoint.name}",
            "n_images": self.options.num_images,
            "resolution": f"{s['width']}x{s['height']}",
            "sampler": s["sampler"],
            "steps": s["steps"],
            "guidance": s["guidance"],
            "seed": self.options.seed,
            "prompts": self.prompt_set.describe(),
            "device": self.device.type,
            "dtype": self.options.dtype,
            "reference_dtype": self.reference_dtype,
            "batch_size": self.options.batch_size,
            "protocol": protocols.label(self.options.protocol, self.options.protocol_overrides),
        }

    @property
    def reference_dtype(self) -> str:
        """Dtype of the images PSNR/SSIM/LPIPS compare against: the sweep's own, or fp32 if asked."""
        return "fp32" if self.options.fp32_reference else self.options.dtype

    def manifest(self) -> dict[str, Any]:
        o = self.options
        return {
            "run_id": self.run_id,
            "protocol_digest": o.digest(
                self.model_sha256, with_settings=False, default_resolution=self.default_resolution
            ),
            "command": sys.argv,
            "git_sha": git_sha(),
            "versions": versions(),
            "host": {"platform": platform.platform(), "threads": torch.get_num_threads()},
            "model": {"preset": self.pipeline.cfg.name, "file": str(self.checkpoint), "sha256": self.model_sha256},
            "protocol": self.row_protocol(),
            "protocol_preset": {**protocols.get(o.protocol).describe(), "overrides": o.protocol_overrides}
            if o.protocol
            else None,
            "prompts": {"set": self.prompt_set.name, "sha256": self.prompt_set.sha256, "count": len(self.prompts)},
            "reference": {"images": len(self.reference.images), "sha256": self.reference.sha256},
            "calibration_prompts": len(self.calibration_prompts),
            "metrics": {m.name: {"protocol": m.protocol(), "unavailable": m.unavailable()} for m in self.metrics},
            "options": json.loads(json.dumps(asdict(o), default=str)),
            "settings": [s.id for s in self.settings],
            "skipped": self.skipped,
        }
