"""The core: data and the protocols a trial body is handed, torch-free, no MLflow, no I/O. Every other layer builds
on it.

    spec         the sweep spec's schema (pydantic models; validating one reads no file)
    spec_file    YAML text or file -> SweepSpec, and SpecError naming the file, line and field
    trials       one trial's resolved config (TrialSpec) and its key
    task         what an executor carries to a trial and brings back (TrialTask, TrialResult)
    outcome      what a trial body returns (TrialOutcome) and what it is handed (TrialLog, RungJudge, DeviceUsage)
    methods      the method catalogue: hyperparameters, needs, where each method's torch code lives; StageKind
    runs         run states and which count as done, draws or outcomes; a run read back (TrialRecord)
    rungs        early stopping's rule: where rungs fall, their signatures, ASHA's cutoff
    tags         the names of what a run records
    registry     the name -> thing registry every plugin table uses
    errors       reading exception chains
"""
