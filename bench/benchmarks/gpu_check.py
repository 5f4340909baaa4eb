"""GPU check: what this harness does on a CUDA GPU, measured in one run of under ~8 minutes.

    bash scripts/gpu_check.sh                  # installs carried wheels offline, then runs this
    python -m bench.benchmarks.gpu_check [--out results/gpu_check] [--budget-s 420] [--dry-run]

1. parity: our v1-5 UNet (random weights) in fp16 and bf16 on CUDA vs fp32 on CUDA (TF32 off), and fp32
   CUDA vs fp32 CPU: max|diff| / max|ref| and SNR in dB of the predicted noise.
2. modes: step latency of one UNet call (v1-5 architecture, random weights, 64x64 latents, batch 2 = one
   image with guidance) for the dense rungs (fp32, bf16, fp16, fp16 + torch.compile) and one setting per
   mode of every registered technique that does not refuse CUDA at plan time; ratio = fp16 eager / row.
3. batched sampling: images/s of the whole fp16 pipeline at --batch-size 1, 4, 16 (16 images each).
4. one 50-step 512x512 image (PNDM, guidance 7.5) in fp16 with the UNet under torch.compile.

It imports only torch, numpy, PIL, tqdm, safetensors, regex, psutil and the project (never diffusers,
open_clip or wandb), so it runs where just torch, transformers, torchmetrics and accelerate are installed.
Each part checks the time left and is reported "not run: time budget" rather than overrunning.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench import cost
from bench.calibration import Calibration, UNetCall
from bench.registry import TECHNIQUES
from bench.techniques.base import Setting
from stable_diffusion.config import get_config
from stable_diffusion.defaults import REPO_ROOT
from stable_diffusion.model import LatentDiffusion, init_weights
from stable_diffusion.pipeline import StableDiffusion

log = logging.getLogger(__name__)

PLAN = [
    "parity: v1-5 UNet fp16/bf16 vs fp32 on CUDA, fp32 CUDA vs fp32 CPU",
    "modes: UNet step latency, v1-5 random weights, 64x64 latents, batch 2; dense rungs + every CUDA mode",
    "batched sampling: images/s at --batch-size 1, 4, 16 (fp16 pipeline, 512x512)",
    "one 50-step 512x512 image, fp16 + torch.compile",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODE_KEYS = ("mode", "onnx_mode", "method")  # one setting per value of the first of these a setting has


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def cuda_times(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    """(p50, p90) seconds of `fn`, each call synchronized so the GPU's work is inside the timing."""

    def synced() -> None:
        fn()
        torch.cuda.synchronize()

    return cost.percentiles(cost.time_calls(synced, warmup=warmup, repeats=repeats))


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max|diff| / max|ref| and SNR (dB) of `out` against `ref`."""
    out, ref = out.double().cpu(), ref.double().cpu()
    diff = out - ref
    return {
        "max_rel": (diff.abs().max() / ref.abs().max()).item(),
        "snr_db": (10 * torch.log10(ref.pow(2).sum() / diff.pow(2).sum().clamp(min=1e-30))).item(),
    }


def unet_inputs(cfg, batch: int, latent: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.unet.in_channels, latent, latent, generator=gen)
    ctx = torch.randn(batch, cfg.clip.max_length, cfg.unet.context_dim, generator=gen)
    return x.to(device), torch.tensor(500, device=device), ctx.to(device)


def parity(unet: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, dict[str, float]]:
    x, t, ctx = inputs
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            ref = unet(x, t, ctx)
            out = {}
            for name in ("fp16", "bf16"):
                low = copy.deepcopy(unet).to(DTYPES[name])
                out[f"{name} cuda vs fp32 cuda"] = compare(low(x.to(DTYPES[name]), t, ctx.to(DTYPES[name])), ref)
                del low
            cpu = copy.deepcopy(unet).cpu()
            out["fp32 cuda vs fp32 cpu"] = compare(ref, cpu(x.cpu(), t.cpu(), ctx.cpu()))
            del cpu
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def synthetic_calibration(inputs: tuple[torch.Tensor, ...], n_prompts: int = 4) -> Calibration:
    """Calibration calls for the static modes: random latents at spread timesteps (random weights anyway)."""
    x, _, ctx = inputs
    gen = torch.Generator().manual_seed(1)
    calls, owners = [], []
    for p in range(n_prompts):
        for t in (900, 500, 100):
            calls.append(UNetCall(torch.randn(x.shape, generator=gen), torch.tensor(t), ctx.cpu()))
            owners.append(p)
    return Calibration(calls, owners)


def mode_settings() -> list[tuple[str, Setting | None, str | None]]:
    """(technique, setting or None, refusal or import failure) for one setting per mode of each technique."""
    out: list[tuple[str, Setting | None, str | None]] = []
    for name in TECHNIQUES.names():
        try:
            technique = TECHNIQUES.get(name)()
        except ImportError as e:  # e.g. onnx without the onnx package: reported, not fatal
            out.append((name, None, f"not importable here: {e}"))
            continue
        seen = set()
        cuda_axes = {a.name: ["cuda"] for a in technique.axes if a.name.endswith("provider")}  # e.g. onnx_provider
        for s in technique.settings(cuda_axes):
            key = next((s.params[k] for k in MODE_KEYS if k in s.params), s.id)
            if key not in seen and s.params.get("ratio") != 0.0:  # ratio 0 is the dense model again
                seen.add(key)
                out.append((name, s, technique.unsupported(s, torch.device("cuda"))))
    return out


def modes(unet: nn.Module, inputs, budget: Budget, repeats: int) -> list[dict[str, object]]:
    """Step latency of the dense rungs and of every technique mode that runs on CUDA."""
    x, t, ctx = inputs
    rows: list[dict[str, object]] = []

    def timed(label: str, module: nn.Module, dtype: torch.dtype, kernels: str, ref: torch.Tensor | None) -> None:
        xi, ci = x.to(dtype), ctx.to(dtype)
        with torch.inference_mode():
            start = time.perf_counter()
            out = module(xi, t, ci)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            p50, p90 = cuda_times(lambda: module(xi, t, ci), warmup=2, repeats=repeats)
        row = {"mode": label, "kernels": kernels, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "first_call_s": first}
        if ref is not None:
            row.update(compare(out, ref))
        rows.append(row)
        log.info("%s: %.2f ms", label, p50 * 1e3)

    with torch.inference_mode():
        ref = unet(x, t, ctx)
    timed("fp32 eager", unet, torch.float32, "dense fp32", ref)
    for name in ("bf16", "fp16"):
        low = copy.deepcopy(unet).to(DTYPES[name])
        timed(f"{name} eager", low, DTYPES[name], f"dense {name}", ref)
        if name == "fp16":
            timed("fp16 compile", torch.compile(low), torch.float16, "dense fp16, inductor", ref)
        del low
    calibration = synthetic_calibration(inputs)
    for name, setting, refusal in mode_settings():
        label = setting.id if setting else name
        if refusal or budget.left() < 60:
            rows.append({"mode": label, "kernels": f"refused: {refusal}" if refusal else "not run: time budget"})
            continue
        technique = TECHNIQUES.get(name)()
        try:
            compressed = technique.apply(copy.deepcopy(unet), setting, calibration)
        except Exception as e:  # a mode that fails on this GPU is a finding, reported in the table
            rows.append({"mode": label, "kernels": f"failed: {type(e).__name__}: {e}"[:200]})
            continue
        if compressed.sampling or hasattr(compressed.module, "reset_sampling_state"):
            # fewer steps or a stateful cache: one UNet call says nothing of it; a sweep's image latency does
            rows.append({"mode": label, "kernels": "not timed: it changes sampling (see a sweep's image latency)"})
            continue
        weight = next(compressed.module.parameters(), None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        timed(label, compressed.module, dtype, str(compressed.fields.get("kernels", "?")), ref)
        del compressed
        torch.cuda.empty_cache()
    fp16 = next(r["p50_ms"] for r in rows if r["mode"] == "fp16 eager")
    for r in rows:
        if "p50_ms" in r:
            r["vs_fp16"] = fp16 / r["p50_ms"]
    return rows


def pipeline(model: LatentDiffusion) -> StableDiffusion:
    return StableDiffusion(model)


def batched(sd: StableDiffusion, budget: Budget, steps: int, sizes: tuple[int, ...] = (1, 4, 16)) -> list[dict]:
    """images/s of 16 images at each batch size (one seed per image, as the sweep samples)."""
    prompts = [f"a photo of object number {i}" for i in range(16)]
    sd(prompts[:1], seeds=[0], steps=1, sampler="ddim", progress=False)  # warm up kernels and allocator
    out = []
    for n in sizes:
        if budget.left() < 60:
            out.append({"batch_size": n, "images_per_s": None, "note": "not run: time budget"})
            continue
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(prompts), n):
            sd(prompts[i : i + n], seeds=list(range(i, i + n)), steps=steps, sampler="ddim", progress=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20
        out.append({"batch_size": n, "images_per_s": len(prompts) / wall, "peak_mem_mb": peak})
        log.info("batch %d: %.2f images/s", n, len(prompts) / wall)
    return out


def one_image(sd: StableDiffusion, budget: Budget, repeats: int = 3) -> dict[str, object]:
    """A 50-step 512x512 image with the fp16 UNet under torch.compile (first call compiles)."""
    if budget.left() < 120:
        return {"note": "not run: time budget"}
    eager = sd.model.swap_unet(torch.compile(sd.model.model.diffusion_model))
    try:
        run = lambda: sd("a photo of an astronaut riding a horse", steps=50, sampler="pndm", progress=False)  # noqa: E731
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        p50, p90 = cuda_times(run, warmup=0, repeats=repeats)
    finally:
        sd.model.swap_unet(eager)
    return {"image_p50_s": p50, "image_p90_s": p90, "first_image_s": first, "target_s": 0.6}


def markdown(result: dict[str, object]) -> str:
    lines = [f"GPU check on {result['device']} (torch {result['torch']}, CUDA {result['cuda']})", ""]
    lines += ["| parity | max rel | SNR dB |", "|---|---|---|"]
    lines += [f"| {k} | {v['max_rel']:.2e} | {v['snr_db']:.1f} |" for k, v in result["parity"].items()]
    lines += [
        "",
        "| mode | kernels | step p50 ms | p90 ms | vs fp16 eager | SNR dB vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["modes"]:
        cells = [f"{r[k]:.2f}" if isinstance(r.get(k), float) else "" for k in ("p50_ms", "p90_ms", "vs_fp16")]
        snr = f"{r['snr_db']:.1f}" if "snr_db" in r else ""
        lines.append(f"| {r['mode']} | {r['kernels']} | {' | '.join(cells)} | {snr} |")
    lines += ["", "| batch size | images/s | peak MiB |", "|---|---|---|"]
    for r in result["batched"]:
        ips = f"{r['images_per_s']:.2f}" if r.get("images_per_s") else r.get("note", "")
        lines.append(f"| {r['batch_size']} | {ips} | {r.get('peak_mem_mb', 0):.0f} |")
    img = result["one_image"]
    if "image_p50_s" in img:
        lines += [
            "",
            f"50-step 512x512 image, fp16 + compile: {img['image_p50_s']:.3f} s (p90 {img['image_p90_s']:.3f}; "
            f"first call {img['first_image_s']:.1f} s with compilation; target <= 0.6 s on an H200)",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "gpu_check")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new parts after this")
    p.add_argument("--repeats", type=int, default=20, help="timed UNet calls per mode")
    p.add_argument("--batch-steps", type=int, default=20, help="sampling steps in the batched-sampling part")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print("plan:\n" + "\n".join(f"  {i + 1}. {line}" for i, line in enumerate(PLAN)), flush=True)
    for name, setting, refusal in mode_settings():  # what the modes part runs, known without a GPU
        print(f"  {'skip' if refusal else 'mode'}: {setting.id if setting else name}" + f" - {refusal}" * bool(refusal))
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (the plan above is what a CUDA machine runs)")
        return 0
    if args.dry_run:
        return 0
    budget, device = Budget(args.budget_s), torch.device("cuda")
    cfg = get_config("v1-5")
    model = init_weights(LatentDiffusion(cfg), seed=0).eval().requires_grad_(False).to(device)
    inputs = unet_inputs(cfg, batch=2, latent=64, device=device)
    unet = model.model.diffusion_model
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
    }  # fmt: skip
    result["parity"] = parity(unet, inputs)
    result["modes"] = modes(unet, inputs, budget, args.repeats)
    sd = pipeline(model.to(torch.float16))
    result["batched"] = batched(sd, budget, args.batch_steps)
    result["one_image"] = one_image(sd, budget)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu_check.md").write_text(table := markdown(result))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
