"""Images/s of the proxy trainer against a bare PyTorch loop with the same model, head and data.

The trainer (`trainers.train.train`, one epoch of the `tiny` backbone on `synthetic:demo`)
reports its training throughput per epoch (judging excluded; the judge's own time on the
validation split, which every proxy epoch pays once, is timed beside it). The bare loop builds the same
backbone, `MarginSoftmax` and SGD from the same seed and runs the same batches (uint8 → float,
flips, channels_last) with nothing else: no scheduler, no gradient clipping, no finiteness
check. Runs alternate (trainer, bare, trainer, ...) and each column reports its median.

    .venv/bin/python bench/trainer_speed.py            # arcface, 3 runs each (~2-4 min on 2 cores)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch  # noqa: E402

from marginsearch.losses import MarginSoftmax, named  # noqa: E402
from marginsearch.trainers.backbones import EmbeddingModel, build_backbone  # noqa: E402
from marginsearch.trainers.budget import Budget  # noqa: E402
from marginsearch.trainers.evaluate import pair_counts  # noqa: E402
from marginsearch.trainers.judge import judge  # noqa: E402
from marginsearch.trainers.sources import training_data  # noqa: E402
from marginsearch.trainers.train import TrainData, to_float_images, train  # noqa: E402

try:  # run as a script (python bench/NAME.py) or a module (python -m bench.NAME)
    from .common import markdown_table, write_report
except ImportError:
    from common import markdown_table, write_report  # type: ignore[no-redef]


def trainer_images_per_second(spec, data: TrainData, budget: Budget) -> float:
    """Training throughput of one epoch of the project's trainer."""
    return train(spec, data, budget).history[0].images_per_second


def bare_images_per_second(spec, data: TrainData, budget: Budget) -> float:
    """The same epoch as a plain loop: backbone → head → backward → SGD step."""
    data = data.subset(budget.identities)
    size = budget.image_size or data.images.shape[-1]
    torch.manual_seed(budget.seed)
    model = EmbeddingModel(build_backbone(budget.backbone, budget.embedding_size, (size, size)))
    model = model.to(memory_format=torch.channels_last).train()
    head = MarginSoftmax(spec, budget.embedding_size, data.num_classes).train()
    optimizer = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=budget.lr,
                                momentum=budget.momentum, weight_decay=budget.weight_decay)
    g = torch.Generator().manual_seed(budget.seed * 100_003)
    order = torch.randperm(len(data.labels), generator=g)
    seen, start = 0, time.perf_counter()
    for lo in range(0, len(order) - budget.batch_size + 1, budget.batch_size):
        idx = order[lo:lo + budget.batch_size]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = to_float_images(data.images[idx], size)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous(memory_format=torch.channels_last)
        loss = head(model.backbone(x), data.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(idx)
    return seen / (time.perf_counter() - start)


def judge_seconds(data: TrainData, budget: Budget) -> float:
    """Wall seconds of one judgement of the validation split (as after each epoch), on an untrained backbone."""
    size = budget.image_size or data.images.shape[-1]
    model = EmbeddingModel(build_backbone(budget.backbone, budget.embedding_size, (size, size)))
    start = time.perf_counter()
    judge(model, data.val, budget.eval_pairs, seed=budget.seed)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="synthetic:demo")
    parser.add_argument("--loss", default="arcface")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both columns")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "bench_trainer.md"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = training_data(args.source)
    budget = Budget(epochs=1, backbone="tiny")
    spec = named(args.loss)
    columns = {"trainer (trainers.train.train)": trainer_images_per_second, "bare PyTorch loop": bare_images_per_second}
    rates: dict[str, list[float]] = {name: [] for name in columns}
    for _ in range(args.runs):
        for name, fn in columns.items():
            rates[name].append(fn(spec, data, budget))
    bare = statistics.median(rates["bare PyTorch loop"])
    machine = (f"torch {torch.__version__}, cpu, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
               f"{platform.processor() or platform.machine()}")
    lines = ["# Trainer speed: images/s over one epoch", "",
             (f"Command: `.venv/bin/python bench/trainer_speed.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`").rstrip(),
             "", f"Machine: {machine}. Data {args.source} ({len(data.labels)} training images, {data.num_classes} "
             f"identities), backbone tiny, batch {budget.batch_size}, loss {args.loss}; median of {args.runs} "
             "alternating runs.", "",
             markdown_table(["column", "images/s (median)", "runs", "× bare loop"],
                            [[name, f"{statistics.median(values):.0f}", ", ".join(f"{v:.0f}" for v in values),
                              f"{statistics.median(values) / bare:.2f}"] for name, values in rates.items()],
                            align="lrlr")]
    judged = statistics.median(judge_seconds(data, budget) for _ in range(args.runs))
    epoch = len(data.labels) / statistics.median(rates["trainer (trainers.train.train)"])
    n_val = len(data.val.labels)
    per_class = min(budget.eval_pairs, *pair_counts(data.val.labels.numpy()))  # balanced: as judge draws them
    lines += ["", f"Judging the validation split after an epoch ({n_val} images, "
              f"all {n_val * (n_val - 1) // 2:,} pairs "
              f"for TAR@FAR and AUC, {per_class} genuine + {per_class} impostor pairs for the 10-fold accuracy) takes "
              f"{judged:.2f} s (median of {args.runs}), {100 * judged / (judged + epoch):.0f} % of a proxy epoch "
              f"({epoch:.2f} s of training)."]
    return write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    raise SystemExit(main())
