"""Run-folder state: `results.csv` (one complete line per finished setting), `manifest.json`, and the lock.

Why it is built this way (issue 9):
- Every writer (sweeps, W&B agents, on a shared filesystem too) takes the run folder's file lock around
  "read the finished rows, then append", so no two processes write one setting and none is lost.
- A resume reads results.csv line by line (the writer never puts a newline inside a row): a line that does
  not parse as a full row (a kill, a full disk, binary garbage, an unbalanced quote) is moved to
  `results.csv.quarantine` with a warning naming it, and a setting id seen twice keeps its first row. The
  setting is then redone, so nothing finished is lost and nothing is written twice.
- Every rewrite (repaired results.csv, manifest.json, images) goes to a temp file, is fsync'ed, then
  renamed over the old one: a crash or full disk leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from stable_diffusion.errors import InputError

from . import schema
from .techniques.base import Setting

log = logging.getLogger(__name__)

LOCK_NAME = ".sdbench.lock"


def run_lock(run_dir: Path) -> FileLock:
    """The lock every writer of `run_dir` holds while it reads-then-writes state (re-entrant per process)."""
    return FileLock(str(run_dir / LOCK_NAME))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` as temp file + fsync + rename, so readers see the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def parse_line(line: bytes) -> dict[str, str] | None:
    """One results.csv line as a row, or None if it is not one complete row of this schema."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\n") or "\n" in text[:-1] or "\r" in text:
        return None
    try:
        cells = next(csv.reader([text[:-1]], strict=True), None)
    except csv.Error:
        return None
    if cells is None or len(cells) != len(schema.COLUMN_NAMES):
        return None
    row = dict(zip(schema.COLUMN_NAMES, cells, strict=True))
    if not row["setting_id"] or not row["technique"] or schema.row_line(row) != text:
        return None  # not what our writer makes of these cells: damaged in a way csv let through
    try:
        params = json.loads(row["params"] or "{}")
    except ValueError:
        return None
    if not isinstance(params, dict) or Setting(row["technique"], params).id != row["setting_id"]:
        return None  # the id is derived from technique + params: a damaged id (or params) would be a new setting
    return row


class ResultsFile:
    def __init__(self, path: Path, run_id: str, writer: bool = True) -> None:
        self.path = path
        self.run_id = run_id
        self.lock = run_lock(path.parent)
        if writer:
            with self.lock:
                self._prepare()

    def _prepare(self) -> None:
        """Create the file with its header, or repair it: bad lines and repeated ids go to the quarantine."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            write_atomic(self.path, schema.header_line())
            return
        lines = self.path.read_bytes().splitlines(keepends=True)
        upgraded = lines[0] != schema.header_line().encode()
        if upgraded:
            lines = self._upgrade(lines)
        kept, bad, seen = [lines[0]], [], set()
        for number, line in enumerate(lines[1:], start=2):
            row = parse_line(line)
            if row is not None and row["setting_id"] not in seen:
                seen.add(row["setting_id"])
                kept.append(line)
                continue
            why = "a second row of " + row["setting_id"] if row else "not a complete row"
            if number == len(lines) and not line.endswith(b"\n"):
                why = "an unfinished last line (the sweep was killed mid-write)"
            log.warning("%s line %d: %s (%r...), moved to %s; that setting is redone",
                        self.path, number, why, line[:60], self.quarantine.name)  # fmt: skip
            bad.append(b"# line %d, %s: " % (number, why.encode()) + line.rstrip(b"\r\n") + b"\n")
        if bad:
            with open(self.quarantine, "ab") as f:
                f.write(b"".join(bad))
                f.flush()
                os.fsync(f.fileno())
        if bad or upgraded:
            write_atomic(self.path, b"".join(kept))

    def _upgrade(self, lines: list[bytes]) -> list[bytes]:
        """Rows written under an older header (a subset of today's columns), rewritten under today's (cell for
        cell, new columns empty), so an old run folder resumes; any other header is refused. Lines that do not
        parse under the old header are passed through unchanged, to be quarantined by the caller."""
        try:
            old = next(csv.reader([lines[0].decode("utf-8").rstrip("\r\n")], strict=True))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            old = []
        if not old or not set(old) <= set(schema.column_names()) or len(set(old)) != len(old):
            raise InputError(
                f"{self.path} has another column layout (written by another sdbench version?); "
                "use a new --run-id or --out"
            )
        out = [schema.header_line().encode()]
        for line in lines[1:]:
            try:
                cells = next(csv.reader([line.decode("utf-8").rstrip("\r\n")], strict=True), None)
            except (UnicodeDecodeError, csv.Error):
                cells = None
            if cells is None or len(cells) != len(old) or not line.endswith(b"\n"):
                out.append(line)
                continue
            values = dict(zip(old, cells, strict=True))
            try:
                json.loads(values.get("extra") or "{}")
            except ValueError:
                out.append(line)
                continue
            out.append(schema.row_line({**dict.fromkeys(schema.column_names(), ""), **values}).encode())
        log.warning("%s: written by an older sdbench (other columns); rewritten under today's header", self.path)
        return out

    @property
    def quarantine(self) -> Path:
        return self.path.with_name(self.path.name + ".quarantine")

    def _write(self, text: str) -> None:
        """Append one line; if the disk fills mid-write, cut the file back so no half row is left."""
        size = self.path.stat().st_size
        try:
            with self.path.open("a", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise

    def rows(self) -> list[dict[str, str]]:
        """The complete rows, first of each setting id (what a resume keeps), read line by line."""
        if not self.path.exists():
            return []
        out, seen = [], set()
        for line in self.path.read_bytes().splitlines(keepends=True)[1:]:
            if (row := parse_line(line)) is not None and row["setting_id"] not in seen:
                seen.add(row["setting_id"])
                out.append(row)
        return out

    def finished(self) -> set[str]:
        """Setting ids that already have a row."""
        return {row["setting_id"] for row in self.rows()}

    def append(self, values: Mapping[str, Any]) -> bool:
        """Append the row unless another process wrote that setting first (then keep theirs: False)."""
        row = schema.make_row({"run_id": self.run_id, **values})
        if parse_line(schema.row_line(row).encode()) is None:
            raise RuntimeError(f"row {row['setting_id']} would not read back")  # a bug, not a user error
        with self.lock:
            if row["setting_id"] in self.finished():
                log.info("row %s was written meanwhile by another process; keeping that one", row["setting_id"])
                return False
            self._write(schema.row_line(row))
        log.info("row written: %s", row["setting_id"])
        return True


def update_manifest(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Merge this sweep's manifest into `path` (call under the run lock) and write it atomically.

    Sweeps of one protocol share a folder (W&B agents: one setting each); their setting lists are merged.
    An unreadable manifest (a crash of an older version mid-write) is moved aside with a warning and
    rebuilt; the rows keep their own protocol columns, so nothing is lost.
    """
    old: dict[str, Any] | None = None
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            log.warning("%s is unreadable (%s); moved to %s and rebuilt", path, e, aside.name)
            old = None
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    if old is not None:
        if old.get("protocol_digest") != data["protocol_digest"]:
            raise InputError(
                f"{path.parent} holds a sweep with another protocol (model, prompts, sampler, steps, seed, "
                "metrics...); use another --run-id or --out"
            )
        was, now_sha = (old.get("prompts") or {}).get("sha256"), (data.get("prompts") or {}).get("sha256")
        if was and now_sha and was != now_sha:  # same name, other content (an edited prompt file)
            raise InputError(
                f"{path.parent} holds a sweep whose prompts had other content (sha256 {was[:12]}, now "
                f"{now_sha[:12]}); use another --run-id or --out"
            )
        data = {**data, "started": old.get("started"), "resumed": [*old.get("resumed", []), now]}
        data["settings"] = list(dict.fromkeys([*old.get("settings", []), *data["settings"]]))
    else:
        data = {**data, "started": now}
    write_atomic(path, json.dumps(data, indent=2, default=str))
    return data


def read_rows(csv_path: Path | str) -> list[dict[str, str]]:
    """Rows as written by the runner; every schema column present (older files may lack some)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        names = schema.column_names()
        return [{name: row.get(name) or "" for name in names} for row in csv.DictReader(f)]
