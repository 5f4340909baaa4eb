"""`results.csv`: appended one complete line per finished setting, fsync'ed, safe to resume after a kill."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stable_diffusion.errors import InputError

from . import schema

log = logging.getLogger(__name__)


class ResultsFile:
    def __init__(self, path: Path, run_id: str, writer: bool = True) -> None:
        self.path = path
        self.run_id = run_id
        if writer:
            self._prepare()

    def _prepare(self) -> None:
        """Create the file with its header, or repair a last line cut short by a kill (it is redone)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._write(schema.header_line(), mode="w")
            return
        text = self.path.read_text(encoding="utf-8")
        header = text.split("\n", 1)[0]
        if header.split(",") != schema.COLUMN_NAMES:
            raise InputError(
                f"{self.path} has another column layout (written by another sdbench version?); "
                "use a new --run-id or --out"
            )
        if not text.endswith("\n"):
            kept = text[: text.rfind("\n") + 1]
            log.warning("%s: dropping an unfinished last line (the sweep was killed mid-write)", self.path)
            tmp = self.path.with_suffix(".csv.tmp")
            tmp.write_text(kept, encoding="utf-8")
            os.replace(tmp, self.path)

    def _write(self, text: str, mode: str = "a") -> None:
        with self.path.open(mode, encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def finished(self) -> set[str]:
        """Setting ids that already have a row."""
        if not self.path.exists():
            return set()
        with self.path.open(encoding="utf-8", newline="") as f:
            return {row["setting_id"] for row in csv.DictReader(f) if row.get("setting_id")}

    def append(self, values: Mapping[str, Any]) -> None:
        row = schema.make_row({"run_id": self.run_id, **values})
        if row["setting_id"] in self.finished():
            raise RuntimeError(f"row {row['setting_id']} already written")  # a bug, not a user error
        self._write(schema.row_line(row))
        log.info("row written: %s", row["setting_id"])
