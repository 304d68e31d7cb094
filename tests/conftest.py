"""Test-wide set-up: offline defaults for MLflow and Ray (the same ones every entry point sets) before any test
imports them."""
from marginsearch.searchspace.environment import set_offline_defaults

set_offline_defaults()
