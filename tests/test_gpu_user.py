"""The GPU user's features, tested on the CPU: plan-time device refusals, --dtype rows, batched sampling,
out-of-memory handling, and the GPU check's entry point without CUDA."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.techniques.onnx.backend import provider_unavailable
from bench.techniques.quant import Quantization
from stable_diffusion.pipeline import StableDiffusion

from .test_sweep import FAST, REPO, rows_of, run_main

ONNX_CUDA = "onnx[onnx_mode=fp32,onnx_provider=cuda,onnx_prune=0.0]"


def images_of(out: Path, slug: str) -> list[np.ndarray]:
    [run_dir] = [p for p in out.iterdir() if p.is_dir()]
    files = sorted((run_dir / "images" / slug).glob("*.png"))
    return [np.asarray(Image.open(f).convert("RGB")).astype(np.int16) for f in files]


def test_quant_real_kernel_modes_are_cpu_only():
    q = Quantization()
    for mode in ("dynamic-int8", "weight-int8", "weight-int4"):
        [setting, *_] = q.settings({"mode": [mode]})
        assert q.unsupported(setting, "cpu") is None
        assert "use --device cpu" in q.unsupported(setting, torch.device("cuda", 1))
    [static, *_] = q.settings({"mode": ["static-w8a8"]})
    assert q.unsupported(static, "cuda") is None


def test_real_kernel_modes_declare_their_devices():
    """torchao int8 runs on CUDA too; PT2E x86 is CPU-only; float8 needs a CUDA GPU of capability >= 8.9."""
    q = Quantization()
    mode = {m: q.settings({"mode": [m]})[0] for m in ("torchao-int8-dynamic", "pt2e-static-int8", "torchao-float8")}
    assert q.unsupported(mode["torchao-int8-dynamic"], "cuda") is None
    assert q.unsupported(mode["torchao-int8-dynamic"], "cpu") is None
    assert q.unsupported(mode["pt2e-static-int8"], "cpu") is None
    assert "use --device cpu" in q.unsupported(mode["pt2e-static-int8"], "cuda")
    assert "compute capability" in q.unsupported(mode["torchao-float8"], "cpu")


@pytest.mark.skipif(provider_unavailable("cuda") is None, reason="this onnxruntime has the CUDA provider")
def test_cuda_only_mode_is_skipped_at_plan_time_and_the_sweep_goes_on(tmp_path):
    args = ["--sweep", "prune,onnx", "--ratios", "0.5", "--onnx-mode", "fp32", "--onnx-provider", "cuda"]
    proc = run_main(*args, "--device", "cpu", "--out", str(tmp_path), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"skipped: {ONNX_CUDA} \u2014 provider cuda needs onnxruntime-gpu") == 1
    ids = [r["setting_id"] for r in rows_of(tmp_path)]
    assert ids == ["baseline", "prune[method=l1,ratio=0.5,scope=global,target=all]"]
    [manifest] = tmp_path.glob("*/manifest.json")
    assert ONNX_CUDA in manifest.read_text()  # the plan records what it left out, and why


@pytest.mark.parametrize("dtype, fp32_reference", [("fp16", False), ("bf16", True)])
def test_dtype_sweep_rows(tmp_path, dtype, fp32_reference):
    args = ["--sweep", "prune", "--ratios", "0.5", "--dtype", dtype, "--out", str(tmp_path), *FAST]
    proc = run_main(*args, *(["--fp32-reference"] if fp32_reference else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, pruned = rows_of(tmp_path)
    assert base["kernels"] == f"dense {dtype}" and pruned["kernels"] == "dense"
    for row in (base, pruned):
        assert row["dtype"] == dtype and row["device"] == "cpu" and row["batch_size"] == "1"
        assert row["reference_dtype"] == ("fp32" if fp32_reference else dtype)
        assert float(row["images_per_s"]) > 0 and float(row["peak_mem_mb"]) > 0
    if fp32_reference:  # the baseline is the low-precision model measured against FP32 images
        assert 15 < float(base["psnr"]) < float("inf")
        assert len(images_of(tmp_path, "reference-fp32")) == 2
    else:
        assert base["psnr"] == "inf"


@pytest.fixture(scope="module")
def unbatched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("batch1")
    proc = run_main("--sweep", "prune", "--ratios", "0.5", "--out", str(out), *FAST, "--num-images", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_images(a: Path, b: Path) -> None:
    """Batched GEMMs sum in another order: an 8-bit pixel may move by one step, no more."""
    for slug in ("baseline", "prune_method=l1_ratio=0.5_scope=global_target=all"):
        x, y = images_of(a, slug), images_of(b, slug)
        assert len(x) == len(y) == 4
        assert max(int(np.abs(i - j).max()) for i, j in zip(x, y, strict=True)) <= 1, slug


def test_batched_sweep_equals_unbatched(unbatched, tmp_path):
    proc = run_main("--sweep", "prune", "--ratios", "0.5", "--out", str(tmp_path), *FAST, "--num-images", "4",
                    "--batch-size", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_images(unbatched, tmp_path)
    assert [r["batch_size"] for r in rows_of(tmp_path)] == ["4", "4"]


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="no accelerate")
def test_accelerate_sharded_batched_equals_single(unbatched, tmp_path):
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["--sweep", "prune", "--ratios", "0.5", "--out", str(tmp_path), *FAST, "--num-images", "4"]
    proc = run_main(*args, "--batch-size", "2", launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_images(unbatched, tmp_path)
    rows, single = rows_of(tmp_path), rows_of(unbatched)
    assert [r["setting_id"] for r in rows] == [r["setting_id"] for r in single]  # one row each: main writes
    for row in rows:
        assert float(row["latency_step_p50_ms"]) > 0 and float(row["images_per_s"]) > 0


def test_out_of_memory_is_one_clear_error(tmp_path, caplog, monkeypatch):
    import main

    real = StableDiffusion.__call__

    def small_memory(self, prompt, **kwargs):
        if isinstance(prompt, list) and len(prompt) > 1:  # as if two images at once did not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, prompt, **kwargs)

    monkeypatch.setattr(StableDiffusion, "__call__", small_memory)
    argv = ["--sweep", "prune", "--ratios", "0.5", "--out", str(tmp_path), *FAST, "--num-images", "4"]
    assert main.main([*argv, "--batch-size", "4", "--device", "cpu"]) == 2
    assert "out of cpu memory sampling 4 images per call" in caplog.text and "try --batch-size 2" in caplog.text
    assert "Traceback" not in caplog.text


GPU_CHECK = """
import sys
from bench.benchmarks import gpu_check
rc = gpu_check.main(["--dry-run"])
print("imported:", sorted(m for m in ("diffusers", "open_clip", "wandb", "matplotlib") if m in sys.modules))
sys.exit(rc)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run for real")
def test_gpu_check_without_cuda_plans_and_exits_cleanly():
    proc = subprocess.run([sys.executable, "-c", GPU_CHECK], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout and "plan:" in proc.stdout
    assert "skip: quant[granularity=channel,layers=linear,mode=dynamic-int8] - quant mode" in proc.stdout
    assert "mode: quant[calib_prompts=4,granularity=channel,layers=all,mode=static-w8a8," in proc.stdout
    assert "imported: []" in proc.stdout  # runs where diffusers, open_clip, wandb (and matplotlib) are absent
