# Two commands for a newcomer: `make demo` (the main job) and `make test` (the test suite).
# Each builds its own virtual environment in .venv from scratch if it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv test check lint demo losses figures clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q

# The quick loop while developing: lint, types, and every test not marked slow (a few minutes).
check: lint
	MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# The main job: the demo campaign on the embedded defaults (synthetic demo data, MLflow and Optuna
# SQLite stores in out/demo). Running it again resumes an unfinished campaign or adds the next one.
demo: venv
	mkdir -p out/demo
	cd out/demo && MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 ../../$(BIN)/marginsearch campaign

losses: venv
	$(BIN)/python -m marginsearch.losses

# The README's pictures, regenerated from code (commit the result).
CURVES := normface cosface arcface combined sphereface mv-arc curricularface search-softmax adaface magface
figures: venv
	$(BIN)/python -m marginsearch.losses --plot docs/target_logits.png $(CURVES) > /dev/null

clean:
	rm -rf $(VENV) .pytest_cache out
