"""The wheel as a user installs it: package data inside, one `marginsearch` namespace, a campaign from an empty
directory.

The wheel is built from this checkout without build isolation (no download) and installed with
`pip install --no-deps --target`; its dependencies come from the running environment's
site-packages, added as a plain path (so the editable install's finder there stays off), and
Python runs with -S, so nothing of the checkout is importable but through the wheel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((work / "dist").glob("marginsearch-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(work / "site"),
                    str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MARGINSEARCH_CACHE")}
    env["PYTHONPATH"] = os.pathsep.join([str(work / "site"), sysconfig.get_paths()["purelib"]])
    env["MARGINSEARCH_CACHE"] = str(work / "cache")
    return {"site": str(work / "site"), "wheel": str(wheel), **{f"env:{k}": v for k, v in env.items()}}


def _env(installed: dict[str, str]) -> dict[str, str]:
    return {k[4:]: v for k, v in installed.items() if k.startswith("env:")}


def _python(installed: dict[str, str], cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=_env(installed), capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_holds_the_spaces_and_the_console_script(installed):
    site = Path(installed["site"])
    assert sorted(p.name for p in (site / "marginsearch/searchspace/spaces").glob("*.toml")) == [
        "am-lfs.toml", "kappa.toml", "margin.toml", "mv.toml", "search-softmax.toml", "unified.toml"]
    assert not (site / "losses").exists() and not (site / "trainers").exists()  # no generic top-level names
    script = site / "bin" / "marginsearch"
    assert script.is_file() and "marginsearch.trainers.cli" in script.read_text()


def test_a_users_own_losses_py_does_not_shadow_the_package(installed, tmp_path):
    (tmp_path / "losses.py").write_text("raise ImportError('this is the user\\'s losses.py')\n")
    (tmp_path / "searchspace.py").write_text("raise ImportError('this is the user\\'s searchspace.py')\n")
    code = ("import marginsearch.searchspace as s, marginsearch.losses as l; "
            "space = s.load('margin'); print(l.__file__); print(sorted(space.baselines()))")
    done = _python(installed, tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    origin, baselines = done.stdout.splitlines()
    assert origin.startswith(installed["site"])  # the wheel's copy, not the checkout's
    assert all(name in baselines for name in ("'arcface'", "'cosface'", "'normface'"))  # the space file was found


def test_a_tiny_campaign_runs_from_an_empty_directory(installed, tmp_path):
    sets = {"data.train": "synthetic:tiny", "search.trials": 1, "search.baselines": ["cosface"],
            "budget.proxy.epochs": 1, "budget.proxy.identities": 0, "budget.proxy.batch_size": 32,
            "budget.proxy.eval_pairs": 200, "budget.proxy.reward_metric": "auc", "budget.full.epochs": 1,
            "budget.full.batch_size": 32, "budget.full.eval_pairs": 200, "budget.full.reward_metric": "auc",
            "promote.top_k": 1, "promote.metric": "auc"}
    argv = [arg for k, v in sets.items() for arg in ("--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
    done = _python(installed, tmp_path, "-m", "marginsearch.trainers.cli", "campaign", *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "champion: marginsearch-demo v" in done.stdout
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "optuna.db").is_file()
