"""One prepared script that proves every CUDA path of marginsearch in minutes (issue #18).

    python bench/gpu_check.py --out DIR             # on a CUDA machine: ≤ 8 min, writes DIR/gpu_check.md and .json
    python bench/gpu_check.py --dry-run --out DIR   # the same code paths on CPU at tiny sizes (about a minute)
    python bench/gpu_check.py --out DIR --only head amp   # some sections only (a second, shorter window)

On a lent machine whose image holds torch but not this package (nor optuna, mlflow, ray), install it
offline first: `python3 -m pip install --no-deps --no-build-isolation -e . && python3
bench/gpu_check.py --out $OUT`. Sections that need a missing package fail their check with its name
and the others still run (without ray the campaign runs on the optuna backend, and says so).

Sections (one function each, sizes in `GPU_PLAN` / `DRY_PLAN`):

1. head: forward + backward of `MarginSoftmax` (named points, full and class-chunked) against plain
   linear + cross-entropy and the insightface-style reference (bench/head_speed.py), under bf16
   autocast, each against the floor of reading W and writing its gradient once at the measured
   device-to-device copy bandwidth;
2. backbones: images/s of MobileFaceNet and IResNet-50 at 112×112 (bf16, channels-last), eager and
   `torch.compile`, the trainer (`trainers.train.train`) against a bare loop of the same model,
   head and optimizer;
3. campaign: a 2-epoch campaign on synthetic data through `run_campaign` (Ray, half a GPU per
   trial) with a probe around every training that records the device it ran on;
4. amp: every named point trained under bf16 and fp16 autocast against float32 (same seed): finite,
   and the last epoch's loss within `AMP_TOLERANCE` of float32;
5. distributed: `torchrun` NCCL DDP and `head_parallel` where 2 GPUs are present.

They run in the order head, campaign, amp, distributed, backbones (the compilations last, so a slow
compile eats only into its own section) and are reported in the order above. Each section times
itself; the run keeps to a total budget (`--budget`, 480 s on a GPU) and
skips what no longer fits with a note. The report is rewritten after every section, so a run
cut off mid-way still leaves one. Without a GPU (and without --dry-run) it stops at once with
one line on stderr and exit code 2. Exit code 1 when a check failed, else 0.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__:
    from .common import device_name, markdown_table
else:  # run as a script: bench/ is on sys.path
    from common import device_name, markdown_table

# ---------------------------------------------------------------------------- what is measured
HEAD_POINTS = ("arcface", "cosface", "curricularface")       # full mode
HEAD_CHUNKED = ("arcface", "curricularface")                  # with class_chunk
REFERENCE = "insightface-style arcface"
PRECISIONS = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}  # label → Budget.amp
AMP_TOLERANCE = 0.15   # |loss − float32 loss| / float32 loss of the last epoch's mean training loss
TRAIN_LOSS = "arcface"  # the loss of sections 2 and 5


@dataclass(frozen=True)
class Plan:
    """The sizes of one run (the GPU run or the CPU dry run) and each section's share of the time budget."""

    name: str
    budget_s: float
    threads: int | None                  # torch.set_num_threads (1 on a shared CPU: steadier); None: torch's default
    reward_metric: str                   # the trainings' reward (tiny data has too few pairs for TAR@FAR=1e-3)
    caps_s: dict[str, float]             # most seconds each section may take (the total budget bounds them all)
    # 1. head
    head_batches: tuple[int, ...]
    head_classes: tuple[int, ...]
    head_dim: int
    head_chunk: int
    head_rounds: int
    head_warmup: int
    copy_bytes: int                      # size of the bandwidth probe's copy
    # 2. backbones
    backbones: tuple[str, ...]
    image_size: int
    embedding_size: int
    batch_size: int
    train_source: str
    bare_steps: int
    compile_backend: str                 # "inductor" (what the trainer uses) or "eager" (dynamo only)
    compile_min_s: float                 # a compiled row starts only with this many seconds left in the section
    trainer_compile: bool                # the trainer's compiled rows (inductor)
    # 3. campaign
    campaign_source: str
    campaign_backend: str
    gpus_per_trial: float
    campaign_trials: int
    campaign_batch: int
    # 4. amp
    amp_source: str
    amp_epochs: int
    amp_batch: int
    # 5. distributed
    ddp_source: str
    ddp_batch: int


GPU_PLAN = Plan(
    name="gpu", budget_s=480.0, threads=None, reward_metric="tar@far=1e-3",
    caps_s={"head": 60, "campaign": 150, "amp": 120, "distributed": 90, "backbones": 240},
    head_batches=(128, 256), head_classes=(100_000, 1_000_000), head_dim=512, head_chunk=32_768,
    head_rounds=5, head_warmup=2, copy_bytes=1 << 30,
    backbones=("mobilefacenet", "iresnet50"), image_size=112, embedding_size=512, batch_size=128,
    train_source="synthetic:demo", bare_steps=30, compile_backend="inductor", compile_min_s=90,
    trainer_compile=True,
    campaign_source="synthetic:demo", campaign_backend="ray", gpus_per_trial=0.5, campaign_trials=3,
    campaign_batch=128,
    amp_source="synthetic:demo", amp_epochs=2, amp_batch=64,
    ddp_source="synthetic:demo", ddp_batch=128,
)

DRY_PLAN = Plan(
    name="dry-run", budget_s=150.0, threads=1, reward_metric="auc",
    caps_s={"head": 20, "backbones": 30, "campaign": 40, "amp": 40, "distributed": 40},
    head_batches=(16, 32), head_classes=(3_000,), head_dim=64, head_chunk=1_024,
    head_rounds=3, head_warmup=1, copy_bytes=16 << 20,
    backbones=("mobilefacenet",), image_size=16, embedding_size=64, batch_size=16,
    train_source="synthetic:tiny", bare_steps=4, compile_backend="eager", compile_min_s=0,
    trainer_compile=False,
    campaign_source="synthetic:tiny", campaign_backend="optuna", gpus_per_trial=0.0, campaign_trials=2,
    campaign_batch=32,
    amp_source="synthetic:tiny", amp_epochs=1, amp_batch=32,
    ddp_source="synthetic:tiny", ddp_batch=32,
)


# ---------------------------------------------------------------------------- run state and section records
@dataclass
class Run:
    """One invocation: plan, device, clock and a scratch directory."""

    plan: Plan
    device: torch.device
    dry_run: bool
    scratch: Path
    command: str
    start: float = field(default_factory=time.perf_counter)

    @property
    def deadline(self) -> float:
        return self.start + self.plan.budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section_deadline(self, name: str) -> float:
        return min(time.perf_counter() + self.plan.caps_s[name], self.deadline)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Section:
    """What a section measured: markdown body, raw numbers, notes and pass/fail checks."""

    key: str
    title: str
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.lines += [markdown_table(header, rows), ""]

    def out_of_time(self, deadline: float, what: str) -> bool:
        """True (with a note) when the section's time is spent: `what` and everything after it is skipped."""
        if time.perf_counter() < deadline:
            return False
        self.note(f"skipped from {what} on: time budget spent")
        return True

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn(); an exception becomes a failed check with its first line (traceback on stderr), and None."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failing path must not cost the rest of a GPU window
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            self.check(what, False, f"{type(exc).__name__}: {first}")
            return None


_DATA: dict[str, Any] = {}


def load_data(source: str) -> Any:
    """The `TrainData` of a source string, loaded once (`trainers.sources`: torch, numpy and Pillow only)."""
    from marginsearch.trainers.sources import training_data

    if source not in _DATA:
        _DATA[source] = training_data(source)
    return _DATA[source]


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Those of `names` that cannot be imported here."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    return [n for n in names if absent(n)]


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- 0. the machine
def machine_info(run: Run) -> dict[str, Any]:
    """The device and software the numbers come from."""
    info: dict[str, Any] = {"device": device_name(run.device), "type": run.device.type, "torch": torch.__version__,
                            "cuda": torch.version.cuda, "python": platform.python_version(),
                            "host_cpus": os.cpu_count(), "platform": platform.platform()}
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        info.update(name=torch.cuda.get_device_name(run.device), memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    device_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        info.update(name="CPU", threads=torch.get_num_threads())
    return info


def copy_bandwidth(run: Run, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy, read and write counted (median of 5 after 2 warm-ups)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=run.device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(7):
        run.sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        run.sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def peak_bandwidth(run: Run) -> float | None:
    """Bytes/s from the device properties (memory clock × bus width × 2, double data rate), where torch has them."""
    if run.device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(run.device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


# ---------------------------------------------------------------------------- 1. the head
def head_columns(x: torch.Tensor, w: torch.nn.Parameter, y: torch.Tensor, chunk: int,
                 device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """Name → a closure computing one loss: linear + CE, the reference, our head on named points (full, chunked)."""
    import torch.nn.functional as F

    from marginsearch.losses import MarginSoftmax, named

    if __package__:
        from .head_speed import insightface_style_arcface
    else:
        from head_speed import insightface_style_arcface

    columns: dict[str, Callable[[], torch.Tensor]] = {
        "linear + CE": lambda: F.cross_entropy(F.linear(x, w), y),
        REFERENCE: lambda: insightface_style_arcface(x, w, y),
    }
    options = [(name, {}) for name in HEAD_POINTS] + [(name, {"class_chunk": chunk}) for name in HEAD_CHUNKED]
    for name, kwargs in options:
        with torch.device(device):  # built on the device: no C×D initialisation on the host
            head = MarginSoftmax(named(name), w.shape[1], w.shape[0], **kwargs)
        head.weight = w  # one shared parameter
        label = name + (f" chunk={chunk}" if kwargs else "")
        columns[label] = lambda head=head: head(x, y)
    return columns


def time_columns(run: Run, columns: dict[str, Callable[[], torch.Tensor]], params: list[torch.Tensor],
                 rounds: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per round of forward (bf16 autocast) + backward of each column, rounds interleaved; the last losses."""
    times: dict[str, list[float]] = {name: [] for name in columns}
    losses: dict[str, float] = {}
    for r in range(warmup + rounds):
        for name, fn in columns.items():
            for p in params:
                p.grad = None
            run.sync()
            t0 = time.perf_counter()
            with torch.autocast(run.device.type, dtype=torch.bfloat16):
                loss = fn()
            loss.backward()
            run.sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
            losses[name] = float(loss.detach())
    return times, losses


def peak_mib(run: Run, fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> float | None:
    """CUDA allocator's peak rise over one step (None on CPU)."""
    if run.device.type != "cuda":
        return None
    for p in params:
        p.grad = None
    run.sync()
    torch.cuda.reset_peak_memory_stats(run.device)
    base = torch.cuda.memory_allocated(run.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn()
    loss.backward()
    run.sync()
    return (torch.cuda.max_memory_allocated(run.device) - base) / 2**20


def head_case(run: Run, sec: Section, batch: int, classes: int, bandwidth: float) -> None:
    """One (B, C): each column's median ms, ratios to linear + CE and to the bandwidth floor, the reference's ÷ this."""
    plan, dim = run.plan, run.plan.head_dim
    g = torch.Generator(device=run.device).manual_seed(0)
    w = torch.nn.Parameter(torch.randn(classes, dim, generator=g, device=run.device) * 0.01)
    x = (torch.randn(batch, dim, generator=g, device=run.device) * 3.0).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=g, device=run.device)
    columns = head_columns(x, w, y, plan.head_chunk, run.device)
    times, losses = time_columns(run, columns, [x, w], plan.head_rounds, plan.head_warmup)
    memory = {name: peak_mib(run, fn, [x, w]) for name, fn in columns.items()}
    floor_s = 2 * classes * dim * w.element_size() / bandwidth  # read W once, write W.grad once
    rows, raw = [], {}
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        speedup = median_ratio(times[REFERENCE], ts) if name not in ("linear + CE", REFERENCE) else None
        rows.append([name, fmt(ms, 2), fmt(median_ratio(ts, times["linear + CE"]), 2), fmt(ms / (floor_s * 1e3), 1),
                     fmt(speedup, 2) if speedup else "", fmt(memory[name], 0)])
        raw[name] = {"ms": [t * 1e3 for t in ts], "median_ms": ms, "peak_mib": memory[name], "loss": losses[name]}
    sec.lines += [f"**B = {batch}, C = {classes:,}** (floor {floor_s * 1e3:.3f} ms: W and its gradient, "
                  f"{2 * classes * dim * 4 / 2**20:,.0f} MiB, at the copy bandwidth)", ""]
    sec.table(["column", "ms", "× linear + CE", "× floor", "insightface-style ÷ this", "peak MiB"], rows)
    sec.data.setdefault("cases", []).append({"batch": batch, "classes": classes, "floor_ms": floor_s * 1e3,
                                             "columns": raw})
    bad = [n for n, v in losses.items() if not math.isfinite(v)]
    sec.check(f"head B={batch} C={classes}: every loss finite", not bad, ", ".join(bad))
    del columns, w, x, y
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def head_section(run: Run, sec: Section) -> None:
    deadline = run.section_deadline("head")
    plan = run.plan
    bandwidth = copy_bandwidth(run, plan.copy_bytes)
    peak = peak_bandwidth(run)
    sec.data.update(copy_bandwidth_gbs=bandwidth / 1e9, peak_bandwidth_gbs=None if peak is None else peak / 1e9)
    sec.lines += [f"D = {plan.head_dim}, forward under torch.autocast(bfloat16) + backward, median of "
                  f"{plan.head_rounds} interleaved rounds after {plan.head_warmup} warm-up; ratios are medians of "
                  f"per-round ratios. Bandwidth: {bandwidth / 1e9:.1f} GB/s measured (device-to-device copy of "
                  f"{plan.copy_bytes / 2**20:.0f} MiB, read + write)"
                  + (f", {peak / 1e9:.0f} GB/s from the device properties" if peak else "")
                  + ". × floor: the step's time over the time to read W (float32) and write its gradient once at "
                  "the measured bandwidth. Chunked columns use class_chunk = "
                  f"{plan.head_chunk:,}. Peak MiB: the CUDA allocator's rise over the step (— on CPU).", ""]
    for batch in plan.head_batches:
        for classes in plan.head_classes:
            if sec.out_of_time(deadline, f"B={batch}, C={classes:,}"):
                return
            sec.attempt(f"head B={batch} C={classes}",
                        lambda b=batch, c=classes: head_case(run, sec, b, c, bandwidth))


# ---------------------------------------------------------------------------- 2. backbones
def bare_images_per_second(run: Run, data: Any, budget: Any, compiled: bool) -> float:
    """The trainer's step as a bare loop: device-resident uint8 images, flips, channels-last, autocast, SGD."""
    from marginsearch.losses import MarginSoftmax, named
    from marginsearch.trainers.backbones import build_backbone
    from marginsearch.trainers.train import to_float_images

    device, size = run.device, budget.image_size or data.images.shape[-1]
    torch.manual_seed(budget.seed)
    backbone = build_backbone(budget.backbone, budget.embedding_size, (size, size))
    backbone = backbone.to(device).to(memory_format=torch.channels_last).train()
    head = MarginSoftmax(named(TRAIN_LOSS), budget.embedding_size, data.num_classes).to(device).train()
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=budget.lr,
                                momentum=budget.momentum, weight_decay=budget.weight_decay)
    forward = torch.compile(backbone.forward, backend=run.plan.compile_backend) if compiled else backbone
    images, labels = data.images.to(device), data.labels.to(device)
    batch = budget.batch_size

    def step() -> torch.Tensor:
        idx = torch.randint(0, len(labels), (batch,), device=device)
        x = to_float_images(images[idx], size)
        flip = torch.rand(batch, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = head(forward(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(3):  # warm-up (and compilation)
        step()
    run.sync()
    t0 = time.perf_counter()
    for _ in range(run.plan.bare_steps):
        loss = step()
    run.sync()
    seconds = time.perf_counter() - t0
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"bare loop loss {float(loss.detach())}")
    return run.plan.bare_steps * batch / seconds


def backbone_case(run: Run, sec: Section, data: Any, backbone: str, compiled: bool) -> None:
    from marginsearch.losses import named
    from marginsearch.trainers.budget import Budget
    from marginsearch.trainers.train import train

    plan = run.plan
    budget = Budget(epochs=2, backbone=backbone, embedding_size=plan.embedding_size, image_size=plan.image_size,
                    batch_size=plan.batch_size, amp="bf16", compile=compiled, eval_pairs=500, seed=0,
                    reward_metric=plan.reward_metric)
    row: dict[str, Any] = {"backbone": backbone, "compile": compiled}
    label = f"{backbone} {'compiled' if compiled else 'eager'}"
    if compiled and not plan.trainer_compile:
        sec.note(f"{label}: trainer row skipped in the dry run (inductor compiles for minutes on 2 CPU cores); "
                 f"the bare loop compiles with backend={plan.compile_backend!r} (dynamo tracing only)")
    else:
        def trainer() -> None:
            t0 = time.perf_counter()
            result = train(named(TRAIN_LOSS), data, budget, device=run.device)
            history = result.history
            row.update(trainer_seconds=time.perf_counter() - t0, status=result.status,
                       trainer_ips=history[-1].images_per_second if history else None,
                       trainer_first_epoch_ips=history[0].images_per_second if history else None,
                       trainer_loss=history[-1].train_loss if history else None)
            sec.check(f"trainer {label}: complete, finite loss",
                      result.status == "complete" and math.isfinite(row["trainer_loss"] or math.nan),
                      f"{result.status} {result.reason}".strip())

        sec.attempt(f"trainer {label}", trainer)  # a failed trainer row still leaves the bare loop's
    row["bare_ips"] = sec.attempt(f"bare loop {label}", lambda: bare_images_per_second(run, data, budget, compiled))
    if row["bare_ips"] is not None:  # (a failure is already a failed check)
        sec.check(f"bare loop {label}: ran, finite loss", True)
    sec.data.setdefault("cases", []).append(row)


def backbone_section(run: Run, sec: Section) -> None:
    deadline = run.section_deadline("backbones")
    plan = run.plan
    data = load_data(plan.train_source)
    sec.lines += [f"{plan.train_source} ({len(data.labels)} training images, {data.num_classes} identities) resized "
                  f"to {plan.image_size}×{plan.image_size}, batch {plan.batch_size}, embedding {plan.embedding_size}, "
                  f"{TRAIN_LOSS}, SGD; bf16 autocast on CUDA (the trainer runs float32 on CPU), channels-last. "
                  "Trainer: `trainers.train.train`, 2 epochs, images/s of epoch 2 (epoch 1, in its own column, pays "
                  f"the warm-up and compilation; judging excluded). Bare loop: {plan.bare_steps} steps after 3 "
                  "warm-up steps of the same backbone, head and SGD on device-resident images, nothing else.", ""]
    cases = [(b, c) for c in (False, True) for b in plan.backbones]  # eager rows first: compilation is the slow part
    for backbone, compiled in cases:
        if sec.out_of_time(deadline - (plan.compile_min_s if compiled else 0),
                           f"{backbone} {'compiled' if compiled else 'eager'}"):
            break
        backbone_case(run, sec, data, backbone, compiled)
    rows = []
    for r in sec.data.get("cases", []):
        ips, bare = r.get("trainer_ips"), r["bare_ips"]
        rows.append([r["backbone"], "yes" if r["compile"] else "no", fmt(ips, 0),
                     fmt(r.get("trainer_first_epoch_ips"), 0), fmt(bare, 0),
                     fmt(ips / bare if ips and bare else None, 2)])
    sec.table(["backbone", "torch.compile", "trainer img/s", "trainer epoch 1 img/s", "bare loop img/s",
               "trainer ÷ bare"], rows)


# ---------------------------------------------------------------------------- 3. campaign
def _probe_record(path: str, phase: str, spec: Any, result: Any, seconds: float) -> None:
    """Append where this process's training ran: CUDA visible, device, the allocator's peak (GPU memory was used)."""
    from marginsearch.trainers.campaign import spec_key

    cuda = torch.cuda.is_available()
    record = {"phase": phase, "pid": os.getpid(), "spec_key": spec_key(spec), "cuda": cuda,
              "device": f"cuda:{torch.cuda.current_device()}" if cuda else "cpu",
              "gpu": torch.cuda.get_device_name() if cuda else None,
              "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "seconds": seconds,
              "status": result.status, "epochs": len(result.history),
              "images_per_second": result.history[-1].images_per_second if result.history else None}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def probed_train(path: str, phase: str) -> Iterator[None]:
    """Within the block, `trainers.campaign.train` records each training's device in `path` (this process only)."""
    from marginsearch.trainers import campaign

    previous = campaign.train
    original = getattr(previous, "unprobed", previous)  # a trial inside a probed campaign (same process): one record

    def train(spec: Any, data: Any, budget: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(Exception):  # the probe never breaks the training it watches
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = original(spec, data, budget, **kwargs)
        try:
            _probe_record(path, phase, spec, result, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            print(f"device probe failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return result

    train.unprobed = original  # type: ignore[attr-defined]
    campaign.train = train
    try:
        yield
    finally:
        campaign.train = previous


class ProbedObjective:
    """A campaign's trial objective whose trainings record their device; picklable, so it runs in Ray workers too."""

    def __init__(self, inner: Any, path: str) -> None:
        self.inner, self.path = inner, path

    def __call__(self, spec: Any, report: Callable[[int, float], None]) -> float:
        with probed_train(self.path, "trial"):
            return self.inner(spec, report)


@contextlib.contextmanager
def probed_campaign(path: str) -> Iterator[None]:
    """`run_campaign` with a device probe around every trial (in whatever process it runs) and every promotion.

    The trial objective is wrapped where the campaign hands it to `run_search`; `TrackedObjective`
    itself stays untouched, so Ray pickles it by reference and its workers train with their own
    (then probed) `trainers.campaign.train`, not a copy of the driver's.
    """
    from marginsearch.searchspace import search

    original = search.run_search

    def run_search(space: Any, objective: Any, *args: Any, **kwargs: Any) -> Any:
        return original(space, ProbedObjective(objective, path), *args, **kwargs)

    search.run_search = run_search
    if __name__ != "__main__":  # imported (not run as a script): Ray workers cannot import this module by name
        with contextlib.suppress(ImportError):
            import ray.cloudpickle
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with probed_train(path, "promote"):
            yield
    finally:
        search.run_search = original


def campaign_overrides(run: Run, workdir: Path, backend: str) -> dict[str, Any]:
    """The `--set` assignments of the check's campaign: few trials, 2 epochs on both budgets, no pruning."""
    plan = run.plan
    budget = {"epochs": 2, "batch_size": plan.campaign_batch, "eval_pairs": 500, "identities": 0,
              "reward_metric": plan.reward_metric}
    return {"campaign.name": "gpucheck", "campaign.workdir": str(workdir), "data.train": plan.campaign_source,
            "search.backend": backend, "search.gpus_per_trial": plan.gpus_per_trial if backend == "ray" else 0.0,
            "search.trials": plan.campaign_trials, "search.baselines": ["arcface"], "search.population": 2,
            "search.pruner": "none", "promote.top_k": 1, "promote.metric": plan.reward_metric,
            **{f"budget.proxy.{k}": v for k, v in budget.items()}, **{f"budget.full.{k}": v for k, v in budget.items()}}


def campaign_run(run: Run, sec: Section, backend: str) -> bool:
    """One campaign in a temporary workdir, every training probed; tables of trials and promotions, two checks."""
    from marginsearch.losses import MarginSpec
    from marginsearch.trainers.campaign import run_campaign, spec_key
    from marginsearch.trainers.config import load_config, override

    workdir = Path(tempfile.mkdtemp(prefix=f"campaign-{backend}-", dir=run.scratch))
    probe = workdir / "device_probe.jsonl"
    overrides = campaign_overrides(run, workdir, backend)
    config = override(load_config(), overrides)
    sec.lines += [f"**Backend {backend}**: `run_campaign(override(load_config(), …))` in a temporary workdir with "
                  + ", ".join(f"{k} = {json.dumps(v)}" for k, v in overrides.items() if k != "campaign.workdir")
                  + ".", ""]
    log: list[str] = []
    record: dict[str, Any] = {"backend": backend, "overrides": overrides, "log": log}
    sec.data.setdefault("runs", []).append(record)
    t0 = time.perf_counter()
    with probed_campaign(str(probe)):
        result = run_campaign(config, log=lambda line: (log.append(line), print("  " + line, flush=True)))
    record["seconds"] = time.perf_counter() - t0
    probes = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
    record["probes"] = probes
    trials = {p["spec_key"]: p for p in probes if p["phase"] == "trial"}
    promotions = {p["spec_key"]: p for p in probes if p["phase"] == "promote"}

    def as_spec(spec: Any) -> MarginSpec:  # a trial row's spec: a MarginSpec, or its dict in older rows
        return spec if isinstance(spec, MarginSpec) else MarginSpec.from_dict(spec)

    def probe_cells(p: dict[str, Any] | None) -> list[str]:
        if p is None:
            return ["no probe", "—", "—", ""]
        return [p["device"], fmt(p["peak_mib"], 0), fmt(p["images_per_second"], 0), p["cuda_visible_devices"] or ""]

    sec.lines += [f"Campaign {result.key}: {len(result.search.rows)} trials, {len(result.promoted)} promoted, "
                  f"{record['seconds']:.1f} s.", ""]
    sec.table(["trial", "loss", "state", "proxy reward", "device", "peak MiB", "img/s", "CUDA_VISIBLE_DEVICES"],
              [[r.number, r.baseline or r.named or "sampled", r.state, fmt(r.reward, 4),
                *probe_cells(trials.get(spec_key(as_spec(r.spec))) if r.spec else None)]
               for r in result.search.rows])
    metric = f"test/{config.promote.metric}"
    sec.table(["promoted (full budget)", metric, "device", "peak MiB", "img/s", "CUDA_VISIBLE_DEVICES"],
              [[m.label, fmt(m.metrics.get(metric), 4), *probe_cells(promotions.get(spec_key(m.spec)))]
               for m in result.promoted])
    want = run.device.type
    complete = [r for r in result.search.rows if r.state == "COMPLETE"]
    sec.check(f"campaign ({backend}): every trial complete",
              bool(complete) and len(complete) == len(result.search.rows),
              f"{len(complete)} of {len(result.search.rows)} complete")
    # on CUDA the allocator's peak proves the training put its tensors on the GPU
    on_device = [p for p in probes if p["device"].startswith(want) and (want == "cpu" or (p["peak_mib"] or 0) > 0)]
    sec.check(f"campaign ({backend}): every trial and promotion trained on {want}",
              len(on_device) == len(probes) and len(trials) >= len(complete)
              and len(promotions) >= len(result.promoted) > 0,
              f"{len(on_device)} of {len(probes)} probes on {want}: {len(trials)} trial(s), "
              f"{len(promotions)} promotion(s)")
    if not os.environ.get("GPU_CHECK_KEEP"):
        shutil.rmtree(workdir, ignore_errors=True)
    return True


def campaign_section(run: Run, sec: Section) -> None:
    deadline = run.section_deadline("campaign")
    plan = run.plan
    sec.lines += ["A probe around every training (in a Ray worker or in the driver) records the device, "
                  "CUDA_VISIBLE_DEVICES, the CUDA allocator's peak during the training and its images/s.", ""]
    if run.dry_run and plan.campaign_backend != "ray":
        sec.note(f"dry run: backend {plan.campaign_backend!r} on {plan.campaign_source}, Ray's GPU resources do not "
                 f"apply on CPU; the GPU run uses Ray with search.gpus_per_trial = {GPU_PLAN.gpus_per_trial}")
    backend = plan.campaign_backend
    missing = missing_modules(("optuna", "mlflow") + (("ray",) if backend == "ray" else ()))
    if "optuna" not in missing and "mlflow" not in missing and "ray" in missing:
        sec.note("ray is not installed here: the campaign runs on the optuna backend instead (trials in this process)")
        backend, missing = "optuna", []
    if missing:
        sec.check("campaign: its packages are installed", False,
                  f"{', '.join(missing)} not importable here (a campaign needs optuna and mlflow; Ray trials need ray)")
        return
    if sec.attempt(f"campaign ({backend})", lambda: campaign_run(run, sec, backend)) is None and backend != "optuna":
        if not sec.out_of_time(deadline, "the optuna fallback"):
            sec.note(f"the {backend} campaign failed: the same campaign again on the optuna backend "
                     "(trials in this process)")
            sec.attempt("campaign (optuna)", lambda: campaign_run(run, sec, "optuna"))


# ---------------------------------------------------------------------------- 4. amp
def amp_point(run: Run, data: Any, point: str) -> dict[str, Any]:
    """One named point trained under each precision from the same seed: status and the last epoch's mean loss."""
    from marginsearch.losses import named
    from marginsearch.trainers.budget import Budget
    from marginsearch.trainers.train import train

    plan = run.plan
    out: dict[str, Any] = {"point": point, "steps": plan.amp_epochs * (len(data.labels) // plan.amp_batch)}
    for label, amp in PRECISIONS.items():
        budget = Budget(epochs=plan.amp_epochs, batch_size=plan.amp_batch, backbone="tiny", embedding_size=128,
                        amp=amp, eval_pairs=300, seed=0, reward_metric=plan.reward_metric)
        result = train(named(point), data, budget, device=run.device)
        loss = result.history[-1].train_loss if result.history and result.status == "complete" else None
        out[label] = {"status": result.status, "reason": result.reason, "loss": loss}
    return out


def amp_section(run: Run, sec: Section) -> None:
    from marginsearch.losses import NAMED
    deadline = run.section_deadline("amp")
    plan = run.plan
    data = load_data(plan.amp_source)
    sec.lines += [f"Every named point, tiny backbone on {plan.amp_source}, batch {plan.amp_batch}, "
                  f"{plan.amp_epochs} epoch(s) of `trainers.train.train` per precision from seed 0 "
                  "(Budget.amp = off / bf16 / fp16; fp16 with the trainer's GradScaler). Loss: the mean training "
                  f"loss of the last epoch; Δ: relative to float32; pass: every run complete and finite and "
                  f"|Δ| ≤ {AMP_TOLERANCE:.0%}.", ""]
    if run.device.type != "cuda":
        sec.note("CPU: the trainer autocasts on CUDA only, so bf16 and fp16 rows run float32 here and equal it")
    rows = []
    for point in NAMED:
        if sec.out_of_time(deadline, point):
            break
        r = sec.attempt(f"amp {point}", lambda p=point: amp_point(run, data, p))
        if r is None:
            continue
        sec.data.setdefault("points", []).append(r)
        ref = r["fp32"]["loss"]
        cells, ok, why = [], True, []
        for label in PRECISIONS:
            loss = r[label]["loss"]
            if loss is None or not math.isfinite(loss):
                ok = False
                why.append(f"{label} {r[label]['status']} {r[label]['reason']}".strip())
                cells.append(r[label]["status"])
                continue
            delta = None if label == "fp32" or ref is None else (loss - ref) / abs(ref)
            if delta is not None and abs(delta) > AMP_TOLERANCE:
                ok = False
                why.append(f"{label} Δ {delta:+.1%}")
            cells.append(fmt(loss, 4) + ("" if delta is None else f" ({delta:+.1%})"))
        rows.append([point, r["steps"], *cells, "yes" if ok else "NO"])
        sec.check(f"amp {point}: finite and within {AMP_TOLERANCE:.0%} of float32", ok, "; ".join(why))
    sec.table(["point", "steps", "fp32 loss", "bf16 loss (Δ)", "fp16 loss (Δ)", "pass"], rows)


# ---------------------------------------------------------------------------- 5. distributed
DISTRIBUTED_CASES = {"DDP": [], "head_parallel": ["--budget-set", "head_parallel=true"]}


def torchrun_case(run: Run, sec: Section, name: str, extra: list[str], timeout: float) -> None:
    plan = run.plan
    out = run.scratch / f"torchrun-{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "marginsearch.trainers.cli", "train", "--loss", TRAIN_LOSS, "--data", plan.ddp_source,
           "--budget", "proxy", "--budget-set", "epochs=1", "--budget-set", f"batch_size={plan.ddp_batch}",
           "--budget-set", "eval_pairs=300", "--budget-set", f"reward_metric={plan.reward_metric}", *extra,
           "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 5.0), env=env)
    seconds = time.perf_counter() - t0
    summary = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    row = {"case": name, "returncode": proc.returncode, "seconds": seconds, "status": summary.get("status"),
           "reward": summary.get("reward"), "stderr_tail": proc.stderr[-2000:]}
    sec.data.setdefault("cases", []).append(row)
    reward = summary.get("reward")
    ok = proc.returncode == 0 and summary.get("status") == "complete" and math.isfinite(reward or math.nan)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    sec.check(f"torchrun 2 processes, {name}: complete", ok, "" if ok else f"exit {proc.returncode}: {last}")


def distributed_section(run: Run, sec: Section) -> None:
    deadline = run.section_deadline("distributed")
    gpus = torch.cuda.device_count() if run.device.type == "cuda" else 0
    if run.device.type == "cuda" and gpus < 2:
        sec.lines += [f"skipped: {gpus} GPU", ""]
        sec.data["skipped"] = f"{gpus} GPU"
        return
    backend = "NCCL" if run.device.type == "cuda" else "gloo (CPU dry run)"
    sec.lines += [f"`torchrun --standalone --nproc-per-node 2 -m marginsearch.trainers.cli train` ({backend}), "
                  f"{TRAIN_LOSS}, 1 epoch of {run.plan.ddp_source}, batch {run.plan.ddp_batch} split over the 2 "
                  "ranks; head_parallel splits the class centres across them. Seconds include start-up.", ""]
    for name, extra in DISTRIBUTED_CASES.items():
        if sec.out_of_time(deadline, name):
            break
        sec.attempt(f"torchrun {name}",
                    lambda n=name, e=extra: torchrun_case(run, sec, n, e, deadline - time.perf_counter()))
    sec.table(["case", "status", "reward", "seconds", "exit code"],
              [[r["case"], r["status"], fmt(r["reward"], 4), fmt(r["seconds"], 1), r["returncode"]]
               for r in sec.data.get("cases", [])])


# ---------------------------------------------------------------------------- the report
# in report order; they run in RUN_ORDER: the short must-have paths first, the compilations last, where a
# slow compile can only eat into its own section's time
RUN_ORDER = ("head", "campaign", "amp", "distributed", "backbones")
SECTIONS: list[tuple[str, str, Callable[[Run, Section], None]]] = [
    ("head", "1. Head forward + backward (bf16 autocast)", head_section),
    ("backbones", "2. Backbones: images/s, trainer against a bare loop", backbone_section),
    ("campaign", "3. Campaign on the device", campaign_section),
    ("amp", "4. AMP training of every named point", amp_section),
    ("distributed", "5. Two processes: DDP and head_parallel", distributed_section),
]


def run_section(run: Run, key: str, title: str, fn: Callable[[Run, Section], None]) -> Section:
    sec = Section(key, title)
    print(f"{title} ({run.elapsed():.0f} s elapsed)", flush=True)
    if run.elapsed() >= run.plan.budget_s:
        sec.lines += ["skipped: the total time budget was spent before this section", ""]
        sec.note("time budget spent before this section")
        return sec
    t0 = time.perf_counter()
    sec.attempt(key, lambda: fn(run, sec))
    sec.seconds = time.perf_counter() - t0
    return sec


def finite_json(value: Any) -> Any:
    """NaN and ±inf as None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_report(out: Path, run: Run, info: dict[str, Any], sections: list[Section]) -> Path:
    checks = [c for s in sections for c in s.checks]
    failed = [c for c in checks if not c["ok"]]
    mode = ("CPU dry run: tiny sizes through the same code paths as the GPU run; the numbers are CPU numbers and "
            "predict nothing about a GPU" if run.dry_run else "GPU run")
    if run.device.type == "cuda":
        device = (f"{info['device']}, compute capability {info['capability']}, {info['multiprocessors']} SMs, "
                  f"{info['device_count']} CUDA device(s)")
        software = (f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, Python {info['python']}; "
                    f"TF32 matmul {'on' if info['tf32_matmul'] else 'off'} (the head's float32 matmuls), "
                    f"TF32 cuDNN {'on' if info['tf32_cudnn'] else 'off'}")
    else:
        device = f"{info['device']}, {info['threads']} torch threads (no GPU used)"
        software = f"torch {info['torch']}, CUDA {info['cuda'] or 'none (CPU build)'}, Python {info['python']}"
    lines = ["# GPU check", "", f"Mode: {mode}.", "", f"Device: {device}.", "",
             f"Software: {software}; {info['platform']}.", "",
             f"Command: `{run.command}`", "",
             f"Total {run.elapsed():.0f} s of a {run.plan.budget_s:.0f} s budget; checks: {len(checks) - len(failed)} "
             f"passed, {len(failed)} failed.", ""]
    for s in sections:
        lines += [f"## {s.title}", "", f"_{s.seconds:.1f} s_", "", *s.lines, *[f"Note: {n}" for n in s.notes]]
        if s.notes:
            lines.append("")
    lines += ["## Checks", "", markdown_table(["section", "check", "result", "detail"],
                                              [[s.key, c["name"], "pass" if c["ok"] else "FAIL", c["detail"]]
                                               for s in sections for c in s.checks]), ""]
    path = out / "gpu_check.md"
    path.write_text("\n".join(lines))
    raw = {"mode": run.plan.name, "command": run.command, "machine": info, "budget_s": run.plan.budget_s,
           "total_s": run.elapsed(), "plan": dataclasses.asdict(run.plan),
           "sections": [{"key": s.key, "title": s.title, "seconds": s.seconds, "data": s.data, "notes": s.notes,
                         "checks": s.checks} for s in sections]}
    (out / "gpu_check.json").write_text(json.dumps(finite_json(raw), indent=1, default=str))
    return path


def no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: torch.cuda.is_available() is False "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.md and gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on CPU at tiny sizes")
    parser.add_argument("--budget", type=float, default=None, help="total seconds (default: 480 on a GPU, 150 dry run)")
    parser.add_argument("--only", nargs="+", choices=[k for k, _, _ in SECTIONS], help="run only these sections")
    parser.add_argument("--campaign-backend", choices=("optuna", "ray"), default=None,
                        help="override the campaign's search backend (e.g. ray in a dry run, with gpus_per_trial 0)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"no CUDA device: {no_cuda_reason()}; use --dry-run on CPU", file=sys.stderr)
        return 2
    if missing_modules(("marginsearch",)) or missing_modules(("marginsearch.losses",)):
        print("marginsearch is not importable: install it first (offline: python -m pip install --no-deps "
              "--no-build-isolation -e .)", file=sys.stderr)
        return 2
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget)
    if args.campaign_backend is not None:
        plan = dataclasses.replace(plan, campaign_backend=args.campaign_backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        run = Run(plan, torch.device("cpu" if args.dry_run else "cuda:0"), args.dry_run, Path(scratch), command)
        if run.device.type == "cuda":
            torch.cuda.set_device(run.device)
        if plan.threads is not None:
            torch.set_num_threads(plan.threads)
        info = machine_info(run)
        print(f"gpu_check ({plan.name}) on {info['device']}, budget {plan.budget_s:.0f} s", flush=True)
        sections: list[Section] = []
        order = {key: i for i, (key, _, _) in enumerate(SECTIONS)}
        for key in RUN_ORDER:
            if args.only and key not in args.only:
                continue
            _, title, fn = SECTIONS[order[key]]
            sections.append(run_section(run, key, title, fn))
            sections.sort(key=lambda s: order[s.key])
            path = write_report(out, run, info, sections)  # after every section: a cut-off run still leaves a report
    failed = [c for s in sections for c in s.checks if not c["ok"]]
    print(f"wrote {path} and {path.with_suffix('.json')} in {run.elapsed():.0f} s; "
          f"{len(failed)} failed check(s){': ' + '; '.join(c['name'] for c in failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
