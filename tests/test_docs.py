"""The documents match the code: the README's layout names every source file, and every
``docs/method.md §N`` citation points at a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_SUFFIXES = {".py", ".h", ".cpp", ".cu", ".cuh"}


def _source_files():
    for base in ("dqkernels", "csrc", "python"):
        for path in sorted((ROOT / base).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.name not in ("__init__.py", "__main__.py"):
                if "__pycache__" not in path.parts:
                    yield path


def test_readme_layout_names_every_source_file_and_only_existing_ones():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    missing = [str(p.relative_to(ROOT)) for p in _source_files() if p.name not in layout]
    assert not missing, f"README layout does not mention {missing}"
    names = set(re.findall(r"`([\w/.-]+\.(?:py|h|cpp|cu|cuh))`", layout))
    existing = {p.name for p in _source_files()} | {"__init__.py", "__main__.py"}
    assert not {Path(n).name for n in names} - existing, "README layout names files that do not exist"


def test_every_method_citation_names_an_existing_section():
    document = (ROOT / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)[. ]", document, re.M))
    bad = []
    for path in ROOT.rglob("*"):
        if path.suffix not in SOURCE_SUFFIXES | {".md", ".toml", ".sh"} or ".git" in path.parts:
            continue
        if not path.is_file():
            continue
        for first, last in re.findall(r"method\.md §(\d+(?:\.\d+)*)(?:[–-](\d+(?:\.\d+)*))?", path.read_text(errors="ignore")):
            for number in (first, last):
                if number and number not in sections:
                    bad.append((str(path.relative_to(ROOT)), number))
    assert not bad, f"citations of missing sections: {bad}"
