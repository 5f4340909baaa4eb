"""The registry, axes, modifiers' setting expansion and row assembly precedence (no model needed)."""

from __future__ import annotations

import pytest

from bench import schema
from bench.modifiers.base import Modifier, expand, technique_setting
from bench.registry import MODIFIERS, TECHNIQUES, Axis, Column, Registry, positive_int, text
from bench.sweep import technique_settings
from bench.techniques.base import Setting, Technique
from stable_diffusion.errors import InputError


class _B:
    name, order = "b", 1


class _A:
    name, order = "a", 2


class _C:
    name, order = "c", 1


def test_registry_orders_by_order_then_name_and_lists_choices():
    reg: Registry = Registry("thing")
    for cls in (_A, _B, _C):
        reg.register(cls)
    assert reg.names() == ["b", "c", "a"]
    assert reg.get("a") is _A
    with pytest.raises(InputError, match="unknown thing 'z'; choose from: b, c, a"):
        reg.get("z")
    reg.register(_A)  # the same class again is harmless (a module imported twice)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(type("Other", (), {"name": "a"}))


def test_temporarily_registers_for_the_block_only():
    reg: Registry = Registry("thing")
    with reg.temporarily(_A):
        assert "a" in reg
    assert "a" not in reg


def test_discovery_finds_every_technique_and_metric_module():
    assert {"prune", "quant", "onnx"} <= set(TECHNIQUES.names())
    names = [c.name for c in schema.columns()]
    assert len(names) == len(set(names)) and names[0] == "run_id" and names[-1] == "extra"


def test_axis_checks_values_and_names_the_choices():
    axis = Axis("colour", ["red"], text, "a colour", ["red", "blue"])
    assert axis.values("red, blue") == ["red", "blue"] and axis.flag == "--colour"
    with pytest.raises(InputError, match="choose from: red, blue"):
        axis.check("green")
    with pytest.raises(InputError, match="--colour"):
        axis.check(3)  # a TOML number where a string is expected
    n = Axis("n_things", [1], positive_int, "how many")
    assert n.values([2, "3"]) == [2, 3] and n.flag == "--n-things"
    with pytest.raises(InputError, match="n_things: expected a positive integer"):
        n.check("0")


class _Grid(Technique):
    name = "grid_toy"
    axes = (Axis("a", [1, 2], positive_int, "a"), Axis("b", ["x"], text, "b", ["x", "y"]))


def test_default_settings_are_the_validated_grid():
    assert [s.id for s in _Grid().settings({"b": ["x", "y"]})] == [
        "grid_toy[a=1,b=x]",
        "grid_toy[a=1,b=y]",
        "grid_toy[a=2,b=x]",
        "grid_toy[a=2,b=y]",
    ]
    with pytest.raises(InputError, match="unknown grid_toy axis 'c'"):
        _Grid().settings({"c": [1]})
    with pytest.raises(InputError, match="choose from: x, y"):
        _Grid().settings({"b": ["z"]})
    assert _Grid().unsupported(Setting("grid_toy"), "cpu") is None
    assert "cpu, cuda only" in (_Grid().unsupported(Setting("grid_toy"), "meta") or "")


class _Twice(Modifier):
    name = "twice"
    axis = Axis("twice", [False], lambda v: str(v).lower() in ("1", "true"), "a toy modifier")
    default = False

    def applies_to(self, technique: Technique) -> bool:
        return technique.name == "grid_toy"


def test_modifier_at_default_adds_nothing_to_setting_ids():
    with MODIFIERS.temporarily(_Twice):
        base = _Grid().settings({})
        assert [s.id for s in expand(base, _Grid(), {})] == [s.id for s in base]
        ids = [s.id for s in technique_settings(_Grid(), {"a": [1], "twice": ["false", "true"]})]
        assert ids == ["grid_toy[a=1,b=x]", "grid_toy[a=1,b=x,twice=True]"]
        assert technique_setting(Setting("grid_toy", {"a": 1, "twice": True})).params == {"a": 1}
        prune = TECHNIQUES.get("prune")()
        assert len(technique_settings(prune, {"ratio": [0.5], "twice": [True]})) == 1  # does not apply to prune


def test_row_precedence_and_guarded_runner_columns():
    protocol, params = {"steps": 20, "backend": "pytorch"}, {"ratio": 0.5}
    cost = {"unet_params": 10, "latency_step_p50_ms": 1.0}
    row = schema.assemble_row(protocol, params, cost, {"ratio": 0.49, "backend": "onnxruntime"}, {"psnr": 30.0})
    assert row == {"steps": 20, "backend": "onnxruntime", "ratio": 0.49, "unet_params": 10,
                   "latency_step_p50_ms": 1.0, "psnr": 30.0}  # fmt: skip
    with pytest.raises(ValueError, match="unet_params"):
        schema.assemble_row(protocol, params, cost, {"unet_params": 5}, {})
    with pytest.raises(ValueError, match="steps"):
        schema.assemble_row(protocol, params, cost, {"steps": 4}, {})
    assert (
        schema.assemble_row(protocol, params, cost, {"unet_params": 5}, {}, declared={"unet_params"})["unet_params"]
        == 5
    )


def test_shared_columns_appear_once_with_the_first_declaration():
    class Late(Technique):
        name, order = "late_toy", 999
        columns = (Column("sparsity", "another meaning"), Column("late_col", "new"))

    with TECHNIQUES.temporarily(Late):
        names = schema.column_names()
        assert names.count("sparsity") == 1 and schema.column("sparsity").meaning.startswith("measured")
        assert names.index("late_col") < names.index("psnr")  # technique columns come before metrics
    assert "late_col" not in schema.column_names()
