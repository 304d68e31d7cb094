"""bench/gpu_check.py: the CPU dry run writes a whole report with finite numbers; without a GPU it exits 2."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
SECTIONS = ["## 1. Head", "## 2. Backbones", "## 3. Campaign", "## 4. AMP", "## 5. Two processes", "## Checks"]


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run("--dry-run", "--out", str(out))
    return proc, out


def test_dry_run_writes_every_section_with_finite_numbers(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    assert "Mode: CPU dry run" in report
    assert re.search(r"^Device: CPU \(", report, re.M), "the report names the device"
    assert "torch " + torch.__version__ in report
    positions = [report.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    assert "FAIL" not in report and "skipped from" not in report  # nothing failed, nothing cut by the time budget
    tables = [line for line in report.splitlines() if line.startswith("|")]
    assert tables and not any(re.search(r"\b(nan|inf)\b", line, re.I) for line in tables)
    raw = json.loads((out / "gpu_check.json").read_text())
    assert raw["mode"] == "dry-run" and raw["machine"]["type"] == "cpu"
    assert [s["key"] for s in raw["sections"]] == ["head", "backbones", "campaign", "amp", "distributed"]
    assert all(math.isfinite(x) for x in _numbers(raw))
    head = raw["sections"][0]["data"]
    assert head["copy_bandwidth_gbs"] > 0 and all(c["columns"]["arcface"]["median_ms"] > 0 for c in head["cases"])
    assert all(c["ok"] for s in raw["sections"] for c in s["checks"])
    assert raw["total_s"] < 120


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run")
def test_without_a_gpu_it_exits_2_with_one_line(tmp_path):
    proc = _run("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device: ") and lines[0].endswith("; use --dry-run on CPU")
    assert not (tmp_path / "gpu_check.md").exists()
