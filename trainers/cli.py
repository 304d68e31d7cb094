"""`marginsearch`: the command line. Bad input ends with one line on stderr and exit code 2.

    marginsearch losses [--plot FILE] [NAME ...]
    marginsearch train --loss NAME [--set key=value ...] [--data SOURCE] [--budget proxy|full] [--out DIR]
    marginsearch evaluate --model PATH --data SOURCE [--split test]
    marginsearch export --model PATH --format torchscript|onnx --out FILE
    marginsearch split --data imagefolder:DIR --out DIR [--test-fraction 0.25] [--folds 10] [--pairs-per-fold 50]
                       [--min-images 4] [--max-images N] [--seed 0] [--overwrite]
                                                split a folder by identity: train/ and an LFW-style pairs.txt
    marginsearch campaign [--config FILE] [--set section.key=value ...] [--tracking-uri URI] [--resume | --new]
    marginsearch search   [same options] [--worker]   the search phase only; --worker: one of N processes
    marginsearch promote  [same options]        promote and register from the newest campaign's search
    marginsearch ui [--tracking-uri URI]        how to open the MLflow UI on the store

With no arguments `marginsearch campaign` runs the demo campaign on the embedded defaults
(synthetic demo data, MLflow and Optuna SQLite stores in the working directory).

SOURCE is synthetic:<preset>, imagefolder:<dir>, recordio:<file.rec>, bin:<file.bin> or
pairs:<pairs.txt>@<image root>. Run `train` under `torchrun --nproc-per-node N` for DDP.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from marginsearch.losses.errors import MarginsearchError

from .faults import install_from_environment
from .stores import check_output_file, check_workdir

__all__ = ["main", "parse_assignments", "COMMANDS"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


class UsageError(MarginsearchError):
    """Bad command-line input."""


def parse_value(text: str) -> Any:
    """'0.5' → 0.5, 'true' → True, '[1, 2]' → [1, 2], anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: Sequence[str] | None, what: str = "--set") -> dict[str, Any]:
    """['m=0.4', 'guard=easy'] → {'m': 0.4, 'guard': 'easy'}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _spec(args: argparse.Namespace):
    """The named loss or spec file, with `--set` fields (flat names as `spec.flat()` prints them) applied."""
    from marginsearch.searchspace.space import with_fields

    spec = _base_spec(args)
    return with_fields(spec, parse_assignments(args.set)) if args.set else spec


def _base_spec(args: argparse.Namespace):
    from marginsearch.losses import MarginSpec, named

    if args.spec:
        path = Path(args.spec)
        if not path.is_file():
            raise UsageError(f"--spec {path} does not exist")
        try:
            return MarginSpec.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise UsageError(f"--spec {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return named(args.loss)


def cmd_losses(args: argparse.Namespace) -> int:
    from marginsearch.losses.__main__ import main as losses_main
    return losses_main([*(["--markdown"] if args.markdown else []), *(["--plot", args.plot] if args.plot else []),
                        *args.names])


def _init_distributed() -> bool:
    """Join the process group torchrun describes in the environment; True if one was started."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _names(value: str | None) -> tuple[str, ...] | str:
    """--identities / --val-identities: a file of names if one exists by that name, else comma-separated names."""
    if not value:
        return ()
    return value if Path(value).expanduser().is_file() else tuple(v.strip() for v in value.split(",") if v.strip())


def _split(args: argparse.Namespace):
    """The identity split that train's --identities, --val-* options ask for (None: the source's own)."""
    from .sources import Split

    split = Split(_names(args.identities), args.val_fraction, _names(args.val_identities), args.val_data)
    return None if split == Split() else split


def cmd_train(args: argparse.Namespace) -> int:
    from .budget import budget_from
    from .export import save_bundle
    from .sources import training_data
    from .train import few_steps, train

    spec = _spec(args)
    budget = budget_from(args.budget, **parse_assignments(args.budget_set, "--budget-set"))
    auxiliary = {}
    for item in args.aux or []:
        name, _, rest = item.partition(":")
        weight, _, params = rest.partition(":")
        try:
            auxiliary[name] = (float(weight or 1.0), parse_assignments([p for p in params.split(",") if p], "--aux"))
        except ValueError:
            raise UsageError(f"--aux expects name:weight[:key=value,...], got {item!r}") from None
    check_workdir(Path(args.out), "--out")
    data = training_data(args.data, split=_split(args))
    warnings = [w for w in [few_steps(len(data.subset(budget.identities).labels), budget)] if w]
    distributed = _init_distributed()
    trained = False
    try:
        result = train(spec, data, budget, auxiliary=auxiliary or None, checkpoint=args.checkpoint,
                       progress=not args.quiet, on_epoch=None if args.quiet else _print_epoch)
        trained = True
    finally:
        if distributed:
            import torch.distributed as dist
            rank = dist.get_rank()
            if trained:  # every rank's collectives are done before the group goes (a rank leaving early aborted gloo)
                dist.barrier()
            dist.destroy_process_group()
            if rank != 0:
                # a non-zero rank ends here with 0, also when training raised (rank 0 reports): kept as it was
                return 0  # noqa: B012
    out = Path(args.out)
    path = save_bundle(out / "model.pt", result.model, budget.backbone, budget.embedding_size, result.model.preprocess,
                       {"spec": spec.to_dict(), "metrics": result.metrics, "status": result.status})
    summary = {"status": result.status, "reason": result.reason, "reward": result.reward,
               "metrics": result.metrics, "model": str(path), "warnings": warnings}
    for warning in warnings:  # after training, so that an error is still the only line on stderr
        print(f"marginsearch train: warning: {warning}", file=sys.stderr)
    (out / "result.json").write_text(strict_json(summary))
    print(strict_json(summary))
    return 0 if result.status != "diverged" else 1


def _finite_or_none(value: Any) -> Any:
    """JSON-ready: NaN and ±inf become null (valid JSON has no NaN), containers recursively, odd objects their str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def strict_json(value: Any) -> str:
    """`value` as strict JSON (what `json.loads` of any language accepts): undefined metrics are null."""
    return json.dumps(_finite_or_none(value), indent=1, allow_nan=False)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from .campaign import log_line

        log_line(self.format(record))


def _log_to_stdout() -> None:
    """marginsearch's INFO log records (data generation, ...) as campaign log lines on stdout."""
    logger = logging.getLogger("marginsearch")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
        logger.setLevel(logging.INFO)


def _print_epoch(report) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"epoch {report.epoch}: loss {report.train_loss:.4f}  reward {report.reward:.4f}  "
               f"acc {report.metrics.get('accuracy', float('nan')):.4f}  {report.images_per_second:.0f} img/s",
               file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .judge import judge, judge_pairs
    from .sources import PairSet, evaluation_data
    from .tracking import load_any_model

    if args.pairs < 1:
        raise UsageError(f"--pairs must be ≥ 1, got {args.pairs}")
    model, _ = load_any_model(args.model, args.tracking_uri)
    data = evaluation_data(args.data, split=args.split)
    if isinstance(data, PairSet):
        metrics = judge_pairs(model, data.images, data.issame)
    else:
        metrics = judge(model, data, pairs=args.pairs)
    print(strict_json({"data": args.data, "metrics": metrics}))
    return 0


def _campaign_config(args: argparse.Namespace):
    from .config import load_config, override

    config = load_config(args.config)
    assignments = parse_assignments(args.set, "--set")
    if args.tracking_uri:
        assignments["tracking.uri"] = args.tracking_uri
    return override(config, assignments) if assignments else config


def _run_phases(args: argparse.Namespace, phases: tuple[str, ...]) -> int:
    from .campaign import log_line, run_campaign

    config = _campaign_config(args)
    if args.resume and args.new:
        raise UsageError("--resume and --new exclude each other")
    _log_to_stdout()
    worker = bool(getattr(args, "worker", False))
    result = run_campaign(config, new=args.new, phases=phases, worker=worker, log=log_line)
    if "promote" in phases:
        print("\n" + result.summary())
    else:
        print("\n" + result.search.to_markdown())
        print(f"\nnext: marginsearch promote{' --config ' + args.config if args.config else ''}")
    return 0


def cmd_campaign(args: argparse.Namespace) -> int:
    return _run_phases(args, ("search", "promote"))


def cmd_search(args: argparse.Namespace) -> int:
    return _run_phases(args, ("search",))


def cmd_promote(args: argparse.Namespace) -> int:
    return _run_phases(args, ("promote",))


def cmd_ui(args: argparse.Namespace) -> int:
    from .campaign import ui_command
    from .tracking import resolve_tracking_uri

    config = _campaign_config(args)
    print(ui_command(resolve_tracking_uri(config.tracking.uri or None, config.workdir)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model
    from .tracking import load_any_model

    check_output_file(Path(args.out))
    model, meta = load_any_model(args.model, args.tracking_uri)  # every loader sets model.preprocess
    path = export_model(model, args.out, args.format, extra={"spec": meta.get("spec")})
    print(f"wrote {path}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from .data.split import split_identities

    kind, _, root = args.data.partition(":")
    if kind != "imagefolder" or not root:
        raise UsageError(f"--data expects imagefolder:<dir> (dir/<identity>/<image>), got {args.data!r}")
    summary = split_identities(root, args.out, test_fraction=args.test_fraction, folds=args.folds,
                               pairs_per_fold=args.pairs_per_fold, min_images=args.min_images,
                               max_images=args.max_images, seed=args.seed, overwrite=args.overwrite)
    print(strict_json(summary))
    toml = "\n".join(f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in summary["data"].items())
    print(f"\n[data]   # for a campaign config\n{toml}")   # a JSON string with ensure_ascii=False is a TOML one
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def _campaign_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", metavar="FILE.toml", help="campaign config (default: the demo campaign)")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field")
    s.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking server or store (overrides [tracking] uri)")
    s.add_argument("--resume", action="store_true", help="continue the newest unfinished campaign (the default)")
    s.add_argument("--new", action="store_true", help="start a new campaign even if the last one did not finish")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="marginsearch", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("losses", help="list the named losses; --plot draws their target-logit curves")
    s.add_argument("--markdown", action="store_true")
    s.add_argument("--plot", metavar="FILE.png")
    s.add_argument("names", nargs="*")

    s = sub.add_parser("train", help="train one named loss or spec under a budget")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--loss", help="a named loss (see `marginsearch losses`)")
    g.add_argument("--spec", metavar="FILE.json", help="a MarginSpec as JSON (MarginSpec.to_dict)")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="a spec field, named as `spec.flat()` prints them, e.g. target.m2_rad=0.45 or s=32")
    s.add_argument("--data", default="synthetic:demo", metavar="SOURCE")
    s.add_argument("--identities", metavar="NAMES_OR_FILE",
                   help="folder/RecordIO data: only these identities (comma-separated, or a file of one per line)")
    s.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="folder/RecordIO data: validate on the last fraction F of identities in name order (0.1)")
    s.add_argument("--val-identities", metavar="NAMES_OR_FILE", help="validate on these identities instead")
    s.add_argument("--val-data", default="", metavar="SOURCE", help="validate on this folder/RecordIO source instead")
    s.add_argument("--budget", default="proxy", help="proxy or full")
    s.add_argument("--budget-set", action="append", metavar="KEY=VALUE", help="override a budget field, e.g. epochs=2")
    s.add_argument("--aux", action="append", metavar="NAME:WEIGHT[:K=V,...]", help="auxiliary term, e.g. range:0.1")
    s.add_argument("--checkpoint", metavar="FILE.pt", help="save each epoch here and resume from it")
    s.add_argument("--out", default="out/train", metavar="DIR")
    s.add_argument("--quiet", action="store_true")

    s = sub.add_parser("evaluate", help="judge a model on a benchmark split, a folder, a .bin set or a pairs list")
    s.add_argument("--model", required=True, metavar="PATH_OR_MODELS_URI")
    s.add_argument("--data", default="synthetic:demo", metavar="SOURCE")
    s.add_argument("--split", default="test", help="val or test (synthetic sources)")
    s.add_argument("--pairs", type=int, default=3000,
                   help="10-fold accuracy on balanced pairs: min(pairs, available) genuine and as many impostor")
    s.add_argument("--tracking-uri", metavar="URI", help="MLflow store of a models:/ URI (default: ./mlflow.db)")

    s = sub.add_parser("export", help="export a trained model to TorchScript or ONNX")
    s.add_argument("--model", required=True, metavar="PATH_OR_MODELS_URI", help="a model.pt, or models:/NAME@champion")
    s.add_argument("--tracking-uri", metavar="URI", help="MLflow store of a models:/ URI (default: ./mlflow.db)")
    s.add_argument("--format", default="torchscript", choices=("torchscript", "onnx"))
    s.add_argument("--out", required=True, metavar="FILE")

    s = sub.add_parser("split", help="split an image folder by identity into train/ and an LFW-style pairs.txt")
    s.add_argument("--data", required=True, metavar="imagefolder:DIR", help="DIR/<identity>/<image>, left unchanged")
    s.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder (see --overwrite)")
    s.add_argument("--test-fraction", type=float, default=0.25, metavar="F", help="identities held out (0.25)")
    s.add_argument("--folds", type=int, default=10, help="identity-disjoint folds of pairs.txt (10)")
    s.add_argument("--pairs-per-fold", type=int, default=50, metavar="N",
                   help="genuine pairs per fold, and as many impostor pairs (50)")
    s.add_argument("--min-images", type=int, default=4, metavar="N", help="leave out identities with fewer (4)")
    s.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="keep the first N images of each identity (natural order of names)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier split in --out (only train/, test/, pairs_root/, pairs.txt, split.json)")

    for name, text in (("campaign", "search, then promote the best to full training and register the champion"),
                       ("search", "the search phase of a campaign"),
                       ("promote", "promote and register from the newest campaign's search")):
        s = sub.add_parser(name, help=text)
        _campaign_options(s)
        if name == "search":
            s.add_argument("--worker", action="store_true",
                           help="one of several processes on the same campaign, study and stores: run it N times "
                                "(one start first, the others once it has started); then `marginsearch promote`")
    s = sub.add_parser("ui", help="print the command that opens the MLflow UI on the campaign's store")
    s.add_argument("--config", metavar="FILE.toml")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    s.add_argument("--tracking-uri", metavar="URI")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "losses": cmd_losses, "train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "split": cmd_split,
    "campaign": cmd_campaign, "search": cmd_search, "promote": cmd_promote, "ui": cmd_ui,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `marginsearch` console script."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, its one line already printed): a code, also in process
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    install_from_environment()  # MARGINSEARCH_FAULT=<point>:<n>: the kill-and-resume tests' one seam
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM ends like Ctrl-C: trial retryable, runs KILLED
    try:
        return COMMANDS[args.command](args)
    except MarginsearchError as exc:  # bad input (SpecError, ConfigError, DataError, ...); anything else is a bug
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"marginsearch {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"marginsearch {args.command}: terminated (SIGTERM); run the same command again to resume",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"marginsearch {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `marginsearch losses | head`: the reader went away; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)

if __name__ == "__main__":
    sys.exit(main())
