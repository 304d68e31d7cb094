"""What a person sees: strict JSON from the CLI, a closed pipe ends quietly, log lines between progress bars."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from marginsearch.trainers.cli import strict_json


def test_strict_json_has_no_nan_or_infinity():
    text = strict_json({"reward": math.nan, "metrics": {"tar@far=1e-6": math.inf, "auc": 0.5},
                        "hist": [1.0, -math.inf]})
    data = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert data == {"reward": None, "metrics": {"tar@far=1e-6": None, "auc": 0.5}, "hist": [1.0, None]}


def test_a_closed_pipe_ends_without_a_traceback():
    done = subprocess.run(f"{sys.executable} -m marginsearch.trainers.cli losses | head -n 1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "normface"
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
