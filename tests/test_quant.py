"""Quantization technique: integer round trips, real kernels vs their simulation, calibration, settings, errors.

Whole-UNet tolerances are max |quant - fp32| / max |fp32| on the tiny random-weight UNet, measured over
4 input seeds x t in {20, 500, 950} and doubled: dynamic-int8 0.094 -> 0.2, weight-int8 (bf16 or fp32
activations) 0.022 -> 0.05, weight-int4 (group 32) 0.30 -> 0.6, static W8A8 (all layers) 0.15 -> 0.3.
The tiny UNet's random weights amplify per-layer error about 5x, so per-layer checks below are tighter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.calibration import Calibration, UNetCall
from bench.techniques import quant_ops as ops
from bench.techniques.base import Setting
from bench.techniques.quant import Quantization, measured_size_bytes
from stable_diffusion.config import TINY
from stable_diffusion.errors import InputError

UNET_TOL = {"dynamic-int8": 0.2, "weight-int8": 0.05, "weight-int4": 0.6, "static-w8a8": 0.3}
UNET_TOL["static-w8a8-timestep"] = UNET_TOL["static-w8a8"]
FIRST_CONV = "input_blocks.0.0"  # its input is the latent x itself, so its observed range is known exactly
Q = Quantization()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def make_calibration(scales: dict[int, float], prompts: int = 2, per_prompt_t: tuple[int, ...] = (900, 100)):
    """Random UNet calls; x at timestep t is scaled by scales[t], and prompt p's x also by (p + 1)."""
    gen = torch.Generator().manual_seed(1)
    calls, prompt_ids = [], []
    for p in range(prompts):
        for t in per_prompt_t:
            x = torch.randn(2, 4, 8, 8, generator=gen) * scales.get(t, 1.0) * (p + 1)
            calls.append(UNetCall(x, torch.tensor(t), torch.randn(2, 77, TINY.unet.context_dim, generator=gen)))
            prompt_ids.append(p)
    return Calibration(calls, prompt_ids)


@pytest.fixture(scope="module")
def unet(tiny_model) -> nn.Module:
    return tiny_model.unet


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    return make_calibration({})


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, TINY.unet.context_dim, generator=gen)


def run(module: nn.Module, inputs, t: int | torch.Tensor = 500) -> torch.Tensor:
    with torch.no_grad():
        return module(inputs[0], torch.as_tensor(t), inputs[1])


def apply(unet: nn.Module, calibration: Calibration | None = None, **params):
    return Q.apply(copy.deepcopy(unet), Setting("quant", params), calibration)


# ------------------------------------------------------------------------------------------ integer round trips


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_symmetric_round_trip_within_half_a_step(bits, per_channel, scale_dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=gen) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different size
    q, scale = ops.quantize_symmetric(w, bits, per_channel, scale_dtype)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() <= qmax and scale.dtype == scale_dtype
    err = (w - ops.dequantize_symmetric(q, scale)).abs()
    assert (err <= scale.float()[:, None] / 2 * (1 + 1e-5)).all()
    bound = 0.5 / qmax if scale_dtype == torch.float32 else 0.5 * scale.float().max() / w.abs().max()
    assert ops.relative_error(w, ops.dequantize_symmetric(q, scale)) <= bound * (1 + 1e-5)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groupwise_round_trip_within_half_a_step(group_size):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=gen) + torch.randn(32, 256 // group_size, 1, generator=gen).repeat_interleave(
        group_size, 1
    ).reshape(32, 256)  # groups with offsets: the asymmetric zero point matters
    q, scale, zero = ops.quantize_int4_groupwise(w, group_size)
    assert q.min() >= 0 and q.max() <= 15 and scale.shape == (32, 256 // group_size)
    step = scale.repeat_interleave(group_size, 1)
    err = (w - ops.dequantize_int4_groupwise(q, scale, zero)).abs()
    assert (err <= step / 2 + 1e-6 * w.abs().max()).all()


def test_nibble_packing_halves_the_bytes():
    q = torch.randint(0, 16, (4, 10), dtype=torch.int32)
    packed = ops.pack_nibbles(q)
    assert packed.shape == (4, 5)
    assert torch.equal(torch.stack([packed & 15, packed >> 4], -1).reshape(4, 10).int(), q)


# ---------------------------------------------------------------------------------------- real-kernel modes


def test_dynamic_int8_uses_quantized_linear_and_is_close(unet, inputs):
    out = apply(unet, mode="dynamic-int8")
    n_linear = sum(isinstance(m, nn.Linear) for m in unet.modules())
    dyn = [m for m in out.module.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(dyn) == n_linear == out.fields["quantized_layers"]
    assert not any(type(m) is nn.Linear for m in out.module.modules())
    assert out.fields["kernels"] == "int8" and out.fields["bits_activations"] == 8
    assert rel_err(run(out.module, inputs), run(unet, inputs)) <= UNET_TOL["dynamic-int8"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_weight_only_layer_kernel_matches_simulation(bits, act_dtype):
    """The real kernel against the same codes run through F.linear (fp32 exact; bf16 = output rounding)."""
    if not ops.kernel_usable(bits, act_dtype):
        pytest.skip("this torch build has no usable CPU weight-only kernel")
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 96)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 256, generator=gen) / 16)
    x = torch.randn(3, 5, 256, generator=gen)
    real = ops.WeightOnlyLinear(linear, bits, True, 32, act_dtype, real=True)
    sim = ops.WeightOnlyLinear(linear, bits, True, 32, act_dtype, real=False)
    with torch.no_grad():
        y_real, y_sim, y_fp32 = real(x), sim(x), linear(x)
    assert y_real.shape == (3, 5, 96) and y_real.dtype == torch.float32
    assert rel_err(y_real, y_sim) <= (1e-5 if act_dtype == torch.float32 else 1e-2)
    assert rel_err(y_real, y_fp32) <= (0.02 if bits == 8 else 0.1)


@pytest.mark.parametrize("mode", ["weight-int8", "weight-int4"])
@pytest.mark.parametrize("act_dtype", ["bf16", "fp32"])
def test_weight_only_unet_close_to_fp32_and_to_simulation(unet, inputs, monkeypatch, mode, act_dtype):
    out = apply(unet, mode=mode, act_dtype=act_dtype)
    y, ref = run(out.module, inputs), run(unet, inputs)
    assert rel_err(y, ref) <= UNET_TOL[mode]
    assert out.fields["quantized_layers"] == sum(isinstance(m, nn.Linear) for m in unet.modules())
    assert out.fields["bits_activations"] == (16 if act_dtype == "bf16" else None)
    monkeypatch.setattr(ops, "kernel_usable", lambda *_: False)
    sim = apply(unet, mode=mode, act_dtype=act_dtype)
    assert sim.fields["kernels"] == "simulated"
    if out.fields["kernels"] != "simulated":
        assert out.fields["kernels"] == f"{mode.split('-')[1]}-weight-only"
        # fp32: the kernels agree with the simulation to rounding; bf16: 1-ulp output flips, amplified
        assert rel_err(y, run(sim.module, inputs)) <= (1e-4 if act_dtype == "fp32" else 2e-2)


def test_int4_group_that_does_not_divide_leaves_layer_fp32(unet):
    out = apply(unet, mode="weight-int4", group_size=64)
    narrow = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and m.in_features % 64]
    assert narrow and out.fields["skipped_layers"] == len(narrow)
    assert all(type(out.module.get_submodule(n)) is nn.Linear for n in narrow)


# ---------------------------------------------------------------------------------------- static calibration


def first_conv_range(calls: list[UNetCall]) -> tuple[float, float]:
    return min(c.x.min().item() for c in calls), max(c.x.max().item() for c in calls)


def test_static_minmax_sees_the_calls_and_percentile_is_inside(unet, calibration):
    from bench.techniques.quant import calibrate, select_layers

    targets = select_layers(unet, "all")
    minmax, _ = calibrate(unet, targets, calibration.calls, "minmax", 1)
    pct, _ = calibrate(unet, targets, calibration.calls, "percentile", 1)
    assert minmax[FIRST_CONV][0].tolist() == pytest.approx(first_conv_range(calibration.calls))
    for name, _ in targets:
        (lo_m, hi_m), (lo_p, hi_p) = minmax[name][0].tolist(), pct[name][0].tolist()
        assert lo_m <= lo_p <= hi_p <= hi_m, name
    assert any(pct[n][0, 1] < minmax[n][0, 1] for n, _ in targets)  # the tails are actually cut somewhere


def test_calib_prompts_takes_only_the_first_prompts(unet):
    cal = make_calibration({}, prompts=3)  # prompt p's latents are (p + 1) times larger
    out = apply(unet, cal, mode="static-w8a8", layers="conv", calib_prompts=1)
    first = cal.take(1)
    assert out.fields["calib_calls"] == len(first) == 2 and out.fields["calib_prompts"] == 1
    layer = out.module.get_submodule(FIRST_CONV)
    expected = ops.affine_qparams(*first_conv_range(first))
    assert layer.act_scale.tolist() == pytest.approx([expected[0]])
    assert layer.act_zero.tolist() == [expected[1]]


def test_timestep_groups_have_their_own_ranges_used_according_to_t(unet, inputs):
    cal = make_calibration({100: 0.01, 900: 10.0})  # early and late steps of wildly different scale
    out = apply(unet, cal, mode="static-w8a8-timestep", timestep_groups=2, layers="all")
    assert isinstance(out.module, ops.TimestepAwareUNet) and out.fields["timestep_groups_empty"] == 0
    layer = out.module.unet.get_submodule(FIRST_CONV)
    low = [c for c in cal.calls if c.t == 100]
    high = [c for c in cal.calls if c.t == 900]
    assert layer.act_scale.tolist() == pytest.approx([ops.affine_qparams(*first_conv_range(c))[0] for c in (low, high)])
    assert layer.act_scale[1] > 100 * layer.act_scale[0]

    seen = []
    layer.register_forward_hook(lambda m, args, y: seen.append((args[0], y)))
    x = inputs[0] * 0.01
    for t, group in [(100, 0), (900, 1), (torch.tensor([100, 900]), None)]:
        seen.clear()
        run(out.module, (x, inputs[1]), t)
        (x_in, y) = seen[0]
        groups = torch.tensor([0, 1]) if group is None else torch.tensor([group, group])
        scale, zero = layer.act_scale[groups].view(-1, 1, 1, 1), layer.act_zero[groups].view(-1, 1, 1, 1)
        expected = F.conv2d(ops.fake_quant_affine(x_in, scale, zero), layer.weight_deq, layer.bias, padding=1)
        assert torch.allclose(y, expected, atol=1e-6)
    # with the late-step range small latents quantize to (almost) nothing; with their own range they survive
    assert (ops.fake_quant_affine(x, layer.act_scale[1], layer.act_zero[1]) == 0).float().mean() > 0.9
    assert rel_err(ops.fake_quant_affine(x, layer.act_scale[0], layer.act_zero[0]), x) < 0.02


def test_empty_timestep_groups_fall_back_to_all_calls(unet):
    cal = make_calibration({}, per_prompt_t=(900, 100))
    out = apply(unet, cal, mode="static-w8a8-timestep", timestep_groups=4, layers="conv")
    assert out.fields["timestep_groups_empty"] == 2  # t=100 -> group 0, t=900 -> group 3
    layer = out.module.unet.get_submodule(FIRST_CONV)
    everything = ops.affine_qparams(*first_conv_range(cal.calls))[0]
    assert layer.act_scale[1:3].tolist() == pytest.approx([everything, everything])


# -------------------------------------------------------------------------------------- settings and rows


def test_default_settings_one_row_per_mode():
    rows = Q.settings({})
    assert [(s.params["mode"], s.params.get("observer")) for s in rows] == [
        ("dynamic-int8", None),
        ("weight-int8", None),
        ("weight-int4", None),
        ("static-w8a8", "minmax"),
        ("static-w8a8", "percentile"),
        ("static-w8a8-timestep", "minmax"),
    ]
    assert rows[0].params == {"mode": "dynamic-int8", "granularity": "channel", "layers": "linear"}
    assert rows[3].params["layers"] == "all" and rows[5].params["timestep_groups"] == 4


def test_given_axes_expand_only_where_they_apply():
    rows = Q.settings({"mode": ["dynamic-int8", "static-w8a8"], "observer": ["minmax", "percentile"],
                       "layers": ["all", "attn"]})  # fmt: skip
    ids = [s.id for s in rows]
    assert len(ids) == len(set(ids)) == 1 + 4
    assert rows[0].params == {"mode": "dynamic-int8", "granularity": "channel", "layers": "attn"}
    assert [s.params["mode"] for s in Q.settings({"bits": [4]})] == ["weight-int4"]
    assert len(Q.settings({"mode": ["weight-int4"], "group_size": [32, 64, 128]})) == 3


def test_every_default_row_applies_and_runs(unet, calibration, inputs):
    ref = run(unet, inputs)
    fp32_size = measured_size_bytes(unet)
    for setting in Q.settings({}):
        out = Q.apply(copy.deepcopy(unet), setting, calibration)
        y = run(out.module, inputs, torch.tensor(640))
        assert y.shape == ref.shape and torch.isfinite(y).all(), setting.id
        mode = setting.params["mode"]
        assert rel_err(run(out.module, inputs), ref) <= UNET_TOL[mode], setting.id
        f = out.fields
        assert f["mode"] == mode and f["quantized_layers"] > 0 and 0 < f["weight_error_max_rel"] < 0.1
        assert 0 < f["size_bytes"] < fp32_size
        if mode.startswith("static"):
            assert f["kernels"] == "simulated" and f["calib_calls"] == len(calibration.take(4))
            assert f["size_bytes"] < 0.35 * fp32_size  # every Linear and Conv2d weight is int8


def test_bad_inputs_raise_input_error(unet, calibration):
    with pytest.raises(InputError, match="dynamic-int8"):
        Q.settings({"mode": ["int3"]})
    with pytest.raises(InputError, match="32, 64, 128, 256"):
        Q.settings({"group_size": [48]})
    with pytest.raises(InputError, match="unknown quant axis"):
        Q.settings({"sparsity": [0.5]})
    with pytest.raises(InputError, match="no quant setting"):
        Q.settings({"mode": ["weight-int8"], "layers": ["conv"]})
    with pytest.raises(InputError, match="positive integer"):
        Q.axis("calib_prompts").check("zero")
    with pytest.raises(InputError, match="needs calibration"):
        apply(unet, None, mode="static-w8a8")
    with pytest.raises(InputError, match="no UNet calls"):
        apply(unet, Calibration([], []), mode="static-w8a8-timestep")
    with pytest.raises(InputError, match="does not apply"):
        apply(unet, calibration, mode="dynamic-int8", observer="minmax")
    with pytest.raises(InputError, match="Linear layers only"):
        apply(unet, calibration, mode="weight-int4", layers="conv")
    with pytest.raises(InputError, match="timestep_groups"):
        apply(unet, calibration, mode="static-w8a8-timestep", timestep_groups=0)
