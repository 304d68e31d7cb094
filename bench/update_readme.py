"""Copy generated result files into the pages that show them, between their markers, so no number is edited by hand.

    python bench/update_readme.py                 # README.md and every docs/*.md page, in place
    python bench/update_readme.py docs/speed.md   # only the pages named

A block `<!-- BEGIN docs/x.md -->` … `<!-- END docs/x.md -->` (the path relative to the repository
root) is replaced by the current text of docs/x.md without its HTML comments, its headings as bold
lines (the page keeps its outline) and its image links made relative to the page that includes it;
a missing file leaves its block as it is and is reported. The generated reports themselves (bench
tables, study results) land in docs/ pages (docs/results.md, docs/speed.md, ...); the README links
to them. A page is written only when its text changes.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMENT = re.compile(r"\n?<!--.*?-->\n?", re.S)  # raw data kept in a result file (e.g. every run) stays out of the page
HEADING = re.compile(r"^#+ +(.+)$", re.M)  # an included file's headings become bold lines: the page keeps its outline
IMAGE = re.compile(r"(!\[[^\]]*\]\()(?!https?://|/)([^)]+\))")  # relative to the included file → to the page
BLOCK = re.compile(r"(<!-- BEGIN (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- END (?P=path) -->)", re.S)


def pages(root: Path = ROOT) -> list[Path]:
    """The pages that may hold blocks: the README and the hand-written pages directly in docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def update(text: str, root: Path = ROOT, page: Path | None = None) -> tuple[str, list[str]]:
    """The text of `page` (default: the README) with every block refreshed, and the paths that were missing."""
    page = root / "README.md" if page is None else page
    missing: list[str] = []

    def refresh(m: re.Match) -> str:
        source = root / m.group("path")
        if not source.is_file():
            missing.append(m.group("path"))
            return m.group(0)
        body = HEADING.sub(r"**\1**", COMMENT.sub("\n", source.read_text(encoding="utf-8")))
        folder = Path(os.path.relpath(source.parent, page.parent)).as_posix()
        prefix = "" if folder == "." else folder + "/"
        body = IMAGE.sub(lambda i: f"{i.group(1)}{prefix}{i.group(2)}", body)
        return m.group(1) + body.rstrip() + "\n" + m.group(4)

    return BLOCK.sub(refresh, text), missing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    targets = [Path(a).resolve() for a in argv] or pages()
    for page in targets:
        old = page.read_text(encoding="utf-8")
        text, missing = update(old, ROOT, page)
        if text != old:
            page.write_text(text, encoding="utf-8")
            print(f"updated {page.relative_to(ROOT).as_posix()}")
        for path in missing:
            print(f"{page.relative_to(ROOT).as_posix()}: not found (block left as it was): {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
