"""Check that every `NAME==VERSION` pin of every requirements file exists on the package index.

Why: a pin that does not exist (onnxruntime-gpu==1.32.0) breaks every install of that file, and CI installs
only the CPU file. Only the index's JSON pages are read (`pip install --dry-run` would download each
wheel, 255 MB for onnxruntime-gpu), in parallel, so it takes seconds. A version counts when it has an sdist
or a wheel for this interpreter and platform. Exit 1 names every missing pin.

    python scripts/check_pins.py [requirements*.txt ...]
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")


def pins(path: Path, seen: set[Path] | None = None) -> dict[str, tuple[str, str]]:
    """name -> (version, where) of every pin in `path` and the files it includes with `-r`."""
    seen = seen if seen is not None else set()
    if path in seen:
        return {}
    seen.add(path)
    out: dict[str, tuple[str, str]] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            out.update(pins(path.parent / line.split(None, 1)[1], seen))
        elif m := PIN.match(line):
            out[m.group(1).lower()] = (m.group(2), f"{path.name}:{n}")
    return out


def index_url() -> str:
    """The index pip installs from: $PIP_INDEX_URL, else PyPI's simple API."""
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def available(name: str) -> list[str] | str:
    """Versions of `name` that have a file installable here (sdist, or a wheel matching this interpreter's
    tags), from the index's JSON simple API (PEP 691: one small page, no wheel download); or an error line."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import canonicalize_name, parse_wheel_filename
    except ImportError:  # before any venv exists: the copy pip vendors
        from pip._vendor.packaging.tags import sys_tags
        from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

    url = f"{index_url()}/{canonicalize_name(name)}/"
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"cannot read {url}: {e}"
    tags = set(sys_tags())
    versions: dict[str, None] = {}
    for f in files:
        filename = f["filename"]
        if f.get("yanked"):
            continue
        if filename.endswith(".whl"):
            _, version, _, wheel_tags = parse_wheel_filename(filename)
            if tags & set(wheel_tags):
                versions[str(version)] = None
        elif filename.endswith((".tar.gz", ".zip")):
            versions[filename.rsplit("-", 1)[-1].removesuffix(".tar.gz").removesuffix(".zip")] = None
    return sorted(versions, key=_version_key, reverse=True)


def _version_key(text: str) -> object:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        from pip._vendor.packaging.version import InvalidVersion, Version

    try:
        return (1, Version(text))
    except InvalidVersion:
        return (0, text)


def missing(wanted: dict[str, tuple[str, str]], lookup=available) -> list[str]:
    """One message per pin whose version the index lacks (with the newest versions it has)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(wanted, pool.map(lookup, wanted), strict=True))
    out = []
    for name, (version, where) in sorted(wanted.items()):
        versions = found[name]
        if isinstance(versions, str):
            out.append(f"{where}: {name}=={version}: {versions}")
        elif version not in versions:
            out.append(f"{where}: {name}=={version} does not exist on the index (newest: {', '.join(versions[:3])})")
    return out


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted(p for p in ROOT.glob("requirements*.txt"))
    wanted: dict[str, tuple[str, str]] = {}
    for path in files:
        wanted.update(pins(path.resolve()))
    problems = missing(wanted)
    for line in problems:
        print(f"unresolvable pin: {line}", file=sys.stderr)
    print(f"checked {len(wanted)} pins of {', '.join(p.name for p in files)}: {len(problems)} missing", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
