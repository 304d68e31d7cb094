"""Copy generated result files into the README between their markers, so no number is edited by hand.

    python bench/update_readme.py            # README.md in place

A block `<!-- BEGIN docs/x.md -->` … `<!-- END docs/x.md -->` is replaced by the current text of
docs/x.md without its HTML comments, its headings as bold lines and its image links made relative to
the README; a missing file leaves its block as it is and is reported.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMENT = re.compile(r"\n?<!--.*?-->\n?", re.S)  # raw data kept in a result file (e.g. every run) stays out of the README
HEADING = re.compile(r"^#+ +(.+)$", re.M)  # an included file's headings become bold lines: the README keeps its outline
IMAGE = re.compile(r"(!\[[^\]]*\]\()(?!https?://|/)([^)]+\))")  # relative to the included file → to the README
BLOCK = re.compile(r"(<!-- BEGIN (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- END (?P=path) -->)", re.S)


def update(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """The README text with every block refreshed, and the paths that were missing."""
    missing: list[str] = []

    def refresh(m: re.Match) -> str:
        source = root / m.group("path")
        if not source.is_file():
            missing.append(m.group("path"))
            return m.group(0)
        body = HEADING.sub(r"**\1**", COMMENT.sub("\n", source.read_text()))
        folder = source.parent.relative_to(root).as_posix()
        body = IMAGE.sub(lambda i: f"{i.group(1)}{folder}/{i.group(2)}", body)
        return m.group(1) + body.rstrip() + "\n" + m.group(4)

    return BLOCK.sub(refresh, text), missing


def main() -> int:
    readme = ROOT / "README.md"
    text, missing = update(readme.read_text())
    readme.write_text(text)
    for path in missing:
        print(f"not found (block left as it was): {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
