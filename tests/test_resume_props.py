"""Issue 9 items 4-6 as properties of the run-folder state (`bench.results`), without sampling anything:
random truncation or corruption of results.csv and manifest.json, then a resume, never loses an intact
finished row nor writes a setting twice; concurrent writers never duplicate one."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import schema
from bench.results import ResultsFile, parse_line, update_manifest
from stable_diffusion.errors import InputError

IDS = ["baseline", *[f"prune[method=l1,ratio=0.{i},scope=global,target=all]" for i in range(1, 7)]]


def _row(setting_id: str) -> dict[str, object]:
    return {"setting_id": setting_id, "technique": setting_id.split("[")[0], "params": {"r": setting_id},
            "psnr": 31.25, "status": "ok", "model": 'tiny:"quoted", name', "fid_bootstrap_bias": 0.5}  # fmt: skip


def _resume(path: Path) -> list[str]:
    """What a sweep does on resume: open (repairs), read the finished ids, append the missing settings."""
    results = ResultsFile(path, "run")
    done = results.finished()
    for setting_id in IDS:
        if setting_id not in done:
            results.append(_row(setting_id))
    return [row["setting_id"] for row in results.rows()]


def _fresh(folder: Path) -> Path:
    path = folder / "results.csv"
    results = ResultsFile(path, "run")
    for setting_id in IDS:
        results.append(_row(setting_id))
    return path


def _intact_ids(original: bytes, damaged: bytes) -> set[str]:
    """Ids whose complete original line still appears, whole and on its own line, in the damaged file."""
    lines = set(damaged.splitlines(keepends=True))
    return {row["setting_id"] for line in original.splitlines(keepends=True)[1:] if line in lines
            and (row := parse_line(line))}  # fmt: skip


damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(b"")),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.sampled_from([b'x,"unbalanced\n', b"\xff\xfe\x00garbage\n",
                                                                   b"\n", b'"', b"baseline,,,\n"])),
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damages=st.lists(damage, min_size=1, max_size=3))
def test_resume_after_damage_never_loses_or_duplicates(damages: list[tuple[str, float, bytes]]) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        path = _fresh(folder)
        original = data = path.read_bytes()
        for kind, where, payload in damages:
            at = int(where * len(data))
            if kind == "truncate":
                data = data[:at]
            elif kind == "overwrite":
                data = data[:at] + payload + data[at + len(payload) :]
            else:
                data = data[:at] + payload + data[at:]
        path.write_bytes(data)
        intact = _intact_ids(original, data)
        try:
            ids = _resume(path)
        except InputError:  # the header itself was damaged: refused, the file left as it was
            assert path.read_bytes() == data and not data.startswith(schema.header_line().encode())
            return
        assert sorted(ids) == sorted(IDS)  # every setting exactly once
        after = path.read_bytes().splitlines(keepends=True)
        kept = {parse_line(line)["setting_id"]: line for line in after[1:]}
        assert len(after) == len(IDS) + 1  # no stray line left behind: the bad ones are in the quarantine
        for line in original.splitlines(keepends=True)[1:]:
            setting_id = parse_line(line)["setting_id"]
            if setting_id in intact:
                assert kept[setting_id] == line  # an intact finished row is kept, not redone
        assert ResultsFile(path, "run").finished() == set(IDS) and path.read_bytes() == b"".join(after)  # stable
    finally:
        shutil.rmtree(folder)


def _manifest(settings_: list[str], digest: str = "p1") -> dict[str, object]:
    return {"run_id": "run", "protocol_digest": digest, "settings": settings_}


@settings(max_examples=40, deadline=None)
@given(cut=st.floats(0, 1), garbage=st.binary(max_size=20))
def test_a_damaged_manifest_is_rebuilt_and_the_rows_survive(cut: float, garbage: bytes) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        path = _fresh(folder)
        rows_before = path.read_bytes()
        manifest = folder / "manifest.json"
        update_manifest(manifest, _manifest(["baseline", IDS[1]]))
        text = manifest.read_bytes()
        damaged = text[: int(cut * len(text))] + garbage
        manifest.write_bytes(damaged)
        try:
            readable = isinstance(json.loads(damaged), dict)
        except ValueError:
            readable = False
        if readable and json.loads(damaged).get("protocol_digest") != "p1":
            with pytest.raises(InputError, match="another protocol"):
                update_manifest(manifest, _manifest([IDS[2]]))
            return
        merged = update_manifest(manifest, _manifest([IDS[2]]))
        assert json.loads(manifest.read_text()) == merged and IDS[2] in merged["settings"]
        if not readable:
            assert len(list(folder.glob("manifest.json.corrupt-*"))) == 1
        assert _resume(path) == IDS and path.read_bytes() == rows_before  # nothing redone, nothing lost
    finally:
        shutil.rmtree(folder)


def test_manifest_merges_agents_settings_and_refuses_another_protocol(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    update_manifest(manifest, _manifest(["baseline", IDS[1]]))
    merged = update_manifest(manifest, _manifest(["baseline", IDS[2]]))
    assert merged["settings"] == ["baseline", IDS[1], IDS[2]] and len(merged["resumed"]) == 1
    with pytest.raises(InputError, match="another protocol"):
        update_manifest(manifest, _manifest(["baseline"], digest="p2"))
    assert json.loads(manifest.read_text()) == merged  # the refused sweep changed nothing


def test_a_quoted_newline_cell_stays_on_one_line(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.csv", "run")
    results.append({**_row("baseline"), "model": "two\nlines\r\nmodel"})
    (row,) = results.rows()
    assert row["model"] == "two lines model" and len((tmp_path / "results.csv").read_bytes().splitlines()) == 2


def _writer(folder: str, worker: int, barrier) -> None:
    results = ResultsFile(Path(folder) / "results.csv", "run")
    barrier.wait()
    for setting_id in IDS:  # every worker tries every setting, as two sweeps into one --out do
        if setting_id not in results.finished():
            results.append({**_row(setting_id), "extra_worker": worker})


def test_concurrent_writers_never_duplicate_a_row(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    lines = (tmp_path / "results.csv").read_bytes().splitlines(keepends=True)
    assert lines[0] == schema.header_line().encode()
    ids = [parse_line(line)["setting_id"] for line in lines[1:]]
    assert sorted(ids) == sorted(IDS)  # each exactly once, every line a complete row
