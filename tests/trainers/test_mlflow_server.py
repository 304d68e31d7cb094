"""A campaign against an MLflow tracking server (the README's "Outgrowing one machine"), on 127.0.0.1 only.

`mlflow server` with a SQLite backend runs in a subprocess on a free loopback port; the campaign
gets its URI by configuration alone, logs trials, promotes, registers, and the champion loads back
from the server. The server is stopped at the end.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from marginsearch.trainers.campaign import run_campaign
from marginsearch.trainers.config import load_config, override

pytestmark = pytest.mark.slow

TINY = {
    "data.train": "synthetic:tiny", "search.trials": 1, "search.baselines": ["cosface"],
    "budget.proxy.epochs": 1, "budget.proxy.identities": 0, "budget.proxy.batch_size": 32,
    "budget.proxy.eval_pairs": 200, "budget.proxy.reward_metric": "auc", "budget.full.epochs": 1,
    "budget.full.batch_size": 32, "budget.full.eval_pairs": 200, "budget.full.reward_metric": "auc",
    "promote.top_k": 1, "promote.metric": "auc",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # wait for the server to answer (a bounded wait for readiness, not a timing)
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_a_campaign_runs_against_an_mlflow_server(server, tmp_path, monkeypatch):
    import mlflow
    import torch

    monkeypatch.setenv("MARGINSEARCH_CACHE", str(tmp_path / "cache"))
    config = override(load_config(), {**TINY, "campaign.workdir": str(tmp_path / "w"), "tracking.uri": server})
    result = run_campaign(config, log=lambda line: None)
    assert result.tracking_uri == server and result.champion_version is not None
    assert not (tmp_path / "w" / "mlflow.db").exists()  # everything went to the server
    client = mlflow.MlflowClient(server, registry_uri=server)
    version = client.get_model_version(result.model_name, result.champion_version)
    assert version.description and len(version.tags) < 20
    mlflow.set_tracking_uri(server)
    mlflow.set_registry_uri(server)
    model = mlflow.pytorch.load_model(f"models:/{result.model_name}@champion")
    assert model(torch.zeros(2, 3, 32, 32)).shape[0] == 2
