"""The runtime: a trial's run from lock to close and the MLflow adapter that does every write of it.

    lifecycle    run_trial: lock, exactly once per key, the body called, its outcome or failure recorded, cost
    judge        ASHA's decision at a rung, from the values the stage's other trials logged (the RungJudge)
    kept_models  which trained models outlive their trial, and their Model Registry entries
    store        tracking URIs, clients, locks, reachability (the tracking store itself)
    sweep_runs   a sweep's experiment as the driver reads and writes it
    trial_log    a trial's run as its process writes it (TrialLogger), and its system metrics
    server       the MLflow server a parallel sweep starts and supervises

Only this package imports MLflow (import-linter, pyproject.toml); trainers/ imports nothing from it.
"""
