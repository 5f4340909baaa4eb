"""README stays in step with the code: the generated tables (techniques, modifiers, metrics, CSV columns)
and the CI test command."""

from __future__ import annotations

import pytest

from bench import docs
from bench.schema import COLUMNS

README = docs.README.read_text()


def test_readme_documents_every_csv_column_in_order():
    table = docs.section(README, "columns")
    assert table is not None
    documented = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert documented == [name for name, _ in COLUMNS]


@pytest.mark.parametrize("name", list(docs.SECTIONS))
def test_generated_readme_sections_are_current(name):
    assert docs.section(README, name) == docs.SECTIONS[name](), "stale README: run `python -m bench.docs`"


def test_readme_holds_the_two_commands():
    assert "<!-- run-command -->" in README and "<!-- test-command -->" in README
    assert "bash scripts/install.sh && .venv/bin/python -m pytest" in README
