"""The `main.py` command line: the embedded default end to end, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_help():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout


def test_generate_on_embedded_default(tmp_path):
    proc = run_cli("generate", "--prompt", "a red cube", "--steps", "3", "--batch", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == (64, 64)


def test_img2img_and_sampler_options(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    code = main.main(
        ["generate", "--prompt", "a cube", "--init-image", str(init), "--strength", "0.5", "--sampler", "euler",
         "--steps", "4", "--seed", "7", "--guidance", "3", "--negative-prompt", "blurry", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0 and len(list((tmp_path / "o").glob("*.png"))) == 1


def test_missing_checkpoint_exits_cleanly(tmp_path):
    proc = run_cli("generate", "--prompt", "x", "--checkpoint", str(tmp_path / "nope.ckpt"))
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--steps", "0"], "steps must be a positive"),
        (["--guidance", "nan"], "guidance must be a finite"),
        (["--sampler", "heun"], "ddim"),
        (["--resolution", "100"], "multiples of 16"),
        (["--device", "cuda"], "no CUDA device"),
    ],
)
def test_bad_options(tmp_path, caplog, extra, words):
    if words == "no CUDA device":
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a CUDA device is present")
    assert main.main(["generate", "--prompt", "x", "--out", str(tmp_path), *extra]) == 2
    assert words in caplog.text


def test_wrong_size_init_image(tmp_path, caplog):
    init = tmp_path / "init.png"
    Image.new("RGB", (40, 24)).save(init)
    assert main.main(["generate", "--prompt", "x", "--init-image", str(init), "--resolution", "64"]) == 2
    assert "init image is 40x24" in caplog.text


def test_text_file_as_checkpoint(tmp_path, caplog):
    fake = tmp_path / "model.ckpt"
    fake.write_text("this is not a checkpoint\n")
    assert main.main(["generate", "--prompt", "x", "--checkpoint", str(fake)]) == 2
    assert "not a PyTorch checkpoint" in caplog.text or "corrupt" in caplog.text


def test_tiny_file_with_v15_config(caplog):
    from stable_diffusion.defaults import embedded_checkpoint

    assert main.main(["generate", "--prompt", "x", "--checkpoint", str(embedded_checkpoint()), "--config", "v1-5"]) == 2
    assert "--config tiny" in caplog.text


def test_unknown_config_is_a_usage_error():
    proc = run_cli("generate", "--prompt", "x", "--config", "sd3")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
