"""bench/RESULTS.md: every section says where and on what code its figures were measured."""

from __future__ import annotations

import re

from bench import common
from tests.conftest import REPO


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0]: p for p in parts}


def test_every_section_names_its_machine_and_commit():
    sections = _sections((REPO / "bench" / "RESULTS.md").read_text())
    assert len(sections) > 10
    for title, body in sections.items():
        assert "Machine: " in body, f"{title}: no machine"
        assert re.search(r"\bCommit(ted in)? [0-9a-f]{7}", body), f"{title}: no commit"


def test_write_section_stamps_the_checked_out_commit(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(common, "RESULTS", results)
    common.write_section("Demo (bench/demo.py)", "Machine: m.\n\n| a |\n|---|\n| 1 |")
    common.write_section("Other", "Machine: m. Commit abcdef1. Already stamped.")
    sections = _sections(results.read_text())
    sha = common.commit()
    assert re.fullmatch(r"[0-9a-f]{7,}( \+ uncommitted changes)?", sha), sha
    assert sections["Demo (bench/demo.py)"].rstrip().endswith(f"Commit {sha}.")
    assert sections["Other"].count("Commit ") == 1


def test_the_readme_quotes_only_figures_results_holds():
    """Every measured figure in README.md (a decimal number) stands in bench/RESULTS.md."""
    readme = (REPO / "README.md").read_text().replace("127.0.0.1", "")
    results = (REPO / "bench" / "RESULTS.md").read_text()
    figures = set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", readme))
    assert figures
    assert not sorted(f for f in figures if f not in results)
