"""Issue 9 item 1: every weight entry point reads files through `safe_load`; a pickle whose `__reduce__`
runs code is refused with one clear message and its payload never runs (the marker file never appears)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.metrics.clip_score import CLIPScore
from bench.metrics.fid import FID
from bench.metrics.fidelity import Fidelity
from stable_diffusion.checkpoint import load_model, load_unet_into, safe_load
from stable_diffusion.errors import InputError, SDBenchError

REPO = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this runs `touch <marker>`: what an attacker's weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def evil_file(folder: Path, name: str = "evil.pth", legacy: bool = False) -> tuple[Path, Path]:
    """(a weights file whose unpickling creates `marker`, marker); torch.save zip or a bare pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    path, marker = folder / name, folder / f"PWNED-{name}"
    obj = {"features.0.weight": torch.zeros(1), "x": Payload(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path)
    return path, marker


@pytest.fixture(autouse=True)
def _offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty torch hub cache per test."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    """Guard for every test below: the file is live, so 'marker absent' means the loader refused it."""
    path, marker = evil_file(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save", "bare-pickle"])
def test_safe_load_refuses_code(tmp_path: Path, legacy: bool) -> None:
    path, marker = evil_file(tmp_path, legacy=legacy)
    with pytest.raises(InputError, match="refused for safety") as info:
        safe_load(path, "--lpips-weights")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_lpips_weights_flag(tmp_path: Path) -> None:
    path, marker = evil_file(tmp_path)
    with pytest.raises(InputError, match="--lpips-weights"):
        Fidelity(lpips_weights=path, device="cpu").prepare()
    assert not marker.exists()


def test_lpips_from_the_hub_cache_and_from_a_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = Fidelity()._hub_file()
    evil, marker = evil_file(cached.parent, cached.name)
    with pytest.raises(InputError, match="refused"):
        Fidelity(device="cpu").prepare()
    assert not marker.exists()
    evil.unlink()

    def fake_download(url: str, dst: str, **_: object) -> None:  # a hostile mirror / poisoned cache
        evil_file(Path(dst).parent, Path(dst).name)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(InputError, match="refused"):
        Fidelity(allow_download=True, device="cpu").prepare()
    assert not marker.exists()


def test_fid_weights_and_hub_cache(tmp_path: Path) -> None:
    refs = [Image.new("RGB", (8, 8))] * 2
    path, marker = evil_file(tmp_path)
    with pytest.raises(InputError, match="--fid-weights"):
        FID(refs, weights_path=path).prepare()
    cached = FID(refs)._hub_file()
    _, cached_marker = evil_file(cached.parent, cached.name)
    with pytest.raises(InputError, match="refused"):
        FID(refs).prepare()
    assert not marker.exists() and not cached_marker.exists()


def test_clip_weights(tmp_path: Path) -> None:
    path, marker = evil_file(tmp_path)
    with pytest.raises(InputError, match="--clip-weights"):
        CLIPScore("RN50", weights_path=path, device="cpu").prepare()
    assert not marker.exists()


def test_checkpoint_and_unet_files(tmp_path: Path, tiny_model) -> None:
    path, marker = evil_file(tmp_path, "evil.ckpt")
    with pytest.raises(SDBenchError, match="arbitrary code"):
        load_model(path)
    with pytest.raises(SDBenchError, match="arbitrary code"):
        load_unet_into(tiny_model, path)
    assert not marker.exists()


def test_training_resume_state(tmp_path: Path) -> None:
    from stable_diffusion.train import TrainConfig, Trainer

    tc = TrainConfig(work_dir=str(tmp_path / "work"), out=str(tmp_path / "o.safetensors"), pool=4)
    trainer = Trainer(tc, progress=False)
    _, marker = evil_file(trainer.state_path.parent, trainer.state_path.name)
    with pytest.raises(InputError, match="training state"):
        trainer.load_state()
    assert not marker.exists()


def test_cli_lpips_weights_repro(tmp_path: Path) -> None:
    """The issue's repro: exit 2, one line on stderr, no traceback, no payload, no run folder."""
    path, marker = evil_file(tmp_path)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "main.py", "--sweep", "prune", "--ratios", "0.3", "--num-images", "2", "--steps", "2",
         "--lpips-weights", str(path), "--out", str(out), "--wandb-mode", "disabled"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "refused for safety" in errors[0], proc.stderr
    assert not marker.exists() and not out.exists()
