"""ONNX Runtime backends: sessions behind `nn.Module`s the pipeline calls in place of our PyTorch modules,
and the ORT quantization modes that turn an exported FP32 UNet into INT8 / INT4 models.

Modes (`quantize`):
  fp32               the export as it is
  dynamic-int8       `quantize_dynamic`, MatMul/Gemm with constant weights (DynamicQuantizeMatMul kernels);
                     attention's activation x activation MatMuls stay FP32 (ORT's MatMulConstBOnly default)
  dynamic-int8-conv  as above plus Conv (ConvInteger), which is slower than FP32 on CPU: kept so the
                     report shows it
  static-int8        `quantize_static`, QDQ, per-channel int8 weights and uint8 activations calibrated
                     (MinMax) on recorded sampling trajectories. Quantizes Conv/MatMul/Gemm, except the
                     activation x activation MatMuls and the sinusoidal time projection (Mul/Sin/Cos
                     between `t` and the first Gemm): that subgraph broke calibration in onnxruntime
                     issue 19183 and its [0, 1000) arguments are not int8 material anyway
  int4               weight-only int4 (`MatMulNBits`, block 32, symmetric) on constant-weight MatMuls,
                     via `matmul_nbits_quantizer` when the installed ORT has it (`int4_unavailable()`)

ORT's `quant_pre_process` is not run: on these exports it changes nothing the quantizers see (same quantized
nodes, bit-identical outputs, measured on tiny; its symbolic shape inference fails on the dynamic shapes and
the exporter already folded constants), and on v1-5 it costs half a minute and a 3.4 GB copy. The
quantizers run ONNX shape inference themselves. Everything is written with external data, so the v1-5
UNet (> 2 GB) takes the same path as the tiny one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from torch import nn

from stable_diffusion.errors import CheckpointError, InputError

from ...calibration import UNetCall
from .export import Exported, export_text_encoder, export_unet, export_vae_decoder, quiet_logs

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
MODES = ["fp32", "dynamic-int8", "dynamic-int8-conv", "static-int8", "int4"]
DYNAMIC_OPS = {"dynamic-int8": ["MatMul", "Gemm"], "dynamic-int8-conv": ["MatMul", "Gemm", "Conv"]}
STATIC_OPS = WEIGHTED_OPS = ["Conv", "MatMul", "Gemm"]
INT4_BLOCK = 32  # divides every Linear in_features of both presets
ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}
LOAD_ERRORS = (ort_errors.Fail, ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.NoSuchFile)


# ------------------------------------------------------------------------------------------------ sessions


def provider_unavailable(provider: str) -> str | None:
    """Why `provider` cannot run here, or None."""
    if provider not in PROVIDERS:
        return f"unknown ONNX Runtime provider {provider!r}; choose from: {', '.join(PROVIDERS)}"
    if PROVIDERS[provider][0] not in ort.get_available_providers():
        return f"provider {provider} needs onnxruntime-gpu (pip install -r requirements-gpu.txt) and a GPU"
    return None


def make_session(path: Path, provider: str = "cpu") -> ort.InferenceSession:
    """An ORT session on `provider` with as many intra-op threads as torch has (the runner may have split the
    cores between processes), so both backends get the same share of the CPU."""
    if reason := provider_unavailable(provider):
        raise InputError(reason)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: ORT's C++ warnings go straight to stderr, past our logging
    # Idle workers sleep instead of spinning: the pipeline runs torch ops (scheduler, CLIP, VAE) between
    # UNet calls on the same cores, and spinning ORT threads made whole images 2-5x slower on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=PROVIDERS[provider])
    except LOAD_ERRORS as e:
        raise CheckpointError(
            f"ONNX Runtime cannot load {path}: {str(e).strip()[:500]}\n"
            f"The file is corrupt or truncated: delete {path.parent} (an export cache entry is re-made on the "
            "next run)"
        ) from None


class OrtModule(nn.Module):
    """An ORT session behind nn.Module: torch tensors in and out, on the caller's device and dtype.

    It holds no weights. One empty parameter stays on the pipeline's device, because `StableDiffusion`
    reads its device and dtype from the model's first parameter (so a pipeline whose every component
    runs in ORT still works); `state_dict()` is that one 0-element tensor, so parameter counts give 0.
    """

    def __init__(
        self,
        path: Path,
        provider: str = "cpu",
        device: torch.device | str = "cpu",
        keep: tempfile.TemporaryDirectory | None = None,
    ) -> None:
        super().__init__()
        self.path, self.provider = Path(path), provider
        self.session = make_session(self.path, provider)
        self.input_dtypes = {i.name: ORT_DTYPES[i.type] for i in self.session.get_inputs()}
        self.device_anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        self._keep = keep  # e.g. the TemporaryDirectory holding a quantized model: lives as long as we do

    def run(self, like: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Run the session on `inputs` (named as the ONNX inputs); the output takes `like`'s device/dtype."""
        feeds = {k: v.detach().to("cpu", self.input_dtypes[k]).contiguous().numpy() for k, v in inputs.items()}
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out).to(like.device, like.dtype)


class OrtUNet(OrtModule):
    """The UNet call signature `(x, t, context) -> eps`; t may be a scalar or [B]."""

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self.run(x, x=x, t=t, context=context)


class OrtTextEncoder(OrtModule):
    """Token ids [B, 77] -> context [B, 77, width], like `FrozenCLIPEmbedder`."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run(self.device_anchor, ids=ids)


class OrtVAEDecoder(OrtModule):
    """Stands in for `AutoencoderKL` in text-to-image sampling: `decode` only (the encoder is not exported)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.run(z, z=z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self(z)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise InputError("the ONNX Runtime VAE holds the decoder only: image-to-image needs the PyTorch VAE")


def run_all_in_ort(model: nn.Module, provider: str = "cpu", **export_kwargs: Any) -> dict[str, Exported]:
    """Export (or reuse) the UNet, text encoder and VAE decoder of `model` (a LatentDiffusion) and put their
    ORT stand-ins in its place: text-to-image sampling then runs entirely in ONNX Runtime."""
    device = next(model.parameters()).device
    exported = {
        "unet": export_unet(model.unet, **export_kwargs),
        "text_encoder": export_text_encoder(model.text_encoder, **export_kwargs),
        "vae_decoder": export_vae_decoder(model.vae, **export_kwargs),
    }
    model.swap_unet(OrtUNet(exported["unet"].path, provider, device))
    model.cond_stage_model = OrtTextEncoder(exported["text_encoder"].path, provider, device)
    model.first_stage_model = OrtVAEDecoder(exported["vae_decoder"].path, provider, device)
    return exported


# ------------------------------------------------------------------------------------------ quantization


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI int8 dot products (AVX512-VNNI or AVX-VNNI; Linux flags).

    Without VNNI, ORT's u8s8 int8 kernels multiply with `vpmaddubsw`, whose int16 pair sums saturate on
    8-bit weights; ORT's remedy is 7-bit weights (`reduce_range`), measured here on an AVX2-only EPYC:
    dynamic-int8 PSNR 28.5 dB -> 38.9 dB vs FP32 on the tiny test model.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_vnni|avx_vnni)\b", flags))


def int4_unavailable() -> str | None:
    """Why weight-only int4 (MatMulNBits) cannot be made with this onnxruntime, or None."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: F401
    except ImportError as e:
        return f"onnxruntime {ort.__version__} has no matmul_nbits_quantizer ({e})"
    return None


def time_projection_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes between the `t` input and the first layer with weights (the sinusoidal embedding: Mul, Sin,
    Cos, Concat, reshapes). Shape nodes are not followed: they carry t's batch size, not its values."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, str] = {}
    frontier = ["t"]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("Shape", *WEIGHTED_OPS) or node.name in found:
                continue
            found[node.name] = node.op_type
            frontier += list(node.output)
    return list(found)


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes without a constant weight (attention's q k^T and attn v)."""
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


class TrajectoryReader(CalibrationDataReader):
    """Feeds recorded UNet calls (latents, timesteps over the schedule, text embeddings) to ORT calibration.

    `set_range` lets ORT calibrate one call at a time (`CalibStridedMinMax=1`), merging min/max as it goes:
    its default keeps every intermediate tensor of every call in memory until the end.
    """

    def __init__(self, calls: list[UNetCall]) -> None:
        self.calls, self.pending = calls, iter(calls)

    def __len__(self) -> int:
        return len(self.calls)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.calls[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        call = next(self.pending, None)
        if call is None:
            return None
        batch = call.x.shape[0]
        t = torch.as_tensor(call.t).reshape(-1).expand(batch)
        return {
            "x": call.x.float().numpy(),
            "t": t.float().numpy(),
            "context": call.context.float().numpy(),
        }


@contextlib.contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    """Drop ORT's "Please consider to run pre-processing" warning: skipping it is deliberate (see above)."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _shared_gemm_weights(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gemm nodes whose weight (input B) is an initializer that another node also reads."""
    uses = Counter(name for node in model.graph.node for name in node.input)
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in inits
            and uses[n.input[1]] > 1]  # fmt: skip


def own_gemm_weights(src: Path, out_dir: Path) -> Path:
    """`src`, or a copy in `out_dir` where every Gemm reads its own copy of a shared weight initializer.

    ORT 1.31's quantize_dynamic (the newest onnxruntime-gpu) transposes a shared Gemm weight in place for
    one consumer, silently corrupting the others; with private copies every Gemm quantizes its own weight.
    The rewrite changes no arithmetic (fp32 outputs identical, tested).
    """
    if not _shared_gemm_weights(onnx.load(str(src), load_external_data=False)):
        return src
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input)
    copies = 0
    for node in _shared_gemm_weights(model):
        name = node.input[1]
        if uses[name] < 2:  # the last reader keeps the original
            continue
        copies += 1
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}.gemm{copies}"
        model.graph.initializer.append(copy)
        node.input[1] = copy.name
        uses[name] -= 1
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / src.name
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    log.info("gave %d Gemm nodes their own weight copy before quantize_dynamic", copies)
    return out


def quantize(src: Path, mode: str, out_dir: Path, calls: list[UNetCall] | None = None) -> Path:
    """Write the `mode` version of the FP32 UNet model `src` into `out_dir`; returns its .onnx path."""
    if mode == "fp32":
        return src
    if mode not in MODES:
        raise InputError(f"unknown ONNX mode {mode!r}; choose from: {', '.join(MODES)}")
    out = out_dir / mode / src.name
    out.parent.mkdir(parents=True)
    if mode == "static-int8" and not calls:
        raise InputError("ONNX static-int8 needs calibration calls (calib_prompts >= 1)")
    model = onnx.load(str(src), load_external_data=False)
    keep_float = activation_matmuls(model)
    excluded = time_projection_nodes(model) if mode == "static-int8" else []
    log.info("quantizing to %s (%d attention MatMuls%s stay FP32)", mode, len(keep_float),
             f" and {len(excluded)} time-projection nodes" if excluded else "")  # fmt: skip
    with quiet_logs(), _without_preprocess_hint():
        if mode in DYNAMIC_OPS:
            own = own_gemm_weights(src, out_dir / "own-gemm-weights")
            quantize_dynamic(
                own, out, op_types_to_quantize=DYNAMIC_OPS[mode], per_channel=True, weight_type=QuantType.QInt8,
                reduce_range=not cpu_has_vnni(), use_external_data_format=True,
            )  # fmt: skip
        elif mode == "static-int8":
            quantize_static(
                src, out, TrajectoryReader(calls), quant_format=QuantFormat.QDQ, op_types_to_quantize=STATIC_OPS,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                reduce_range=not cpu_has_vnni(), nodes_to_exclude=excluded + keep_float, use_external_data_format=True,
                extra_options={"CalibStridedMinMax": 1},
            )  # fmt: skip
        else:
            _quantize_int4(src, out, keep_float)
    return out


def _quantize_int4(src: Path, out: Path, exclude: list[str]) -> None:
    if reason := int4_unavailable():
        raise InputError(f"ONNX mode int4 is unavailable: {reason}")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), block_size=INT4_BLOCK, is_symmetric=True, nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",),
    )  # fmt: skip
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)


def quantized_nodes(path: Path) -> dict[str, int]:
    """How many nodes of each integer op type a model holds (what ORT will actually run in int8/int4)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    kinds = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DequantizeLinear", "MatMulNBits")
    return dict(Counter(node.op_type for node in graph.node if node.op_type in kinds))


def new_workdir(root: Path) -> tempfile.TemporaryDirectory:
    """A folder for quantized models under the cache root (they are as big as the export), removed when the
    OrtModule holding it goes away; a killed run can leave `.work-*` folders behind, safe to delete."""
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".work-", dir=root)
