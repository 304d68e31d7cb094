"""One trainer for proxy and full budgets: backbone + `MarginSoftmax`, judged each epoch on held-out identities."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from marginsearch.losses import MarginSoftmax, MarginSpec, ShardedMarginSoftmax, WithAuxiliary, build_auxiliary
from marginsearch.losses.errors import MarginsearchError

from .backbones import EmbeddingModel, build_backbone
from .budget import Budget
from .data.errors import DataError, one_line
from .images import ImageBatcher, Preprocess, to_float_images
from .judge import LabelledImages, judge

__all__ = ["TrainData", "TrainError", "EpochReport", "TrainResult", "train", "few_steps", "to_float_images"]


class TrainError(MarginsearchError):
    """A training that cannot start: fewer images than one batch, a batch that does not split, a checkpoint of
    another run."""


@dataclass
class TrainData:
    """Training images with labels, and the held-out identities that give the reward.

    `images` is uint8 [N, 3, H, W] in memory (the synthetic benchmark), or a Dataset of (HWC uint8
    RGB array, label) items decoded as they are needed (folders, RecordIO), through a DataLoader.
    """

    images: Tensor | Dataset
    labels: Tensor
    num_classes: int
    val: LabelledImages
    name: str = "data"
    hard: Tensor | None = None   # hard-sample flags [N] (DDL), when the data has them

    def subset(self, identities: int | None) -> TrainData:
        """Only the first `identities` identities (a proxy's identity budget), relabelled densely."""
        if not identities or identities >= self.num_classes:
            return self
        keep = self.labels < identities
        hard = self.hard[keep] if self.hard is not None else None
        images = self.images[keep] if isinstance(self.images, Tensor) else self.images.take(keep.numpy().nonzero()[0])
        return dataclasses.replace(self, images=images, labels=self.labels[keep], num_classes=identities, hard=hard)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images as stored: the in-memory tensor's, else the first image's."""
        if isinstance(self.images, Tensor):
            return int(self.images.shape[-2]), int(self.images.shape[-1])
        first = self.images[0][0]
        return int(first.shape[0]), int(first.shape[1])

    def preprocess(self, budget: Budget) -> Preprocess:
        """How this data becomes the model input under `budget` (image_size, image_fit)."""
        return Preprocess.of(budget.image_size, self.image_size, budget.image_fit)

    @classmethod
    def from_benchmark(cls, bench: Any, name: str = "synthetic") -> TrainData:
        """Train split for training, validation split for the reward (a `SyntheticBenchmark`)."""
        val = LabelledImages(bench.val.images, bench.val.labels, bench.val.hard, "val")
        return cls(bench.train.images, bench.train.labels, bench.train.num_classes, val, name, bench.train.hard)


@dataclass
class EpochReport:
    """What one epoch did: loss, throughput and the judge's metrics on the validation identities."""

    epoch: int
    train_loss: float
    metrics: dict[str, float]
    reward: float
    seconds: float
    images_per_second: float


@dataclass
class TrainResult:
    """The outcome of a training: status (complete, diverged, stopped), history, final model and head."""

    status: str
    reason: str
    history: list[EpochReport]
    model: EmbeddingModel
    head: MarginSoftmax
    spec: MarginSpec
    budget: Budget

    @property
    def reward(self) -> float:
        """The last epoch's reward; −inf when no epoch finished."""
        return self.history[-1].reward if self.history else -math.inf

    @property
    def metrics(self) -> dict[str, float]:
        return self.history[-1].metrics if self.history else {}


def _batches(n: int, batch_size: int, g: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=g)
    for start in range(0, n - batch_size + 1, batch_size):  # drop_last: BatchNorm needs ≥ 2
        yield order[start:start + batch_size]


FEW_STEPS = 10  # fewer optimizer steps per epoch than this: the user is told (a small set with a large batch)


def few_steps(images: int, budget: Budget, where: str = "budget") -> str | None:
    """A one-line warning when `images` training images give fewer than FEW_STEPS steps per epoch under `budget`
    (the last partial batch is dropped), else None."""
    steps = images // budget.batch_size
    if steps >= FEW_STEPS:
        return None
    return (f"{where}: {images} training images in batches of {budget.batch_size} give {steps} step(s) per epoch "
            f"(the last partial batch is dropped); a batch_size of {max(2, images // FEW_STEPS)} or less gives "
            f"{FEW_STEPS}")


def _lr_factor(budget: Budget, steps_per_epoch: int) -> Callable[[int], float]:
    total = budget.epochs * steps_per_epoch
    warmup = int(budget.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if budget.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 0.1 ** sum(progress >= m for m in budget.milestones)

    return factor


def _optimizer(model: nn.Module, head: nn.Module, budget: Budget) -> torch.optim.Optimizer:
    head_lr = budget.head_lr if budget.head_lr is not None else budget.lr
    groups = [
        {"params": list(model.parameters()), "lr": budget.lr, "weight_decay": budget.weight_decay},
        {"params": list(head.parameters()), "lr": head_lr,
         "weight_decay": budget.weight_decay if budget.head_weight_decay else 0.0},
    ]
    groups = [g for g in groups if g["params"] and any(p.requires_grad for p in g["params"])]
    if budget.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=budget.momentum)
    return torch.optim.AdamW(groups)


def _autocast(device: torch.device, budget: Budget):
    if device.type != "cuda" or budget.amp == "off":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if budget.amp == "bf16" else torch.float16)


def parallel_embedding(backbone: nn.Module, device: torch.device,
                       compiled: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """The backbone wrapped in DDP alone (for a head sharded across the ranks), as a function; `compiled` compiles
    the wrapper."""
    ddp = nn.parallel.DistributedDataParallel(backbone, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
    return (torch.compile(ddp) if compiled is not None else ddp).__call__


def _clip_gradients(objective: nn.Module, max_norm: float, sharded: bool) -> None:
    """Clip by the norm of the whole gradient; under a sharded head it adds up every rank's shard, so all ranks
    scale alike."""
    if not sharded:
        torch.nn.utils.clip_grad_norm_(objective.parameters(), max_norm)
        return
    norm = torch.nn.utils.get_total_norm
    backbone = [p.grad for p in objective.model.parameters() if p.grad is not None]
    shard = [p.grad for p in objective.loss.parameters() if p.grad is not None]
    shard_sq = norm(shard) ** 2 if shard else torch.zeros((), device=backbone[0].device)
    torch.distributed.all_reduce(shard_sq)
    total = torch.sqrt(norm(backbone) ** 2 + shard_sq)
    torch.nn.utils.clip_grads_with_norm_(list(objective.parameters()), max_norm, total)


def rank_checkpoint(path: Path, rank: int) -> Path:
    """Rank r's checkpoint file under a sharded head: `path` on rank 0, `<stem>.rank<r><suffix>` beside it otherwise."""
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def loader_workers(requested: int | None) -> int:
    """Data-loading processes for streamed data: the budget's, else one per core but one, at most 8."""
    return requested if requested is not None else max(0, min(8, (os.cpu_count() or 1) - 1))


class _EpochBatches:
    """A DataLoader batch_sampler whose batches are set before each epoch (so workers persist across epochs)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Streamed:
    """Batches of a Dataset of images through a DataLoader: decoded and fitted in `workers` processes."""

    def __init__(self, dataset: Dataset, preprocess: Preprocess, workers: int, device: torch.device) -> None:
        self.sampler = _EpochBatches()
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                                  collate_fn=ImageBatcher(preprocess),
                                                  pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def epoch(self, batches: list[Tensor]) -> Iterator[Tensor]:
        """The uint8 images of each batch of indices, in order."""
        self.sampler.batches = [b.tolist() for b in batches]
        try:
            for images, _ in self.loader:
                yield images
        except DataError as exc:  # from a worker: torch's message holds the worker's traceback
            raise one_line(exc) from None


def _stage_images(images: Tensor, device: torch.device) -> Tensor:
    """Where batches are cut from: the uint8 images moved to the GPU once when they take under a quarter of its free
    memory, else host memory."""
    if device.type == "cuda" and images.numel() * images.element_size() < torch.cuda.mem_get_info(device)[0] // 4:
        return images.to(device)
    return images


def _batch_images(images: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    """The uint8 batch `images[idx]` on `device`: cut there when the images live there, else cut on the host,
    pinned, copied asynchronously."""
    if images.device == device:
        return images[idx.to(device)]
    batch = images[idx]
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


Auxiliary = Mapping[str, tuple[float, Mapping[str, Any]]]


class _Objective(nn.Module):
    """Backbone and loss in one module, so one DDP wrapper syncs both (the head's centres included)."""

    def __init__(self, model: EmbeddingModel, loss: nn.Module, embed: Callable[[Tensor], Tensor] | None = None,
                 embedding_grad_scale: float = 1.0) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        # None: call the backbone; else a compiled forward or a DDP-wrapped backbone's __call__ (a function,
        # so the backbone is not registered twice)
        self.embed_fn = embed
        self.embedding_grad_scale = embedding_grad_scale

    def forward(self, x: Tensor, labels: Tensor, hard: Tensor | None = None) -> Tensor:
        embeddings = self.model.backbone(x) if self.embed_fn is None else self.embed_fn(x)
        if self.embedding_grad_scale != 1.0 and embeddings.requires_grad:
            embeddings.register_hook(lambda g: g * self.embedding_grad_scale)
        if isinstance(self.loss, WithAuxiliary):
            return self.loss(embeddings, labels, **({} if hard is None else {"hard": hard}))
        return self.loss(embeddings, labels)


def _world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True if `flag` is true on any rank (so every rank stops together)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def _summed_buffers(module: nn.Module) -> set[int]:
    """The buffers every head inside `module` names as per-rank sums (`summed_buffers()`, e.g. KappaFace's class
    statistics)."""
    out: set[int] = set()
    for sub in module.modules():
        if callable(getattr(sub, "summed_buffers", None)):
            out.update(id(getattr(sub, name)) for name in sub.summed_buffers())
    return out


def _sync_buffers(module: nn.Module, world: int) -> None:
    """Make every rank's buffers equal at the epoch's end: class-statistic sums add up, running means average.

    Within an epoch each rank updates its buffers from its own share of the batch (BatchNorm
    statistics, CurricularFace's t, AdaFace's norm statistics are EMAs over the rank's samples).
    """
    if world == 1:
        return
    summed = _summed_buffers(module)
    for _, buf in module.named_buffers():
        if not buf.is_floating_point():
            continue  # step counters advance identically on every rank
        torch.distributed.all_reduce(buf)
        if id(buf) not in summed:
            buf.div_(world)


def train(spec: MarginSpec, data: TrainData, budget: Budget, *,
          auxiliary: Auxiliary | None = None,
          on_epoch: Callable[[EpochReport], Any] | None = None,
          checkpoint: str | os.PathLike | None = None,
          device: str | torch.device | None = None,
          progress: bool = False) -> TrainResult:
    """Train a backbone with the head of `spec` under `budget`; judge each epoch on `data.val`.

    `auxiliary` adds weighted terms beside the head: {"range": (0.1, {"margin": 0.5}), ...}
    (names of `losses.AUXILIARY`). `on_epoch(report)` runs after each epoch (it may raise, e.g.
    optuna.TrialPruned, to stop the run; returning True stops it quietly). A non-finite loss
    ends the run with status "diverged". With `checkpoint`, state is saved after each epoch and
    a run resumes from it, to the same weights as an uninterrupted run on CPU. Under torchrun
    (an initialised process group) each rank trains on its share of every batch through DDP;
    rank 0 judges, calls `on_epoch` and writes the checkpoint. With `budget.head_parallel` the
    class centres are split across the ranks instead (`losses.ShardedMarginSoftmax`): DDP syncs the
    backbone only, every rank writes its own checkpoint (`rank_checkpoint`), and the returned head
    is the rank's shard.
    """
    rank, world = _world()
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    data = data.subset(budget.identities)
    if len(data.labels) < budget.batch_size:
        raise TrainError(f"{data.name}: {len(data.labels)} training images, "
                         f"fewer than one batch of {budget.batch_size}")
    if budget.batch_size % world:
        raise TrainError(f"budget: batch_size {budget.batch_size} must be divisible by the {world} processes")
    preprocess = data.preprocess(budget)
    torch.manual_seed(budget.seed)
    backbone = build_backbone(budget.backbone, budget.embedding_size, preprocess.size)
    # the preprocess is judged, saved and exported with the model; channels_last on CPU too: ~15% faster
    model = EmbeddingModel(backbone, preprocess).to(device).to(memory_format=torch.channels_last)
    sharded = budget.head_parallel and world > 1
    if sharded and auxiliary:
        raise TrainError("budget: head_parallel does not take auxiliary terms (their class centres are not sharded)")
    head_type = ShardedMarginSoftmax if sharded else MarginSoftmax
    head = head_type(spec, budget.embedding_size, data.num_classes).to(device)
    loss_module: nn.Module = head
    if auxiliary:
        terms = {name: (float(w), build_auxiliary(name, data.num_classes, budget.embedding_size, **dict(params)))
                 for name, (w, params) in auxiliary.items()}
        loss_module = WithAuxiliary(head, terms).to(device)
    # compile the backbone's forward only: the head's checks and autograd Function stay eager, and the
    # returned model is the plain module (export and judging never see a compiled graph)
    embed = torch.compile(backbone.forward) if budget.compile else None
    if sharded:  # DDP syncs the backbone only; each rank keeps its own shard of the centres
        embed = parallel_embedding(backbone, device, embed)
    objective = _Objective(model, loss_module, embed, embedding_grad_scale=world if sharded else 1.0)
    optimizer = _optimizer(model, head, budget)
    steps_per_epoch = max(1, len(data.labels) // budget.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(budget, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and budget.amp == "fp16")
    history: list[EpochReport] = []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and sharded:
        ckpt_path = rank_checkpoint(ckpt_path, rank)  # every rank saves its shard and its optimizer state
    if ckpt_path is not None and ckpt_path.exists():
        history = _load_checkpoint(ckpt_path, spec, budget, device, loss_module, backbone, optimizer, scheduler)
    step_fn: nn.Module = objective
    if world > 1 and not sharded:
        step_fn = nn.parallel.DistributedDataParallel(objective,
                                                      device_ids=[device.index] if device.type == "cuda" else None,
                                                      broadcast_buffers=False)  # buffers: synced per epoch below

    streamed = None if isinstance(data.images, Tensor) else _Streamed(data.images, preprocess,
                                                                      loader_workers(budget.workers), device)
    images = _stage_images(data.images, device) if streamed is None else None
    labels = data.labels.to(device)
    hard = data.hard.to(device) if data.hard is not None and auxiliary else None
    bar = _progress(progress and rank == 0, budget.epochs, len(history), data.name)
    status, reason = "complete", ""
    for epoch in range(len(history), budget.epochs):
        objective.train()
        g = torch.Generator().manual_seed(budget.seed * 100_003 + epoch)
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        batches = list(_batches(len(labels), budget.batch_size, g))
        loaded = None if streamed is None else streamed.epoch([idx[rank::world] for idx in batches])
        for idx in batches:
            flip = torch.rand(len(idx), generator=g) < 0.5  # drawn for the whole batch on every rank
            idx, flip = idx[rank::world], flip[rank::world]
            batch = _batch_images(images, idx, device) if loaded is None else next(loaded).to(device, non_blocking=True)
            x = preprocess.floats(batch)
            if budget.flip:
                x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
            x = x.contiguous(memory_format=torch.channels_last)
            dev_idx = idx.to(device)
            with _autocast(device, budget):
                loss = step_fn(x, labels[dev_idx], None if hard is None else hard[dev_idx])
            if _any_rank(not torch.isfinite(loss), world, device):
                status, reason = "diverged", (f"loss became {loss.item()} at epoch {epoch + 1}, "
                                              f"step {seen // len(idx) + 1}")
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if budget.grad_clip is not None:
                scaler.unscale_(optimizer)
                _clip_gradients(objective, budget.grad_clip, sharded)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        if status != "complete":
            break
        _sync_buffers(objective, world)
        head.end_epoch()
        train_seconds = time.perf_counter() - t0
        stop = False
        if rank == 0:
            metrics = judge(model, data.val, budget.eval_pairs, seed=budget.seed, device=device,
                            workers=loader_workers(budget.workers))
            report = EpochReport(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1), metrics=metrics,
                                 reward=metrics[budget.reward_metric], seconds=time.perf_counter() - t0,
                                 images_per_second=seen * world / max(train_seconds, 1e-9))
            history.append(report)
            if ckpt_path is not None and not sharded:
                _save_checkpoint(ckpt_path, spec, budget, backbone, loss_module, optimizer, scheduler, history)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{report.train_loss:.3f}", reward=f"{report.reward:.4f}")
            stop = on_epoch is not None and on_epoch(report) is True
        else:
            history.append(EpochReport(epoch + 1, loss_sum / max(seen, 1), {}, math.nan, time.perf_counter() - t0,
                                       seen * world / max(train_seconds, 1e-9)))
        if ckpt_path is not None and sharded:
            _save_checkpoint(ckpt_path, spec, budget, backbone, loss_module, optimizer, scheduler, history)
        if _any_rank(stop, world, device):
            status, reason = "stopped", f"stopped by callback after epoch {epoch + 1}"
            break
    if bar is not None:
        bar.close()
    return TrainResult(status, reason, history, model.cpu().eval(), head.cpu().eval(), spec, budget)


def _budget_state(budget: Budget) -> dict[str, Any]:
    """The budget as a checkpoint records it; `workers` is left out (it changes no result)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(budget).items() if k != "workers"}


def _load_checkpoint(path: Path, spec: MarginSpec, budget: Budget, device: torch.device, loss_module: nn.Module,
                     backbone: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> list[EpochReport]:
    """Restore a run saved by `_save_checkpoint`; its history. Refuses a checkpoint of another run."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise TrainError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not isinstance(state, dict):
        raise TrainError(f"{path}: not a marginsearch checkpoint (it holds a {type(state).__name__})")
    if state.get("spec") != spec.to_dict() or state.get("budget") != _budget_state(budget):
        raise TrainError(f"{path}: checkpoint belongs to another spec or budget")
    backbone.load_state_dict(state["backbone"])
    loss_module.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return [EpochReport(**r) for r in state["history"]]


def _save_checkpoint(path: Path, spec: MarginSpec, budget: Budget, backbone: nn.Module, head: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: Any, history: list[EpochReport]) -> None:
    state = {
        "spec": spec.to_dict(), "budget": _budget_state(budget),
        "backbone": backbone.state_dict(), "head": head.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(), "history": [dataclasses.asdict(r) for r in history],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=f"train {name}", unit="epoch", leave=False)
