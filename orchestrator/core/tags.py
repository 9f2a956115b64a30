"""The names a run's tags and artifacts carry: what posweep records about a sweep in its tracking store (the MLflow
adapter, orchestrator.runtime, writes and reads them; a trial body names what it wants said through its log)."""

SAMPLES_ARTIFACT = "samples.json"
TAG_SWEEP = "posweep.sweep"
TAG_KIND = "posweep.run_kind"        # "stage" | "trial"
TAG_STAGE = "posweep.stage"
TAG_METHOD = "posweep.method"
TAG_KEY = "posweep.trial_key"
TAG_INIT_KEY = "posweep.init_trial_key"
TAG_CHECKPOINT = "posweep.checkpoint"
TAG_SAMPLES = "posweep.samples"
TAG_SAMPLES_SHA = "posweep.samples_sha256"  # content hash of samples.json, checked by the trials that read it
# Without a shared workdir (executor.shared_workdir: false) what later trials read from a trial is in its artifacts:
# the checkpoint folder (its ready marker lists every file's sha256) and samples.json as written (TAG_SAMPLES_SHA)
CHECKPOINT_ARTIFACT = "checkpoint"
SAMPLES_FILE_ARTIFACT = "posweep/samples.json"
TAG_CHECKPOINT_ARTIFACT = "posweep.checkpoint_artifact"  # set once CHECKPOINT_ARTIFACT is whole in the store
TAG_INIT_FROM = "posweep.init_from"  # where a trial on a node without the workdir got its start checkpoint
TAG_NODE = "posweep.node"            # the machine a trial ran on (POSWEEP_NODE_NAME, else the host name)
# cache entries passed between nodes (orchestrator.core.outcome.SharedFiles): artifacts under SHARED_ARTIFACTS/<name>,
# tagged TAG_SHARED<name> = sha256 once whole
SHARED_ARTIFACTS = "shared"
TAG_SHARED = "posweep.shared/"
TAG_REF_CACHE_SHA = "posweep.ref_cache_sha256"  # of the reference-log-prob cache file the trial read or wrote
TAG_FAILURE = "posweep.failure"
TAG_REF_CACHE = "posweep.ref_cache"  # hit | miss: whether the trial computed its reference log-probs
TAG_STAGE_KEY = "posweep.stage_key"
TAG_RESUMED = "posweep.resumed_from_step"
TAG_DEVICE = "posweep.device"        # e.g. "cpu" or "cuda:NVIDIA H100 80GB HBM3"
TAG_LAYOUT = "posweep.layout"        # how training rows were laid out and log-probs computed (trainers.logprobs)
# What the final evaluation had to cut: "prompts 3, reward_prompts 1, reward_responses 0" (trainers.evaluate)
TAG_EVAL_CUTS = "posweep.eval_cuts"
TAG_STOPPED_AT_STEP = "posweep.stopped_at_step"  # early stopping ended the trial after this optimizer step
TAG_STOPPED_AT_RUNG = "posweep.stopped_at_rung"
TAG_STOP_REASON = "posweep.stop_reason"  # the ASHA decision: its value, the cutoff, how many trials it was among
TAG_RUNG_SIGNATURE = "posweep.rung_signature"  # where its rungs fall and what they measure (early_stopping)
TAG_STOPPED_UNDER = "posweep.stopped_under"  # the early-stopping rule a STOPPED run was stopped under
TAG_WEIGHTS = "posweep.weights"      # "uploading", then "logged" once model/ is whole; "deleted: why" after
WEIGHTS_HELD = ("uploading", "logged")  # states in which a run's artifacts may hold weights
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # the artifacts the UI lists as tables
WEIGHTS_ARTIFACT = "model"           # a kept model: a Hugging Face folder under the run's artifacts
# MLflow 3 opens an experiment on its GenAI overview unless told it holds model training
TAG_EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# The runs table as the UI's "share view" stores it (an experiment tag): the trial metrics and hyperparameters as
# columns, best mean_score first. `sweep ui` prints the URL that opens it.
RUNS_VIEW_KEY = "posweep"
TAG_RUNS_VIEW = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
