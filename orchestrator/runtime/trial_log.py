"""A trial's run as its process writes it: start, metrics, tags, samples, weights, close (TrialLogger, the core's
TrialLog protocol), the rung values of the stage's other trials (ASHA's query), and system metrics sampled while
it runs."""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from orchestrator.core.runs import RunStatus, TrialRecord
from orchestrator.core.tags import (LOGGED_ARTIFACTS, SAMPLES_ARTIFACT, TAG_KEY, TAG_KIND, TAG_PARENT, TAG_WEIGHTS,
                                    WEIGHTS_ARTIFACT)
from orchestrator.runtime.rung_record import RungValues, merge_rung_values, read_record, stage_query, values_since
from orchestrator.runtime.store import all_runs, artifact_repository, record_of, store_client

MAX_PARAM_LENGTH = 6000

class SystemMetrics:
    """MLflow's system metrics (the run page's System metrics tab: system/cpu_utilization_percentage,
    system/system_memory_usage_megabytes, disk, network, and GPU where pynvml is installed) for a run this client
    created: MLflow's own monitor follows fluent runs (mlflow.start_run) and drops what it sampled when a run ends
    within its interval. This one samples every `interval` seconds in a thread, with MLflow's monitors, and logs
    a last sample when the block ends, so even a 2-second trial has one."""

    def __init__(self, logger: "TrialLogger", interval: float):
        self.logger, self.interval = logger, interval
        self.monitors = _system_monitors()
        self.step, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, name="posweep-system-metrics", daemon=True)

    def _sample_and_log(self) -> None:
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        self.logger.log_metrics({f"system/{k}": v for k, v in metrics.items()}, step=self.step)
        self.step += 1

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self._sample_and_log()
            except Exception:  # noqa: BLE001 - a lost sample must not touch the trial; the last one is retried
                continue

    def __enter__(self) -> "SystemMetrics":
        for monitor in self.monitors:  # psutil's first CPU reading is 0.0: prime it, then discard
            monitor.collect_metrics()
            monitor.clear_metrics()
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(Exception):  # the trial's own outcome is what matters now
            self._sample_and_log()


def _system_monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    with contextlib.suppress(Exception):  # no NVIDIA GPU, or no pynvml: CPU, memory, disk and network only
        monitors.append(GPUMonitor())
    return monitors


class TrialLogger:
    """Trial-side logging into one child run; usable from any process that can reach the store."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, served_root: Optional[str] = None):
        self.client = store_client(uri)
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.served_root = served_root  # artifacts under it go through the tracking server (store.artifact_repository)
        self.run_id: Optional[str] = None
        self._repositories: dict[str, Any] = {}  # run id -> its artifact repository (resolving one reads the run)

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={**tags, TAG_KIND: "trial", TAG_PARENT: self.parent_run_id})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifacts(self, run_id: Optional[str] = None):
        """The artifact repository of this run (or another run of the store, to read what it left)."""
        run_id = run_id or self.run_id
        if run_id not in self._repositories:
            self._repositories[run_id] = artifact_repository(self.client, run_id, self.served_root)
        return self._repositories[run_id]

    def _log_file(self, write, artifact_file: str) -> None:
        """`write(path)` into a temporary file, logged as `artifact_file` (folders in its name kept)."""
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="posweep-artifact-") as tmp:
            path = Path(tmp) / name
            write(path)
            self.artifacts().log_artifact(str(path), folder or None)

    def log_samples(self, samples: list[dict], artifact_file: str = SAMPLES_ARTIFACT) -> None:
        """Per-sample records as an MLflow table (viewable in the UI's artifact and evaluation views): the JSON
        MLflow's log_table writes, and the tag that lists it as a table."""
        import pandas as pd

        columns = {key: [s.get(key) for s in samples] for key in samples[0]} if samples else {}
        self._log_file(lambda path: pd.DataFrame(columns).to_json(path, orient="split", index=False,
                                                                   date_format="iso"), artifact_file)
        self.set_tags({LOGGED_ARTIFACTS: json.dumps([{"path": artifact_file, "type": "table"}])})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._log_file(lambda path: path.write_text(text), artifact_file)

    def log_file(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.artifacts().log_artifact(str(path), artifact_path)

    def log_folder(self, folder: Path, artifact_path: str) -> None:
        self.artifacts().log_artifacts(str(folder), artifact_path)

    def log_weights(self, folder: Path) -> None:
        """A trained model folder as the run's model/ artifacts, tagged "logged" once the copy is whole (and
        "uploading" before, so a process killed mid-copy leaves a run whose partial weights are found and deleted)."""
        self.set_tags({TAG_WEIGHTS: "uploading"})
        self.log_folder(folder, WEIGHTS_ARTIFACT)
        self.set_tags({TAG_WEIGHTS: "logged"})

    def download(self, run_id: str, artifact_path: str, destination: Path) -> Path:
        """An artifact (file or folder) of a run of this store into `destination`; the local path."""
        destination.mkdir(parents=True, exist_ok=True)
        return Path(self.artifacts(run_id).download_artifacts(artifact_path, str(destination)))

    def finish(self, status: RunStatus) -> None:
        self.client.set_terminated(self.run_id, RunStatus(status).value)

    def rename(self, name: str) -> None:
        self.client.update_run(self.run_id, name=name)

    def runs_of(self, trial_key: str) -> list[TrialRecord]:
        """Every run of one trial key in this experiment, newest first."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_KEY}` = '{trial_key}'",
                                       max_results=1000)
        return [record_of(r) for r in runs]

    def rung_values(self, stage_key: str, metric: str, exclude_key: str, signature: str) -> list[float]:
        """The value of `metric` (asha/rung_K) of every other trial key of the stage that logged it under the same
        rung signature, one per key: from the stage's rung record (runtime.rung_record) and the runs it cannot
        hold yet, or, without a record, from every run of the stage."""
        record = read_record(self.artifacts(self.parent_run_id), signature)
        if record is None:
            found: RungValues = {}
            merge_rung_values(found, all_runs(self.client, self.experiment_id, stage_query(stage_key, signature)))
            values = found.get(signature, {}).get(metric, {})
        else:
            values = dict(record["values"].get(metric, {}))
            newer = values_since(self.client, self.experiment_id, stage_key, record["as_of_ms"])
            for key, value in newer.get(signature, {}).get(metric, {}).items():
                values.setdefault(key, value)
        return [value for key, value in values.items() if key != exclude_key]

    def reopen(self, run_id: str) -> None:
        """Continue logging into an earlier attempt's run (a trial resumed from its checkpoint)."""
        self.run_id = run_id
        self.client.update_run(run_id, status=RunStatus.RUNNING.value)

    def close(self, run_id: str, status: RunStatus) -> None:
        self.client.set_terminated(run_id, RunStatus(status).value)
