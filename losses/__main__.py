"""`python -m marginsearch.losses`: list the named points (formula, defaults, citation); `--plot FILE` draws their
curves; `--fidelity` compares each with its official code."""
from __future__ import annotations

import argparse
import sys

from .named import NAMED, named


def _defaults(entry) -> str:
    parts = []
    for key, value in entry.defaults.items():
        unit = entry.units.get(key)
        parts.append(f"{key}={value}" + (f" ({unit})" if unit else ""))
    return ", ".join(parts)


def table(markdown: bool = False) -> str:
    """The named points as text, or as a Markdown table for the README."""
    if markdown:
        rows = ["| name | target logit | defaults | citation |", "|---|---|---|---|"]
        rows += [f"| `{n}` | {e.formula} | {_defaults(e)} | {e.citation} |" for n, e in NAMED.items()]
        return "\n".join(rows)
    blocks = []
    for name, e in NAMED.items():
        lines = [name, f"  formula : {e.formula}", f"  defaults: {_defaults(e)}", f"  cites   : {e.citation}"]
        if e.note:
            lines.append(f"  note    : {e.note}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginsearch.losses", description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--plot", metavar="FILE.png", help="write the target-logit curves of the named points")
    parser.add_argument("--fidelity", action="store_true",
                        help="print each named point against its official code (with --markdown: docs/fidelity.md)")
    parser.add_argument("names", nargs="*", help="named points to plot (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMED]
    if unknown:
        print(f"error: unknown loss {unknown[0]!r}; named losses: {', '.join(NAMED)}", file=sys.stderr)
        return 2
    if args.fidelity:
        from .fidelity import fidelity_markdown, fidelity_text
        print(fidelity_markdown() if args.markdown else fidelity_text(), end="\n" if not args.markdown else "")
        return 0
    print(table(args.markdown))
    if args.plot:
        from .plot import plot_target_logits
        names = args.names or list(NAMED)
        plot_target_logits({n: named(n) for n in names}, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
