"""README stays in step with the code: the CSV schema table and the CI test command."""

from __future__ import annotations

from pathlib import Path

from bench.schema import COLUMNS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_documents_every_csv_column_in_order():
    documented = [line.split("`")[1] for line in README.splitlines() if line.startswith("| `")]
    assert documented[: len(COLUMNS)] == [name for name, _ in COLUMNS]


def test_readme_holds_the_two_commands():
    assert "<!-- run-command -->" in README and "<!-- test-command -->" in README
    assert "bash scripts/install.sh && .venv/bin/python -m pytest" in README
