"""Small helpers shared by the bench scripts: a markdown table and a one-line device description."""
from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

__all__ = ["markdown_table", "device_name"]


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table: one header row, a separator, one line per row (cells turned to str; '|' escaped)."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def device_name(device: Any) -> str:
    """'NVIDIA H200 (139.8 GiB)' for a CUDA device, 'CPU (x86_64, 2 cores)' otherwise (a torch.device or str)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
