"""The contract layer: what every other part of posweep builds on, torch-free.

    spec         the sweep spec's schema (pydantic models, pure: no file is read to validate one)
    spec_file    YAML text/file -> SweepSpec, and SpecError naming the file, line and field
    trials       one trial's resolved config (TrialSpec) and its key
    task         what an executor carries to a trial and brings back (TrialTask, TrialResult)
    methods      the method catalogue: hyperparameters, needs, and where each method's torch code lives
    runs         run statuses (RunStatus)
    tracking     the MLflow client (the only module that talks to MLflow)
    lifecycle    a trial's run from lock to close: exactly once per key, failures recorded, lost trials
    registry     the name -> thing registry every plugin table uses (methods, executors, rank launchers)
    errors       reading exception chains
    net          free ports for the servers and process groups a sweep starts

Layers (import-linter enforces them, pyproject.toml): driver (orchestrator.cli, pipeline, ...) > executors
(cluster) > trial body (trainers, the only torch user) > this contract > analysis (pandas only).
"""
