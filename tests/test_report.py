"""Report: CSV read-back, plots, Pareto front, image grids, W&B logging (offline only) and sweep files."""

from __future__ import annotations

import builtins
import json
import logging
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from bench import report, schema, wandb_report
from bench.techniques.base import Setting

PROTOCOL = {
    "run_id": "r1",
    "model": "tiny (tiny-random-seed0.safetensors)",
    "n_images": 4,
    "resolution": "64x64",
    "sampler": "ddim",
    "steps": 10,
    "guidance": 7.5,
    "seed": 0,
    "prompts": "parti:abc123",
}
# Offline run: lpips and clip_score never measured, so no plot may exist for them.
EMPTY_METRICS = ("lpips", "clip_score")
PLOTTED = ("psnr", "ssim", "mse", "fid", "latency_step_p50_ms", "latency_image_p50_s", "size_bytes", "peak_rss_mb")


def _row(setting: Setting, **fields: object) -> dict[str, str]:
    values = {**PROTOCOL, "setting_id": setting.id, "technique": setting.technique, "params": dict(setting.params)}
    return schema.make_row({"backend": "pytorch", "kernels": "dense fp32", "status": "ok", **values, **fields})


def fake_rows() -> list[dict[str, str]]:
    rows = [
        _row(Setting("baseline"), ratio=0.0, psnr=math.inf, ssim=1.0, mse=0.0, fid=80.0, fid_ci_low=75.0,
             fid_ci_high=86.0, latency_step_p50_ms=50.0, latency_image_p50_s=0.6, size_bytes=23e6,
             peak_rss_mb=900.0, sparsity=0.0),
    ]  # fmt: skip
    for t, target in enumerate(("all", "attn")):
        for i, ratio in enumerate((0.1, 0.3, 0.5)):
            setting = Setting("prune", {"method": "l1", "ratio": ratio, "scope": "global", "target": target})
            rows.append(
                _row(
                    setting,
                    ratio=ratio,
                    sparsity=ratio * 0.99,
                    psnr=40.0 - 10 * i - 3 * t,
                    ssim=0.9 - 0.1 * i,
                    mse=0.001 * (i + 1),
                    fid=82.0 + 5 * i,
                    fid_ci_low=78.0 + 5 * i,
                    fid_ci_high=88.0 + 5 * i,
                    latency_step_p50_ms=50.0 - 2 * i - t,
                    latency_image_p50_s=0.6,
                    size_bytes=23e6,
                    peak_rss_mb=910.0,
                )
            )
    for mode, kernels, psnr, latency, fid in (
        ("dynamic", "int8", 33.0, 35.0, 84.0),
        ("static", "int8", 30.0, 30.0, None),  # FID not measured for this one
        ("w4", "simulated", 28.0, 70.0, 90.0),
    ):
        setting = Setting("quant", {"mode": mode, "observer": "minmax"})
        rows.append(
            _row(
                setting,
                mode=mode,
                kernels=kernels,
                psnr=psnr,
                ssim=0.8,
                mse=0.002,
                fid=fid,
                fid_ci_low=fid and fid - 4,
                fid_ci_high=fid and fid + 4,
                latency_step_p50_ms=latency,
                latency_image_p50_s=latency / 80,
                size_bytes=6e6,
                peak_rss_mb=800.0,
            )
        )
    return rows


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    path = tmp_path / "results.csv"
    path.write_text(schema.header_line() + "".join(schema.row_line(r) for r in fake_rows()), encoding="utf-8")
    return path


def test_read_rows_round_trip(csv_path: Path) -> None:
    rows = report.read_rows(csv_path)
    assert rows == fake_rows()
    assert json.loads(rows[1]["params"])["target"] == "all"
    assert schema.parse_float(rows[0]["psnr"]) == math.inf


def test_write_report_plots_measured_metrics_only(csv_path: Path, tmp_path: Path) -> None:
    paths = report.write_report(tmp_path, report.read_rows(csv_path))
    names = {p.name for p in paths}
    for technique in ("prune", "quant"):
        for metric in PLOTTED:
            assert f"{technique}_{metric}.png" in names
        for metric in EMPTY_METRICS:
            assert f"{technique}_{metric}.png" not in names
    assert "prune_sparsity.png" in names and "quant_sparsity.png" not in names
    assert not any(n.startswith("baseline_") for n in names)
    assert "pareto_psnr_latency_step_p50_ms.png" in names
    for path in paths:
        assert path.parent == tmp_path / "plots" and path.stat().st_size > 5000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 400


def test_write_report_tolerates_single_and_empty_rows(tmp_path: Path) -> None:
    baseline = fake_rows()[:1]
    paths = report.write_report(tmp_path / "one", baseline)
    assert [p.name for p in paths] == ["pareto_fid_latency_step_p50_ms.png"]  # psnr is only inf: falls back
    bare = [_row(Setting("baseline")), _row(Setting("prune", {"ratio": 0.5}), ratio=0.5)]
    paths = report.write_report(tmp_path / "bare", bare)
    assert [p.name for p in paths] == ["pareto_psnr_latency_step_p50_ms.png"]  # placeholder, says no data
    assert paths[0].stat().st_size > 0
    assert report.write_report(tmp_path / "none", []) == []


def test_pareto_front_is_exactly_the_non_dominated_points() -> None:
    points = [(30.0, 10.0), (25.0, 5.0), (20.0, 5.0), (30.0, 12.0), (35.0, 20.0), (10.0, 1.0), (25.0, 5.0)]
    front = report.pareto_front(points)
    assert sorted(front) == [0, 1, 4, 5, 6]  # 2 is beaten by 1, 3 by 0; the tie 1/6 is kept
    assert [points[i][1] for i in front] == sorted(points[i][1] for i in front)  # cheapest first
    assert report.pareto_front([(math.inf, 15.0), (35.0, 20.0), (30.0, 10.0)]) == [2, 0]
    assert report.pareto_front([]) == []


def test_pareto_rows_are_the_non_dominated_real_kernel_rows() -> None:
    rows = fake_rows()
    front = report.pareto_rows(rows, "psnr", "latency_step_p50_ms")
    real = [r for r in rows if r["kernels"] != "simulated"]
    pts = {r["setting_id"]: (float(r["psnr"]), float(r["latency_step_p50_ms"])) for r in real}
    expected = {
        sid
        for sid, (q, c) in pts.items()
        if not any(q2 >= q and c2 <= c and (q2, c2) != (q, c) for q2, c2 in pts.values())
    }
    assert {rows[i]["setting_id"] for i in front} == expected
    assert "baseline" in expected and "quant[mode=static,observer=minmax]" in expected  # best quality / fastest
    costs = [float(rows[i]["latency_step_p50_ms"]) for i in front]
    assert costs == sorted(costs)
    # The simulated row is never on the front, even when it would dominate everything.
    fast_sim = [{**r, "latency_step_p50_ms": "1.0", "psnr": "99.0"} if r["kernels"] == "simulated" else r for r in rows]
    assert {fast_sim[i]["setting_id"] for i in report.pareto_rows(fast_sim, "psnr", "latency_step_p50_ms")} == expected
    # Lower is better for FID: the row without FID is skipped, the lowest-FID row is on the front.
    fid_front = {rows[i]["setting_id"] for i in report.pareto_rows(rows, "fid", "latency_step_p50_ms")}
    assert "baseline" in fid_front and "quant[mode=static,observer=minmax]" not in fid_front


def test_plot_pareto_falls_back_to_fid(tmp_path: Path) -> None:
    rows = [{**r, "psnr": "", "ssim": ""} for r in fake_rows()]
    assert report.pick_quality(rows) == "fid"
    path = report.plot_pareto(rows, tmp_path)
    assert path.name == "pareto_fid_latency_step_p50_ms.png" and path.stat().st_size > 5000


def test_make_grid() -> None:
    colours = ["red", "green", "blue", "white", "black"]
    images = [Image.new("RGB", (8, 6), c) for c in colours]
    grid = report.make_grid(images, cols=3)
    assert grid.size == (24, 12)
    assert grid.getpixel((8 + 1, 6 + 1)) == (0, 0, 0)  # image 4: row 1, column 1
    assert report.make_grid(images[:2], cols=4).size == (16, 6)
    with pytest.raises(ValueError, match="must be"):
        report.make_grid([images[0], Image.new("RGB", (4, 4))], cols=2)


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep W&B silent, offline and inside tmp_path (config, cache and data dirs included)."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)


@pytest.mark.usefixtures("offline_wandb")
def test_log_wandb_offline_writes_run_with_table(csv_path: Path, tmp_path: Path) -> None:
    rows = report.read_rows(csv_path)
    plots = report.write_report(tmp_path, rows)[-1:]
    grid = tmp_path / "grid.png"
    report.make_grid([Image.new("RGB", (8, 8), "red")] * 4, cols=2).save(grid)
    run_dir = tmp_path / "run"
    where = wandb_report.log_wandb(
        run_dir, "sdbench-test", "offline", {"technique": "prune"}, rows, {rows[1]["setting_id"]: grid}, plots, "t1"
    )
    assert where is not None
    offline = Path(where)
    assert offline.parent == run_dir / "wandb" and offline.name.startswith("offline-run-")
    assert list(offline.glob("run-*.wandb"))
    (table_file,) = offline.glob("files/media/table/results_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(dict.fromkeys(schema.COLUMN_NAMES))
    assert len(table["data"]) == len(rows)
    col = table["columns"].index
    assert table["data"][1][col("psnr")] == 40.0 and table["data"][1][col("setting_id")] == rows[1]["setting_id"]
    assert table["data"][0][col("psnr")] is None  # inf: JSON Infinity would break the W&B frontend
    assert table["data"][-2][col("fid")] is None  # not measured
    assert len(list(offline.glob("files/media/images/grid/*.png"))) == 1
    assert len(list(offline.glob("files/media/images/plot/*.png"))) == 1


@pytest.mark.usefixtures("offline_wandb")
def test_log_wandb_failures_warn_and_return_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    def broken_init(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="bench.wandb_report"):
        assert wandb_report.log_wandb(tmp_path, rows=fake_rows()) is None
    assert "no W&B today" in caplog.text

    real_import = builtins.__import__

    def no_wandb(name: str, *args: object, **kwargs: object) -> object:
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    caplog.clear()
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with caplog.at_level(logging.WARNING, logger="bench.wandb_report"):
        assert wandb_report.log_wandb(tmp_path, rows=fake_rows()) is None
    assert "not available" in caplog.text
    with pytest.raises(ValueError, match="mode"):
        wandb_report.log_wandb(tmp_path, mode="shared")


def test_write_wandb_sweep(tmp_path: Path) -> None:
    axes = {"ratio": [0.1, 0.3], "target": ["all", "attn"], "calib_prompts": [4, 16]}
    path = wandb_report.write_wandb_sweep(tmp_path / "sweep.yaml", "prune", axes, ["--n-images", "4", "--run-id", "s1"])
    text = path.read_text()
    assert text.startswith("#") and "wandb agent" in text and "--run-id" in text
    spec = yaml.safe_load(text)
    assert spec["program"] == "main.py" and spec["method"] == "grid"
    assert spec["command"] == [
        "${env}", "python", "${program}", "--sweep", "prune", "--n-images", "4", "--run-id", "s1", "${args}"
    ]  # fmt: skip
    assert spec["parameters"] == {
        "ratio": {"values": [0.1, 0.3]},
        "target": {"values": ["all", "attn"]},
        "calib-prompts": {"values": [4, 16]},
    }
    with pytest.raises(ValueError, match="comma"):
        wandb_report.write_wandb_sweep(tmp_path / "bad.yaml", "prune", {"target": ["a,b"]}, [])
