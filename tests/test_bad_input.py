"""The bad-input corpus: each case through `trainers.cli.main` ends with exit code 2 and one line on stderr naming
the problem, runs nothing hidden in a file, and leaves what a finished campaign recorded unchanged."""
from __future__ import annotations

import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from marginsearch.trainers.cli import main
from tests.trainers.test_faults import ROOT, campaign_argv

TINY_TRAIN = ["--data", "synthetic:tiny", "--budget-set", "epochs=1", "--budget-set", "batch_size=32",
              "--budget-set", "eval_pairs=100", "--quiet"]


class RunsCommand:
    """A pickle that, if loaded without restriction, runs a shell command creating `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, a valid model bundle to evaluate with, and marker paths a hidden command would
    create."""
    from marginsearch.trainers.backbones import EmbeddingModel, build_backbone
    from marginsearch.trainers.data import write_record_file
    from marginsearch.trainers.export import save_bundle
    from marginsearch.trainers.images import Preprocess

    d = tmp_path_factory.mktemp("bad")
    f = {"dir": d, "bin_marker": d / "bin-ran", "pt_marker": d / "pt-ran", "model_marker": d / "model-ran"}
    (d / "broken.toml").write_text("[search\ntrials = 3\n")
    (d / "unknown_section.toml").write_text("[serach]\ntrials = 3\n")
    (d / "wrong_type.toml").write_text("[search]\ntrials = \"many\"\n")
    (d / "space.toml").write_text("name = 'x'\n[[param]\n")
    (d / "spec.json").write_text("{not json")
    (d / "spec_kind.json").write_text(json.dumps({"s": 64, "target": {"kind": "hyperbolic"}}))
    (d / "empty").mkdir()
    (d / "no_images" / "alice").mkdir(parents=True)
    (d / "no_images" / "alice" / "notes.txt").write_text("not an image")
    for who in ("alice", "bob", "carol", "dave"):
        (d / "corrupt" / who).mkdir(parents=True)
        (d / "corrupt" / who / "0.png").write_bytes(_png(len(who)))
    (d / "corrupt" / "bob" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    items = [(np.full((16, 16, 3), 10 * i, dtype=np.uint8), i // 2) for i in range(12)]
    for name in ("trunc", "short", "badidx", "magic"):
        (d / name).mkdir()
        write_record_file(d / name / "train.rec", items)
    rec = (d / "trunc" / "train.rec").read_bytes()
    (d / "trunc" / "train.rec").write_bytes(rec[: len(rec) - 10])  # no .idx: the reader scans into the cut record
    (d / "trunc" / "train.idx").unlink()
    (d / "short" / "train.rec").write_bytes(rec[: len(rec) // 2])    # the .idx points past the end
    (d / "badidx" / "train.idx").write_text("0\t0\nthis is not an index\n")
    rec = bytearray((d / "magic" / "train.rec").read_bytes())
    rec[0:4] = struct.pack("<I", 0xDEADBEEF)
    (d / "magic" / "train.rec").write_bytes(bytes(rec))
    (d / "evil.bin").write_bytes(pickle.dumps(RunsCommand(f["bin_marker"])))
    (d / "truncated.bin").write_bytes(pickle.dumps(([b"\xff\xd8" * 10] * 4, [True, False]))[:-20])
    torch.save({"spec": RunsCommand(f["pt_marker"])}, d / "evil.pt")
    torch.save({"format": "marginsearch-model/1", "state_dict": RunsCommand(f["model_marker"])}, d / "evil_model.pt")
    model = EmbeddingModel(build_backbone("tiny", 16, (32, 32)))
    f["model"] = save_bundle(d / "model.pt", model, "tiny", 16, Preprocess(32, 32))
    torch.save({"spec": {"s": 1}, "budget": {}}, d / "other.pt")
    torch.save([1, 2, 3], d / "list.pt")
    bundle = torch.load(f["model"], weights_only=True)
    torch.save({**bundle, "embedding_size": 32}, d / "wrong_shape.pt")       # weights of 16, described as 32
    (d / "fake.ts").write_bytes(b"PK\x03\x04" + b"not a zip archive" * 20)
    (d / "out_dir").mkdir()
    (d / "a_file").write_text("x")
    (d / "one_kind.bin").write_bytes(pickle.dumps(([_png(i) for i in range(4)], [True, True]), protocol=2))
    (d / "binary_pairs.txt").write_bytes(bytes(range(256)) * 4)
    for who in ("ann", "bo", "cy", "dee"):  # 4 identities × 7 grey 12×10 .pgm images: 2 train (14 images), 2 validate
        (d / "faces" / who).mkdir(parents=True)
        for j in range(7):
            Image.fromarray(np.full((12, 10), 30 * j, dtype=np.uint8)).save(d / "faces" / who / f"{j}.pgm")
        (d / "lfw" / who).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "lfw" / who / f"{who}_0001.png")
        Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(d / "lfw" / who / f"{who}_0002.png")
    (d / "one_kind_pairs.txt").write_text("1 1\nann\t1\t2\nbo\t1\t2\n")
    many = [(np.full((16, 16, 3), 3 * i, dtype=np.uint8), i // 2) for i in range(64)]
    for name, value in (("label_huge", 1e30), ("label_nan", float("nan")), ("label_half", 2.5)):
        (d / name).mkdir()
        write_record_file(d / name / "train.rec", many, header=False)
        rec = bytearray((d / name / "train.rec").read_bytes())
        rec[12:16] = struct.pack("<f", value)   # key 0: chunk head (8 bytes), flag (4), then its float label
        (d / name / "train.rec").write_bytes(bytes(rec))
    return f


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A finished tiny campaign; the bad inputs run against its working directory."""
    workdir = tmp_path_factory.mktemp("campaign")
    os.environ["MARGINSEARCH_CACHE"] = str(workdir / "cache")
    argv = _small(campaign_argv(workdir))
    assert main(argv) == 0
    return workdir, argv


def _small(argv: list[str]) -> list[str]:
    """The fault tests' campaign, cut to one sampled trial of one epoch and one full epoch."""
    return [*argv, "--set", "search.trials=1", "--set", "budget.proxy.epochs=1", "--set", "budget.full.epochs=1",
            "--set", "promote.baseline=false"]


def _snapshot(workdir: Path) -> dict:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    studies = {s.study_name: [(t.number, t.state.name, t.values, t.params) for t in
                              optuna.load_study(study_name=s.study_name, storage=storage).get_trials()]
               for s in optuna.get_all_study_summaries(storage)}
    versions = [(v.name, v.version, v.status) for v in client.search_model_versions()]
    aliases = {m.name: dict(m.aliases) for m in client.search_registered_models()}
    return {"runs": sorted((r.info.run_id, r.info.status, r.data.tags.get("marginsearch.phase")) for r in runs),
            "studies": studies, "versions": sorted(versions), "aliases": aliases}


# (argv or a function of the files fixture, substring the one-line message must hold)
CAMPAIGN_CASES = [
    (lambda f: ["--config", str(f["dir"] / "broken.toml")], "not valid TOML"),
    (lambda f: ["--config", str(f["dir"] / "missing.toml")], "missing.toml does not exist"),
    (lambda f: ["--config", str(f["dir"] / "unknown_section.toml")], "unknown section(s) serach"),
    (lambda f: ["--config", str(f["dir"] / "wrong_type.toml")], "search.trials: expected int, got 'many'"),
    (["--set", "search.trails=3"], "unknown key(s) trails"),
    (["--set", "searh.trials=3"], "unknown section(s) searh"),
    (["--set", "trials=3"], "--set expects section.key=value"),
    (["--set", "search.trials"], "--set expects key=value"),
    (["--set", "search.baselines=3"], "search.baselines: expected a list of strings"),
    (["--set", "search.baselines=[\"arcfcae\"]"], "unknown named loss(es) arcfcae"),
    (["--set", "search.population=1"], "search.population must be ≥ 2"),
    (["--set", "search.backend=dask"], "search.backend must be 'optuna' or 'ray'"),
    (["--set", "search.space=nope"], "unknown search space 'nope'"),
    (["--set", "search.space=/nonexistent/space.toml"], "unknown search space '/nonexistent/space.toml'"),
    (lambda f: ["--set", f"search.space={f['dir'] / 'space.toml'}"], "not valid TOML"),
    (["--set", "search.sampler=annealing"], "unknown sampler 'annealing'"),
    (["--set", "search.pruner=early"], "unknown pruner 'early'"),
    (["--set", "budget.proxy.epochs=0"], "epochs must be ≥ 1"),
    (["--set", "budget.huge.epochs=1"], "unknown budget(s) huge"),
    (["--set", "campaign.name=a/b"], "campaign.name may hold"),
    (["--set", "data.train=ftp:faces"], "unknown data source kind 'ftp'"),
    (["--set", "data.train=imagefolder:/nonexistent/faces"], "/nonexistent/faces does not exist"),
    (lambda f: ["--set", f"data.train=imagefolder:{f['dir'] / 'empty'}"], "no identity sub-folders"),
    (lambda f: ["--set", f"data.train=imagefolder:{f['dir'] / 'corrupt'}"], "bob/1.png: image does not decode"),
    (lambda f: ["--set", f"data.train=recordio:{f['dir'] / 'trunc' / 'train.rec'}"], "truncated record"),
    (["--set", "data.verification=[\"gopher:lfw\"]"], "unknown data source kind 'gopher'"),
    (["--set", "search.storage=nosuchdb://x"], "storage 'nosuchdb://x'"),
    (lambda f: ["--tracking-uri", f"http://127.0.0.1:{_closed_port()}"], "is unreachable"),
    (["--set", "budget.proxy.epochs=2.5"], "epochs must be an integer, got 2.5"),
    (["--set", "budget.proxy.lr=inf"], "lr must be a finite number"),
    (["--set", "budget.proxy.reward_metric=foo"], "reward_metric 'foo' is not a metric of the judge"),
    (["--set", "budget.proxy.backbone=nope"], "budget.proxy.backbone: unknown backbone 'nope'"),
    (["--set", "search.trials=0", "--set", "search.baselines=[]"], "the search is empty"),
    (["--set", "data.verification=[\"bin:/nonexistent/lfw.bin\"]"], "/nonexistent/lfw.bin does not exist"),
    (["--tracking-uri", "weird://host/x"], "unknown scheme 'weird'"),
    (lambda f: ["--set", f"data.verification=[\"bin:{f['dir'] / 'one_kind.bin'}\"]"],
     "one_kind: all 2 pairs are genuine"),
    (lambda f: ["--set", f"data.test=pairs:{f['dir'] / 'one_kind_pairs.txt'}@{f['dir'] / 'lfw'}"],
     "one_kind_pairs: all 2 pairs are genuine"),
    (lambda f: ["--set", f"data.verification=[\"imagefolder:{f['dir'] / 'faces'}\"]"], "is not a pair list"),
    (lambda f: ["--set", f"data.train=imagefolder:{f['dir'] / 'faces'}", "--set", "budget.proxy.batch_size=64"],
     "budget.proxy.batch_size: 64 is more than the 14 training images"),
    (lambda f: ["--set", f"data.train=imagefolder:{f['dir'] / 'faces'}", "--set", "data.val_identities=[\"zed\"]"],
     "data.val_identities: 1 identity not in"),
    (lambda f: ["--set", f"data.train=imagefolder:{f['dir'] / 'faces'}", "--set", "data.identities=\"/no/ids.txt\""],
     "data.identities: identity list file /no/ids.txt does not exist"),
    (["--set", "data.val_fraction=0"], "data.val_fraction must be in (0, 1)"),
    (["--set", "data.val_identities=[\"a\"]"], "apply to imagefolder: and recordio: sources"),
    (["--set", "budget.proxy.image_size=[64, 48, 3]"], "image_size must be an integer or [height, width]"),
    (["--set", "budget.proxy.image_fit=squash"], "image_fit must be one of resize, crop"),
    (["--set", "promote.metric=acc"], "promote.metric: 'acc' is not a metric of the judge"),
    (lambda f: ["--set", f"data.train=imagefolder:{f['dir'] / 'faces'}", "--set", "budget.proxy.batch_size=4",
                "--set", "budget.proxy.reward_metric=hard_sample_tar@far=1e-3"], "needs hard-sample flags"),
    (["--set", "budget.proxy.lr=abc"], "budget.proxy]: budget: lr must be a finite number, got 'abc'"),
    (["--set", "budget.proxy.batch_size=32.5"], "batch_size must be an integer, got 32.5"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--resume", "--new"], "--resume and --new exclude each other"),
]

OTHER_CASES = [
    (["train", "--loss", "arcface", "--set", "target.m2_rad=4"], "angular margin must be in (−π, π) radians, got 4"),
    (["train", "--loss", "arcfcae"], "arcfcae"),
    (["train", "--loss", "arcface", "--set", "q=1"], "q"),
    (lambda f: ["train", "--spec", str(f["dir"] / "spec.json")], "not JSON"),
    (lambda f: ["train", "--spec", str(f["dir"] / "spec_kind.json")], "unknown kind 'hyperbolic'"),
    (lambda f: ["train", "--loss", "arcface", "--data", f"imagefolder:{f['dir'] / 'no_images'}"],
     "identity folder holds no"),
    (lambda f: ["train", "--loss", "arcface", "--data", f"recordio:{f['dir'] / 'badidx' / 'train.rec'}"],
     "line 2 is not 'key<TAB>offset'"),
    (lambda f: ["train", "--loss", "arcface", "--data", f"recordio:{f['dir'] / 'magic' / 'train.rec'}"], "bad magic"),
    (lambda f: ["train", "--loss", "arcface", "--data", f"recordio:{f['dir'] / 'short' / 'train.rec'}"],
     "past the end of"),
    (lambda f: ["train", "--loss", "arcface", *TINY_TRAIN, "--checkpoint", str(f["dir"] / "evil.pt"),
                "--out", str(f["dir"] / "out")], "evil.pt: not a readable checkpoint"),
    (lambda f: ["train", "--loss", "arcface", *TINY_TRAIN, "--checkpoint", str(f["dir"] / "other.pt"),
                "--out", str(f["dir"] / "out")], "checkpoint belongs to another spec or budget"),
    (lambda f: ["evaluate", "--model", str(f["model"]), "--data", f"bin:{f['dir'] / 'evil.bin'}"], "evil.bin"),
    (lambda f: ["evaluate", "--model", str(f["model"]), "--data", f"bin:{f['dir'] / 'truncated.bin'}"],
     "truncated.bin"),
    (lambda f: ["evaluate", "--model", str(f["dir"] / "evil_model.pt"), "--data", "synthetic:tiny"],
     "neither a marginsearch model bundle nor a TorchScript export"),
    (lambda f: ["evaluate", "--model", "models:/marginsearch-demo@champion", "--data", "synthetic:tiny",
                "--tracking-uri", f"http://127.0.0.1:{_closed_port()}"], "is unreachable"),
    (lambda f: ["evaluate", "--model", str(f["model"]), "--data", f"pairs:{f['dir'] / 'pairs.txt'}@{f['dir']}"],
     "pairs.txt"),
    (["export", "--model", "/nonexistent/model.pt", "--out", "m.ts"], "model /nonexistent/model.pt does not exist"),
    (["train", "--loss", "arcface", *TINY_TRAIN[:2], "--budget-set", "epochs=abc"], "epochs must be an integer"),
    (["train", "--loss", "arcface", *TINY_TRAIN[:2], "--budget-set", "seed=-1"], "seed must be ≥ 0, got -1"),
    (["train", "--loss", "arcface", *TINY_TRAIN[:2], "--budget-set", "eval_pairs=-5"], "eval_pairs must be ≥ 1"),
    (lambda f: ["train", "--loss", "arcface", "--data", f"recordio:{f['dir'] / 'label_huge' / 'train.rec'}"],
     "label_huge/train.rec key 0: label 1000000015047466219876688855040 is outside the 32 identities"),
    (lambda f: ["train", "--loss", "arcface", "--data", f"recordio:{f['dir'] / 'label_nan' / 'train.rec'}"],
     "label_nan/train.rec key 0: label nan is not an identity index"),
    (lambda f: ["train", "--loss", "arcface", "--data", f"recordio:{f['dir'] / 'label_half' / 'train.rec'}"],
     "label_half/train.rec key 0: label 2.5 is not an identity index"),
    (lambda f: ["train", "--loss", "arcface", *TINY_TRAIN, "--checkpoint", str(f["dir"] / "list.pt"),
                "--out", str(f["dir"] / "out")], "list.pt: not a marginsearch checkpoint (it holds a list)"),
    (lambda f: ["train", "--loss", "arcface", *TINY_TRAIN, "--out", str(f["dir"] / "a_file" / "x")],
     "a_file is a file, not a folder"),
    (lambda f: ["evaluate", "--model", str(f["dir"] / "wrong_shape.pt"), "--data", "synthetic:tiny"],
     "wrong_shape.pt: the bundle's weights do not fit its description (size mismatch"),
    (lambda f: ["evaluate", "--model", str(f["dir"] / "fake.ts"), "--data", "synthetic:tiny"],
     "fake.ts: neither a marginsearch model bundle nor a TorchScript export"),
    (lambda f: ["evaluate", "--model", str(f["model"]), "--data", f"bin:{f['dir'] / 'one_kind.bin'}"],
     "one_kind: all 2 pairs are genuine (same-person); verification needs both kinds"),
    (lambda f: ["evaluate", "--model", str(f["model"]), "--data", "synthetic:tiny", "--pairs", "-5"],
     "--pairs must be ≥ 1, got -5"),
    (lambda f: ["evaluate", "--model", str(f["model"]), "--data", f"pairs:{f['dir'] / 'binary_pairs.txt'}@{f['dir']}"],
     "binary_pairs.txt: not a text pairs list"),
    (["evaluate", "--model", "models:/x@champion", "--data", "synthetic:tiny", "--tracking-uri", "weird://host/x"],
     "unknown scheme 'weird'"),
    (lambda f: ["export", "--model", str(f["model"]), "--out", str(f["dir"] / "out_dir")], "out_dir is a folder"),
    (lambda f: ["export", "--model", str(f["model"]), "--out", str(f["dir"] / "a_file" / "m.pt")],
     "a_file is a file, not a folder"),
]


def _argv(case, files) -> list[str]:
    return case(files) if callable(case) else list(case)


def _one_line(capsys, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err and "error" in err


@pytest.mark.parametrize("case, message", CAMPAIGN_CASES, ids=[m for _, m in CAMPAIGN_CASES])
def test_bad_campaign_input_exits_2_and_leaves_the_recorded_campaign_unchanged(case, message, files, recorded, capsys):
    workdir, argv = recorded
    before = _snapshot(workdir)
    capsys.readouterr()
    assert main([*argv, *_argv(case, files)]) == 2
    _one_line(capsys, message)
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("case, message", OTHER_CASES, ids=[m for _, m in OTHER_CASES])
def test_bad_input_exits_2_with_one_line_naming_the_problem(case, message, files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(_argv(case, files)) == 2
    _one_line(capsys, message)
    assert not any(files[k].exists() for k in ("bin_marker", "pt_marker", "model_marker"))  # nothing hidden ran


@pytest.mark.parametrize("case, message", [
    (lambda f: ["evaluate", "--model", str(f["model"]), "--data", f"bin:{f['dir'] / 'evil.bin'}"], "evil.bin"),
    (lambda f: ["train", "--loss", "arcface", *TINY_TRAIN, "--checkpoint", str(f["dir"] / "evil.pt")], "evil.pt"),
    (lambda f: ["campaign", "--tracking-uri", f"http://127.0.0.1:{_closed_port()}"], "is unreachable"),
    (lambda f: ["campaign", "--config", str(f["dir"] / "broken.toml")], "not valid TOML"),
], ids=["evil-bin", "evil-checkpoint", "tracking-uri", "broken-toml"])
def test_in_a_fresh_process_stderr_is_the_one_line_and_no_traceback(case, message, files, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MARGINSEARCH_CACHE": str(tmp_path / "cache"),
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "marginsearch.trainers.cli", *_argv(case, files)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not any(files[k].exists() for k in ("bin_marker", "pt_marker", "model_marker"))


def test_the_corpus_holds_at_least_30_cases():
    assert len(CAMPAIGN_CASES) + len(OTHER_CASES) >= 30
