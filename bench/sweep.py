"""What a sweep is: options (CLI or `--config-file sweep.toml`), and the plan built from them.

The run id is a digest of everything that changes the results, so re-running the same command lands in
the same `results/<run-id>/` and resumes it; a different sweep can never append to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from stable_diffusion.checkpoint import load_unet_into
from stable_diffusion.defaults import REPO_ROOT, embedded_checkpoint
from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import StableDiffusion

from . import protocols, report
from .data import COCO_DIR, PromptSet, ReferenceSet, file_sha256, load_prompts, load_reference, shapes_set
from .metrics.base import Metric
from .techniques import technique_class
from .techniques.base import Setting, Technique, parse_axis, parse_setting_id

log = logging.getLogger(__name__)

ALL_TECHNIQUES = ["prune", "quant", "onnx"]
PACKAGES = [
    "torch",
    "diffusers",
    "transformers",
    "torchmetrics",
    "open_clip_torch",
    "onnxruntime",
    "accelerate",
    "wandb",
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    wandb_project: str = "sdbench"
    wandb_mode: str = "offline"

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise InputError(f"--num-images must be >= 1, got {self.num_images}")
        if self.latency_repeats < 1:
            raise InputError(f"--latency-repeats must be >= 1, got {self.latency_repeats}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise InputError(f"--wandb-mode must be offline, online or disabled, got {self.wandb_mode!r}")

    def digest(self, model_id: str, with_settings: bool = True) -> str:
        """Hash of everything that changes the rows (not output location, W&B or resume flags).

        Without settings it is the protocol digest: rows of several sweeps may share one run folder
        (`--run-id`, e.g. W&B sweep agents) only when they share the protocol.
        """
        skip = {"out", "run_id", "resume", "wandb_project", "wandb_mode"}
        if not with_settings:
            skip |= {"techniques", "axes"}
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        keep["model"] = model_id
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_metrics(o: SweepOptions, reference: ReferenceSet, size: tuple[int, int]) -> list[Metric]:
    from .metrics.clip_score import CLIPScore
    from .metrics.fid import FID
    from .metrics.fidelity import Fidelity
    from .metrics.shapes import PromptAccuracy, shapes_fid

    cache = REPO_ROOT / "data" / "cache" / "fid"
    _, split, seed = shapes_set(o.prompts) or shapes_set("shapes-heldout")  # shapes-FID vs the prompts' own scenes
    return [
        Fidelity(lpips_weights=o.lpips_weights, allow_download=o.allow_download),
        FID(
            weights_path=o.fid_weights,
            reference=reference,
            cache_dir=cache,
            allow_download=o.allow_download,
            resize=o.fid_size,
        ),
        CLIPScore(
            model_name=o.clip_model,
            weights_path=o.clip_weights,
            allow_download=o.allow_download,
            download_tag=o.clip_tag,
            quick_gelu=o.clip_quick_gelu,
        ),
        PromptAccuracy(),
        shapes_fid(n_reference=256, split=split, seed=seed, cache_dir=cache),
    ]


def _parse_axis(technique: Technique, axis: str, value: str) -> list[Any]:
    if axis not in technique.axes:
        raise InputError(f"{technique.name} has no parameter {axis!r}; it has: {', '.join(technique.axes)}")
    return parse_axis(axis, value, technique.axes[axis][1])


class SweepPlan:
    """Everything resolved before the first row: model, prompts, settings, metrics, run folder."""

    def __init__(self, options: SweepOptions, device: torch.device | str | None = None, is_main: bool = True) -> None:
        o = self.options = options
        self.techniques: dict[str, Technique] = {name: technique_class(name)() for name in o.techniques}
        self.settings = [Setting("baseline")]
        if o.only:
            self.settings += [self._one_setting(text) for text in o.only if text != "baseline"]
        for technique in self.techniques.values() if not o.only else []:
            given = {k: v for k, v in o.axes.items() if k in technique.axes}
            self.settings += [s for s in technique.settings(given) if s.id not in {x.id for x in self.settings}]

        if o.protocol:  # a preset's missing input fails here, before the model loads
            protocols.check_inputs(o.protocol, o.reference, o.fid_weights, o.clip_weights, o.allow_download)
        self.checkpoint = o.checkpoint or embedded_checkpoint()
        self.pipeline = self._load_model(device or o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = self.pipeline.cfg
        o.height, o.width = o.resolution or (cfg.resolution, cfg.resolution)

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
        self.metrics = build_metrics(o, self.reference, (o.height, o.width))

        self.model_sha256 = file_sha256(self.checkpoint)
        self.data_id = f"{self.model_sha256}:{prompt_set.sha256}"  # the prompts' content, not only their name
        self.run_id = o.run_id or f"{'+'.join(o.techniques)}-{cfg.name}-{o.digest(self.data_id)}"
        self.run_dir = o.out / self.run_id
        try:
            (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot write to output folder {self.run_dir}: {e}; pass a writable --out") from None
        if is_main:
            self._write_manifest()

    def _one_setting(self, text: str) -> Setting:
        """The setting a `--setting ID` names, rebuilt through its technique (so it is validated)."""
        name, raw = parse_setting_id(text)
        if name not in self.techniques:
            raise InputError(f"--setting {text!r} is not a setting of --sweep {','.join(self.techniques)}")
        technique = self.techniques[name]
        axes = {k: _parse_axis(technique, k, v) for k, v in raw.items()}
        match = [s for s in technique.settings(axes) if s.id == text]
        if not match:
            raise InputError(f"--setting {text!r} is not a valid {name} setting")
        return match[0]

    def _load_model(self, device: torch.device | str) -> StableDiffusion:
        o = self.options
        from stable_diffusion.config import get_config

        if o.dtype not in DTYPES:
            raise InputError(f"unknown dtype {o.dtype!r}; choose from {', '.join(DTYPES)}")
        cfg = get_config(o.config) if o.config else None
        sd = StableDiffusion.from_checkpoint(
            self.checkpoint, cfg, dtype=DTYPES[o.dtype], device=device, unsafe=o.unsafe_load
        )
        if o.unet:
            load_unet_into(sd.model, o.unet, unsafe=o.unsafe_load)
        return sd

    def row_protocol(self) -> dict[str, Any]:
        o = self.options
        return {
            "model": f"{self.pipeline.cfg.name}:{self.checkpoint.name}",
            "n_images": o.num_images,
            "resolution": f"{o.width}x{o.height}",
            "sampler": o.sampler,
            "steps": o.steps,
            "guidance": o.guidance,
            "seed": o.seed,
            "prompts": self.prompt_set.describe(),
            "protocol": protocols.label(o.protocol, o.protocol_overrides),
        }

    def manifest(self) -> dict[str, Any]:
        o = self.options
        return {
            "run_id": self.run_id,
            "protocol_digest": o.digest(self.data_id, with_settings=False),
            "command": sys.argv,
            "git_sha": _git_sha(),
            "versions": _versions(),
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
        }

    def _write_manifest(self) -> None:
        path = self.run_dir / "manifest.json"
        data = self.manifest()
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("protocol_digest") != data["protocol_digest"]:
                raise InputError(
                    f"{self.run_dir} holds a sweep with another protocol (model, prompts, sampler, steps, seed, "
                    "metrics...); use another --run-id or --out"
                )
            data["started"] = old.get("started")
            data["resumed"] = [*old.get("resumed", []), time.strftime("%Y-%m-%dT%H:%M:%S")]
        else:
            data["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        path.write_text(json.dumps(data, indent=2, default=str))

    def finish(self, rows: list[dict[str, str]], plots: list[Path]) -> None:
        """W&B run (offline by default), W&B sweep configs for spreading settings over machines."""
        o = self.options
        for name in self.techniques:
            ids = [s.id for s in self.settings if s.technique == name]
            if ids:
                path = self.run_dir / f"wandb_sweep_{name}.yaml"
                report.write_wandb_sweep(path, name, {"setting": ids}, self.base_args())
        grids = {s.id: self.run_dir / "images" / f"{s.slug}-grid.png" for s in self.settings}
        if o.wandb_mode != "disabled":
            where = report.log_wandb(
                self.run_dir, o.wandb_project, o.wandb_mode, self.manifest(), rows,
                {k: v for k, v in grids.items() if v.exists()}, plots, self.run_id,
            )  # fmt: skip
            log.info("W&B run (%s): %s", o.wandb_mode, where)
        log.info("results: %s", self.run_dir / "results.csv")

    def base_args(self) -> list[str]:
        """CLI flags that reproduce this sweep's protocol (for W&B sweep agents)."""
        o = self.options
        args = ["--num-images", str(o.num_images), "--steps", str(o.steps), "--sampler", o.sampler]
        args += ["--guidance", str(o.guidance), "--seed", str(o.seed), "--prompts", o.prompts]
        args += ["--resolution", f"{o.width}x{o.height}", "--run-id", self.run_id]
        if o.checkpoint:
            args += ["--checkpoint", str(o.checkpoint)]
        if o.protocol:
            args += ["--protocol", o.protocol]
        return args
