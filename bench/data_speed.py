"""Streamed training data: decoding throughput of a RecordIO file, and the trainer's memory while it streams one.

1. Data: N face-like 112×112 images (a bright oval on smooth random colour blobs at four scales,
   JPEG quality 95 as insightface writes them, ~4–5 KB each), 50 per identity, written once with
   `write_record_file` to <workdir>/n<N>/train.rec (+ .idx, property) and reused on later runs.
2. Decoding: images/s of what a training step's batch costs on the host: `RecordDataset` items
   (read the record, decode the JPEG, RGB array) collated by `ImageBatcher` (fit to the model's
   size, stack into uint8 [128, 3, H, W]), through the trainer's own loader (`train._Streamed`)
   with 0 workers (everything in this process, one thread) and 1 and 2 worker processes, on
   random batches of 128. Median of --runs rounds, the configurations interleaved in each round.
3. Training speed: one epoch of `train` on the first --identities identities, streamed with 0 and
   2 workers and decoded into memory first, with 1 and 2 torch threads in the training process.
   The memory runs use 1 (--train-threads): on a small machine shared with other jobs, intra-op
   threads that wait for each other at every operation can slow training by an order of magnitude.
4. Memory: one epoch of `train` (cosface, tiny backbone, batch 128, images fitted to
   --image-size) on the whole file, streamed, in a fresh process while a thread samples every
   0.5 s the resident set (VmRSS) of the process and of its DataLoader workers, and their
   proportional set (Pss: a page shared by k processes counts 1/k, so the sum does not count
   the forked workers' shared pages twice). Validation: the last 20 identities (1000 images),
   the same at every N, so the judge's share does not grow with N.

    .venv/bin/python bench/data_speed.py                     # N = 100,000, memory also at 20,000 (~10 min, 2 cores)
    .venv/bin/python bench/data_speed.py --n 20000 --also    # smaller: memory at N = 20,000 only
    .venv/bin/python bench/data_speed.py --skip threads memory   # decoding only (plus writing the file once)
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from marginsearch.losses import named  # noqa: E402
from marginsearch.trainers.budget import budget_from  # noqa: E402
from marginsearch.trainers.data import RecordDataset, to_labelled_tensor, write_record_file  # noqa: E402
from marginsearch.trainers.images import Preprocess  # noqa: E402
from marginsearch.trainers.sources import Split, training_data  # noqa: E402
from marginsearch.trainers.train import _Streamed, train  # noqa: E402

try:  # run as a script (python bench/NAME.py) or a module (python -m bench.NAME)
    from .common import markdown_table, write_report
except ImportError:
    from common import markdown_table, write_report  # type: ignore[no-redef]

SIDE = 112
PER_IDENTITY = 50
VAL_IDENTITIES = 20
BATCH = 128
GPU_RATES = (2000, 3000)  # images/s an IResNet-50 training step takes on one GPU
MIB = 2 ** 20


def face_like(n: int, generator: torch.Generator) -> np.ndarray:
    """`n` images [n, 112, 112, 3] uint8: smooth colour blobs at 4 scales (detail varies per image) under an oval."""
    detail = 0.5 + torch.rand(n, 1, 1, 1, generator=generator)
    field = torch.randn(n, 3, 4, 4, generator=generator) * 40
    for size, amplitude in ((8, 25.0), (16, 15.0), (32, 8.0)):
        field = F.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
        field += torch.randn(n, 3, size, size, generator=generator) * amplitude * detail
    out = F.interpolate(field, size=(SIDE, SIDE), mode="bicubic", align_corners=False)
    y, x = torch.meshgrid(torch.linspace(-1, 1, SIDE), torch.linspace(-1, 1, SIDE), indexing="ij")
    out += (1 - (x / 0.7) ** 2 - (y / 0.9) ** 2).clamp(min=0).sqrt() * 80 + 90
    return out.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """An HWC uint8 RGB image as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def record_items(n: int, seed: int = 0, chunk: int = 1000) -> Iterator[tuple[bytes, int]]:
    """(JPEG bytes, label) for `n` images, PER_IDENTITY consecutive images per label, generated `chunk` at a time."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, chunk):
        for i, image in enumerate(face_like(min(chunk, n - start), generator), start=start):
            yield jpeg(image), i // PER_IDENTITY


def record_file(workdir: Path, n: int) -> Path:
    """<workdir>/n<N>/train.rec with `n` images, written unless a complete one is already there."""
    path = workdir / f"n{n}" / "train.rec"
    if path.is_file() and path.with_suffix(".idx").is_file() and (path.parent / "property").is_file():
        if len(RecordDataset(path)) == n:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_record_file(path, record_items(n))
    print(f"wrote {path} ({n:,} images, {path.stat().st_size / MIB:.0f} MiB) in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    return path


def decode_rates(path: Path, images: int, sizes: list[int], workers: list[int], runs: int,
                 seed: int = 0) -> dict[tuple[int, int], list[float]]:
    """{(size, workers): images/s of each run} through the trainer's loader, configurations interleaved per run."""
    torch.set_num_threads(1)  # 0 workers = this process on one core; workers are single-threaded anyway
    dataset = RecordDataset(path)
    g = torch.Generator().manual_seed(seed)
    loaders = {(size, w): _Streamed(dataset, Preprocess(size, size), w, torch.device("cpu"))
               for size in sizes for w in workers}
    for loader in loaders.values():  # warm-up: workers started, file opened, first decode paid
        for _ in loader.epoch(list(torch.randperm(len(dataset), generator=g)[:2 * BATCH].split(BATCH))):
            pass
    rates: dict[tuple[int, int], list[float]] = {key: [] for key in loaders}
    for _ in range(runs):
        for key, loader in loaders.items():
            batches = list(torch.randperm(len(dataset), generator=g)[:images // BATCH * BATCH].split(BATCH))
            start = time.perf_counter()
            seen = sum(len(batch) for batch in loader.epoch(batches))
            rates[key].append(seen / (time.perf_counter() - start))
    return rates


def item_rate(path: Path, images: int, seed: int = 0) -> float:
    """Images/s of `RecordDataset` items alone (read + decode + RGB array), one thread, no collation."""
    dataset = RecordDataset(path)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    start = time.perf_counter()
    for i in order:
        dataset[i]
    return len(order) / (time.perf_counter() - start)


def index_size(path: Path) -> int:
    """Bytes Python allocates to open a `RecordDataset` (its record index) and read its labels."""
    tracemalloc.start()
    try:
        dataset = RecordDataset(path)
        assert len(dataset.labels) == len(dataset)  # read while traced, as training_data does
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def _status_kib(pid: int, field: str) -> int:
    """A `field:  N kB` line of /proc/<pid>/status (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    """The proportional set size of a process (/proc/<pid>/smaps_rollup), 0 when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from the parent ids in /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


class MemorySampler:
    """A thread that samples this process's and its descendants' VmRSS and Pss every `interval` s, keeping peaks."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples = 0
        self.peak = {"main_rss": 0, "workers_rss": 0, "total_rss": 0, "total_pss": 0, "workers": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        """One sample, in KiB: main_rss, workers_rss (summed), total_rss, total_pss, and the worker count."""
        pid = os.getpid()
        children = descendants(pid)
        main, workers = _status_kib(pid, "VmRSS"), sum(_status_kib(c, "VmRSS") for c in children)
        pss = _pss_kib(pid) + sum(_pss_kib(c) for c in children)
        return {"main_rss": main, "workers_rss": workers, "total_rss": main + workers, "total_pss": pss,
                "workers": len(children)}

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.sample().items():
                self.peak[key] = max(self.peak[key], value)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def train_run(path: Path, image_size: int, workers: int, threads: int, identities: int, loss: str,
              in_memory: bool = False) -> dict[str, Any]:
    """One epoch of `train` on the file (its first `identities` identities; 0: all), memory sampled; streamed, or
    with `in_memory` the training images decoded into one uint8 tensor first (as the synthetic benchmark is held)."""
    torch.set_num_threads(threads)
    sampler = MemorySampler()
    at_import = sampler.sample()
    classes = len(RecordDataset(path).classes)
    split = Split(val_identities=tuple(str(k) for k in range(classes - VAL_IDENTITIES, classes)))
    data = training_data(f"recordio:{path}", split=split)
    if in_memory:
        data = data.subset(identities)
        data = dataclasses.replace(data, images=to_labelled_tensor(data.images)[0])
    before = sampler.sample()
    budget = budget_from("proxy", epochs=1, identities=identities, batch_size=BATCH, backbone="tiny",
                         image_size=image_size, workers=workers)
    start = time.perf_counter()
    with sampler:
        result = train(named(loss), data, budget)
    seconds = time.perf_counter() - start
    epoch = result.history[0]
    return {"images": len(RecordDataset(path)), "train_images": len(data.subset(identities).labels),
            "val_images": len(data.val.labels), "identities": classes, "threads": threads, "workers": workers,
            "in_memory": in_memory,
            "status": result.status, "seconds": seconds, "train_seconds": epoch.seconds,
            "images_per_second": epoch.images_per_second, "samples": sampler.samples,
            "processes": sampler.peak["workers"],
            "import_rss": at_import["main_rss"] / 1024, "before_rss": before["main_rss"] / 1024,
            "peak_main_rss": sampler.peak["main_rss"] / 1024, "peak_main_hwm": _status_kib(os.getpid(), "VmHWM") / 1024,
            "peak_workers_rss": sampler.peak["workers_rss"] / 1024,
            "peak_total_rss": sampler.peak["total_rss"] / 1024, "peak_total_pss": sampler.peak["total_pss"] / 1024}


def measure(path: Path, image_size: int, workers: int, threads: int, identities: int, loss: str,
            in_memory: bool = False) -> dict[str, Any]:
    """`train_run` in a fresh Python process (so one run's peak does not carry into the next), its JSON parsed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--train-run", str(path), "--image-size", str(image_size),
               "--train-workers", str(workers), "--train-threads", str(threads), "--identities", str(identities),
               "--loss", loss, *(["--in-memory"] if in_memory else [])]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(value: float) -> str:
    return f"{value:,.0f}"


def _in_memory_mib(images: int) -> float:
    return images * 3 * SIDE * SIDE / MIB


def decoding_section(args: argparse.Namespace, rates: dict[tuple[int, int], list[float]], items: float) -> list[str]:
    """The decoding table, the items-only rate and how many cores an IResNet-50 GPU step takes."""
    lines = ["## Decoding", "",
             f"A batch of {BATCH} random records read, decoded to RGB and collated by `ImageBatcher` (fitted to the "
             f"size below, stacked into uint8) through the trainer's loader; median of {args.runs} interleaved runs of "
             f"{args.images // BATCH * BATCH:,} images each. With 0 workers everything runs in the main process on one "
             "thread; per core divides by the processes decoding.", ""]
    rows: list[list[Any]] = []
    per_core: dict[int, float] = {}
    for (size, workers), values in rates.items():
        rate = statistics.median(values)
        per_core.setdefault(size, rate / max(1, workers))
        rows.append([f"{size}×{size}" + (" (as stored)" if size == SIDE else " (resized)"), workers, f"{rate:,.0f}",
                     f"{rate / max(1, workers):,.0f}", ", ".join(f"{v:,.0f}" for v in values)])
    lines += [markdown_table(["fitted to", "workers", "images/s", "images/s per core", "runs"], rows, align="lrrrl"),
              "", f"`RecordDataset` items alone (read + JPEG decode + RGB array, no collation), one thread: "
              f"{items:,.0f} images/s."]
    if SIDE in per_core:
        rate = per_core[SIDE]
        low, high = (gpu / rate for gpu in GPU_RATES)
        lines += ["", f"What that feeds: an IResNet-50 training step on one GPU consumes about "
                  f"{GPU_RATES[0]:,}–{GPU_RATES[1]:,} images/s at {SIDE}×{SIDE}; at {rate:,.0f} images/s per core "
                  f"(0 workers, as stored) that takes {low:.1f}–{high:.1f} cores of decoding (loader workers) per GPU, "
                  "besides the training process itself. `loader_workers` (auto: one per core but one, at most 8) gives "
                  f"that when the machine has at least {math.ceil(high) + 1} cores per GPU."]
    return lines


def throughput_section(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[str]:
    """Training images/s on the file streamed (by loader workers) and decoded in memory, by torch threads."""
    lines = ["## Training speed: streamed against in memory, by threads", "",
             f"One epoch of `train` (cosface, tiny backbone, batch {BATCH}, images fitted to "
             f"{args.image_size}×{args.image_size}) on the first {args.identities} identities of the file "
             f"({runs[0]['train_images']:,} images), each run in a fresh process; images/s of training (judging "
             "excluded). Streamed: the trainer's loader decodes each batch (in the training process with 0 workers); "
             "in memory: the same images decoded into one uint8 tensor before training, as the synthetic benchmark "
             "is held. Threads: `torch.set_num_threads` in the training process (loader workers run one each).", ""]
    rows = [[r["threads"], "in memory" if r["in_memory"] else f"streamed, {r['workers']} workers",
             f"{r['images_per_second']:,.0f}", f"{r['train_seconds']:.1f}"] for r in runs]
    lines += [markdown_table(["torch threads", "data", "images/s", "epoch s (with judging)"], rows, align="rlrr")]
    rate = {(r["threads"], r["in_memory"]): max(q["images_per_second"] for q in runs
                                                if (q["threads"], q["in_memory"]) == (r["threads"], r["in_memory"]))
            for r in runs}
    shares = [f"{rate[t, False] / rate[t, True]:.0%} with {t} thread{'s' if t > 1 else ''}"
              for t in sorted({r["threads"] for r in runs}) if (t, True) in rate and (t, False) in rate]
    if shares:
        lines += ["", "The best streamed run trains at " + " and ".join(shares) + " of the in-memory speed."]
    if (1, False) in rate and (2, False) in rate:
        lines += ["", f"Streamed, 2 torch threads train at {rate[2, False] / rate[1, False]:.2f}× the speed of 1 "
                  f"(in memory: {rate[2, True] / rate[1, True]:.2f}×) on this machine: where the cores are shared "
                  "with loader workers or other jobs, intra-op threads wait for each other at every operation."]
    return lines


def memory_section(args: argparse.Namespace, memory: list[dict[str, Any]], index_bytes: int = 0) -> list[str]:
    """The peak resident sets of full-epoch runs at each N, against the decoded images' size."""
    lines = ["## Memory while training on the streamed file", "",
             f"One epoch of `train` (cosface, tiny backbone, batch {BATCH}, images fitted to "
             f"{args.image_size}×{args.image_size}, {args.train_threads} torch thread(s), {args.train_workers} loader "
             f"workers, validation on the last {VAL_IDENTITIES} identities) on all the other identities of the file, "
             "in a fresh process; resident sets sampled every 0.5 s: VmRSS of the process (peak: its VmHWM) and of its "
             "DataLoader workers (training's and the judge's, summed), and Pss summed (a page shared with the forked "
             "workers counts once). Images in memory: what the images would take decoded, N × 3 × 112 × 112 bytes. "
             "RSS before: the process after loading the source (record index and labels), before training. MiB.", ""]
    rows = [[f"{m['images']:,}", _mib(_in_memory_mib(m["images"])), _mib(m["before_rss"]), _mib(m["peak_main_hwm"]),
             _mib(m["peak_workers_rss"]), _mib(m["peak_total_rss"]), _mib(m["peak_total_pss"]),
             f"{m['train_images']:,} in {m['train_seconds']:.0f} s", f"{m['images_per_second']:,.0f}"] for m in memory]
    lines += [markdown_table(["N", "images in memory", "RSS before", "peak RSS (process)", "peak RSS (workers)",
                              "peak RSS (sum)", "peak Pss (sum)", "trained (epoch, with judging)", "images/s"], rows,
                             align="rrrrrrrlr")]
    top = memory[0]
    lines += ["", f"At N = {top['images']:,} the peak memory of the process and its workers "
              f"({_mib(top['peak_total_pss'])} MiB Pss; {_mib(top['peak_total_rss'])} MiB counting shared pages "
              f"in every worker) is "
              f"{top['peak_total_pss'] / _in_memory_mib(top['images']):.0%} of what the decoded images alone would "
              f"take ({_mib(_in_memory_mib(top['images']))} MiB). The .rec file is read through the kernel's page "
              "cache, which is not the process's memory and is given back under pressure."]
    if len(memory) > 1:
        small = memory[-1]
        grown = top["peak_total_pss"] - small["peak_total_pss"]
        added = top["images"] - small["images"]
        per_image = grown * MIB / added
        lines += ["", f"From N = {small['images']:,} to {top['images']:,} the decoded images would take "
                  f"{_mib(_in_memory_mib(top['images']) - _in_memory_mib(small['images']))} MiB more; the peak Pss "
                  f"moved by {grown:+,.0f} MiB and the process's RSS before training by "
                  f"{top['before_rss'] - small['before_rss']:+,.0f} MiB: {per_image:,.0f} bytes per image over the "
                  f"process and its workers, {per_image / (3 * SIDE * SIDE):.1%} of an image's {3 * SIDE * SIDE:,} "
                  "bytes decoded (a peak sampled every 0.5 s can miss a short one: runs at one N differ by tens of "
                  "MiB)."]
    if index_bytes:
        lines += ["", f"Part of what grows with N is the record index: a `RecordDataset` holds its keys and byte "
                  f"offsets as Python ints, {index_bytes / top['images']:,.0f} bytes per image (Python's allocations "
                  f"while opening the {top['images']:,}-image file and reading its labels, {index_bytes / MIB:,.1f} "
                  "MiB); a forked worker that reads through it writes those ints' reference counts, so the pages it "
                  "touches are copied into it: up to that much again in each worker."]
    return lines


def report(argv: list[str], path: Path, load: tuple[float, float], sections: list[str]) -> str:
    """The markdown report: the data and machine, then each section."""
    count = len(RecordDataset(path))
    machine = (f"torch {torch.__version__}, {os.cpu_count()} CPUs shared with other jobs (load average "
               f"{load[0]:.1f} at the start, {load[1]:.1f} at the end), {platform.processor() or platform.machine()}")
    lines = ["# Data loading: decoding throughput and memory while streaming", "",
             "Command: `" + " ".join([".venv/bin/python bench/data_speed.py", *argv]) + "`", "",
             f"Machine: {machine}. Data: {count:,} face-like {SIDE}×{SIDE} JPEGs (quality 95, "
             f"{path.stat().st_size / count / 1024:.1f} KiB each on average, {PER_IDENTITY} per identity) in one "
             f"RecordIO file ({path.stat().st_size / MIB:,.0f} MiB, in the page cache while measured).", "",
             *sections]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="images in the RecordIO file")
    parser.add_argument("--also", type=int, nargs="*", default=[20_000], help="memory also at these N")
    parser.add_argument("--workdir", default="/tmp/marginsearch-bench-data", help="where the .rec files are cached")
    parser.add_argument("--images", type=int, default=4096, help="images per decoding run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[SIDE, 32], help="sizes the batches are fitted to")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers for decoding")
    parser.add_argument("--image-size", type=int, default=32, help="the model input while training")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads of the memory runs")
    parser.add_argument("--train-workers", type=int, default=2, help="loader workers of the memory runs")
    parser.add_argument("--identities", type=int, default=80, help="identities of the threads × workers runs")
    parser.add_argument("--loss", default="cosface")
    parser.add_argument("--skip", nargs="*", default=[], choices=["threads", "memory"], help="sections left out")
    parser.add_argument("--train-run", help=argparse.SUPPRESS)  # internal: one training on this file, JSON out
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)  # internal: with --train-run
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_data.md"))
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.train_run:
        print(json.dumps(train_run(Path(args.train_run), args.image_size, args.train_workers, args.train_threads,
                                   args.identities, args.loss, args.in_memory)))
        return 0
    start_load = os.getloadavg()[0]
    workdir = Path(args.workdir)
    path = record_file(workdir, args.n)
    rates = decode_rates(path, args.images, args.sizes, args.workers, args.runs)
    items = item_rate(path, args.images)
    raw: dict[str, Any] = {"items": items,
                           "decoding": {f"{size}px, {w} workers": values for (size, w), values in rates.items()}}
    sections = decoding_section(args, rates, items)
    if "threads" not in args.skip:
        runs = [measure(path, args.image_size, workers, threads, args.identities, args.loss, in_memory)
                for threads in (1, 2) for workers, in_memory in ((0, False), (2, False), (0, True))]
        sections += ["", *throughput_section(args, runs)]
        raw["training"] = runs
    if "memory" not in args.skip:
        memory = []
        for n in [args.n, *(m for m in args.also if m != args.n)]:
            memory.append(measure(record_file(workdir, n), args.image_size, args.train_workers, args.train_threads, 0,
                                  args.loss))
            print(f"memory at N = {n:,}: {memory[-1]}", file=sys.stderr)
        sections += ["", *memory_section(args, memory, index_size(path))]
        raw["memory"] = memory
    sections += ["", "<!-- raw: " + json.dumps(raw) + " -->"]
    return write_report(report(argv, path, (start_load, os.getloadavg()[0]), sections), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
