"""The documentation: README.md stays an entry page, and its links and those of docs/*.md hold.

Pure Python (no project import, no engines, no subprocess): the README is under
15 KB; every relative link in README.md and docs/*.md points at a file or folder
that exists, and a `#anchor` at a heading of the linked page (GitHub's anchor
rules); every page in docs/ is linked from the README.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 15_000  # "under 15 KB"

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)=[\"']([^\"']+)[\"']", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    lines, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            lines.append("")
            continue
        if fence is not None:
            if match and match.group(1).startswith(fence):
                fence = None
            lines.append("")
            continue
        lines.append(line)
    return lines


def link_targets(text: str) -> list[str]:
    """Every link target (inline links, images, reference definitions) outside code."""
    prose = "\n".join(prose_lines(text))
    prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose)
    targets = [m.group(1) for m in INLINE_LINK.finditer(prose)]
    targets += [m.group(1) for m in REFERENCE_DEF.finditer(prose)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in targets]


def heading_texts(text: str) -> list[str]:
    """The text of every heading (ATX and setext) outside fenced code blocks, in order."""
    out, previous = [], ""
    for line in prose_lines(text):
        atx = ATX_HEADING.match(line)
        if atx:
            out.append(atx.group(2) or "")
        elif SETEXT_UNDERLINE.match(line) and previous.strip() and not ATX_HEADING.match(previous):
            out.append(previous.strip())
        previous = line
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: the rendered text, lower-cased, punctuation
    other than '-' and '_' dropped, each space turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), text)
    text = re.sub(r"(?<![\w\\])_(.+?)_(?!\w)", r"\1", text)  # _emphasis_ (underscores inside words stay)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page offers: heading slugs (repeats get -1, -2, ...) and HTML name/id anchors."""
    seen: dict[str, int] = {}
    out = set()
    for heading in heading_texts(text):
        slug = github_slug(heading)
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
            while slug in out:  # a literal heading may already have taken "x-1"
                slug += "-1"
        else:
            seen[slug] = 0
        out.add(slug)
    out.update(m.group(1) for m in HTML_ANCHOR.finditer(text))
    return out


def relative_links(page: Path) -> list[tuple[str, Path, str | None]]:
    """(as written, resolved path, anchor or None) for each relative link of a page."""
    out = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto, ...: not checked here
        path_part, _, anchor = target.partition("#")
        path = (page.parent / unquote(path_part)).resolve() if path_part else page.resolve()
        out.append((target, path, unquote(anchor) if anchor else None))
    return out


# -- the checker itself -------------------------------------------------------------


@pytest.mark.parametrize(("heading", "slug"), [
    ("Parity gating for CI", "parity-gating-for-ci"),
    ("Compact storage (`--store`)", "compact-storage---store"),
    ("Capture speed: the benchmark", "capture-speed-the-benchmark"),
    ("A real accelerator run (NVIDIA H100)", "a-real-accelerator-run-nvidia-h100"),
    ("Layout (before the reshaping)", "layout-before-the-reshaping"),
    ("Combinations that are refused (exit 2)", "combinations-that-are-refused-exit-2"),
    ("`RunConfig` and [the CLI](cli.md)", "runconfig-and-the-cli"),
    ("max_num_seqs and _emphasis_", "max_num_seqs-and-emphasis"),
    ("Δp of the reference token", "δp-of-the-reference-token"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_links_and_headings_in_code_are_ignored():
    text = "\n".join([
        "# Title",
        "[a](a.md) and `[b](b.md)`",
        "```sh",
        "# not a heading",
        "[c](c.md)",
        "```",
        "Title",
        "-----",
        "[d]: d.md#x",
    ])
    assert link_targets(text) == ["a.md", "d.md#x"]
    assert anchors(text) == {"title", "title-1"}


# -- the documentation ----------------------------------------------------------------


def test_readme_is_an_entry_page():
    size = README.stat().st_size
    assert size < README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it under {README_MAX_BYTES} and move reference material to docs/")


def test_docs_folder_has_pages():
    assert doc_pages(), "docs/ holds no .md page"


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for written, path, anchor in relative_links(page):
        if not path.exists():
            broken.append(f"{written}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
                          "does not exist")
        elif anchor is not None:
            if path.is_dir() or path.suffix.lower() != ".md":
                broken.append(f"{written}: an anchor into something that is not a Markdown page")
            elif anchor not in anchors(path.read_text(encoding="utf-8")):
                broken.append(f"{written}: no heading of {path.name} has the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(broken)


def test_readme_links_every_docs_page():
    linked = {path for _, path, _ in relative_links(README)}
    unlinked = [p.relative_to(ROOT).as_posix() for p in doc_pages() if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link: {', '.join(unlinked)}"
