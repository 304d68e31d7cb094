"""Forward+backward time and peak memory of the margin head against plain linear + cross-entropy.

Columns, measured side by side in one process: plain `F.linear` + `F.cross_entropy` (the floor),
an insightface-style ArcFace written here from the formula (normalise W, linear, margin blended
in with a one-hot over B×C, cross-entropy), pytorch-metric-learning's `ArcFaceLoss` when it is
installed (margin in degrees: 28.6° = 0.5 rad), and `MarginSoftmax` on named points, full,
class-chunked and with Partial FC. Each round runs every column once in turn (so the machine's
load hits them alike); a column's time is its median over rounds after warm-up, each ratio the
median of its per-round ratios: to plain linear + CE, to the same point in full mode (chunked and
Partial FC columns) and the insightface-style column's time over this column's (the speed-up).

Peak memory: on CPU, the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over the resident set before one step, the gradient of W included
(tensors of a few MB and up are mmapped and returned on free, so this tracks live tensors); on
CUDA, torch.cuda.max_memory_allocated over the allocated memory before the step.

    .venv/bin/python bench/head_speed.py                      # C ∈ {10k, 100k}, B = 128 (~5 min on 2 cores)
    .venv/bin/python bench/head_speed.py --million --batch-256 # adds C = 1M and B = 256
    .venv/bin/python bench/head_speed.py --threads 1           # one thread: steadier on a shared CPU

At C = 10k the CPU peak-memory column reads ~0: blocks under glibc's mmap threshold (≤ 32 MiB)
are reused from the heap without raising the resident set.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from marginsearch.losses import MarginSoftmax, named  # noqa: E402

try:  # run as a script (python bench/NAME.py) or a module (python -m bench.NAME)
    from .common import markdown_table
except ImportError:
    from common import markdown_table  # type: ignore[no-redef]

POINTS = ["normface", "cosface", "arcface", "mv-arc", "curricularface", "search-softmax"]


def insightface_style_arcface(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, s: float = 64.0,
                              m: float = 0.5) -> torch.Tensor:
    """ArcFace (arXiv 1801.07698) as the common PyTorch heads write it: normalised W, one-hot blend over B×C."""
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))
    phi = cos * math.cos(m) - sin * math.sin(m)
    phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
    one_hot = F.one_hot(y, w.shape[0]).to(cos.dtype)
    return F.cross_entropy(s * (one_hot * phi + (1.0 - one_hot) * cos), y)


def pml_arcface(embedding_size: int, num_classes: int) -> Callable | None:
    """pytorch-metric-learning's ArcFaceLoss (margin in degrees), or None when it is not installed."""
    try:
        from pytorch_metric_learning.losses import ArcFaceLoss
    except ImportError:
        return None
    return ArcFaceLoss(num_classes, embedding_size, margin=math.degrees(0.5), scale=64.0)


def build_columns(batch: int, classes: int, dim: int, args: argparse.Namespace,
                  device: torch.device) -> tuple[dict[str, Callable[[], None]], list[str]]:
    """One closure per column, each one forward+backward from fresh gradients; plus notes."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(classes, dim, generator=g) * 0.01).to(device))
    x = (torch.randn(batch, dim, generator=g) * 3.0).to(device).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    notes: list[str] = []

    def step(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss_fn().backward()
        run.params = params  # type: ignore[attr-defined]  # their gradients are cleared before each timed call
        return run

    columns: dict[str, Callable[[], None]] = {
        "linear + CE": step(lambda: F.cross_entropy(F.linear(x, weight), y), [x, weight]),
    }
    if args.no_reference:
        pml = None
    else:
        columns["insightface-style arcface"] = step(lambda: insightface_style_arcface(x, weight, y), [x, weight])
        pml = pml_arcface(dim, classes)
    if pml is None and not args.no_reference:
        notes.append("pytorch-metric-learning is not installed: its column is skipped "
                     "(`.venv/bin/pip install pytorch-metric-learning --no-deps`).")
    elif pml is not None:
        pml = pml.to(device)
        columns["PML ArcFaceLoss (28.6°)"] = step(lambda: pml(x, y), [x, pml.W])

    def head_column(name: str, **options) -> Callable[[], None]:
        head = MarginSoftmax(named(name), dim, classes, **options).to(device)
        head.weight = weight  # one shared parameter: C×D once in memory
        return step(lambda: head(x, y), [x, weight])

    for name in args.points:
        columns[name] = head_column(name)
    for name in args.chunked:
        columns[f"{name} chunk={args.chunk}"] = head_column(name, class_chunk=args.chunk)
        columns[f"{name} chunk={args.chunk}"].full_mode = name  # type: ignore[attr-defined]
    for name in args.partial:
        columns[f"{name} partial-fc r={args.rate}"] = head_column(name, sample_rate=args.rate)
        columns[f"{name} partial-fc r={args.rate}"].full_mode = name  # type: ignore[attr-defined]
    return columns, notes


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def clear_grads(run: Callable[[], None]) -> None:
    """Drop the gradients a column's parameters hold, so each call starts from none (as after
    zero_grad(set_to_none))."""
    for p in run.params:  # type: ignore[attr-defined]
        p.grad = None


def peak_memory_mib(run: Callable[[], None], device: torch.device) -> float:
    """Peak memory rise during one call of `run` (CUDA: allocator; CPU: resident-set high-water mark)."""
    clear_grads(run)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return float("nan")
    base = _status_mib("VmRSS")
    run()
    return _status_mib("VmHWM") - base


def measure(columns: dict[str, Callable[[], None]], rounds: int, warmup: int,
            device: torch.device) -> dict[str, list[float]]:
    """Per column its seconds per round, rounds interleaved (every column once per round)."""
    times: dict[str, list[float]] = {name: [] for name in columns}
    for r in range(warmup + rounds):
        for name, run in columns.items():
            clear_grads(run)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of the per-round ratio of column `name` to column `base` (NaN if `base` was not run)."""
    if base not in times:
        return float("nan")
    return statistics.median(t / b for t, b in zip(times[name], times[base]))


def table_rows(columns: dict[str, Callable[[], None]], times: dict[str, list[float]],
               memory: dict[str, float]) -> list[list[str]]:
    """One markdown row per column: ms, × linear + CE, × the same point in full mode, insightface-style ÷ this,
    peak MiB."""
    reference = "insightface-style arcface"
    rows = []
    for name, run in columns.items():
        full = getattr(run, "full_mode", None)
        vs_full = f"{median_ratio(times, name, full):.2f}" if full in times else ""
        faster = (f"{median_ratio(times, reference, name):.1f}"
                  if reference in times and name not in ("linear + CE", reference) else "")
        rows.append([name, f"{statistics.median(times[name]) * 1e3:.1f}",
                     f"{median_ratio(times, name, 'linear + CE'):.2f}", vs_full, faster, f"{memory[name]:.0f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--million", action="store_true", help="add C = 1,000,000")
    parser.add_argument("--batch", type=int, nargs="+", default=[128])
    parser.add_argument("--batch-256", action="store_true", help="add B = 256")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--points", nargs="*", default=POINTS)
    parser.add_argument("--chunked", nargs="*", default=["arcface", "curricularface"])
    parser.add_argument("--chunk", type=int, default=4096, help="class_chunk of the chunked columns")
    parser.add_argument("--partial", nargs="*", default=["arcface"])
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the insightface-style and PML columns "
                             "(their 10 GB at C = 1M change the other columns' memory state)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (on a CPU shared with other jobs, 1 avoids stalled thread pools)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_head.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    classes = args.classes + ([1_000_000] if args.million else [])
    batches = args.batch + ([256] if args.batch_256 else [])

    machine = (f"torch {torch.__version__}, {device.type}"
               + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                  f", {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
                  f"{platform.processor() or platform.machine()}"))
    memory_kind = ("CUDA max_memory_allocated rise" if device.type == "cuda"
                   else "rise of the peak resident set (VmHWM) over the step, W.grad included")
    lines = ["# Head speed: forward + backward", "",
             (f"Command: `.venv/bin/python bench/head_speed.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`").rstrip(),
             "", f"Machine: {machine}. D = {args.dim}; median of {args.rounds} interleaved rounds after "
             f"{args.warmup} warm-up; a ratio is the median of per-round ratios: × linear + CE (the floor), × full "
             f"mode (a chunked or Partial FC column against the same point without the option) and "
             f"insightface-style ÷ this (the speed-up over the reference). Peak memory: {memory_kind}.", ""]
    all_notes: list[str] = []
    for batch in batches:
        for num_classes in classes:
            columns, notes = build_columns(batch, num_classes, args.dim, args, device)
            all_notes += [n for n in notes if n not in all_notes]
            times = measure(columns, args.rounds, args.warmup, device)
            memory = {name: peak_memory_mib(run, device) for name, run in columns.items()}
            table = markdown_table(["column", "ms", "× linear + CE", "× full mode", "insightface-style ÷ this",
                                    "peak MiB"], table_rows(columns, times, memory), align="lrrrrr")
            lines += [f"## B = {batch}, C = {num_classes:,}", "", *table.splitlines(), ""]
            print("\n".join(lines[-(len(columns) + 4):]), flush=True)
    lines += [f"Note: {n}" for n in all_notes]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
