"""Structured compression: pruned shapes, importance order, block removal counts, save/load, recovery."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from bench import recovery
from bench.recovery import DenoisingData, RecoveryConfig, add_lora, kd_loss, make_adapters, merge_lora, recover
from bench.structured import blocks
from bench.structured.channels import prune_channels
from bench.techniques.structured import Structured
from stable_diffusion.checkpoint import load_unet_into, save_checkpoint
from stable_diffusion.config import TINY, V1_5
from stable_diffusion.errors import CheckpointError
from stable_diffusion.model import LatentDiffusion, init_weights
from stable_diffusion.unet import CrossAttention, FeedForward, UNetModel


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    return init_weights(LatentDiffusion(TINY), seed=3).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pruned(model: LatentDiffusion) -> UNetModel:
    """50 % of conv channels, heads and FFN units pruned (L1), shared: building the graph takes seconds."""
    return prune_channels(copy.deepcopy(model.unet), 0.5)


@pytest.fixture(scope="module")
def data(model: LatentDiffusion) -> DenoisingData:
    return DenoisingData(model, n=32, seed=0)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=gen)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_pruned_shapes_are_consistent(model: LatentDiffusion, pruned: UNetModel) -> None:
    unet = pruned
    out = unet(*_inputs())
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 and m.num_groups == TINY.unet.groups for m in norms)
    assert min(m.num_channels for m in norms) < TINY.unet.model_channels  # channels really went
    attns = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    assert all(a.heads == TINY.unet.num_heads // 2 and a.to_q.out_features % a.heads == 0 for a in attns)
    ffns = [(f, g) for f, g in zip(unet.modules(), model.unet.modules(), strict=True) if isinstance(f, FeedForward)]
    assert all(f.net[2].in_features == g.net[2].in_features // 2 for f, g in ffns)
    assert _params(unet) < 0.4 * _params(model.unet)


def test_zero_ratio_is_identity(model: LatentDiffusion) -> None:
    unet = prune_channels(copy.deepcopy(model.unet), 0.0)
    ref = model.unet.state_dict()
    got = unet.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert torch.equal(unet(*_inputs()), model.unet(*_inputs()))


def test_least_important_heads_and_ffn_units_go_first(model: LatentDiffusion) -> None:
    """Zero half the heads and a quarter of the FFN units: pruning exactly those leaves the output unchanged."""
    unet = copy.deepcopy(model.unet)
    with torch.no_grad():
        for a in (m for m in unet.modules() if isinstance(m, CrossAttention)):
            d = a.to_q.out_features // a.heads
            for h in (0, 2):
                rows = slice(h * d, (h + 1) * d)
                a.to_q.weight[rows] = a.to_k.weight[rows] = a.to_v.weight[rows] = 0
                a.to_out[0].weight[:, rows] = 0
        for f in (m for m in unet.modules() if isinstance(m, FeedForward)):
            hidden = f.net[2].in_features
            idx = torch.arange(1, hidden, 4)
            for rows in (idx, idx + hidden):
                f.net[0].proj.weight[rows] = 0
                f.net[0].proj.bias[rows] = 0
            f.net[2].weight[:, idx] = 0
    ref = unet(*_inputs())
    heads = prune_channels(copy.deepcopy(unet), 0.5, parts=("heads",))
    ffn = prune_channels(copy.deepcopy(unet), 0.25, parts=("ffn",))
    assert all(a.heads == 2 for a in heads.modules() if isinstance(a, CrossAttention))
    torch.testing.assert_close(heads(*_inputs()), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ffn(*_inputs()), ref, atol=1e-5, rtol=0)
    # ... while pruning units that matter does change it
    assert not torch.allclose(prune_channels(copy.deepcopy(unet), 0.5, parts=("ffn",))(*_inputs()), ref, atol=1e-5)


def test_block_removal_parameter_counts() -> None:
    """Presets on v1-5 equal the reduced-layout UNet they claim to be; BK-SDM reports 0.58/0.49/0.33 B."""
    with torch.device("meta"):
        one = UNetModel(replace(V1_5.unet, num_res_blocks=1))
        mid = _params(one.middle_block)
        three = UNetModel(replace(V1_5.unet, num_res_blocks=1, channel_mult=(1, 2, 4)))
        expected = {"bk-base": _params(one), "bk-small": _params(one) - mid, "bk-tiny": _params(three) - mid}
        published = {"bk-base": 0.58e9, "bk-small": 0.49e9, "bk-tiny": 0.33e9}
        for preset in blocks.PRESETS:
            got = _params(blocks.remove_blocks(UNetModel(V1_5.unet), preset))
            assert got == expected[preset]
            assert abs(got - published[preset]) < 0.01e9  # BK-SDM Table 1 (their counts are rounded)
    assert blocks.unsupported(TINY.unet, "bk-base") and not blocks.unsupported(TINY.unet, "bk-tiny")


def test_removed_blocks_keep_their_weights(model: LatentDiffusion) -> None:
    unet = blocks.remove_blocks(copy.deepcopy(model.unet), "bk-tiny")
    assert len(unet.middle_block) == 0 and unet.cfg.channel_mult == TINY.unet.channel_mult[:-1]
    assert torch.equal(unet.input_blocks[1][0].in_layers[2].weight, model.unet.input_blocks[1][0].in_layers[2].weight)
    assert unet(*_inputs()).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("structure", ["channels", "bk-tiny", "separable"])
def test_save_load_round_trip_is_exact_and_strict(model: LatentDiffusion, structure: str, tmp_path) -> None:
    unet, _ = Structured().compress(
        copy.deepcopy(model.unet), {"structure": structure, "ratio": 0.5, "importance": "l1", "parts": "conv+heads+ffn"}
    )
    path = save_checkpoint(unet, tmp_path / "u.safetensors", TINY, component="unet")
    fresh = LatentDiffusion(TINY)
    load_unet_into(fresh, path)
    ref, got = unet.state_dict(), fresh.unet.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert torch.equal(fresh.unet(*_inputs()), unet(*_inputs()))
    # strict: one stray tensor and the file no longer loads
    from safetensors.torch import load_file, save_file

    from stable_diffusion.checkpoint import read_arch

    weights = load_file(str(path))
    weights["model.diffusion_model.stray.weight"] = torch.zeros(1)
    save_file(
        weights, str(tmp_path / "bad.safetensors"), metadata={"sdbench_arch": __import__("json").dumps(read_arch(path))}
    )
    with pytest.raises(CheckpointError, match="do not fit"):
        load_unet_into(LatentDiffusion(TINY), tmp_path / "bad.safetensors")


def test_separable_fit_is_exact_for_rank_one_kernels() -> None:
    from stable_diffusion.unet_arch import SeparableConv2d

    conv = nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():  # a kernel that is depthwise-separable: W[o, i] = a[o, i] * k_i
        conv.weight.copy_(torch.randn(5, 3, 1, 1) * torch.randn(1, 3, 3, 3))
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(SeparableConv2d.fit(conv)(x), conv(x), atol=1e-5, rtol=1e-5)


def test_kd_step_lowers_the_loss(model: LatentDiffusion, pruned: UNetModel, data: DenoisingData) -> None:
    """One small gradient step (first order: the gradient of the whole loss is a descent direction)."""
    teacher = model.unet
    student = copy.deepcopy(pruned).requires_grad_(True)
    batch = data.batch(0, 8)
    adapters = make_adapters(student, teacher, batch)
    cfg = RecoveryConfig()
    opt = torch.optim.SGD(list(student.parameters()) + list(adapters.parameters()), lr=1e-4)
    before, parts = kd_loss(student, teacher, batch, adapters, cfg)
    assert parts["feat"] > 0  # feature terms at every level are in the loss
    opt.zero_grad()
    before.backward()
    opt.step()
    after, _ = kd_loss(student, teacher, batch, adapters, cfg)
    assert float(after.detach()) < float(before.detach())


def test_feature_term_is_relative_to_the_teacher_scale() -> None:
    """Each level's feature MSE is divided by the teacher feature's mean square: scale-free, 1 for zeros."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    torch.testing.assert_close(recovery.relative_mse(50 * s, 50 * t), recovery.relative_mse(s, t))
    torch.testing.assert_close(recovery.relative_mse(torch.zeros_like(t), t), torch.tensor(1.0))
    assert float(recovery.relative_mse(t, t)) == 0.0


def test_lora_merge_equals_unmerged(pruned: UNetModel) -> None:
    unet = add_lora(copy.deepcopy(pruned), rank=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero: make the adapters do something
    unmerged = unet(*_inputs())
    merged = merge_lora(unet)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(*_inputs()), unmerged, atol=1e-5, rtol=1e-4)


def test_recovery_resumes_exactly(
    model: LatentDiffusion, pruned: UNetModel, data: DenoisingData, tmp_path, monkeypatch
) -> None:
    student = pruned

    def run(work, **kw):
        cfg = RecoveryConfig(kind="kd", steps=2, batch=2, save_every=1, eval_batches=1, work_dir=work, data=data, **kw)
        return recover(copy.deepcopy(student), model.unet, cfg)

    whole, stats = run(tmp_path / "a")
    assert stats["recovery_steps"] == 2
    real, calls = recovery.kd_loss, []

    def dies_on_second(*args, **kwargs):  # after step 1 was saved: the resumed run trains step 2 only
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recovery, "kd_loss", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(recovery, "kd_loss", real)
    resumed, stats_b = run(tmp_path / "b")
    assert stats_b["recovery_steps"] == 2
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_settings_ids() -> None:
    axes = {"structure": ["channels", "bk-tiny"], "recovery": ["none", "kd"], "compile": ["eager", "compile"]}
    ids = [s.id for s in Structured().settings(axes)]
    assert "structured[structure=bk-tiny]" in ids
    assert "structured[recovery=kd,recovery_steps=600,structure=bk-tiny]" in ids
    assert "structured[compile=compile,recovery=kd,recovery_steps=600,structure=bk-tiny]" in ids
    assert len(ids) == len(set(ids)) == 8


def test_compiled_row_reuses_its_eager_siblings_training(
    model: LatentDiffusion, data: DenoisingData, tmp_path, monkeypatch
) -> None:
    """A compiled row times the UNet its eager sibling trained: the finished state resumes, no new step."""
    from bench.techniques import structured as mod
    from bench.techniques.base import Setting

    compiled_as: list[str] = []
    monkeypatch.setattr(mod, "compile_for_row", lambda m, c, e, f: compiled_as.append(c) or f.update(compile=c) or m)
    tech = Structured()
    tech.bind(model, tmp_path)
    tech._data = data
    params = {"structure": "separable", "recovery": "kd", "recovery_steps": 2}
    eager = tech.apply(copy.deepcopy(model.unet), Setting("structured", params))
    calls, real_kd_loss = [], recovery.kd_loss
    monkeypatch.setattr(recovery, "kd_loss", lambda *a, **k: calls.append(1) or real_kd_loss(*a, **k))
    compiled = tech.apply(copy.deepcopy(model.unet), Setting("structured", {**params, "compile": "compile"}))
    assert calls == [] and compiled_as == ["eager", "compile"]
    assert compiled.fields["recovery_steps"] == eager.fields["recovery_steps"] == 2
    assert compiled.fields["recovery_cpu_min"] == eager.fields["recovery_cpu_min"]
    assert compiled.fields["unet_file"] == eager.fields["unet_file"]
    assert compiled.fields["before_recovery"] == "structured[compile=compile,structure=separable]"
    a, b = eager.module.state_dict(), compiled.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
