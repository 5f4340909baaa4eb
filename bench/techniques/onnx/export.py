"""Export our PyTorch components (UNet, CLIP text encoder, VAE decoder) to ONNX, cached by content hash.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), opset 18. Both exporters match
PyTorch to ~1e-6 relative here; the legacy TorchScript one (`dynamo=False`, deprecated since torch 2.9)
exports faster (v1-5 UNet: 33 s vs 51 s, tiny: 4 s vs 17 s) at the same peak memory (~0.3-0.5 GB above
the weights), but writes one external-data file per tensor (~700 for v1-5) and a graph twice as large.
The dynamo exporter writes one `<name>.onnx.data` file and is the supported path; its slowness is paid
once per weights, as exports are cached.

Inputs are dynamic in batch and latent size (latent sides must be multiples of the UNet's total
downsampling, as in PyTorch); the timestep is a float input `t` of shape [B].

Cache: `<cache>/<key>/<component>.onnx` (+ `.onnx.data`) and `meta.json`. The key hashes the weights, the
source of our module classes, the component and the export settings (opset, external data, versions).
An export is written to a temporary folder, checked (`onnx.checker.check_model` by path, so > 2 GB models
work) and renamed into place, so a folder under its key is complete unless something damaged it later;
`load_entry` then fails with a `CheckpointError` that says which folder to delete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from torch import nn

from stable_diffusion.defaults import DATA_DIR
from stable_diffusion.errors import CheckpointError

from ...cost import PeakRSS

log = logging.getLogger(__name__)

OPSET = 18
CACHE_ENV = "SDBENCH_ONNX_CACHE"  # overrides the cache folder (tests point it at a temporary one)
DEFAULT_CACHE = DATA_DIR / "cache" / "onnx"
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a .onnx.data file (protobuf's hard limit is 2 GiB)
EXAMPLE_BATCH = 2  # > 1, so torch.export does not specialise the batch dimension to 1


def cache_root(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence the INFO chatter of the exporter and of ORT's quantization tools (one line per node, partly
    on the root logger) unless we log at DEBUG ourselves."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("", "onnx_ir", "onnxscript", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ------------------------------------------------------------------------------------- exportable wrappers


class UNetIO(nn.Module):
    """The UNet with named inputs (x, t, context) and `t` a float [B] tensor, as ONNX sees it."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context)


class DecoderIO(nn.Module):
    """`AutoencoderKL.decode`: unscaled latent -> image in about [-1, 1] (the encoder is not exported)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


@dataclass(frozen=True)
class Spec:
    """How one component is exported: wrapper, example inputs, dynamic dimensions, input/output names."""

    wrapper: nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, Any]]
    output: str


def _spec(component: str, module: nn.Module) -> Spec:
    """Example inputs on the module's device; `Dim`s make batch (and latent size) dynamic."""
    ref = next(module.parameters())
    batch = torch.export.Dim("batch")
    if component == "unet":
        cfg = module.cfg
        f = 2 ** (len(cfg.channel_mult) - 1)  # latent sides must be multiples of the UNet's downsampling
        h, w = torch.export.Dim("h"), torch.export.Dim("w")
        inputs = {
            "x": torch.randn(EXAMPLE_BATCH, cfg.in_channels, 2 * f, 2 * f),
            "t": torch.full((EXAMPLE_BATCH,), 500.0),
            "context": torch.randn(EXAMPLE_BATCH, 77, cfg.context_dim),
        }
        dynamic = {"x": {0: batch, 2: f * h, 3: f * w}, "t": {0: batch}, "context": {0: batch}}
        return Spec(UNetIO(module), _to(inputs, ref), dynamic, "eps")
    if component == "text_encoder":
        n_pos = module.transformer.text_model.embeddings.position_embedding.num_embeddings
        inputs = {"ids": torch.zeros(EXAMPLE_BATCH, n_pos, dtype=torch.long, device=ref.device)}
        return Spec(module, inputs, {"ids": {0: batch}}, "context")
    if component == "vae_decoder":
        z_channels = module.post_quant_conv.in_channels
        h, w = torch.export.Dim("h"), torch.export.Dim("w")
        inputs = {"z": torch.randn(EXAMPLE_BATCH, z_channels, 8, 8)}
        return Spec(DecoderIO(module), _to(inputs, ref), {"z": {0: batch, 2: h, 3: w}}, "image")
    raise ValueError(f"unknown component {component!r}")


def _to(inputs: dict[str, torch.Tensor], ref: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.to(ref.device, ref.dtype) for k, v in inputs.items()}


# -------------------------------------------------------------------------------------------- cache keys


def _architecture(module: nn.Module) -> list[str]:
    """What fixes the graph besides the weights: each submodule's class, repr and plain attributes
    (e.g. attention `heads`, the UNet `cfg`), and the source of our (non-torch) classes and of this file."""
    lines, files = [], {__file__}
    for name, m in module.named_modules():
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
        plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in attrs.items()}
        lines.append(f"{name}:{type(m).__qualname__}:{m.extra_repr()}:{sorted(plain.items())}")
        if not type(m).__module__.startswith("torch"):
            files.add(inspect.getsourcefile(type(m)))
    return lines + [Path(f).read_text() for f in sorted(files)]


def content_key(component: str, module: nn.Module, settings: dict[str, Any]) -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes), architecture and export settings."""
    h = hashlib.sha256(json.dumps({"component": component, **settings}, sort_keys=True).encode())
    for line in _architecture(module):
        h.update(line.encode())
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ cache entries


@dataclass
class Exported:
    """One cache entry: the .onnx path, whether it was reused, and what making it cost."""

    path: Path
    key: str
    cached: bool
    opset: int
    peak_rss_bytes: int | None  # None when reused from the cache (nothing was exported)
    seconds: float | None

    @property
    def size_bytes(self) -> int:
        return model_size_bytes(self.path)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and constant tensors of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            yield from [attr.t] if attr.HasField("t") else []
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _tensors(sub)


def model_files(path: Path) -> list[Path]:
    """The .onnx file and the external data files it names."""
    graph = onnx.load(str(path), load_external_data=False).graph
    external = {ExternalDataInfo(t).location for t in _tensors(graph) if uses_external_data(t)}
    return [path, *(path.parent / name for name in sorted(external))]


def model_size_bytes(path: Path) -> int:
    """Bytes on disk of a model: its .onnx file plus external data."""
    return sum(f.stat().st_size for f in model_files(path))


def load_entry(folder: Path, component: str) -> Path:
    """The checked .onnx of a cache entry; CheckpointError (saying what to delete) if it is damaged."""
    path = folder / f"{component}.onnx"

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(
            f"ONNX cache entry {folder} is damaged ({what}); delete that folder to re-export (rm -r {folder})"
        )

    try:
        meta = json.loads((folder / "meta.json").read_text())
        sizes = {(folder / name): size for name, size in meta["files"].items()}
    except (OSError, ValueError, KeyError) as e:
        raise damaged(f"meta.json unreadable: {e}") from None
    for file, size in sizes.items():
        if not file.is_file() or file.stat().st_size != size:
            found = file.stat().st_size if file.is_file() else "missing"
            raise damaged(f"{file.name} has {found} bytes, expected {size}")
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError) as e:
        raise damaged(f"onnx.checker: {str(e).strip()}") from None
    return path


def export(
    component: str,
    module: nn.Module,
    cache_dir: Path | None = None,
    external_data: bool | None = None,
    opset: int = OPSET,
) -> Exported:
    """Export `module` (a UNetModel, FrozenCLIPEmbedder or AutoencoderKL) or reuse its cache entry.

    `external_data`: True forces the weights into a `.onnx.data` file, False keeps them in the .onnx,
    None (default) decides by size (EXTERNAL_DATA_BYTES).
    """
    if external_data is None:
        n_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        external_data = n_bytes > EXTERNAL_DATA_BYTES
    settings = {
        "opset": opset,
        "external_data": external_data,
        "exporter": "dynamo",
        **{package: metadata.version(package) for package in ("torch", "onnx", "onnxscript")},
    }
    key = content_key(component, module, settings)
    root = cache_root(cache_dir)
    folder = root / key[:24]
    if folder.exists():
        log.info("reusing ONNX export %s", folder)
        return Exported(load_entry(folder, component), key, True, opset, None, None)

    tmp = root / f".{key[:24]}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        start = time.perf_counter()
        with PeakRSS() as mem:
            _export_to(tmp / f"{component}.onnx", component, module, opset, external_data)
        seconds = time.perf_counter() - start
        onnx.checker.check_model(str(tmp / f"{component}.onnx"))
        files = {f.name: f.stat().st_size for f in model_files(tmp / f"{component}.onnx")}
        meta = {"component": component, "key": key, **settings, "files": files, "seconds": seconds}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same export first: use theirs
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s in %.1f s (peak RSS %.0f MB)", component, folder, seconds, mem.peak / 2**20)
    return Exported(load_entry(folder, component), key, False, opset, mem.peak, seconds)


def _export_to(path: Path, component: str, module: nn.Module, opset: int, external_data: bool) -> None:
    spec = _spec(component, module)
    wrapper = spec.wrapper.eval()
    with warnings.catch_warnings(), torch.no_grad(), quiet_logs():
        # "axis name batch will not be used": the inputs share one batch Dim, which is what we want
        warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape")
        program = torch.onnx.export(
            wrapper,
            tuple(spec.inputs.values()),
            dynamo=True,
            opset_version=opset,
            input_names=list(spec.inputs),
            output_names=[spec.output],
            dynamic_shapes=spec.dynamic,
            verbose=False,
        )
    program.save(str(path), external_data=external_data)


def export_unet(unet: nn.Module, **kwargs: Any) -> Exported:
    return export("unet", unet, **kwargs)


def export_text_encoder(text_encoder: nn.Module, **kwargs: Any) -> Exported:
    return export("text_encoder", text_encoder, **kwargs)


def export_vae_decoder(vae: nn.Module, **kwargs: Any) -> Exported:
    return export("vae_decoder", vae, **kwargs)
