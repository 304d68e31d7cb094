"""The one place that sets marginsearch's process environment: offline defaults, before mlflow or ray is imported.

MLflow's telemetry and Ray's usage stats try the network on import; this project runs on machines
that may be offline. Each variable is only a default (`os.environ.setdefault`): a user's own
setting wins. `marginsearch.searchspace` and `marginsearch.trainers` call it on import, so every
entry point (the CLI, campaigns, studies, bench scripts, Ray workers) gets it.
"""
from __future__ import annotations

import os

__all__ = ["OFFLINE_DEFAULTS", "set_offline_defaults"]

OFFLINE_DEFAULTS: dict[str, str] = {
    "MLFLOW_DISABLE_TELEMETRY": "true",            # MLflow 3 telemetry
    "RAY_USAGE_STATS_ENABLED": "0",                # Ray usage stats
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no progress bars from artifact uploads in logs
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # no "View run ... at" line per ended run on stdout
}


def set_offline_defaults() -> None:
    """Set each of OFFLINE_DEFAULTS unless the environment already has it."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
