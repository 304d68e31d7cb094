"""marginsearch.trainers: data, backbones, training, judging, MLflow tracking, campaigns and the CLI."""
from marginsearch.searchspace.environment import set_offline_defaults

set_offline_defaults()  # before mlflow or ray is imported by any trainers module
