"""Protocol presets: each resolves, the shipped COCO caption list matches its derivation, missing inputs are one
clear InputError, and a coco2017-5k sweep runs end to end on tiny stand-ins (random-weight Inception and CLIP)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from bench import protocols
from bench.cli import options_from_args
from bench.data import load_prompts
from main import build_parser
from stable_diffusion.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def _options(*argv: str):
    args = build_parser().parse_args(list(argv))
    return options_from_args(args, getattr(args, "resolution", None))


@pytest.mark.parametrize("name", list(protocols.PROTOCOLS))
def test_each_preset_resolves(name: str, tmp_path: Path) -> None:
    preset = protocols.get(name)
    extra = []
    if preset.prompts is None:  # the user's caption file, here a stand-in of the documented format
        with pytest.raises(InputError, match="--prompts"):
            _options("--sweep", "prune", "--protocol", name)
        stand_in = tmp_path / ("metadata.csv" if "bk" in name else "captions_source.tsv")
        sep = "," if stand_in.suffix == ".csv" else "\t"
        column = "text" if stand_in.suffix == ".csv" else "caption"
        stand_in.write_text(f"file_name{sep}{column}\na.jpg{sep}a cat\nb.jpg{sep}a dog\n")
        extra = ["--prompts", str(stand_in)]
        assert load_prompts(str(stand_in)).prompts == ["a cat", "a dog"]
    o = _options("--sweep", "prune", "--protocol", name, *extra)
    assert (o.num_images, o.steps, o.sampler, o.guidance) == (
        preset.num_images, preset.steps, preset.sampler, preset.guidance,
    )  # fmt: skip
    assert o.resolution == (preset.resolution, preset.resolution) and o.clip_model == preset.clip_model
    assert (o.fid_size, o.accuracy_window, o.clip_window) == (
        preset.fid_size, preset.accuracy_window, preset.clip_window,
    )  # fmt: skip
    assert o.protocol_overrides == [] and protocols.label(name, []) == name
    less = _options("--sweep", "prune", "--protocol", name, *extra, "--num-images", "4", "--resolution", "64")
    assert less.num_images == 4 and sorted(less.protocol_overrides) == ["num_images", "resolution"]
    assert protocols.label(name, less.protocol_overrides) == f"{name}+overrides(num_images,resolution)"


def test_shipped_coco2017_captions_match_their_derivation(tmp_path: Path) -> None:
    out = tmp_path / "derived.tsv"
    assert protocols.derive_coco2017(out=out) == 5000
    assert out.read_bytes() == protocols.COCO2017_CAPTIONS.read_bytes()
    rows = list(csv.DictReader(out.open(encoding="utf-8"), delimiter="\t"))
    assert len({r["image_id"] for r in rows}) == 5000 and all(r["caption"] for r in rows)
    assert load_prompts(str(protocols.COCO2017_CAPTIONS)).prompts[0] == rows[0]["caption"]
    assert "coco2017-val-5k.tsv" in (ROOT / "data" / "LICENSES.md").read_text()


def test_missing_inputs_are_one_clear_error(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    check = protocols.check_inputs
    with pytest.raises(InputError, match="pass --reference DIR"):
        check("coco2017-5k", None, weights, weights, False)
    with pytest.raises(InputError, match="is not a folder"):
        check("coco2017-5k", tmp_path / "nope", weights, weights, False)
    with pytest.raises(InputError, match="needs --fid-weights"):
        check("coco2017-5k", tmp_path, None, weights, False)
    with pytest.raises(InputError, match=r"--clip-weights .*missing\.bin is not a file"):
        check("coco2017-5k", tmp_path, weights, tmp_path / "missing.bin", False)
    check("coco2017-5k", tmp_path, None, None, True)  # --allow-download stands in for the files
    with pytest.raises(InputError, match="unknown --protocol"):
        protocols.get("coco")
    with pytest.raises(InputError, match="LO,HI"):
        protocols.parse_window("23", "--accuracy-window")


def test_missing_reference_exits_2_with_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "main.py"), "--sweep", "prune", "--protocol", "coco2017-5k",
           "--reference", str(tmp_path / "val2017"), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2
    assert "val2017 is not a folder" in done.stderr and "Traceback" not in done.stderr


def test_accuracy_window() -> None:
    window, clip = (23.0, 24.0), (31.6, 31.8)
    assert protocols.in_window({"fid": 23.5, "clip_score": 31.7}, window, clip) is True
    assert protocols.in_window({"fid": 25.0, "clip_score": 31.7}, window, clip) is False
    assert protocols.in_window({"fid": 23.5}, window, clip) is None  # CLIP not measured: no verdict
    assert protocols.in_window({"fid": 23.5}, window, None) is True
    assert protocols.in_window({"fid": 1.0}, None, None) is None


def _random_inception(path: Path) -> None:
    """torch-fidelity's Inception with seeded random weights (its real file is not available offline)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None),
        torch.random.fork_rng(),
    ):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


def test_coco2017_sweep_on_stand_ins(tmp_path: Path, clip_file: Path) -> None:
    """The documented command, shrunk: 3 images at 64 px, 2 steps, random-weight extractors."""
    from bench.runner import Runner
    from bench.sweep import SweepPlan

    reference = tmp_path / "val2017"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(reference / f"{i:012d}.jpg")
    inception = tmp_path / INCEPTION_NAME
    _random_inception(inception)
    o = _options(
        "--sweep", "prune", "--ratios", "0.5", "--protocol", "coco2017-5k", "--reference", str(reference),
        "--fid-weights", str(inception), "--clip-weights", str(clip_file), "--clip-model", "sdbench-tiny-clip",
        "--num-images", "3", "--resolution", "64", "--steps", "2", "--out", str(tmp_path / "out"),
        "--wandb-mode", "disabled", "--latency-repeats", "1", "--accuracy-window", "0,1e9", "--clip-window=-100,100",
    )  # fmt: skip
    assert sorted(o.protocol_overrides) == ["clip_model", "num_images", "resolution", "steps"]
    plan = SweepPlan(o)
    assert plan.prompts == load_prompts(str(protocols.COCO2017_CAPTIONS)).prompts[:3]
    run_dir = Runner(plan).run()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["protocol_preset"]["name"] == "coco2017-5k"
    assert manifest["protocol_preset"]["overrides"] == o.protocol_overrides
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["technique"] for r in rows] == ["baseline", "prune"]
    for row in rows:
        assert row["protocol"].startswith("coco2017-5k+overrides(")
        assert float(row["fid"]) >= 0 and row["fid_ci_low"] and row["clip_score_ci_low"]
        assert row["in_accuracy_window"] == "True"
    assert 0 <= float(rows[1]["clip_score_p"]) <= 1 and rows[0]["clip_score_p"] == ""


INCEPTION_NAME = protocols.INCEPTION
