"""docs/configuration.md: generated from the config dataclasses, complete and current."""

from __future__ import annotations

import dataclasses
import re
import typing

from recsys_moe import config as C
from recsys_moe.config_reference import PAGE, render


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(C.Config)
    out = {f"[{f.name}]": hints[f.name] for f in dataclasses.fields(C.Config)
           if dataclasses.is_dataclass(hints[f.name])}  # fmt: skip
    return {**out, "[[data.tasks]]": C.TaskSpec}


def test_every_key_is_documented():
    """A key added to a config dataclass without the comment that says what it does fails
    here (the comment is what the reference shows)."""
    page = render()
    for title, cls in _sections().items():
        body = page.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
        cells = [re.split(r"(?<!\\)\|", line) for line in body.splitlines()
                 if line.startswith("| `")]  # fmt: skip
        rows = {c[1].strip(" `"): c for c in cells}  # key -> ["", key, type, default, what, ""]
        for f in dataclasses.fields(cls):
            assert f.name in rows, f"{title} {f.name} missing from the reference"
            what = rows[f.name][4].strip()
            assert what, f"{title} {f.name}: no comment above it in recsys_moe/config.py"


def test_the_page_is_current():
    assert PAGE.read_text() == render(), "docs/configuration.md is out of date: run `make docs`"
