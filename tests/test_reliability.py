"""Issue 9 items 2 and 7-10: resolvable pins, ORT's shared-Gemm-weight workaround, metric weights checked at
plan time, and misleading rows (non-finite images, the pipeline dtype)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench.onnx_backend import _shared_gemm_weights, own_gemm_weights, quantize

REPO = Path(__file__).resolve().parent.parent


def _check_pins():
    spec = importlib.util.spec_from_file_location("check_pins", REPO / "scripts" / "check_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- item 2: requirements -------------------------------------------------------------------------------
def test_pins_follow_includes_and_report_missing_versions(tmp_path: Path) -> None:
    check = _check_pins()
    (tmp_path / "base.txt").write_text("# shared\ntorch==2.14.1\nnumpy==2.4.6  # comment\n")
    (tmp_path / "gpu.txt").write_text("-r base.txt\nonnxruntime-gpu==1.32.0\nopen_clip_torch[x]==3.3.0\n")
    wanted = check.pins(tmp_path / "gpu.txt")
    assert {k: v[0] for k, v in wanted.items()} == {
        "torch": "2.14.1", "numpy": "2.4.6", "onnxruntime-gpu": "1.32.0", "open_clip_torch": "3.3.0"
    }  # fmt: skip
    index = {"torch": ["2.15.0", "2.14.1"], "numpy": ["2.4.6"], "onnxruntime-gpu": ["1.31.1", "1.31.0"],
             "open_clip_torch": "cannot read https://index/open-clip-torch/: timed out"}  # fmt: skip
    problems = check.missing(wanted, lookup=index.__getitem__)
    assert len(problems) == 2
    assert "gpu.txt:2: onnxruntime-gpu==1.32.0 does not exist" in problems[0] and "1.31.1" in problems[0]
    assert "open_clip_torch==3.3.0: cannot read" in problems[1]


def test_the_project_pins_are_all_parsed() -> None:
    check = _check_pins()
    gpu, cpu = check.pins(REPO / "requirements-gpu.txt"), check.pins(REPO / "requirements.txt")
    assert gpu["onnxruntime-gpu"][0] == "1.31.1" and cpu["onnxruntime"][0] == "1.32.0"
    assert set(gpu) - {"onnxruntime-gpu"} == set(cpu) - {"onnxruntime"} and "torch" in cpu


# -- item 2: ORT 1.31 quantize_dynamic and shared Gemm weights -------------------------------------------
def _shared_gemm_model(path: Path) -> Path:
    """Two Gemms (transB=1) reading one weight initializer, plus a third Gemm with its own weight."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w2")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["y1"], name="g1", transB=1),
        helper.make_node("Gemm", ["x", "w"], ["y2"], name="g2", transB=1),
        helper.make_node("Gemm", ["y1", "w2"], ["y3"], name="g3", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 16]) for n in ("y2", "y3")], [w, w2, b],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_own_gemm_weights_keeps_fp32_outputs_and_quantizes(tmp_path: Path) -> None:
    src = _shared_gemm_model(tmp_path / "unet.onnx")
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    own = own_gemm_weights(src, tmp_path / "own")
    assert own != src and _shared_gemm_weights(onnx.load(str(own))) == []
    assert len(onnx.load(str(own)).graph.initializer) == 4  # one copy of `w` added
    for ours, ref in zip(_run(own, x), _run(src, x), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)  # same arithmetic, only the weight is copied
    assert own_gemm_weights(own, tmp_path / "again") == own  # nothing shared: no copy written

    q = quantize(src, "dynamic-int8", tmp_path / "q")  # goes through the rewrite: every Gemm quantized
    ops = [n.op_type for n in onnx.load(str(q)).graph.node]
    assert ops.count("Gemm") == 0 and ops.count("MatMulInteger") == 3, ops
    assert (tmp_path / "q" / "own-gemm-weights" / "unet.onnx").is_file()
