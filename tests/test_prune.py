"""Unstructured pruning: exact counts, L1 order, what is (not) touched, seeding, row fields, sparse files."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bench.techniques import prune as pt
from bench.techniques.base import Setting
from stable_diffusion.config import TINY, V1_5
from stable_diffusion.errors import InputError
from stable_diffusion.unet import UNetModel


@pytest.fixture
def unet(tiny_model) -> UNetModel:
    return copy.deepcopy(tiny_model.unet)


def weights(module: nn.Module, target: str = "all") -> dict[str, torch.Tensor]:
    return {name: layer.weight for _, name, layer in pt.target_layers(module, target)}


def originals(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def zeros(t: torch.Tensor) -> int:
    return t.numel() - int(torch.count_nonzero(t))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so that comparisons are bit-exact (-0.0 != 0.0, NaN == NaN)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def assert_l1_order(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    """Every pruned |w| is <= every kept |w| (over the given tensors taken together)."""
    pruned = torch.cat([b[a == 0].abs().flatten() for b, a in zip(before, after, strict=True)])
    kept = torch.cat([b[a != 0].abs().flatten() for b, a in zip(before, after, strict=True)])
    assert pruned.max() <= kept.min()


def tied_mlp() -> nn.Sequential:
    """Weights on a coarse grid (many exact ties of |w|); the first layer is big enough to be sampled."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(700, 600), nn.ReLU(), nn.Linear(600, 10))
    with torch.no_grad():
        for m in (mlp[0], mlp[2]):
            m.weight.copy_(torch.randint(-3, 4, m.weight.shape) / 4)
    return mlp


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_layer_scope_is_exact_per_layer_and_l1_ordered(unet: UNetModel, ratio: float) -> None:
    before = {k: w.clone() for k, w in weights(unet).items()}
    assert all(zeros(w) == 0 for w in before.values())
    pt.prune(unet, ratio, "l1", "layer")
    for name, w in weights(unet).items():
        assert zeros(w) == round(ratio * w.numel()), name
        assert_l1_order([before[name]], [w])


@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_global_scope_is_exact_overall_and_l1_ordered(unet: UNetModel, ratio: float) -> None:
    before = {k: w.clone() for k, w in weights(unet).items()}
    pt.prune(unet, ratio, "l1", "global")
    after = weights(unet)
    total = sum(w.numel() for w in after.values())
    assert total > pt.EXACT_MAX  # the sampled-bracket path, not the exact small one
    assert sum(zeros(w) for w in after.values()) == round(ratio * total)
    assert_l1_order(list(before.values()), list(after.values()))
    per_layer = [zeros(w) / w.numel() for w in after.values()]
    assert max(per_layer) - min(per_layer) > 0.1  # global: layers end up with different sparsities


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ties_are_broken_to_an_exact_count_in_layer_then_index_order(scope: str) -> None:
    mlp = tied_mlp()
    before = [mlp[0].weight.clone(), mlp[2].weight.clone()]
    pt.prune(mlp, 0.3, "l1", scope)
    after = [mlp[0].weight, mlp[2].weight]
    if scope == "layer":
        assert [zeros(w) for w in after] == [round(0.3 * w.numel()) for w in after]
        groups = [[0], [1]]
    else:
        assert sum(zeros(w) for w in after) == round(0.3 * sum(w.numel() for w in after))
        groups = [[0, 1]]
    for group in groups:
        b = torch.cat([before[i].flatten() for i in group]).abs()
        a = torch.cat([after[i].flatten() for i in group])
        assert_l1_order([b], [a])
        at_threshold = (a[b == b[a == 0].max()] == 0).int()  # pruned (1) then kept (0) in index order
        assert torch.equal(at_threshold, at_threshold.sort(descending=True, stable=True).values)


def test_a_missed_bracket_falls_back_to_a_wider_one(unet: UNetModel, monkeypatch: pytest.MonkeyPatch) -> None:
    margins: list[float] = []
    bracket = pt._bracket

    def spy(sample: torch.Tensor, k: int, n: int, z: float, exact: bool) -> tuple[float, float]:
        margins.append(z)
        return bracket(sample, k, n, z, exact)

    monkeypatch.setattr(pt, "Z_TRIES", (0.0, math.inf))  # a zero-width margin misses the k-th score
    monkeypatch.setattr(pt, "_bracket", spy)
    before = {k: w.clone() for k, w in weights(unet).items()}
    pt.prune(unet, 0.4, "l1", "global")
    after = weights(unet)
    assert margins == [0.0, math.inf]
    assert sum(zeros(w) for w in after.values()) == round(0.4 * sum(w.numel() for w in after.values()))
    assert_l1_order(list(before.values()), list(after.values()))


def test_biases_norms_and_kept_weights_are_bit_identical(unet: UNetModel) -> None:
    before = originals(unet)
    pt.prune(unet, 0.5, "l1", "global")
    pruned = {f"{name}.weight" for name in weights(unet)}
    assert any(".norm" in k or "in_layers.0" in k for k in before)
    for key, value in unet.state_dict().items():
        if key in pruned:
            kept = value != 0
            assert torch.equal(bits(value[kept]), bits(before[key][kept])), key
            assert torch.equal(bits(value[~kept]), torch.zeros_like(bits(value[~kept]))), key  # +0.0, not -0.0
        else:
            assert torch.equal(bits(value), bits(before[key])), key


EXPECTED = {
    "all": lambda n, m: True,
    "linear": lambda n, m: isinstance(m, nn.Linear),
    "conv": lambda n, m: isinstance(m, nn.Conv2d),
    "attn": lambda n, m: re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n) is not None,
    "down": lambda n, m: n.startswith("input_blocks."),
    "mid": lambda n, m: n.startswith("middle_block."),
    "up": lambda n, m: n.startswith("output_blocks."),
}


@pytest.mark.parametrize("target", pt.TARGETS)
def test_each_target_touches_exactly_its_layers(unet: UNetModel, target: str) -> None:
    before = originals(unet)
    pt.prune(unet, 0.5, "l1", "layer", target)
    changed = {k.removesuffix(".weight") for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(weights(unet, target))
    if target in EXPECTED:
        assert changed == {n for n, m in pt.prunable_layers(unet) if EXPECTED[target](n, m)}
    if target == "attn":
        blocks = sum(1 for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0"))
        assert len(changed) == 8 * blocks  # q, k, v, out of attn1 and attn2


def test_inner_and_outer_split_v1_5_as_documented() -> None:
    with torch.device("meta"):
        big = UNetModel(V1_5.unet)

    def blocks(target: str) -> set[str]:
        names = weights(big, target)
        return {".".join(n.split(".")[: 2 if n.startswith(("input_", "output_")) else 1]) for n in names}

    inner = {f"input_blocks.{i}" for i in range(7, 12)} | {f"output_blocks.{i}" for i in range(6)} | {"middle_block"}
    outer = {f"input_blocks.{i}" for i in range(7)} | {f"output_blocks.{i}" for i in range(6, 12)}
    assert blocks("inner") == inner
    assert blocks("outer") == outer | {"time_embed", "out"}
    assert set(weights(big, "inner")).isdisjoint(weights(big, "outer"))
    assert len(weights(big, "inner")) + len(weights(big, "outer")) == len(weights(big)) == 282
    assert pt.block_levels(TINY.unet) == ([-1, 0, 0, 1, 1, 2], [2, 2, 1, 1, 0, 0])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_random_pruning_is_seeded_and_exact(unet: UNetModel, scope: str) -> None:
    def mask(seed: int, method: str = "random") -> torch.Tensor:
        net = copy.deepcopy(unet)
        pt.Pruning().apply(net, Setting("prune", {"ratio": 0.3, "method": method, "scope": scope, "seed": seed}))
        w = weights(net)
        if scope == "layer":
            assert all(zeros(v) == round(0.3 * v.numel()) for v in w.values())
        else:
            assert sum(zeros(v) for v in w.values()) == round(0.3 * sum(v.numel() for v in w.values()))
        return torch.cat([(v == 0).flatten() for v in w.values()])

    first = mask(0)
    assert torch.equal(first, mask(0))
    assert not torch.equal(first, mask(1))
    assert not torch.equal(first, mask(0, "l1"))


def test_fields_are_recounts_and_sizes_are_the_files(unet: UNetModel, tmp_path) -> None:
    setting = Setting("prune", {"ratio": 0.5, "method": "l1", "scope": "global", "target": "attn"})
    out = pt.Pruning().apply(unet, setting)
    f = out.fields
    assert out.module is unet
    attn, every = weights(unet, "attn"), weights(unet)
    assert f["sparsity"] == sum(zeros(w) for w in attn.values()) / sum(w.numel() for w in attn.values()) == 0.5
    assert f["sparsity_unet"] == sum(zeros(w) for w in every.values()) / sum(w.numel() for w in every.values())
    assert f["unet_params"] == sum(p.numel() for p in unet.parameters())
    assert f["nonzeros"] == sum(int(torch.count_nonzero(p)) for p in unet.parameters())
    assert f["pruned_layers"] == f["target_layers"] == len(attn) == sum(zeros(w) > 0 for w in attn.values())
    assert f["kernels"] == "dense"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "dense.safetensors")
    pt.save_sparse(unet, tmp_path / "sparse.safetensors")
    assert f["size_dense_bytes"] == (tmp_path / "dense.safetensors").stat().st_size
    assert f["size_bytes"] == (tmp_path / "sparse.safetensors").stat().st_size
    assert f["size_bytes"] < f["size_dense_bytes"]


def test_sparse_file_round_trip_is_bit_exact_and_smaller_at_half(unet: UNetModel, tmp_path) -> None:
    pt.prune(unet, 0.5, "l1", "global")
    sd = unet.state_dict()
    sd["input_blocks.0.0.weight"].view(-1)[:3] = torch.tensor([-0.0, math.inf, math.nan])
    sd["extra.counts"] = torch.arange(5)  # non-float tensors pass through dense
    pt.save_sparse(sd, tmp_path / "sparse.safetensors")
    back = pt.load_sparse(tmp_path / "sparse.safetensors")
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(bits(back[k]), bits(v)), k
    del sd["extra.counts"]
    dense = pt.dense_size_bytes(sd)
    sparse = (tmp_path / "sparse.safetensors").stat().st_size
    assert sparse < 0.6 * dense  # half the values + 1 bit per weight + dense biases and norms


def test_pruned_unet_still_runs_and_ratio_zero_changes_nothing(unet: UNetModel) -> None:
    torch.manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, TINY.unet.context_dim)
    with torch.no_grad():
        ref = unet(x, 500, ctx)
        before = originals(unet)
        unchanged = pt.Pruning().apply(unet, Setting("prune", {"ratio": 0.0, "target": "all"}))
        assert unchanged.fields["sparsity"] == 0.0 and unchanged.fields["pruned_layers"] == 0
        assert all(torch.equal(bits(v), bits(before[k])) for k, v in unet.state_dict().items())
        assert torch.equal(unet(x, 500, ctx), ref)
        pt.Pruning().apply(unet, Setting("prune", {"ratio": 0.5, "method": "l1", "scope": "layer", "target": "all"}))
        out = unet(x, 500, ctx)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("ratio", [-0.1, 1.0, "abc", "1.5", float("nan"), True])
def test_bad_ratio_says_the_range(ratio: object) -> None:
    for call in (
        lambda: pt.Pruning().settings({"ratio": [ratio]}),
        lambda: pt.Pruning().apply(nn.Sequential(nn.Linear(2, 2)), Setting("prune", {"ratio": ratio})),
    ):
        with pytest.raises(InputError, match=r"\[0, 1\)"):
            call()


@pytest.mark.parametrize(
    ("axis", "value", "choices"),
    [
        ("method", "l2", "l1, random"),
        ("scope", "net", "layer, global"),
        ("target", "left", "all, linear, conv, attn, down, mid, up, inner, outer"),
    ],
)
def test_unknown_choices_list_the_allowed_values(axis: str, value: str, choices: str) -> None:
    with pytest.raises(InputError, match=re.escape(choices)):
        pt.Pruning().settings({axis: [value]})
    with pytest.raises(InputError, match=re.escape(choices)):
        pt.Pruning().apply(nn.Sequential(nn.Linear(2, 2)), Setting("prune", {"ratio": 0.5, axis: value}))


def test_other_bad_inputs() -> None:
    with pytest.raises(InputError, match="unknown prune parameters"):
        pt.Pruning().apply(nn.Sequential(nn.Linear(2, 2)), Setting("prune", {"ratio": 0.5, "amount": 1}))
    with pytest.raises(InputError, match="needs a UNet"):
        pt.prune(nn.Sequential(nn.Linear(2, 2)), 0.5, target="inner")
    with pytest.raises(InputError, match="selects no"):
        pt.prune(nn.Sequential(nn.Linear(2, 2)), 0.5, target="attn")
    with pytest.raises(InputError, match="integer"):
        pt.prune(nn.Sequential(nn.Linear(2, 2)), 0.5, seed="x")


def test_settings_ids_and_a_single_unpruned_row_per_target() -> None:
    default = [s.id for s in pt.Pruning().settings({})]
    assert default == [
        f"prune[method=l1,ratio={r},scope=global,target=all]" for r in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    ]
    rows = pt.Pruning().settings(
        {"ratio": ["0", "0.5"], "method": ["l1", "random"], "scope": ["layer", "global"], "target": ["all", "attn"]}
    )
    ids = [s.id for s in rows]
    assert len(ids) == len(set(ids)) == 2 * (1 + 2 * 2)
    assert [i for i in ids if "ratio=0.0" in i] == [
        "prune[method=l1,ratio=0.0,scope=layer,target=all]",
        "prune[method=l1,ratio=0.0,scope=layer,target=attn]",
    ]
    assert "prune[method=random,ratio=0.5,scope=global,target=attn]" in ids
    assert all(set(s.params) == {"ratio", "method", "scope", "target"} for s in rows)
    assert Setting("prune", {"ratio": 0.5, "method": "random", "seed": 3}).id == "prune[method=random,ratio=0.5,seed=3]"


def test_half_precision_weights() -> None:
    mlp = nn.Sequential(nn.Linear(64, 64), nn.Linear(1024, 600)).to(torch.bfloat16)
    pt.prune(mlp, 0.3, "l1", "layer")
    assert [zeros(m.weight) for m in mlp] == [round(0.3 * 64 * 64), round(0.3 * 1024 * 600)]
    assert mlp[1].weight.dtype == torch.bfloat16
