"""The run-state vocabulary (orchestrator.core.runs): which states are outcomes, draws, done for a rerun, and which
of a key's runs stands for it. Every module that counts runs uses these, so they are pinned here."""

import pandas as pd
import pytest

from analysis.robustness import in_states, method_draws
from orchestrator.core.methods import METHODS, StageKind
from orchestrator.core.runs import DRAWS, OUTCOMES, RunStatus, TrialRecord, ended, latest_per_key, resume_done
from orchestrator.core.spec_file import parse_spec
from orchestrator.core.tags import TAG_STOPPED_UNDER
from orchestrator.grid import plan_sweep, preference_stages
from trainers.probe import noop_sweep_yaml


def record(key: str, status: RunStatus, run_id: str = "", stopped_under: str = "") -> TrialRecord:
    return TrialRecord(run_id=run_id or f"{key}-{status}", run_name=key, trial_key=key, stage="dpo", method="dpo",
                       status=status, params={}, metrics={},
                       tags={TAG_STOPPED_UNDER: stopped_under} if stopped_under else {})


def test_the_state_sets():
    assert set(OUTCOMES) == {RunStatus.FINISHED, RunStatus.FAILED, RunStatus.STOPPED}
    assert set(DRAWS) == {RunStatus.FINISHED, RunStatus.FAILED}  # a stopped trial was not drawn at random


@pytest.mark.parametrize("status,stopped_under,stopping,done", [
    (RunStatus.FINISHED, "", None, True),
    (RunStatus.STOPPED, "asha-a", "asha-a", True),    # stopped under the rule the sweep stops by now
    (RunStatus.STOPPED, "asha-a", "asha-b", False),   # other rungs or η: runs again
    (RunStatus.STOPPED, "asha-a", None, False),       # early stopping since turned off: runs to the end
    (RunStatus.FAILED, "", None, False),
    (RunStatus.KILLED, "", None, False),
    (RunStatus.RUNNING, "", None, False),
])
def test_resume_done(status, stopped_under, stopping, done):
    assert resume_done(record("k", status, stopped_under=stopped_under), stopping) is done


def test_a_key_is_stood_for_by_its_finished_run_then_its_stopped_one_then_its_latest():
    newest_first = [record("a", RunStatus.KILLED), record("a", RunStatus.FINISHED), record("a", RunStatus.FAILED),
                    record("b", RunStatus.FAILED, "b-new"), record("b", RunStatus.STOPPED),
                    record("c", RunStatus.RUNNING, "c-new"), record("c", RunStatus.FAILED, "c-old")]
    standing = {r.trial_key: r for r in latest_per_key(newest_first)}
    assert [standing[k].run_id for k in "abc"] == ["a-FINISHED", "b-STOPPED", "c-new"]
    assert {r.trial_key for r in ended(newest_first)} == {"a", "b"}  # c's standing run is still RUNNING


def test_frames_are_filtered_by_the_same_sets():
    frame = pd.DataFrame({"method": ["dpo", "dpo", "dpo", "dpo", "simpo"],
                          "status": ["FINISHED", "FAILED", "STOPPED", "RUNNING", "FINISHED"]})
    assert list(in_states(frame, OUTCOMES)["status"]) == ["FINISHED", "FAILED", "STOPPED", "FINISHED"]
    assert list(method_draws(frame, "dpo")["status"]) == ["FINISHED", "FAILED"]


def test_stages_are_told_apart_by_kind(tmp_path):
    stages = plan_sweep(parse_spec(noop_sweep_yaml("kinds", tmp_path, n_beta=1, n_lr=1)))
    assert [s.kind for s in stages][:2] == [StageKind.UNTRAINED, StageKind.SFT]
    assert [s.stage for s in preference_stages(stages)] == [s.stage for s in stages[2:]]
    assert all(METHODS[s.stage].kind is StageKind.PREFERENCE for s in preference_stages(stages))
