"""Issue 9 items 2 and 7-10: resolvable pins, ORT's shared-Gemm-weight workaround, metric weights checked at
plan time, and misleading rows (non-finite images, the pipeline dtype)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.techniques.onnx.backend import _shared_gemm_weights, own_gemm_weights, quantize

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


# -- CLI: one line, exit 2, nothing created (items 7-9) --------------------------------------------------
def _cli(args: list[str], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """main.main in process: (exit code, error lines); an exception escaping main fails the test."""
    import main

    caplog.clear()
    try:
        code = main.main(args)
    except SystemExit as e:  # argparse
        code = e.code
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    errors += [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    return code, errors


SWEEP = ["--sweep", "prune", "--num-images", "2", "--steps", "1", "--wandb-mode", "disabled", "--latency-repeats", "1"]
BAD_TOML = {
    "num-images-text": 'num_images = "two"',
    "steps-float": "steps = 1.5",
    "guidance-text": 'guidance = "high"',
    "seed-bool": "seed = true",
    "resolution-word": 'resolution = "big"',
    "prompts-number": "prompts = 3",
    "out-number": "out = 5",
    "setting-not-a-list": 'only = "baseline"',
}


@pytest.mark.parametrize("body", BAD_TOML.values(), ids=BAD_TOML.keys())
def test_config_file_value_types(tmp_path: Path, caplog, capsys, body: str) -> None:
    (tmp_path / "sweep.toml").write_text(f"[sweep]\n{body}\n")
    code, errors = _cli([*SWEEP, "--config-file", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "o")],
                        caplog, capsys)  # fmt: skip
    assert code == 2 and len(errors) == 1 and "[sweep]" in errors[0] and "must be" in errors[0], errors
    assert not (tmp_path / "o").exists()


CASES = {
    "resolution-0": ([*SWEEP, "--resolution", "0"], "resolution must be positive"),
    "generate-resolution-0": (["generate", "--prompt", "x", "--resolution", "0"], "resolution must be positive"),
    "device-bogus": ([*SWEEP, "--device", "bogus"], "is not a device"),
    "device-meta": (["generate", "--prompt", "x", "--device", "meta"], "cannot run"),
    "typo-table": ([*SWEEP, "--config-file", "{toml}"], "unknown table [purne]"),
    "other-technique-flag": ([*SWEEP, "--mode", "dynamic-int8"], "is an axis of quant"),
    "run-id-escapes": ([*SWEEP, "--run-id", "../x"], "plain folder name"),
    "setting-outside-axes": (
        [*SWEEP, "--ratios", "0.3", "--setting", "prune[method=l1,ratio=0.5,scope=global,target=all]"],
        "outside this sweep's ratio",
    ),
    "config-dir": ([*SWEEP, "--config-file", "{dir}"], "is a directory"),
    "steps-0-before-folder": ([*SWEEP, "--steps", "0"], "steps must be a positive"),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_bad_inputs_are_one_line_and_create_nothing(tmp_path: Path, caplog, capsys, case: str) -> None:
    args, words = CASES[case]
    (tmp_path / "purne.toml").write_text("[purne]\nratio = [0.3]\n")
    args = [a.format(toml=tmp_path / "purne.toml", dir=tmp_path) for a in args]
    out = tmp_path / "results"
    code, errors = _cli([*args, "--out", str(out)] if args[0] != "generate" else args, caplog, capsys)
    assert code == 2 and len(errors) == 1 and words in errors[0], errors
    assert not out.exists() and not (tmp_path / "x").exists()


def test_another_techniques_table_or_axis_is_rejected(tmp_path: Path, caplog, capsys) -> None:
    for body, words in [("[quant]\nmode = ['dynamic-int8']", "[quant]"), ("[prune]\nmode = ['x']", "unknown axis")]:
        (tmp_path / "s.toml").write_text(body + "\n")
        code, errors = _cli([*SWEEP, "--config-file", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")],
                            caplog, capsys)  # fmt: skip
        assert code == 2 and len(errors) == 1 and words in errors[0], errors


def test_two_tables_setting_a_shared_axis_differently_are_rejected(tmp_path: Path, caplog, capsys) -> None:
    """prune and structured share `ratio`: one table's values must not silently replace the other's."""
    body = "[prune]\nratio = [0.3, 0.7]\n[structured]\nratio = [0.5]\n"
    (tmp_path / "s.toml").write_text(body)
    args = ["--sweep", "prune,structured", "--config-file", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")]
    code, errors = _cli(args, caplog, capsys)
    assert code == 2 and len(errors) == 1 and "[prune] and [structured]" in errors[0], errors
    assert not (tmp_path / "o").exists()


def test_init_image_over_the_pixel_limit_or_truncated(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from stable_diffusion.errors import InputError
    from stable_diffusion.pipeline import load_image

    good = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError, match="cannot read init image"):
        load_image(truncated)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2x the limit: PIL's decompression bomb
    with pytest.raises(InputError, match="cannot read init image"):
        load_image(good)


def test_a_full_disk_mid_append_leaves_no_half_row(tmp_path: Path, monkeypatch) -> None:
    import errno

    from bench.results import ResultsFile

    results = ResultsFile(tmp_path / "results.csv", "run")
    results.append({"setting_id": "baseline", "technique": "baseline"})
    before = results.path.read_bytes()
    real_open = Path.open

    class Full:
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def write(self, text: str) -> None:
            self.f.write(text[:10])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def opener(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        return Full(f) if mode == "a" else f

    monkeypatch.setattr(Path, "open", opener)
    with pytest.raises(OSError):
        results.append({"setting_id": "prune[x=1]", "technique": "prune", "params": {"x": 1}})
    monkeypatch.undo()
    assert results.path.read_bytes() == before


def test_a_full_output_disk_is_one_line(tmp_path: Path, caplog, capsys, monkeypatch) -> None:
    import errno

    import bench.sweep

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "manifest.json"))

    monkeypatch.setattr(bench.sweep, "update_manifest", full)
    code, errors = _cli([*SWEEP, "--out", str(tmp_path / "o")], caplog, capsys)
    assert code == 2 and len(errors) == 1 and "No space left" in errors[0], errors


def test_ctrl_c_during_start_up_is_not_a_traceback() -> None:
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "main.py", "--sweep", "prune"], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    time.sleep(1.0)  # inside `import torch`
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err


# -- metric weights (item 7) ------------------------------------------------------------------------------
def test_failed_downloads_leave_columns_empty_with_one_line(tmp_path: Path, monkeypatch) -> None:
    import urllib.error

    import torch
    from PIL import Image

    from bench.metrics.fid import FID
    from bench.metrics.fidelity import Fidelity

    def offline(*_a, **_k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        fidelity = Fidelity(allow_download=True, device="cpu")
        fidelity.prepare()
        (hint,) = fidelity.hints()
        assert "download" in hint and "failed" in hint and "\n" not in hint
        images = torch.rand(2, 3, 16, 16)
        assert fidelity.compute(images, ["a", "b"], images)["lpips"] is None
        fid = FID([Image.new("RGB", (8, 8))] * 2, allow_download=True)
        fid.prepare()
        assert "failed" in fid.unavailable() and fid.compute(images, ["a", "b"], None) == {}
    finally:
        torch.hub.set_dir(previous)


def test_bad_metric_weights_fail_at_plan_time(tmp_path: Path) -> None:
    from bench.metrics.fidelity import Fidelity
    from stable_diffusion.errors import InputError

    garbage = tmp_path / "alexnet.pth"
    garbage.write_bytes(b"\x00not weights at all" * 10)
    for path, words in [(garbage, "--lpips-weights"), (tmp_path / "missing.pth", "is not a file")]:
        with pytest.raises(InputError, match=words):
            Fidelity(lpips_weights=path, device="cpu").prepare()


# -- W&B agents into one run folder (items 3, 4, 8, 10) --------------------------------------------------
P03 = "prune[method=l1,ratio=0.3,scope=global,target=all]"
P05 = "prune[method=l1,ratio=0.5,scope=global,target=all]"


def _rows(run: Path) -> list[dict[str, str]]:
    from bench.results import ResultsFile

    lines = (run / "results.csv").read_bytes().splitlines()
    rows = ResultsFile(run / "results.csv", "r", writer=False).rows()
    assert len(lines) == len(rows) + 1  # every line a complete row: nothing half-written or quarantined
    return rows


def test_two_agents_in_sequence_share_one_run_folder(tmp_path: Path, caplog, capsys, monkeypatch) -> None:
    """Agent 1 as the W&B YAML runs it; then images/baseline is deleted and agent 2 (its UNet all-NaN, with
    the YAML's explicit --resolution) resumes the same folder: one row per setting, none redone."""
    import json

    import torch
    from torch import nn

    from bench.techniques.base import Compressed
    from bench.techniques.prune import Pruning

    out, run = tmp_path / "out", tmp_path / "out" / "agents"
    code, errors = _cli([*SWEEP, "--out", str(out), "--run-id", "agents", "--setting", P03], caplog, capsys)
    assert code == 0 and not errors, errors
    first = {r["setting_id"]: r for r in _rows(run)}
    assert set(first) == {"baseline", P03}
    assert first["baseline"]["kernels"] == "dense fp32" and first["baseline"]["dtype"] == "fp32"
    baseline_png = (run / "images" / "baseline" / "0000.png").read_bytes()
    for png in (run / "images" / "baseline").iterdir():
        png.unlink()

    class NaNUNet(nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, float("nan"))

    monkeypatch.setattr(Pruning, "apply", lambda self, unet, setting, calibration=None: Compressed(NaNUNet(), {}))
    code, errors = _cli([*SWEEP, "--out", str(out), "--run-id", "agents", "--setting", P05, "--resolution", "64x64"],
                        caplog, capsys)  # fmt: skip
    assert code == 0 and not errors, errors
    rows = {r["setting_id"]: r for r in _rows(run)}
    assert list(rows) == ["baseline", P03, P05]
    assert rows["baseline"] == first["baseline"] and rows[P03] == first[P03]  # kept, not redone
    assert (run / "images" / "baseline" / "0000.png").read_bytes() == baseline_png  # resampled: same pixels
    nan = rows[P05]
    assert nan["status"] == "nonfinite" and nan["nonfinite_images"] == "2"
    assert [nan[c] for c in ("psnr", "ssim", "mse", "lpips")] == ["", "", "", ""]  # never "perfect"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["settings"] == ["baseline", P03, P05] and len(manifest["resumed"]) == 1


def test_two_agents_at_once_into_one_run_folder(tmp_path: Path) -> None:
    """Two processes, one setting each, started together: each row exactly once (the lock decides who
    writes the baseline both computed)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "main.py", *SWEEP, "--out", str(out), "--run-id", "both"]
    procs = [subprocess.Popen([*cmd, "--setting", s], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for s in (P03, P05)]  # fmt: skip
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "Traceback" not in "".join(errs)
    ids = [r["setting_id"] for r in _rows(out / "both")]
    assert sorted(ids) == sorted(["baseline", P03, P05])
