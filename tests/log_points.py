"""A stand-in stage for the concurrency test: logs N points of the metric `x` (steps 0..N-1) to a new run, one
request per point, as a stage's rank 0 logs its epochs. Usage: log_points.py URI EXPERIMENT RUN_NAME N"""

import sys

import mlflow

uri, experiment, name, points = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mlflow.set_tracking_uri(uri)
experiment_id = mlflow.MlflowClient().get_experiment_by_name(experiment).experiment_id
with mlflow.start_run(experiment_id=experiment_id, run_name=name):
    for step in range(points):
        mlflow.log_metric("x", float(step), step=step)
print(f"{name}: logged {points} points", flush=True)
