"""The README and docs/ as a user meets them: short README, the two set-up commands first, no broken link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "sample_models" / "README.md"]


def test_readme_is_a_short_user_guide():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    headings = [line for line in lines if line.startswith("## ")]
    for needed in ("## Quick start", "## Use the output", "## Results", "## Limitations"):
        assert any(h.startswith(needed) for h in headings), needed


def test_the_first_two_bash_blocks_are_the_set_up_commands():
    """.ci/run takes the README's first two ```bash blocks and runs them as written."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert "fyc-convert sample_models/glyph_cnn.pt" in blocks[0] and "pip install -e ." in blocks[0]
    assert "python -m pytest" in blocks[1] and '.[test]' in blocks[1]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(doc: Path):
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        if not (doc.parent / target).exists():
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(doc: Path):
    """Paths written in backticks (`fyc_convert/...py`, `benchmarks/...py`, `tests/...`) name real files."""
    text = doc.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:fyc_convert|benchmarks|tests|sample_models|docs|\.ci)/[\w./-]+)`", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == []
