"""The Ray backend's pieces: StudySearcher on Ray's public Searcher interface (states, epochs, labels, specs, rows,
checkpoints) driven without a cluster; token authentication refusals as one-line SearchErrors, faked and on a real
token-protected `ray start --head`."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pytest

ray = pytest.importorskip("ray")

from ray.exceptions import AuthenticationError  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from marginsearch.searchspace import (  # noqa: E402
    RewardGuidedSampler,
    load,
    ray_backend,  # noqa: E402
    run_search,
)
from marginsearch.searchspace._study import enqueue_baselines  # noqa: E402
from marginsearch.searchspace.ray_backend import (  # noqa: E402
    AUTH_HINT,
    METRIC,
    StudySearcher,
    connect_ray,
    ray_resources,
)
from marginsearch.searchspace.results import FAIL_REASON, SPEC  # noqa: E402
from marginsearch.searchspace.search import RayOptions, SearchError  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.ERROR)

MARGIN = load("margin")


def _searcher(baselines=(), rows=None):
    study = optuna.create_study(direction="maximize", sampler=RewardGuidedSampler(space=MARGIN, seed=0, population=4))
    enqueue_baselines(study, MARGIN, list(baselines))
    return StudySearcher(study, MARGIN, [rows.append] if rows is not None else []), study


def _result(reward, epoch, final, **extra):
    return {METRIC: reward, "epoch": epoch, "final": final, **extra}


def test_the_searcher_is_a_plain_public_searcher():
    """Only Ray's public Searcher base: no OptunaSearch (whose private attributes pinned ray < 2.70)."""
    assert StudySearcher.__mro__[1:] == (Searcher, object)
    searcher, _ = _searcher()
    assert (searcher.metric, searcher.mode) == ("reward", "max")


def test_the_searcher_tells_every_state_with_epochs_labels_specs_and_rows():
    rows = []
    searcher, study = _searcher(["cosface"], rows)
    configs = {tid: searcher.suggest(tid) for tid in "abcd"}
    assert searcher.suggest("a") == configs["a"]  # asked once per Tune trial
    # a: completes after two epochs; b: a scheduler stops it on its second report; c: TrialFailed; d: the worker raised
    for tid in "abc":
        searcher.on_trial_result(tid, _result(0.1, 1, False))
    searcher.on_trial_result("a", _result(0.3, 2, False))
    searcher.on_trial_result("a", _result(0.3, 2, True))  # the final report is not an epoch
    searcher.on_trial_complete("a", _result(0.3, 2, True))
    searcher.on_trial_complete("b", _result(0.2, 2, False))
    searcher.on_trial_complete("c", _result(float("-inf"), 1, True, **{FAIL_REASON: "diverged at epoch 1"}))
    searcher.on_trial_result("d", _result(0.1, 1, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same result in both notifications is one report, no Optuna warning
        searcher.on_trial_complete("d", _result(0.1, 1, False), error=True)
    searcher.on_trial_complete("a", _result(0.9, 3, True))   # a repeated completion changes nothing
    searcher.on_trial_result("a", _result(0.9, 3, False))    # nor a late result
    searcher.on_trial_complete("unknown", _result(0.9, 1, True))
    assert [(r.number, r.state) for r in rows] == [(0, "COMPLETE"), (1, "PRUNED"), (2, "FAIL"), (3, "FAIL")]
    assert [r.params for r in rows] == [configs[tid] for tid in "abcd"]  # the config Tune ran is the trial's params
    a, b, c, d = rows
    assert a.baseline == "cosface" and a.named == "cosface" and a.reward == 0.3 and a.intermediate == {1: 0.1, 2: 0.3}
    assert b.baseline is None and b.reward is None and b.intermediate == {1: 0.1, 2: 0.2}
    assert b.reason == "pruned after epoch 2"
    assert c.reason == "diverged at epoch 1" and d.reason == "the trial raised an error (see the Ray log)"
    assert d.intermediate == {1: 0.1}
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    for t, tid in zip(trials, "abcd"):  # each trial's spec stored once, as the row reads it back
        assert t.user_attrs[SPEC] == MARGIN.to_spec(configs[tid]).to_dict()


def test_a_checkpoint_resumes_the_trials_in_a_new_searcher(tmp_path):
    rows = []
    searcher, study = _searcher(rows=rows)
    config = searcher.suggest("t1")
    searcher.suggest("t2")
    searcher.on_trial_result("t1", _result(0.4, 1, False))
    searcher.on_trial_complete("t2", _result(0.5, 1, True))
    path = tmp_path / "searcher-state.pkl"
    searcher.save(str(path))
    assert json.loads(path.read_text()) == {"study": study.study_name, "numbers": {"t1": 0, "t2": 1}, "done": ["t2"]}
    again = StudySearcher(study, MARGIN, [rows.append])
    again.restore(str(path))
    assert again.suggest("t1") == config  # the same Optuna trial, not a new one
    again.on_trial_result("t1", _result(0.4, 1, False))  # a restarted trial's epoch 1 again: recorded once
    again.on_trial_result("t1", _result(0.6, 2, False))
    again.on_trial_complete("t1", _result(0.7, 2, True))
    again.on_trial_complete("t2", _result(0.1, 1, True))  # finished before the checkpoint
    assert [(r.number, r.state, r.reward, r.intermediate) for r in rows] == [
        (1, "COMPLETE", 0.5, {}), (0, "COMPLETE", 0.7, {1: 0.4, 2: 0.6})]
    other, _ = _searcher()
    with pytest.raises(SearchError, match="is of study"):
        other.restore(str(path))


# ---------------------------------------------------------------------------- token authentication, faked
def _refused_connection(*args, **kwargs):
    """What ray.init(address=...) raises when the GCS refuses the token (ray 2.60): the AuthenticationError as text."""
    inner = RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                         "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is "
                         "missing or incorrect.")
    try:
        raise inner
    except RuntimeError as exc:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc


def _no_token(*args, **kwargs):
    raise AuthenticationError("Token authentication is enabled but no authentication token was found")


@pytest.mark.parametrize("init", [_refused_connection, _no_token])
def test_a_refused_token_is_one_line_naming_what_to_set(monkeypatch, init):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(SearchError) as err:
        run_search("margin", lambda spec, report: 0.0, backend="ray", n_trials=1,
                   ray=RayOptions(address="10.0.0.1:6379"))
    message = str(err.value)
    assert "\n" not in message and err.value.__cause__ is None
    assert message == f"the Ray cluster at 10.0.0.1:6379 uses token authentication and refused this client: {AUTH_HINT}"
    assert "RAY_AUTH_MODE=token" in message and "RAY_AUTH_TOKEN=" in message and "RAY_AUTH_TOKEN_PATH=" in message


def test_other_connection_failures_are_one_line_and_other_errors_pass(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.2:6379\nsee the log")

    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(SearchError, match=r"^cannot connect to Ray at 10.0.0.2:6379: Failed to connect .*6379$"):
        connect_ray("10.0.0.2:6379")

    def bug(*args, **kwargs):
        raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided.")

    monkeypatch.setattr(ray, "init", bug)
    with pytest.raises(ValueError):
        connect_ray("10.0.0.2:6379")


def test_ray_resources_names_what_to_set_when_the_token_is_refused(monkeypatch):
    monkeypatch.setattr(ray_backend.ray, "cluster_resources", _no_token)
    with pytest.raises(SearchError, match="^the Ray cluster uses token authentication .*RAY_AUTH_MODE=token"):
        ray_resources({"cpu": 1}, None)


# ---------------------------------------------------------------------------- token authentication, a real cluster
_CLIENT = """
import sys
import ray
from marginsearch.searchspace.ray_backend import connect_ray, ray_resources
from marginsearch.searchspace.search import SearchError
try:
    connect_ray(sys.argv[1])
    print("RESOURCES", ray_resources({"cpu": 1}, None))
    ray.shutdown()
except SearchError as exc:
    print("SEARCHERROR", exc)
    sys.exit(2)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **extra}  # no ~/.ray/auth_token of the user's


@pytest.fixture
def token_cluster():
    """`ray start --head --block` with token authentication, in its own session and temp dir (so no other Ray of this
    machine is touched or found); its whole process group is ended afterwards."""
    token, port = secrets.token_hex(32), _free_port()
    # a short path under /tmp: Ray's socket paths have a length limit
    with tempfile.TemporaryDirectory(prefix="msray-", dir="/tmp", ignore_cleanup_errors=True) as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        env = _clean_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}/ray"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not Path(tmp, "ray", "ray_current_cluster").exists():
                assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
                time.sleep(0.5)
            yield f"127.0.0.1:{port}", token, home
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(head.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    head.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    continue
                time.sleep(1)  # let the group's other processes go too before the SIGKILL sweep


def _client(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CLIENT, address], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_a_token_cluster_refuses_in_one_line_and_accepts_with_the_token(token_cluster):
    address, token, home = token_cluster
    refused = _client(address, _clean_env(home, RAY_gcs_server_port_wait_time_s="2"))  # 2 connect tries, not 20
    assert refused.returncode == 2, refused.stdout + refused.stderr[-2000:]
    line = [ln for ln in refused.stdout.splitlines() if ln.startswith("SEARCHERROR")]
    assert line == [f"SEARCHERROR the Ray cluster at {address} uses token authentication and refused this client: "
                    f"{AUTH_HINT}"]
    accepted = _client(address, _clean_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr[-2000:]
    assert "RESOURCES ({'cpu': 1.0, 'gpu': 0.0}, 1)" in accepted.stdout
