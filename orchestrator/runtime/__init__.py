"""The runtime: a trial's run from lock to close and the MLflow adapter that does every write of it.

    lifecycle    run_trial: lock, exactly once per key, the body called, its outcome or failure recorded, cost
    judge        ASHA's decision at a rung, from the values the stage's other trials logged (the RungJudge)
    kept_models  which trained models outlive their trial, and their Model Registry entries
    store        tracking URIs, clients, locks, reachability (the tracking store itself)
    sweep_runs   a sweep's experiment as the driver reads and writes it
    trial_log    a trial's run as its process writes it (TrialLogger), and its system metrics
    server       the MLflow server a parallel sweep starts and supervises
    rung_record  a stage's rung values as the driver keeps them, so a decision reads few runs
    node_files   what a trial needs from other trials, on a node without the driver's disk

Only this package imports MLflow (import-linter, pyproject.toml); trainers/ imports nothing from it.
"""

import os

# MLflow 3's usage telemetry, started when mlflow is imported (so set before any import of it, here): a sweep
# runs offline or on a cluster's private network, and under many threads its session variable raced a request
# (`log-batch failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'`: 1 of 974 trials of benchmarks/bench_scale.py
# FAILED so). MLFLOW_DISABLE_TELEMETRY=false in the environment turns it back on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
