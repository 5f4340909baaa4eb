"""Real-kernel speedups: precision casts, torch.compile, torchao and PT2E int8, speedup columns.

Tolerances are max |mode - fp32| / max |fp32| of one UNet call on the tiny random-weight UNet (8x8
latents, batch 2), measured as the max over the six calls of the calibration trajectory below and
doubled: bf16 0.0163 -> 0.035, fp16 0.0019 -> 0.005, torchao int8-dynamic 0.0163 -> 0.035, torchao
int8-weight 0.0096 -> 0.02; PT2E static int8 on the smaller compiled UNet below (random weights,
per-tensor uint8 activations; the simulated static W8A8 of tests/test_quant.py is 0.15 on tiny) 0.231 -> 0.46.

The tests that run inductor (minutes of C++ compilation on 2 cores) run only with SDBENCH_SLOW_TESTS=1; the
fast ones still prove per mode that the real thing is in place: the cast dtype, torchao's Int8Tensor
weights, and the PT2E converted graph with int8 weight constants and q/dq pairs around every Conv2d/Linear.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
from functools import reduce

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from bench.accel.compile import extern_ops
from bench.accel.pt2e import int8_op_counts, quantize_pt2e_x86
from bench.accel.speedup import rewrite_with_speedups, with_speedups
from bench.calibration import Calibration, Recorder
from bench.cli import add_sweep_args, options_from_args
from bench.cost import count_params
from bench.results import ResultsFile
from bench.techniques.base import Setting
from bench.techniques.precision import Precision
from bench.techniques.quant import Quantization
from stable_diffusion.config import TINY, UNetConfig
from stable_diffusion.errors import InputError
from stable_diffusion.pipeline import StableDiffusion
from stable_diffusion.unet import UNetModel

SAMPLE = {"steps": 3, "sampler": "ddim", "guidance": 7.5, "progress": False}
TOL = {"bf16": 0.035, "fp16": 0.005, "int8-dynamic": 0.035, "int8-weight": 0.02, "pt2e": 0.46}
P, Q = Precision(), Quantization()
SLOW = os.environ.get("SDBENCH_SLOW_TESTS") == "1"
slow = pytest.mark.skipif(not SLOW, reason="inductor compile of a UNet (minutes): SDBENCH_SLOW_TESTS=1")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def calibration(tiny_model) -> Calibration:
    """A real trajectory (two prompts, three DDIM steps each) recorded from the fp32 model, as the runner does."""
    model = copy.deepcopy(tiny_model)
    recorder = Recorder(model.unet)
    model.swap_unet(recorder)
    for i, prompt in enumerate(["a red circle", "two blue squares"]):
        recorder.prompt = i
        StableDiffusion(model)(prompt, seed=100 + i, **SAMPLE)
    return Calibration(recorder.calls, recorder.prompt_of_call)


@pytest.fixture(scope="module")
def inputs(calibration):
    call = calibration.calls[-1]
    return call.x, call.t, call.context


def run(module: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)


# ------------------------------------------------------------------------------------------- precision rungs


def test_precision_settings_leave_out_the_baseline_and_eager_from_ids():
    ids = [s.id for s in P.settings({})]
    assert "precision[unet_dtype=fp32]" not in ids  # fp32 eager is the sweep's baseline row
    assert ids == [
        "precision[compile=compile,unet_dtype=fp32]",
        "precision[unet_dtype=bf16]", "precision[compile=compile,unet_dtype=bf16]",
        "precision[unet_dtype=fp16]", "precision[compile=compile,unet_dtype=fp16]",
    ]  # fmt: skip
    with pytest.raises(InputError, match="fp32, bf16, fp16"):
        P.settings({"unet_dtype": ["int8"]})


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cast_unet_runs_in_its_dtype_and_stays_close(tiny_model, inputs, dtype):
    ref = run(tiny_model.unet, inputs)
    out = P.apply(copy.deepcopy(tiny_model.unet), Setting("precision", {"unet_dtype": dtype}))
    weight = next(out.module.parameters())
    assert weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    y = run(out.module, inputs)
    assert y.dtype == torch.float32  # the pipeline around the UNet is untouched
    assert rel_err(y, ref) <= TOL[dtype]
    assert out.fields["kernels"] == f"dense {dtype}" and "text encoder and VAE" in out.fields["cast"]
    assert out.fields["size_bytes"] < 0.55 * sum(p.numel() * 4 for p in tiny_model.unet.parameters())


# ----------------------------------------------------------------------------------------- torchao and PT2E


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weight"])
def test_torchao_modes_put_int8_tensor_subclasses_on_every_linear(tiny_model, calibration, inputs, mode):
    from torchao.quantization import Int8Tensor

    out = Q.apply(copy.deepcopy(tiny_model.unet), Setting("quant", {"mode": f"torchao-{mode}"}), calibration)
    linears = [m for m in out.module.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears)
    assert all(type(m.weight) is nn.Parameter for m in out.module.modules() if isinstance(m, nn.Conv2d))
    assert out.fields["quantized_layers"] == len(linears) and out.fields["compile"] == "eager"
    assert out.fields["kernels"].startswith({"int8-dynamic": "int8 GEMM", "int8-weight": "int8-weight-only"}[mode])
    assert rel_err(run(out.module, inputs), run(tiny_model.unet, inputs)) <= TOL[mode]
    # the cost columns count a quantized weight by its logical elements, non-zeros through its int8 data
    assert count_params(out.module)[0] == count_params(tiny_model.unet)[0]
    assert 0.9 * count_params(tiny_model.unet)[1] <= count_params(out.module)[1] <= count_params(tiny_model.unet)[1]


def test_precision_row_samples_in_the_pipeline_dtype(tiny_model):
    """A cast UNet does not change the pipeline's dtype: latents, VAE and images stay fp32."""
    model = copy.deepcopy(tiny_model)
    model.swap_unet(P.apply(copy.deepcopy(tiny_model.unet), Setting("precision", {"unet_dtype": "fp16"})).module)
    sd = StableDiffusion(model)
    assert sd.dtype == torch.float32
    assert sd("a red circle", seed=0, **{**SAMPLE, "steps": 2}).latents.dtype == torch.float32


def test_count_params_counts_a_shared_tensor_once(tiny_model):
    class Twice(nn.Module):  # as a compiled wrapper that also holds the original module
        def __init__(self, unet: nn.Module) -> None:
            super().__init__()
            self.a, self.b = unet, unet

    assert count_params(Twice(tiny_model.unet)) == count_params(tiny_model.unet)


@pytest.fixture(scope="module")
def micro(tiny_model):
    """A smaller UNet than the tiny preset's (same classes, fits the tiny pipeline) and its real trajectory:
    inductor compiles C++ per kernel, so the compiled tests use it to stay within minutes on 2 cores."""
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                     num_heads=2, context_dim=TINY.unet.context_dim, groups=4)  # fmt: skip
    unet = UNetModel(cfg).eval().requires_grad_(False)
    model = copy.deepcopy(tiny_model)
    recorder = Recorder(unet)
    model.swap_unet(recorder)
    for i, prompt in enumerate(["a red circle", "two blue squares"]):
        recorder.prompt = i
        StableDiffusion(model)(prompt, seed=100 + i, **SAMPLE)
    return unet, Calibration(recorder.calls, recorder.prompt_of_call)


@pytest.fixture(scope="module")
def pt2e(micro):
    unet, calibration = micro
    setting = Setting("quant", {"mode": "pt2e-static-int8", "calib_prompts": 2, "compile": "compile"})
    return Q.apply(copy.deepcopy(unet), setting, calibration)


def test_pt2e_converted_graph_has_int8_weights_and_qdq_on_every_conv_and_linear(micro):
    """Fast (no inductor): the graph inductor would lower holds int8 weight constants and q/dq pairs."""
    unet, calibration = micro
    converted = quantize_pt2e_x86(copy.deepcopy(unet), calibration.take(1))
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in unet.modules())
    consts = [reduce(getattr, str(n.target).split("."), converted) for n in converted.graph.nodes if n.op == "get_attr"]
    int8_consts = [c for c in consts if isinstance(c, torch.Tensor) and c.dtype == torch.int8]
    assert len(int8_consts) >= layers  # one int8 weight per quantized Conv2d / Linear
    counts = int8_op_counts(converted)
    assert counts["quantize"] >= layers and counts["dequantize"] >= counts["quantize"]
    call = calibration.calls[-1]
    err = rel_err(run(converted, (call.x, torch.as_tensor(call.t, dtype=torch.float32), call.context)),
                  run(unet, (call.x, call.t, call.context)))  # fmt: skip
    assert err <= TOL["pt2e"], f"PT2E (reference q/dq maths) rel error {err:.4f}"


@slow
def test_pt2e_static_int8_compiles_to_onednn_int8_kernels(micro, pt2e):
    unet, calibration = micro
    ops = pt2e.module.kernel_ops  # extern kernels called by the inductor output code of the compiled graph
    assert sum(n for op, n in ops.items() if op.startswith("onednn.qconv")) > 0
    assert sum(n for op, n in ops.items() if op.startswith("onednn.qlinear")) > 0
    f = pt2e.fields
    assert f["kernels"].startswith("int8 oneDNN") and f["calib_calls"] == len(calibration.calls)
    assert f["quant_peak_rss_mb"] > 0 and f["compile_s"] > 0 and f["qdq_nodes"]["quantize"] > 0
    assert f["size_bytes"] < 0.5 * sum(p.numel() * 4 for p in unet.parameters())
    call = calibration.calls[-1]
    errors = rel_err(run(pt2e.module, (call.x, call.t, call.context)), run(unet, (call.x, call.t, call.context)))
    assert errors <= TOL["pt2e"], f"PT2E rel error {errors:.4f}"


@slow
@pytest.mark.parametrize("sampler", ["ddim", "euler"])  # int and float timesteps
def test_compiled_unet_never_recompiles_while_sampling(tiny_model, pt2e, sampler):
    model = copy.deepcopy(tiny_model)
    model.swap_unet(pt2e.module)
    graphs = counters["stats"]["unique_graphs"]
    StableDiffusion(model)("a green triangle", seed=3, **{**SAMPLE, "steps": 4, "sampler": sampler})
    assert counters["stats"]["unique_graphs"] == graphs  # 4 timesteps, the one graph compiled already
    assert not counters["recompiles"]


def test_unavailable_modes_are_refused_when_planned(tiny_model, calibration):
    """settings() lists every mode; `unsupported` is what the sweep plan skips (and lists) on this machine."""
    by_mode = {s.params["mode"]: s for s in Q.settings({})}
    assert by_mode["pt2e-static-int8"].id == "quant[calib_prompts=4,compile=compile,mode=pt2e-static-int8]"
    assert "compute capability" in Q.unsupported(by_mode["torchao-float8"], "cpu")  # no CUDA GPU here
    int4 = Q.unsupported(by_mode["torchao-int4-weight"], "cpu")
    assert int4 is None or "mslk" in int4  # torchao 0.18 packs int4 only with its mslk kernels
    assert Q.unsupported(by_mode["pt2e-static-int8"], "cpu") is None
    assert Q.unsupported(by_mode["pt2e-static-int8"], "cuda")
    assert Q.settings({"mode": ["pt2e-static-int8"], "compile": ["eager", "compile"]})[0].params["compile"] == "compile"
    with pytest.raises(InputError, match="only when compiled"):
        Q.apply(copy.deepcopy(tiny_model.unet), Setting("quant", {"mode": "pt2e-static-int8"}), calibration)
    with pytest.raises(InputError, match="compute capability"):  # a direct call is guarded too
        Q.apply(copy.deepcopy(tiny_model.unet), by_mode["torchao-float8"], calibration)


def test_extern_ops_counts_torch_ops_calls():
    code = "buf1 = torch.ops.onednn.qconv_pointwise.default(a)\nbuf2 = torch.ops.onednn.qconv_pointwise(b)\n"
    assert extern_ops([code, "torch.ops.aten.mm.default(x)"]) == {"aten.mm": 1, "onednn.qconv_pointwise": 2}


# ------------------------------------------------------------------------------------------- speedup columns


def _row(setting_id: str, technique: str, latency: float | None, kernels: str = "dense fp32") -> dict[str, str]:
    return {"setting_id": setting_id, "technique": technique, "kernels": kernels,
            "latency_step_p50_ms": "" if latency is None else str(latency)}  # fmt: skip


def test_speedups_against_fp32_and_the_best_dense_row():
    rows = with_speedups([
        _row("baseline", "baseline", 100.0), _row("precision[unet_dtype=bf16]", "precision", 40.0, "dense bf16"),
        _row("quant[mode=pt2e]", "quant", 20.0, "int8 oneDNN"), _row("quant[static]", "quant", 300.0, "simulated"),
        _row("prune", "prune", None),
    ])  # fmt: skip
    got = {r["setting_id"]: (r["speedup_vs_fp32"], r["speedup_vs_best_dense"]) for r in rows}
    assert got["baseline"] == ("1.0", "0.4") and got["precision[unet_dtype=bf16]"] == ("2.5", "1.0")
    assert got["quant[mode=pt2e]"] == ("5.0", "2.0")
    assert got["quant[static]"] == ("", "") and got["prune"] == ("", "")  # simulated / not measured


def test_results_file_rewritten_in_place_with_speedups(tmp_path):
    results = ResultsFile(tmp_path / "results.csv", "run")
    results.append({"setting_id": "baseline", "technique": "baseline", "latency_step_p50_ms": 90.0})
    results.append(
        {
            "setting_id": "precision[unet_dtype=bf16]",
            "technique": "precision",
            "params": '{"unet_dtype": "bf16"}',
            "unet_dtype": "bf16",
            "latency_step_p50_ms": 30.0,
        }
    )
    rewrite_with_speedups(results)
    with results.path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["speedup_vs_best_dense"] for r in rows] == [repr(30.0 / 90.0), "1.0"]
    assert [r["speedup_vs_fp32"] for r in rows] == ["1.0", "3.0"]
    assert not list(tmp_path.glob("*tmp*")) and results.finished() == {"baseline", "precision[unet_dtype=bf16]"}


def test_sweep_quant_includes_the_precision_rungs_unless_modes_are_named():
    parser = argparse.ArgumentParser()
    add_sweep_args(parser)
    assert options_from_args(parser.parse_args(["--sweep", "quant"]), None).techniques == ["precision", "quant"]
    narrowed = parser.parse_args(["--sweep", "quant", "--mode", "pt2e-static-int8"])
    assert options_from_args(narrowed, None).techniques == ["quant"]
