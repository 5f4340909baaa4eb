"""README tables generated from the registries: techniques, modifiers, metrics and the results.csv columns.

`python -m bench.docs` rewrites the marked sections of README.md in place; tests/test_docs.py fails when
they are stale, so a new technique or metric documents itself (its declarations are the documentation).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from stable_diffusion.defaults import REPO_ROOT

from . import schema
from .registry import METRICS, MODIFIERS, TECHNIQUES, Axis

README = REPO_ROOT / "README.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _axis(axis: Axis) -> str:
    sep = "\\|"  # a literal | inside a Markdown table cell
    choices = f" ({sep.join(map(str, axis.choices))})" if axis.choices else ""
    return f"`{axis.flag}`{choices} = {','.join(map(str, axis.default))}"


def techniques_table() -> str:
    rows = ["| technique | what it does | axes (flag = default) | its columns |", "|---|---|---|---|"]
    for cls in TECHNIQUES.classes():
        axes = "<br>".join(_axis(a) for a in cls.axes)
        columns = ", ".join(f"`{c.name}`" for c in cls.columns)
        rows.append(f"| `{cls.name}` | {_cell(cls.summary)} | {axes} | {columns} |")
    return "\n".join(rows)


def modifiers_table() -> str:
    rows = ["| modifier | what it does | axis (flag = default) |", "|---|---|---|"]
    for cls in MODIFIERS.classes():
        rows.append(f"| `{cls.name}` | {_cell(cls.summary)} | {_axis(cls.axis)} |")
    if len(rows) == 2:
        rows.append("| (none registered) | | |")
    return "\n".join(rows)


def metrics_table() -> str:
    rows = ["| metric | columns (better) |", "|---|---|"]
    for cls in METRICS.classes():
        cols = ", ".join(f"`{c.name}`" + (f" ({c.better})" if c.better else "") for c in cls.columns)
        rows.append(f"| `{cls.name}` | {cols} |")
    return "\n".join(rows)


def columns_table() -> str:
    rows = ["| column | meaning |", "|---|---|"]
    rows += [f"| `{c.name}` | {_cell(c.meaning)} |" for c in schema.columns()]
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "techniques": techniques_table,
    "modifiers": modifiers_table,
    "metrics": metrics_table,
    "columns": columns_table,
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated: {name} -->\n)(.*?)(<!-- end generated -->)", re.S)


def section(text: str, name: str) -> str | None:
    """The body of README section `name` as it is now (None if the markers are missing)."""
    match = _pattern(name).search(text)
    return match.group(2).removesuffix("\n") if match else None


def render(text: str) -> str:
    """`text` (the README) with every generated section rewritten from the registries."""
    for name, make in SECTIONS.items():
        if _pattern(name).search(text) is None:
            raise ValueError(f"README has no <!-- generated: {name} --> ... <!-- end generated --> section")
        match = _pattern(name).search(text)
        assert match is not None
        text = text[: match.start(2)] + make() + "\n" + text[match.end(2) :]
    return text


def main() -> int:
    text = README.read_text(encoding="utf-8")
    new = render(text)
    if new != text:
        README.write_text(new, encoding="utf-8")
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
