"""docs/benchmarks.md is an index of the committed results: it names every result file, and every
decimal figure in an entry is copied from the result files that entry names."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
DECIMAL = re.compile(r"\d+\.\d+")


def _entries(text: str) -> list[str]:
    """The doc's bullets, each with its continuation lines."""
    entries: list[str] = []
    for line in text.splitlines():
        if line.startswith("- "):
            entries.append(line)
        elif entries and line.startswith("  ") and line.strip():
            entries[-1] += " " + line.strip()
    return entries


def test_every_result_file_is_indexed():
    text = DOC.read_text()
    files = [p.name for p in RESULTS.iterdir() if p.suffix in {".md", ".json", ".csv", ".yaml"}]
    missing = sorted(f for f in files if f"`{f}`" not in text)
    assert not missing, f"docs/benchmarks.md does not index {missing}"


def test_every_figure_is_in_the_files_its_entry_names():
    entries = _entries(DOC.read_text())
    assert entries
    for entry in entries:
        named = [RESULTS / n for n in re.findall(r"`([\w.]+\.(?:md|json|csv|yaml))`", entry)]
        named = [p for p in named if p.is_file()]
        assert named, f"entry names no result file: {entry[:80]}"
        source = "\n".join(p.read_text() for p in named)
        prose = re.sub(r"`[^`]*`|\]\([^)]*\)", "", entry)  # commands and link targets are not figures
        absent = [x for x in DECIMAL.findall(prose) if x not in source]
        assert not absent, f"{[p.name for p in named]}: {absent} not in the file(s)"
