"""Checkpoint I/O for CompVis-layout Stable Diffusion v1 files (`.ckpt` pickles and `.safetensors`).

Safety: pickles are always read with `torch.load(weights_only=True)`. The official v1 `.ckpt` files are
PyTorch Lightning checkpoints whose pickle references Lightning's `ModelCheckpoint` class (as a dict
key in `callbacks`); we map such known metadata globals to an inert stand-in class instead of importing
Lightning, so nothing in the file can run code. Anything else that needs arbitrary unpickling is refused
unless the user explicitly passes `unsafe=True` (`--unsafe-load`).

Memory: pickles are memory-mapped and the model is built on the meta device, then the file's tensors are
assigned in place, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import logging
import pickle
import pickletools
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .config import PRESETS, SDConfig
from .errors import CheckpointError, InputError
from .model import COMPONENT_PREFIXES, LatentDiffusion

log = logging.getLogger(__name__)

UNSAFE_HINT = "Only if you trust the file, pass --unsafe-load (torch.load weights_only=False) to read it anyway."


class LightningMetadataStandIn:
    """Inert stand-in for Lightning classes named in a checkpoint's training metadata (never used)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


# Globals that appear in the metadata (not the weights) of Lightning-trained SD checkpoints.
KNOWN_METADATA_GLOBALS = [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
]


def _fail(path: Path, what: str, hint: str = "") -> CheckpointError:
    error = CheckpointError(f"cannot load checkpoint {path}: {what}" + (f"\n{hint}" if hint else ""))
    error.reason = what  # type: ignore[attr-defined]  # the bare reason, for safe_load's one-line message
    return error


def _sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch.save) or 'legacy' (a bare pickle) from the first bytes of the file."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":  # (a header cut short is reported by the safetensors reader)
        return "safetensors"
    return "legacy"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupt or truncated safetensors file ({e})") from None


def _torch_load(path: Path, kind: str, weights_only: bool) -> object:
    safe_globals = [(LightningMetadataStandIn, name) for name in KNOWN_METADATA_GLOBALS]
    # torch.load hands any path named *.safetensors to safetensors, so pass an open file unless mmap-ing.
    mmap = kind == "zip" and path.suffix != ".safetensors"
    with torch.serialization.safe_globals(safe_globals), path.open("rb") as f:
        return torch.load(path if mmap else f, map_location="cpu", weights_only=weights_only, mmap=mmap)


def _pickle_globals(path: Path) -> list[str] | None:
    """Globals a bare pickle imports, parsed (never run); None if the file is not a pickle."""
    names: list[str] = []
    strings: list[str] = []
    with path.open("rb") as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:  # PROTO 2..5 opens every modern pickle
            return None
        f.seek(0)
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # malformed further on: report what was seen
            pass
    return list(dict.fromkeys(names))


def _refusal(path: Path, kind: str, msg: str) -> str:
    """Why the weights-only unpickler refused the file; raises if the file is not a pickle at all."""
    names = re.findall(r"GLOBAL (\S+)", msg)
    if "Unsupported operand" in msg:  # an opcode it lacks: garbage, or a pickle of protocol > 2
        if kind == "legacy":
            names = _pickle_globals(path)
            if names is None:
                raise _fail(path, "not a PyTorch checkpoint (neither a torch.save file, a pickle nor safetensors)")
        if not names:
            return "it uses pickle opcodes the weights-only loader lacks (pickle protocol > 2?), refused for safety"
    needs = f" ({_preview(list(dict.fromkeys(names)))})" if names else ""
    return f"it needs arbitrary code to unpickle{needs}, refused for safety"


def _read_pickle(path: Path, kind: str, unsafe: bool) -> object:
    """torch.load with weights_only=True; with `unsafe`, a file that it refuses is then fully unpickled."""
    try:
        try:
            return _torch_load(path, kind, weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise
            refusal = _refusal(path, kind, str(e))
            if not unsafe:
                raise _fail(path, refusal, UNSAFE_HINT) from None
        log.warning("%s: %s; unpickling it anyway as --unsafe-load was given", path, refusal)
        return _torch_load(path, kind, weights_only=False)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        raise _fail(path, f"not a PyTorch checkpoint ({msg.splitlines()[0] if msg else 'unpickling failed'})") from None
    except ImportError as e:  # only when fully unpickling (--unsafe-load)
        raise _fail(path, f"unpickling it needs the module {e.name!r}, which is not installed") from None
    except Exception as e:  # the unpickler raises anything (IndexError, KeyError, ...) on garbage
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = "corrupt or truncated file" if kind == "zip" else "not a PyTorch checkpoint or safetensors file"
        raise _fail(path, f"{what} ({first})", "Re-download it and compare its sha256.") from None


def read_state_dict(path: str | Path, unsafe: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a `.ckpt`/`.safetensors` file, as stored (the `state_dict` entry of a Lightning file)."""
    path = Path(path)
    kind = _checked_file(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    obj = _read_pickle(path, kind, unsafe)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _checked_file(path: Path) -> str:
    """The file's kind ('safetensors', 'zip', 'legacy'); a missing, non-file or empty path raises."""
    if not path.exists():
        raise _fail(path, "no such file", "Pass --checkpoint PATH to a v1 .ckpt/.safetensors file, or omit it.")
    if not path.is_file():
        raise _fail(path, "not a file")
    if path.stat().st_size == 0:
        raise _fail(path, "the file is empty")
    return _sniff(path)


def safe_load_object(path: str | Path, what: str = "weights file") -> object:
    """A torch.save file's object with `weights_only=True` (tensors, containers, numbers): never runs code.

    For state that is more than a flat dict of tensors (training resume state). A file that needs code to
    unpickle, or is no torch file at all, raises one-line InputError naming `what` and the file.
    """
    path = Path(path)
    try:
        kind = _checked_file(path)
        if kind == "safetensors":
            return _read_safetensors(path)
        return _read_pickle(path, kind, unsafe=False)
    except CheckpointError as e:
        raise InputError(f"{what} {path}: {getattr(e, 'reason', e)}") from None


def safe_load(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The one loader of every weight file (metric backbones, UNets, caches): safetensors, or torch.load
    with weights_only=True, so a pickle whose payload runs code is refused (InputError) and never executed.
    """
    obj = safe_load_object(path, what)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{what} {path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def v1_weights(state_dict: dict[str, torch.Tensor], path: str | Path = "<state dict>") -> dict[str, torch.Tensor]:
    """Keep only v1 model weights, in our key layout.

    Drops non-weights (noise-schedule buffers, `model_ema.*`, `position_ids`, training-loss modules) and
    accepts older files whose text-encoder keys lack the `text_model.` level.
    """
    keys = list(state_dict)
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise _fail(
            Path(path), "this is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); sdbench runs v1 models"
        )
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise _fail(Path(path), "this is an SDXL checkpoint; sdbench runs Stable Diffusion v1 models")
    clip = "cond_stage_model.transformer."
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(tuple(COMPONENT_PREFIXES.values())) or k.endswith("position_ids"):
            continue
        if k.startswith("first_stage_model.loss."):
            continue
        if k.startswith(clip) and not k.startswith(clip + "text_model."):
            k = clip + "text_model." + k[len(clip) :]
        out[k] = v
    if not out:
        hint = (
            "It looks like a diffusers-format file; convert it to the single-file layout."
            if any(k.startswith(("down_blocks.", "unet.", "encoder.down_blocks.")) for k in keys)
            else "Expected keys under model.diffusion_model., first_stage_model., cond_stage_model."
        )
        raise _fail(Path(path), "no Stable Diffusion v1 weights found", hint)
    return out


def components_in(weights: dict[str, torch.Tensor]) -> list[str]:
    return [c for c, p in COMPONENT_PREFIXES.items() if any(k.startswith(p) for k in weights)]


def _shapes(cfg: SDConfig, components: Iterable[str]) -> dict[str, torch.Size]:
    with torch.device("meta"):
        sd = LatentDiffusion(cfg).state_dict()
    prefixes = tuple(COMPONENT_PREFIXES[c] for c in components)
    return {k: v.shape for k, v in sd.items() if k.startswith(prefixes)}


def _preview(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def check_keys(cfg: SDConfig, weights: dict[str, torch.Tensor], components: Iterable[str], path: str | Path) -> None:
    """Raise one readable error listing missing, unexpected and wrong-shape keys for these components."""
    components = list(components)
    expected = _shapes(cfg, components)
    prefixes = tuple(COMPONENT_PREFIXES[c] for c in components)
    given = {k: v.shape for k, v in weights.items() if k.startswith(prefixes)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [
        f"{k}: file {list(given[k])} vs model {list(expected[k])}"
        for k in sorted(set(given) & set(expected))
        if given[k] != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    lines = [f"it does not fit config {cfg.name!r} ({', '.join(components)}):"]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shape", wrong)):
        if items:
            lines.append(f"  {label} ({len(items)}): {_preview(items)}")
    fits = detect_config({k: weights[k] for k in given})
    hint = f"The file fits the {fits.name!r} preset: pass --config {fits.name}." if fits else "Is this a v1 checkpoint?"
    raise _fail(Path(path), "\n".join(lines), hint)


def detect_config(weights: dict[str, torch.Tensor]) -> SDConfig | None:
    """The preset whose module shapes equal the file's, if any."""
    given = {k: v.shape for k, v in weights.items()}
    comps = components_in(weights)
    if not comps:
        return None
    return next((cfg for cfg in PRESETS.values() if _shapes(cfg, comps) == given), None)


def _closest_config(weights: dict[str, torch.Tensor]) -> SDConfig:
    """The preset sharing the most key shapes with a file that fits none, so errors list the real differences."""
    given = {k: v.shape for k, v in weights.items()}
    comps = components_in(weights)
    return max(PRESETS.values(), key=lambda c: sum(given.get(k) == s for k, s in _shapes(c, comps).items()))


def load_model(
    path: str | Path,
    cfg: SDConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    unsafe: bool = False,
) -> LatentDiffusion:
    """Build a full model (UNet, VAE, text encoder) from a v1 checkpoint, strictly.

    With no `cfg`, the preset is recognised from the tensor shapes.
    """
    weights = v1_weights(read_state_dict(path, unsafe), path)
    cfg = cfg or detect_config(weights) or _closest_config(weights)
    absent = [c for c in COMPONENT_PREFIXES if c not in components_in(weights)]
    if absent:
        raise _fail(
            Path(path),
            f"it holds no {', '.join(absent)} weights (a partial file)",
            "Load the full model from another file and pass this one as --unet PATH.",
        )
    check_keys(cfg, weights, COMPONENT_PREFIXES, path)
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_unet_into(model: LatentDiffusion, path: str | Path, *, unsafe: bool = False) -> LatentDiffusion:
    """Replace the UNet weights of `model` from a (partial or full) checkpoint, e.g. a compressed UNet."""
    weights = v1_weights(read_state_dict(path, unsafe), path)
    check_keys(model.cfg, weights, ["unet"], path)
    prefix = COMPONENT_PREFIXES["unet"]
    p = next(model.unet.parameters())
    unet_sd = {
        k[len(prefix) :]: v.to(device=p.device, dtype=p.dtype) for k, v in weights.items() if k.startswith(prefix)
    }
    model.unet.load_state_dict(unet_sd, strict=True)
    return model


def _sort_safetensors_metadata(path: Path) -> None:
    """safetensors writes `__metadata__` in hash-map order, which varies from call to call; sort it so that the
    same weights always give the same bytes (the embedded default relies on it). Only key order changes."""
    with path.open("r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) == len(raw.rstrip(b" ")):
            f.seek(8)
            f.write(text.ljust(n))


def save_checkpoint(module: nn.Module, path: str | Path, cfg: SDConfig, component: str | None = None) -> Path:
    """Save in the CompVis layout as safetensors. `component` names the prefix when saving one sub-module."""
    from safetensors.torch import save_file

    prefix = COMPONENT_PREFIXES[component] if component else ""
    sd = {prefix + k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "sdbench_config": cfg.name})
    _sort_safetensors_metadata(tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint behind
    return path
