"""Checkpoint I/O: exact round trips, the real v1 `.ckpt` layout (Lightning metadata, extras, fp16, old key
names), the embedded default, and one clear `CheckpointError` for every kind of bad file.

All on the `tiny` preset; the peak-memory check on a full-size v1-5 file is opt-in (SDBENCH_MEMORY_TEST=1).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stable_diffusion.checkpoint import load_model, load_unet_into, read_state_dict, save_checkpoint
from stable_diffusion.config import TINY, V1_5
from stable_diffusion.defaults import embedded_checkpoint
from stable_diffusion.errors import CheckpointError, SDBenchError
from stable_diffusion.model import LatentDiffusion, init_weights

REPO = Path(__file__).resolve().parent.parent
CLIP = "cond_stage_model.transformer."
LIGHTNING_MODULES = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]

# Set by `_record_call` when an unpickler runs it: proof of whether a pickle's code was executed.
CALLS: list[str] = []


def _record_call(tag: str) -> dict:
    CALLS.append(tag)
    return {}


class RunsCode:
    """Unpickling this calls `func(*args)`: the shape of every malicious pickle."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory, tiny_model: LatentDiffusion) -> Path:
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", TINY)


def assert_weights(model: LatentDiffusion, expected: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """Bit-identical weights (after casting `expected` to `dtype`), same keys, and an inference-ready model."""
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == dtype, k
        assert torch.equal(got[k], v.to(dtype)), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def load_error(path: Path, *words: str, **kwargs: object) -> str:
    """`load_model(path, ...)` must raise a CheckpointError whose message contains all `words`."""
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, SDBenchError)
    assert str(path) in msg
    for w in words:
        assert w in msg, f"{w!r} not in:\n{msg}"
    return msg


def with_v1_extras(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The non-weight entries a real v1 `state_dict` carries besides the three models."""
    steps = 1000
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {
        **sd,
        "betas": betas.float(),
        "alphas_cumprod": alphas_cumprod.float(),
        "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1].float()]),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
        "posterior_variance": torch.rand(steps),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32),
        CLIP + "text_model.embeddings.position_ids": torch.arange(77, dtype=torch.int64)[None],
    }


# ---------------------------------------------------------------- round trips and real-file layouts


@pytest.mark.parametrize("cfg", [None, TINY], ids=["auto-detected", "explicit"])
def test_round_trip_is_exact(tiny_file, tiny_state_dict, cfg):
    model = load_model(tiny_file, cfg)
    assert model.cfg is TINY
    assert_weights(model, tiny_state_dict)


def test_save_is_atomic_and_records_the_config(tiny_file):
    from safetensors import safe_open

    with safe_open(str(tiny_file), "pt") as f:
        assert f.metadata()["sdbench_config"] == "tiny"
    assert not list(tiny_file.parent.glob("*.tmp"))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_fp16_files_load_as_float32(tmp_path, tiny_state_dict, suffix):
    half = {k: v.half() for k, v in tiny_state_dict.items()}
    path = tmp_path / f"fp16{suffix}"
    if suffix == ".safetensors":
        save_file(half, str(path))
    else:
        torch.save({"state_dict": half}, path)
    assert_weights(load_model(path), half)  # upcast: exactly the fp16 values
    assert_weights(load_model(path, dtype=torch.float16), half, dtype=torch.float16)


def test_plain_state_dict_ckpt(tmp_path, tiny_state_dict):
    """A bare `torch.save(state_dict)` (no Lightning wrapper), zip and legacy serialization."""
    for name, zipped in (("zip.ckpt", True), ("legacy.ckpt", False)):
        torch.save(tiny_state_dict, tmp_path / name, _use_new_zipfile_serialization=zipped)
        assert_weights(load_model(tmp_path / name), tiny_state_dict)


def test_ckpt_named_safetensors(tmp_path, tiny_state_dict):
    """torch.load itself routes *.safetensors paths to safetensors; a renamed .ckpt must still load."""
    path = tmp_path / "renamed.safetensors"
    torch.save({"state_dict": tiny_state_dict}, path)
    assert_weights(load_model(path), tiny_state_dict)


def _v1_ckpt(path: Path, state_dict: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write `path` as the official v1 files are: a Lightning checkpoint referencing ModelCheckpoint.

    Lightning is stood in for by fake modules that exist only while saving, as on a machine without it.
    """
    for name in LIGHTNING_MODULES:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": LIGHTNING_MODULES[-1], "__qualname__": "ModelCheckpoint"})
    sys.modules[LIGHTNING_MODULES[-1]].ModelCheckpoint = cls
    torch.save(
        {
            "state_dict": state_dict,
            "global_step": 840000,
            "epoch": 5,
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {cls: {"best_model_score": None}},
        },
        path,
    )
    for name in LIGHTNING_MODULES:
        monkeypatch.delitem(sys.modules, name)
    return path


def test_v1_lightning_ckpt(tmp_path, tiny_state_dict, monkeypatch):
    path = _v1_ckpt(tmp_path / "v1-like.ckpt", with_v1_extras(tiny_state_dict), monkeypatch)
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(pickle.UnpicklingError):  # plain weights-only loading refuses it: the stand-in is needed
        torch.load(path, weights_only=True)

    assert_weights(load_model(path), tiny_state_dict)
    assert_weights(load_model(path, TINY), tiny_state_dict)
    # --unsafe-load is a superset: the same file loads without needing Lightning installed
    assert_weights(load_model(path, unsafe=True), tiny_state_dict)
    assert "pytorch_lightning" not in sys.modules  # we never import Lightning


def test_v1_lightning_ckpt_fp16(tmp_path, tiny_state_dict, monkeypatch):
    half = {k: v.half() for k, v in tiny_state_dict.items()}
    path = _v1_ckpt(tmp_path / "v1-fp16.ckpt", with_v1_extras(half), monkeypatch)
    assert_weights(load_model(path), half)


def test_old_text_encoder_keys(tmp_path, tiny_state_dict):
    """Older v1 files name the text encoder `cond_stage_model.transformer.embeddings...` (no `text_model.`)."""
    old = {k.replace(CLIP + "text_model.", CLIP): v for k, v in tiny_state_dict.items()}
    assert CLIP + "embeddings.token_embedding.weight" in old
    torch.save({"state_dict": with_v1_extras(old)}, tmp_path / "old.ckpt")
    save_file(old, str(tmp_path / "old.safetensors"))
    for name in ("old.ckpt", "old.safetensors"):
        assert_weights(load_model(tmp_path / name), tiny_state_dict)


# ---------------------------------------------------------------- files that are not checkpoints


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _truncated(src: Path, dst: Path, keep: float | int = 0.5) -> Path:
    data = src.read_bytes()
    return _write(dst, data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def _zip_ckpt(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    torch.save({"state_dict": sd}, path)
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _list_pickle(path: Path) -> Path:
    torch.save([1, 2, 3], path)
    return path


# name -> (make(tmp_path, good .safetensors, good state dict) -> bad file, words the error message must hold)
BAD_FILES: dict[str, tuple[Callable[[Path, Path, dict], Path], list[str]]] = {
    "missing": (lambda tmp, good, sd: tmp / "nope.ckpt", ["no such file", "--checkpoint"]),
    "directory": (lambda tmp, good, sd: _directory(tmp / "dir.ckpt"), ["not a file"]),
    "empty": (lambda tmp, good, sd: _write(tmp / "e.ckpt", b""), ["the file is empty"]),
    "truncated safetensors": (
        lambda tmp, good, sd: _truncated(good, tmp / "half.safetensors"),
        ["corrupt or truncated safetensors"],
    ),
    "safetensors cut inside its header": (
        lambda tmp, good, sd: _truncated(good, tmp / "head.safetensors", keep=100),
        ["corrupt or truncated safetensors"],
    ),
    "truncated ckpt": (
        lambda tmp, good, sd: _truncated(_zip_ckpt(tmp / "full.ckpt", sd), tmp / "half.ckpt"),
        ["corrupt or truncated", "sha256"],
    ),
    "text renamed .ckpt": (
        lambda tmp, good, sd: _write(tmp / "t.ckpt", "model: v1-5\nthis is not a checkpoint.\n"),
        ["not a PyTorch checkpoint"],
    ),
    "random bytes": (
        lambda tmp, good, sd: _write(tmp / "r.ckpt", random.Random(0).randbytes(65536)),
        ["not a PyTorch checkpoint"],
    ),
    "random bytes named .safetensors": (
        lambda tmp, good, sd: _write(tmp / "r.safetensors", random.Random(1).randbytes(4096)),
        ["not a PyTorch checkpoint"],
    ),
    "a list, not a dict": (
        lambda tmp, good, sd: _list_pickle(tmp / "list.ckpt"),
        ["expected a dict of tensors, found list"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file(tmp_path, tiny_file, tiny_state_dict, case):
    make, words = BAD_FILES[case]
    path = make(tmp_path, tiny_file, tiny_state_dict)
    msg = load_error(path, "cannot load checkpoint", *words)
    assert "arbitrary code" not in msg and "--unsafe-load" not in msg  # garbage is not a safety refusal
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):  # --unsafe-load does not help either
        read_state_dict(path, unsafe=True)


# ---------------------------------------------------------------- pickles that run code


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(tmp_path, tiny_state_dict, writer):
    marker = tmp_path / "pwned"
    payload = {"state_dict": tiny_state_dict, "x": RunsCode(os.system, f"touch {marker}")}
    path = tmp_path / "evil.ckpt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f)
    load_error(path, "arbitrary code", f"{os.system.__module__}.system", "refused", "--unsafe-load")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="arbitrary code"):
        read_state_dict(path)
    assert not marker.exists()


def test_unsafe_load_runs_a_trusted_pickle(tmp_path, tiny_state_dict, caplog):
    """With unsafe=True a file the safe loader refuses is unpickled in full (harmless code here)."""
    path = tmp_path / "needs-code.ckpt"
    torch.save({"state_dict": tiny_state_dict, "meta": RunsCode(_record_call, "ran")}, path)
    CALLS.clear()
    load_error(path, "arbitrary code", f"{__name__}._record_call", "--unsafe-load")
    assert CALLS == []

    assert_weights(load_model(path, unsafe=True), tiny_state_dict)
    assert CALLS == ["ran"]
    assert "unsafe-load" in caplog.text


def test_unsafe_load_of_a_pickle_needing_a_missing_module(tmp_path, tiny_state_dict, monkeypatch):
    monkeypatch.setitem(sys.modules, "sdbench_absent_plugin", types.ModuleType("sdbench_absent_plugin"))
    cls = type("Plugin", (), {"__module__": "sdbench_absent_plugin"})
    sys.modules["sdbench_absent_plugin"].Plugin = cls
    path = tmp_path / "plugin.ckpt"
    torch.save({"state_dict": tiny_state_dict, "plugin": cls()}, path)
    monkeypatch.delitem(sys.modules, "sdbench_absent_plugin")

    load_error(path, "arbitrary code", "sdbench_absent_plugin.Plugin", "--unsafe-load")
    load_error(path, "sdbench_absent_plugin", "not installed", unsafe=True)


# ---------------------------------------------------------------- checkpoints of other models


def _zeros(*keys: str) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(2, 2) for k in keys}


OTHER_MODELS = {
    "SD 2.x": (
        _zeros(
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "cond_stage_model.model.token_embedding.weight",
            "model.diffusion_model.input_blocks.0.0.weight",
            "first_stage_model.encoder.conv_in.weight",
        ),
        ["2.x", "OpenCLIP"],
    ),
    "SDXL": (
        _zeros(
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "model.diffusion_model.input_blocks.0.0.weight",
        ),
        ["SDXL"],
    ),
    "diffusers": (
        _zeros(
            "down_blocks.0.resnets.0.conv1.weight",
            "mid_block.attentions.0.proj_in.weight",
            "up_blocks.0.resnets.0.conv1.weight",
            "conv_in.weight",
        ),
        ["no Stable Diffusion v1 weights", "diffusers"],
    ),
    "unrelated": (_zeros("fc.weight", "fc.bias"), ["no Stable Diffusion v1 weights", "model.diffusion_model."]),
}


@pytest.mark.parametrize("case", list(OTHER_MODELS))
def test_other_architectures(tmp_path, case):
    sd, words = OTHER_MODELS[case]
    save_file(sd, str(tmp_path / "other.safetensors"))
    load_error(tmp_path / "other.safetensors", *words)
    torch.save({"state_dict": sd}, tmp_path / "other.ckpt")
    load_error(tmp_path / "other.ckpt", *words)


def test_tiny_file_with_v1_5_config(tiny_file):
    load_error(
        tiny_file,
        "does not fit config 'v1-5'",
        "wrong shape",
        f"{CLIP}text_model.embeddings.token_embedding.weight: file [49408, 64] vs model [49408, 768]",
        "missing keys",
        "unexpected keys",
        "--config tiny",
        cfg=V1_5,
    )


@pytest.mark.parametrize("cfg", [None, TINY], ids=["auto-detected", "explicit"])
def test_missing_and_unexpected_keys(tmp_path, tiny_state_dict, cfg):
    """Even without a config the message is against the nearest preset (tiny), listing just the two keys."""
    sd = dict(tiny_state_dict)
    del sd["model.diffusion_model.out.2.bias"]
    sd["first_stage_model.decoder.extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "damaged.safetensors"))
    load_error(
        tmp_path / "damaged.safetensors",
        "does not fit config 'tiny'",
        "missing keys (1): model.diffusion_model.out.2.bias",
        "unexpected keys (1): first_stage_model.decoder.extra.weight",
        cfg=cfg,
    )


def test_unet_only_file(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model.unet, tmp_path / "unet.safetensors", TINY, component="unet")
    assert {k.split(".")[0] for k in read_state_dict(path)} == {"model"}
    load_error(path, "partial", "vae", "clip", "--unet")

    other = init_weights(LatentDiffusion(TINY), seed=1).eval()
    assert not torch.equal(other.unet.out[2].bias, tiny_model.unet.out[2].bias)
    vae_clip_before = {k: v.clone() for k, v in other.state_dict().items() if not k.startswith("model.")}
    assert load_unet_into(other, path) is other
    for k, v in tiny_model.unet.state_dict().items():
        assert torch.equal(other.unet.state_dict()[k], v), k
    after = other.state_dict()
    assert all(torch.equal(after[k], v) for k, v in vae_clip_before.items())  # only the UNet was replaced


def test_unet_file_into_model_of_another_config(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model.unet, tmp_path / "unet.safetensors", TINY, component="unet")
    with torch.device("meta"):
        big = LatentDiffusion(V1_5)
    with pytest.raises(CheckpointError, match="--config tiny"):
        load_unet_into(big, path)


# ---------------------------------------------------------------- the embedded default


def test_embedded_checkpoint_is_cached_and_deterministic(tmp_path, tiny_state_dict):
    first = embedded_checkpoint(seed=0, weights_dir=tmp_path / "a")
    os.utime(first, ns=(10**18, 10**18))  # any rewrite would move the mtime off this value
    assert embedded_checkpoint(seed=0, weights_dir=tmp_path / "a") == first
    assert first.stat().st_mtime_ns == 10**18

    again = embedded_checkpoint(seed=0, weights_dir=tmp_path / "b")
    assert again != first and again.name == first.name
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, again)]
    assert digest[0] == digest[1]
    assert not list(tmp_path.rglob("*.tmp"))
    assert_weights(load_model(first), tiny_state_dict)  # conftest's tiny_model is seed 0 too


def test_save_checkpoint_is_byte_deterministic(tmp_path):
    """safetensors orders `__metadata__` differently from call to call; saving must not depend on that."""
    module = torch.nn.Linear(3, 2)
    digests = {
        hashlib.sha256(save_checkpoint(module, tmp_path / f"{i}.safetensors", TINY).read_bytes()).digest()
        for i in range(16)
    }
    assert len(digests) == 1


# ---------------------------------------------------------------- memory (opt-in: ~9 GB of files, ~1 min)

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would report this process's peak.
PEAK_SCRIPT = textwrap.dedent(
    """
    import json, os, re, sys
    from stable_diffusion.checkpoint import load_model
    from stable_diffusion.config import V1_5

    def peak():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

    before = peak()
    model = load_model(sys.argv[1], V1_5)
    loaded = peak()
    for p in model.parameters():  # fault every weight page in, as a first forward pass would
        p.sum()
    print(json.dumps({"before": before, "loaded": loaded, "peak": peak(), "size": os.path.getsize(sys.argv[1])}))
    """
)


@pytest.mark.skipif(not os.environ.get("SDBENCH_MEMORY_TEST"), reason="slow, ~9 GB in /tmp: SDBENCH_MEMORY_TEST=1")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_v1_5_load_peak_memory(tmp_path):
    model = LatentDiffusion(V1_5)
    ckpt, st = tmp_path / "v1-5.ckpt", tmp_path / "v1-5.safetensors"
    try:
        torch.save({"state_dict": with_v1_extras(model.state_dict()), "global_step": 840000}, ckpt)
        save_checkpoint(model, st, V1_5)
        del model
        for path in (ckpt, st):
            out = subprocess.run(
                [sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout
            m = json.loads(out.splitlines()[-1])
            print(f"{path.name}: {m}")
            assert m["peak"] <= 1.3 * m["size"], (path.name, m)
    finally:
        for path in (ckpt, st):
            path.unlink(missing_ok=True)
