"""ONNX export and ONNX Runtime backends on the tiny preset: parity with PyTorch, INT8/INT4 quality, the
external-data path, the export cache (reuse, damage), prune -> export, and `--sweep onnx` end to end.

Tolerances (measured, then given margin): ORT FP32 vs PyTorch max|diff| <= 1e-5 * max|ref| per component
(measured 1.4e-6 UNet, 5.7e-7 text encoder, 1.1e-6 VAE decoder); a 3-step all-ORT image within 1e-3 on
[0, 1] pixels (measured 4.4e-6); quantized UNets sampled against the FP32 images (PSNR, measured -> bound):
dynamic-int8 36.2 -> 30 dB, dynamic-int8-conv 29.6 -> 25 dB, static-int8 24.0 -> 18 dB, int4 25.4 -> 20 dB.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from bench import cost
from bench.calibration import Calibration, Recorder
from bench.techniques.base import Setting
from bench.techniques.onnx import technique as onnx_technique
from bench.techniques.onnx.backend import (
    OrtTextEncoder,
    OrtUNet,
    OrtVAEDecoder,
    activation_matmuls,
    run_all_in_ort,
    time_projection_nodes,
)
from bench.techniques.onnx.export import CACHE_ENV, export_text_encoder, export_unet, export_vae_decoder, model_files
from bench.techniques.onnx.technique import OnnxRuntime
from stable_diffusion.defaults import embedded_checkpoint
from stable_diffusion.errors import CheckpointError, InputError
from stable_diffusion.pipeline import StableDiffusion

from .conftest import assert_close

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red bus on a street", "two dogs on a beach"]
SAMPLE = {"steps": 3, "sampler": "ddim", "guidance": 7.5, "progress": False}
PSNR_MIN = {"dynamic-int8": 30.0, "dynamic-int8-conv": 25.0, "static-int8": 18.0, "int4": 20.0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def unet_export(tiny_model, cache):
    """The tiny UNet with external data forced (as the sweep exports it, so `--sweep onnx` reuses it)."""
    return export_unet(tiny_model.unet, cache_dir=cache, external_data=True)


def sample(sd: StableDiffusion) -> torch.Tensor:
    return torch.cat([sd(p, seed=i, **SAMPLE).pixels for i, p in enumerate(PROMPTS)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


@pytest.fixture(scope="module")
def fp32_images(tiny_model) -> torch.Tensor:
    return sample(StableDiffusion(tiny_model))


@pytest.fixture(scope="module")
def calibration(tiny_model) -> Calibration:
    """A real trajectory: the UNet inputs of sampling another prompt with the FP32 model."""
    model = copy.deepcopy(tiny_model)
    recorder = Recorder(model.unet)
    model.swap_unet(recorder)
    StableDiffusion(model)("a bowl of fruit", seed=100, **SAMPLE)
    return Calibration(recorder.calls, recorder.prompt_of_call)


# ------------------------------------------------------------------------------------------- FP32 parity


@torch.no_grad()
def test_unet_fp32_matches_pytorch(tiny_model, unet_export):
    ort_unet = OrtUNet(unet_export.path)
    gen = torch.Generator().manual_seed(0)
    for batch, h, w, t in [(2, 16, 16, torch.tensor(981)), (3, 8, 12, torch.tensor([1.0, 500.0, 999.0]))]:
        x = torch.randn(batch, 4, h, w, generator=gen)
        ctx = torch.randn(batch, 77, 64, generator=gen)
        assert_close(ort_unet(x, t, ctx), tiny_model.unet(x, t, ctx), rel=1e-5)


@torch.no_grad()
def test_text_encoder_and_vae_decoder_match_pytorch(tiny_model, cache):
    text = OrtTextEncoder(export_text_encoder(tiny_model.text_encoder, cache_dir=cache, external_data=True).path)
    ids = StableDiffusion(tiny_model).tokenizer(["a photo of a cat", ""])
    assert_close(text(ids), tiny_model.text_encoder(ids), rel=1e-5)
    vae = OrtVAEDecoder(export_vae_decoder(tiny_model.vae, cache_dir=cache, external_data=True).path)
    z = torch.randn(3, 4, 16, 8, generator=torch.Generator().manual_seed(1))
    assert_close(vae.decode(z), tiny_model.vae.decode(z), rel=1e-5)
    with pytest.raises(InputError, match="decoder only"):
        vae.encode(torch.zeros(1, 3, 64, 64))


def test_all_ort_pipeline_matches_pytorch(tiny_model, cache, unet_export, fp32_images):
    model = copy.deepcopy(tiny_model)
    exported = run_all_in_ort(model, cache_dir=cache, external_data=True)
    assert exported["unet"].cached  # the fixture's export, reused (and the test above's for the other two)
    assert sum(p.numel() for p in model.parameters()) == 0  # no weights left in PyTorch
    images = sample(StableDiffusion(model))
    assert (images - fp32_images).abs().max() <= 1e-3


# ----------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("mode", ["dynamic-int8", "dynamic-int8-conv", "static-int8", "int4"])
def test_quantized_unets_stay_close(tiny_model, cache, unet_export, calibration, fp32_images, mode):
    if mode == "int4" and onnx_technique.int4_unavailable():
        pytest.skip(onnx_technique.int4_unavailable())
    params = {"onnx_mode": mode, **({"calib_prompts": 1} if mode == "static-int8" else {})}
    out = OnnxRuntime(cache).apply(copy.deepcopy(tiny_model.unet), Setting("onnx", params), calibration)
    f = out.fields
    assert f["export_cached"] and f["onnx_key"] == unet_export.key[:24]
    assert f["backend"] == "onnxruntime" and f["kernels"].startswith("ort-int") and f["mode"] == mode
    assert f["quantized_nodes"] and 0 < f["size_bytes"] < unet_export.size_bytes
    assert f["quant_peak_rss_mb"] > 0 and f["opset"] == 18 and f["provider"] == "cpu"
    assert f["bits_weights"] == (4 if mode == "int4" else 8)
    if mode == "static-int8":
        assert f["calib_calls"] == len(calibration.calls) == SAMPLE["steps"]
    model = copy.deepcopy(tiny_model)
    model.swap_unet(out.module)
    value = psnr(sample(StableDiffusion(model)), fp32_images)
    print(f"{mode}: PSNR {value:.1f} dB vs FP32")
    assert PSNR_MIN[mode] <= value < math.inf


def test_static_int8_keeps_time_projection_and_attention_float(unet_export):
    model = onnx.load(str(unet_export.path), load_external_data=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    excluded = time_projection_nodes(model)
    assert {"Mul", "Sin", "Cos"} <= {ops[n] for n in excluded}
    assert "Conv" not in {ops[n] for n in excluded} and "Shape" not in {ops[n] for n in excluded}
    assert len(activation_matmuls(model)) == 2 * 2 * 7  # q k^T and attn v, in 2 attentions x 7 transformers


# ------------------------------------------------------------------------------------------- the cache


def test_external_data_is_used_and_checked(unet_export):
    files = model_files(unet_export.path)
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    assert files[1].stat().st_size > files[0].stat().st_size  # the weights are in the data file
    onnx.checker.check_model(str(unet_export.path))  # by path, as for > 2 GB models
    assert unet_export.size_bytes == sum(f.stat().st_size for f in files)
    assert unet_export.peak_rss_bytes > 0 and unet_export.opset == 18


def test_cache_hit_reuses_export_and_new_weights_miss(tiny_model, cache, unet_export):
    mtimes = [f.stat().st_mtime_ns for f in model_files(unet_export.path)]
    again = export_unet(tiny_model.unet, cache_dir=cache, external_data=True)
    assert again.cached and again.path == unet_export.path and again.peak_rss_bytes is None
    assert [f.stat().st_mtime_ns for f in model_files(again.path)] == mtimes
    changed = copy.deepcopy(tiny_model.text_encoder)
    with torch.no_grad():
        changed.transformer.text_model.final_layer_norm.bias.add_(1.0)
    before = export_text_encoder(tiny_model.text_encoder, cache_dir=cache)  # small: weights inline by default
    after = export_text_encoder(changed, cache_dir=cache)
    assert not after.cached and after.key != before.key
    assert model_files(before.path) == [before.path]


@pytest.mark.parametrize("damage", ["truncate-onnx", "truncate-data", "garbage-onnx"])
def test_damaged_export_gives_clear_error(tiny_model, cache, unet_export, tmp_path, damage):
    broken = tmp_path / "cache"
    shutil.copytree(unet_export.path.parent, broken / unet_export.path.parent.name)
    target = broken / unet_export.path.parent.name / ("unet.onnx.data" if damage == "truncate-data" else "unet.onnx")
    if damage == "garbage-onnx":
        target.write_bytes(b"\x00not a model" * 100)
    else:
        os.truncate(target, target.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"damaged .*delete that folder to re-export"):
        export_unet(tiny_model.unet, cache_dir=broken, external_data=True)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        OrtUNet(target if damage != "truncate-data" else target.with_suffix(""))


# ------------------------------------------------------------------------------- technique: prune, axes


def test_prune_then_export_has_the_sparsity_in_onnx(tiny_model, cache):
    setting = Setting("onnx", {"onnx_mode": "fp32", "onnx_prune": 0.5})
    out = OnnxRuntime(cache).apply(copy.deepcopy(tiny_model.unet), setting, None)
    assert out.fields["sparsity"] == pytest.approx(0.5, abs=1e-6) and not out.fields["export_cached"]
    model = onnx.load(str(out.module.path))  # with its external data
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    used = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")} & set(weights)
    zeros = sum(int((weights[n] == 0).sum()) for n in used)
    assert zeros / sum(weights[n].size for n in used) == pytest.approx(0.5, abs=1e-3)
    assert cost.count_params(out.module) == (0, 0)  # what the runner's measure_cost sees: no torch weights


def test_settings_defaults_and_bad_values(monkeypatch):
    ids = [s.id for s in OnnxRuntime().settings({})]
    assert ids[-1] == "onnx[onnx_mode=dynamic-int8,onnx_provider=cpu,onnx_prune=0.5]"
    assert "onnx[calib_prompts=4,onnx_mode=static-int8,onnx_provider=cpu,onnx_prune=0.0]" in ids
    assert len(OnnxRuntime().settings({"onnx_mode": ["fp32", "dynamic-int8"]})) == 2
    monkeypatch.setattr(onnx_technique, "int4_unavailable", lambda: "no MatMulNBits here")
    assert not [i for i in (s.id for s in OnnxRuntime().settings({})) if "int4" in i]
    with pytest.raises(InputError, match="no MatMulNBits here"):
        OnnxRuntime().settings({"onnx_mode": ["int4"]})
    with pytest.raises(InputError, match="onnx_mode"):
        OnnxRuntime().settings({"onnx_mode": ["int3"]})
    with pytest.raises(InputError, match="ratio"):
        OnnxRuntime().settings({"onnx_prune": ["1.5"]})
    with pytest.raises(InputError, match="onnxruntime-gpu"):
        OnnxRuntime().apply(torch.nn.Linear(1, 1), Setting("onnx", {"onnx_mode": "fp32", "onnx_provider": "cuda"}))


# ------------------------------------------------------------------------------------------- end to end


def test_sweep_onnx_end_to_end(cache, unet_export, tmp_path):
    args = ["--sweep", "onnx", "--onnx-mode", "fp32,dynamic-int8", "--num-images", "2", "--steps", "2"]
    args += ["--latency-repeats", "1", "--wandb-mode", "disabled", "--out", str(tmp_path)]
    args += ["--checkpoint", str(embedded_checkpoint(trained=False))]  # the fixture's weights: a cache hit
    env = {**os.environ, CACHE_ENV: str(cache), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [csv_path] = tmp_path.glob("*/results.csv")
    with csv_path.open(newline="") as f:
        rows = {r["setting_id"]: r for r in csv.DictReader(f)}
    assert list(rows) == [
        "baseline",
        "onnx[onnx_mode=fp32,onnx_provider=cpu,onnx_prune=0.0]",
        "onnx[onnx_mode=dynamic-int8,onnx_provider=cpu,onnx_prune=0.0]",
    ]
    base, fp32, int8 = rows.values()
    assert base["backend"] == "pytorch" and fp32["backend"] == int8["backend"] == "onnxruntime"
    assert (fp32["kernels"], int8["kernels"]) == ("ort-fp32", "ort-int8-dynamic")
    assert fp32["psnr"] == "inf" or float(fp32["psnr"]) > 50  # same prompts and seeds as the baseline
    assert 20 < float(int8["psnr"]) < math.inf and int8["bits_weights"] == "8"
    for row in (fp32, int8):
        assert float(row["latency_step_p50_ms"]) > 0 and int(row["size_bytes"]) > 0 and row["nonzeros"] == ""
        assert row["prompts"] == base["prompts"] and row["seed"] == base["seed"]
        extra = json.loads(row["extra"])
        assert extra["provider"] == "cpu" and extra["opset"] == 18 and extra["export_cached"] is True  # fixture's
    assert float(int8["quant_peak_rss_mb"]) > 0 and json.loads(int8["extra"])["quantized_nodes"]
