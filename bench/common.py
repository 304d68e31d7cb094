"""Small helpers shared by the bench scripts: a markdown table and a one-line device description."""
from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "device_name", "write_report"]


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub markdown table: one header row, a separator, one line per row (cells turned to str; '|' escaped).

    `align` holds one letter per column, "l" or "r" (numbers); missing letters mean "l".
    """
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    marks = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(header))]
    return "\n".join([line(header), "|" + "|".join(marks) + "|", *(line(r) for r in rows)])


def device_name(device: Any) -> str:
    """'NVIDIA H200 (139.8 GiB)' for a CUDA device, 'CPU (x86_64, 2 cores)' otherwise (a torch.device or str)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_report(text: str, out: str | Path) -> int:
    """Print a bench report and write it to `out` (folders made); 0, the script's exit code."""
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(f"wrote {out}")
    return 0
