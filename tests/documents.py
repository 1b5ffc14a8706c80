"""The project's documents for the tests that check them: the README and every page of the docs site."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = {path.relative_to(ROOT / "docs").as_posix(): path.read_text() for path in sorted((ROOT / "docs").rglob("*.md"))}
ALL = "\n".join([README, *PAGES.values()])
"""The README and every docs page, one after another."""


def blocks(language: str, text: str = ALL) -> list[str]:
    """The fenced code blocks of one language."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)
