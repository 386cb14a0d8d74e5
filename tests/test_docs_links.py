"""Every relative link in README.md, docs/ and bench/results/README.md leads to a file that exists, and
a `#anchor` to a heading of that file (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "bench" / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images are not links
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(text: str) -> list[str]:
    """Link targets outside code blocks and inline code."""
    text = FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def heading_ids(text: str) -> set[str]:
    """GitHub's ids: lower case, punctuation dropped (letters, digits, '-', '_' and spaces kept), spaces
    to '-', a repeated id suffixed -1, -2, ..."""
    ids: set[str] = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        base, n = slug, 0
        while slug in ids:
            n += 1
            slug = f"{base}-{n}"
        ids.add(slug)
    return ids


def test_pages_exist():
    assert len(PAGES) >= 8, [p.name for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: -- not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_link_check_catches_a_missing_file_and_anchor(tmp_path):
    """The check itself can fail: a missing page and a missing heading are both reported."""
    text = "# Title\n\nsee [a](nowhere.md) and [b](#title) and [c](#no-such-heading) `[d](x.md)`\n"
    assert links(text) == ["nowhere.md", "#title", "#no-such-heading"]
    assert heading_ids(text) == {"title"}
    headings = "## bitsandbytes' own CPU paths\n## A (b, c) 2026-12-06\n## A (b, c) 2026-12-06\n"
    assert heading_ids(headings) == {"bitsandbytes-own-cpu-paths", "a-b-c-2026-12-06", "a-b-c-2026-12-06-1"}
