"""The report document built from the toy sweep: every section, every figure embedded, nothing external."""

import re

from analysis.report import ReportInputs, render, verdicts


def inputs(toy_sweep):
    frame, samples = toy_sweep
    return ReportInputs(sweep="toy", frame=frame, samples=samples, methods=["dpo", "simpo"],
                        hyperparameters={"dpo": ["beta"], "simpo": ["beta"]},
                        sft={"mean_score": 2.0, "win_vs_chosen": 0.3, "length": 6.0})


def test_html_report_has_every_section_and_only_embedded_figures(toy_sweep):
    page = render(inputs(toy_sweep), "html", n_boot=50)
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings == ["Verdict", "The paper&#x27;s findings, checked", "Table 1: the best run of each method",
                        "Table 2: head-to-head win rates at the best run",
                        "Table 3: head-to-head win rates at the 75th-percentile run",
                        "Figure 1: every run&#x27;s metrics", "Figure 2: per-sample length of the top runs",
                        "Figure 3: per-sample kl of the top runs", "Figure 4: dpo against beta",
                        "Figure 5: simpo against beta", "Figure 6: expected best-of-k",
                        "Figure 7: score against KL: the Pareto front",
                        "Figure 8: budget curve: best score found against cost spent",
                        "Cost of reaching the sweep&#x27;s 90th percentile",
                        "Where a trial&#x27;s time goes", "Failed runs (2)"]
    images = re.findall(r"<img src='([^']*)' alt='([^']*)'>", page)
    assert len(images) == 8 and all(uri.startswith("data:image/png;base64,") for uri, _ in images)
    assert all(len(alt) > 40 for _, alt in images)  # each figure says what it shows, not its caption's start
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("<figcaption>") == 8


def test_verdicts_say_best_versus_dpo_chance_to_beat_sft_and_failures(toy_sweep):
    lines = verdicts(inputs(toy_sweep))
    # dpo: scores 0..6 and 1 failed (8 configs), SFT 2: beats = (4 above + 0.5 tie) / 8 = 0.5625;
    # best of 5 from 8: (3·C(4,4) + 4·C(5,4) + 5·C(6,4) + 6·C(7,4)) / C(8,5) = 308 / 56 = 5.5
    assert lines[0] == ("dpo: best score 6.000; 56% of random configs beat SFT (2.000); expected best of 5 random "
                        "configs 5.500; 1 of 8 runs failed.")
    assert lines[1].startswith("simpo: best score 9.000 (+50% vs dpo's best)")


def test_markdown_report_has_tables_and_the_same_figures(toy_sweep):
    page = render(inputs(toy_sweep), "md", n_boot=50)
    assert page.startswith("# Robustness report: sweep toy")
    assert "| method | run_name | finished | failed |" in page
    assert len(re.findall(r"!\[[^\]]{40,}\]\(data:image/png;base64,", page)) == 8


def _with(frame, **row):
    """The frame plus one hand-built trial row (columns it does not name are NaN)."""
    import pandas as pd
    return pd.concat([frame, pd.DataFrame([row])], ignore_index=True)


def test_a_report_made_while_the_sweep_runs_counts_running_trials_apart(toy_sweep):
    """Before, a RUNNING trial counted as failed in the verdict ("2 of 9 runs failed") while Failed runs said
    otherwise, and nothing said the sweep was still running."""
    frame, samples = toy_sweep
    live = _with(frame, stage="dpo", method="dpo", run_name="dpo live", status="RUNNING", trial_key="live", beta=0.9)
    report = inputs((live, samples))
    assert verdicts(report)[0].endswith("1 of 8 runs failed; 1 still running.")
    killed = _with(live, stage="dpo", method="dpo", run_name="dpo cut", status="KILLED", trial_key="cut", beta=1.0)
    assert verdicts(inputs((killed, samples)))[0].endswith(
        "1 of 8 runs failed; 1 still running; 1 interrupted (a rerun runs them).")
    page = render(report, "html", n_boot=20)
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings[0] == "The sweep is not complete" and "Failed runs (2)" in headings
    assert "1 trials have no outcome yet (1 RUNNING)" in page


def test_a_one_method_sweep_has_no_head_to_head_and_no_word_of_dpo(toy_sweep):
    frame, samples = toy_sweep
    simpo = frame[frame.method == "simpo"]
    page = render(ReportInputs(sweep="one", frame=simpo, samples=samples, methods=["simpo"],
                               hyperparameters={"simpo": ["beta"]}), "html", n_boot=20)
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert [h for h in headings if h.startswith("Table")] == ["Table 1: the best run of each method"]
    text = re.sub(r"data:image/png;base64,[^']*", "", page).lower()  # words, not the images' bytes
    assert "head-to-head" not in text and "dpo" not in text


def test_table1_has_the_sft_untrained_and_chosen_rows(toy_sweep):
    report = inputs(toy_sweep)
    report.untrained = {"run_name": "untrained", "mean_score": -9.0, "length": 21.0}
    report.sft = {**report.sft, "run_name": "sft lr=0.003"}
    page = render(report, "md", n_boot=20)
    table = page.split("## Table 1: the best run of each method")[1].split("## ")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert {"dpo", "simpo", "SFT (selected)", "untrained", "chosen responses"} <= set(rows)
    assert "| sft lr=0.003 |" in rows["SFT (selected)"] and "| 2.0 |" in rows["SFT (selected)"]
    assert "| -9.0 |" in rows["untrained"] and "| 1.0 |" in rows["chosen responses"]  # every chosen_score is 1
    assert verdicts(report)[2] == ("References (mean gold score): SFT (selected) 2.000; untrained -9.000; "
                                   "chosen responses 1.000.")


def test_a_best_run_on_the_edge_of_its_grid_is_flagged(toy_sweep):
    frame, samples = toy_sweep
    frame = frame.assign(learning_rate=[1e-4 if i % 2 == 0 else 3e-4 for i in range(len(frame))])
    report = inputs((frame, samples))  # best runs dpo6/simpo6: the lower learning rate, β 0.7 of 0.1..0.8
    lines = [line for line in verdicts(report) if line.startswith("Warning")]
    assert lines == [f"Warning: {m}'s best run sits at the edge of its grid (learning_rate 0.0001 (lowest of 2)): "
                     "its optimum may lie outside the grid; widen that range to find out." for m in ("dpo", "simpo")]
    page = render(report, "html", n_boot=20)
    assert "Figure 5: dpo against learning_rate" in page


def test_cost_is_in_trials_and_device_hours_with_the_load_caveat(toy_sweep):
    frame, samples = toy_sweep
    page = render(inputs((frame.assign(device_hours=0.5), samples)), "md", n_boot=20)
    section = page.split("## Cost of reaching the sweep's 90th percentile")[1]
    header = section.strip().splitlines()[0]
    assert header == ("| method | trials with an outcome | expected trials to reach the sweep's p90 | expected "
                      "device_hours to reach the sweep's p90 | device_hours spent |")
    # "top 10%" means a method's own ⌈n/10⌉ best runs only (the budget curve); this bar is the 14 finished scores'
    # 90th percentile, pooled; simpo's runs 5 and 6 (7.5, 9.0) reach it: (8+1)/(2+1) = 3
    assert "| simpo | 8 | 3.0 | 1.5 | 4.0 |" in section
    assert "carry the machine's load" in section and "compare methods by trials" in section


def test_the_kl_figure_says_why_a_sample_can_be_negative(toy_sweep):
    page = render(inputs(toy_sweep), "html", n_boot=20)
    assert "single-sample estimate" in page and "can be negative" in page


def test_an_early_stopped_sweep_says_its_statistics_are_over_survivors_and_draws_the_budget_curve(toy_sweep):
    frame, samples = toy_sweep
    stopped = _with(frame, stage="dpo", method="dpo", run_name="dpo cut", status="STOPPED", trial_key="cut", beta=0.9)
    stopped = _with(stopped, stage="dpo", method="dpo", run_name="dpo cut2", status="STOPPED", trial_key="cut2",
                    beta=1.0)
    report = inputs((stopped, samples))
    report.grid = ("full-grid", frame)
    assert report.stopped == 2
    assert verdicts(report)[0].endswith("1 of 8 runs failed; 2 stopped early (not counted above).")
    page = render(report, "html", n_boot=20)
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings[0] == "This sweep stopped trials early"  # not "not complete": a stopped trial has ended
    assert "not a sample of the final-score distribution" in page
    assert any(h.endswith("budget curve: best score found against cost spent") for h in headings)
    assert "full-grid" in page and "rank in the grid" in page
    plain = render(inputs(toy_sweep), "html", n_boot=20)
    assert "This sweep stopped trials early" not in plain and "budget curve" in plain  # a grid's own curve


def test_a_collapsing_method_is_named_in_the_verdict_with_its_median_run_and_kl(toy_sweep):
    """The README's example once ended far below SFT (-6.68 against 0.309, KL 16.65) and the report said only
    `p=0.00`. A method whose median run is below the untrained model, or most of whose runs are below SFT, gets
    a warning in the verdict, which opens the report."""
    frame, samples = toy_sweep
    report = inputs((frame, samples))
    report.sft = {**report.sft, "mean_score": 5.5}   # dpo: 0..6, so 6 of its 7 finished runs are below SFT
    report.untrained = {"run_name": "untrained", "mean_score": -1.0}
    warnings = [line for line in verdicts(report) if "collapses" in line]  # simpo too: 4 of its 7 below 5.5
    assert len(warnings) == 2 and warnings[1].startswith("Warning: simpo collapses")
    assert warnings[:1] == ["Warning: dpo collapses in much of its grid: 6 of 7 finished runs score below SFT (5.500); "
                        "its median run (dpo3) scores 3.000 at KL 1.00. Those settings (often the larger learning "
                        "rates or the smaller β) leave the SFT model far behind; see the figures against each "
                        "hyperparameter."]
    report.sft = {**report.sft, "mean_score": 2.0}    # 2 of 7 below SFT and the median above the untrained model
    assert not [line for line in verdicts(report) if "collapses" in line]
    page = render(report, "md", n_boot=20)
    assert page.index("## Verdict") < page.index("## The paper's findings, checked")


def test_table_1_states_relative_changes_in_percent(toy_sweep):
    page = render(inputs(toy_sweep), "md", n_boot=20)
    table = page.split("## Table 1: the best run of each method")[1].split("## ")[0]
    assert "mean_score vs dpo (%)" in table and "mean_score_vs_dpo" not in table
    assert "| simpo | simpo6 | 7 | 1 | 9.0 |" in table and "| 11.0 | 50.0 |" in table  # (9 - 6) / 6 = +50%
