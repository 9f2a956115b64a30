"""The robustness report: one self-contained HTML (or Markdown) document built from a sweep's frames.

A notice when the sweep is not complete, one when early stopping stopped trials (its statistics then cover the
survivors only), then the answer: a short verdict per method (with the references' scores, a warning for each
method whose grid collapses and for each best run at the edge of its grid), the paper's findings F1-F5 checked
against this sweep (a verdict and intervals per finding, analysis.findings), then Table 1 (best runs and the
SFT / untrained / chosen references), the head-to-head tables at the best and 75th-percentile run (the paper's
Table 3; only with two methods or more), expected best-of-k, the distributions, top-k% per-sample length and
KL, metrics against every hyperparameter a method's grid varies, the score-vs-KL Pareto front, the budget curve
(best score found against device-hours, beside a full grid's with --grid: analysis.budget; its "top 10%" is a
method's own ⌈n/10⌉ best runs, the report's one meaning of the words), the cost of reaching the sweep's 90th
percentile (every method's runs pooled; in trials and device-hours), and every failed run with its reason.
Tables and figures are numbered in order. Figures are embedded as PNG data URIs: the file needs no network and
no other file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from analysis import figures
from analysis.budget import budget_curves, budget_table, top_threshold
from analysis.findings import LENGTH_NORMALISED, RULE, check_findings, findings_table
from analysis.robustness import (REFERENCE_METHOD, best_of_k_curve, cost_to_reach, edge_of_grid, expected_best_of_k,
                                 finished_runs, in_states, method_draws, pareto_front, probability_beats,
                                 run_at_quantile, table1, table3, trials_to_reach)
from analysis.summary import time_split
from orchestrator.core.runs import OUTCOMES, RunStatus

TOP_PERCENTS = (1, 10, 25)
BEST_OF_K_SHOWN = 5


@dataclass
class Block:
    """One piece of the document: a heading, a paragraph, a table or a figure (with its caption)."""
    kind: str                                 # "h2" | "p" | "table" | "figure" | "list"
    text: str = ""
    table: Optional[pd.DataFrame] = None
    image: str = ""                           # data URI
    items: list[str] = field(default_factory=list)
    numbered: str = ""                        # h2 only: "Table" or "Figure", numbered in document order
    alt: str = ""                             # figure only: what the image shows, for screen readers
    prose: bool = False                       # table only: its cells are sentences (left-aligned)


@dataclass
class ReportInputs:
    sweep: str
    frame: pd.DataFrame                       # analysis.frames.sweep_frame, every trial of the sweep
    samples: pd.DataFrame                     # analysis.frames.samples_frame of the finished trials
    methods: list[str]                        # preference methods, in stage order
    hyperparameters: dict[str, list[str]]     # method -> its own hyperparameters (beta, gamma, ...)
    sft: Optional[dict[str, float]] = None    # the selected SFT run's metrics (and run_name)
    untrained: Optional[dict[str, float]] = None  # the untrained model's metrics (and run_name)
    grid: Optional[tuple[str, pd.DataFrame]] = None  # a full-grid sweep to set the budget curve against (name, frame)

    @property
    def stopped(self) -> int:
        """Trials early stopping ended at a rung."""
        return int((self.frame["status"] == RunStatus.STOPPED).sum())


def _scores(frame: pd.DataFrame, method: str) -> tuple[list[float], int]:
    """(finished runs' scores, failed runs): the draws of the method's grid that have an outcome."""
    failed = int(((frame["method"] == method) & (frame["status"] == RunStatus.FAILED)).sum())
    return list(finished_runs(frame, method)["mean_score"].dropna()), failed


def _cost_column(frame: pd.DataFrame) -> str:
    return "gpu_hours" if frame["gpu_hours"].fillna(0).sum() > 0 else "device_hours"


def _chosen_score(samples: pd.DataFrame) -> Optional[float]:
    """Mean gold score of the dataset's chosen responses over the evaluation prompts (each prompt once)."""
    per_prompt = samples.dropna(subset=["chosen_score"]).groupby("prompt_id")["chosen_score"].first()
    return float(per_prompt.mean()) if len(per_prompt) else None


def baselines(inputs: ReportInputs) -> dict[str, dict]:
    """Table 1's reference rows: the selected SFT run, the untrained model, the dataset's chosen responses."""
    rows = {"SFT (selected)": inputs.sft, "untrained": inputs.untrained}
    chosen = _chosen_score(inputs.samples)
    if chosen is not None:
        rows["chosen responses"] = {"run_name": "(the dataset)", "mean_score": chosen}
    return {name: metrics for name, metrics in rows.items() if metrics}


def collapse_warning(frame: pd.DataFrame, method: str, sft: Optional[float], untrained: Optional[float]
                     ) -> Optional[str]:
    """A warning when much of the method's grid collapses: its median finished run scores below the untrained
    model, or most of its finished runs score below SFT; with the median run's KL, which shows how far those
    settings moved from the SFT model."""
    scores = finished_runs(frame, method)["mean_score"].dropna()
    median = run_at_quantile(frame, method, 0.5)
    if scores.empty or median is None:
        return None
    below_sft = int((scores < sft).sum()) if sft is not None else 0
    under_untrained = untrained is not None and median["mean_score"] < untrained
    if not under_untrained and below_sft <= len(scores) / 2:
        return None
    kl = f" at KL {median['kl']:.2f}" if "kl" in median and not pd.isna(median["kl"]) else ""
    floor = f", below the untrained model's {untrained:.3f}" if under_untrained else ""
    return (f"Warning: {method} collapses in much of its grid: {below_sft} of {len(scores)} finished runs score "
            f"below SFT ({sft:.3f}); its median run ({median['run_name']}) scores {median['mean_score']:.3f}"
            f"{floor}{kl}. Those settings (often the larger learning rates or the smaller β) leave the SFT model "
            "far behind; see the figures against each hyperparameter." if sft is not None else
            f"Warning: {method} collapses in much of its grid: its median run ({median['run_name']}) scores "
            f"{median['mean_score']:.3f}{floor}{kl}.")


def verdicts(inputs: ReportInputs) -> list[str]:
    """One line per method: best score (vs DPO's), the share of random configs that beat SFT, expected best of k,
    failures (runs still running counted apart); then the references' scores, a warning per method whose grid
    collapses, and every best run at its grid's edge."""
    frame, lines = inputs.frame, []
    ref_scores, _ = _scores(frame, REFERENCE_METHOD)
    ref_best = max(ref_scores) if ref_scores else None
    for method in inputs.methods:
        scores, failed = _scores(frame, method)
        n = len(scores) + failed
        still = _unfinished_text(frame[frame["method"] == method], n)
        if not scores:
            lines.append(f"{method}: no run finished ({failed} failed{still}).")
            continue
        best = max(scores)
        versus = (f" ({(best - ref_best) / abs(ref_best):+.0%} vs {REFERENCE_METHOD}'s best)"
                  if ref_best and method != REFERENCE_METHOD else "")
        beat = (f"; {probability_beats(scores, failed, inputs.sft['mean_score']):.0%} of random configs beat SFT "
                f"({inputs.sft['mean_score']:.3f})" if inputs.sft else "")
        k = min(BEST_OF_K_SHOWN, n)
        expected, _ = expected_best_of_k(scores, failed, k)
        lines.append(f"{method}: best score {best:.3f}{versus}{beat}; expected best of {k} random configs "
                     f"{expected:.3f}; {failed} of {n} runs failed{still}.")
    references = [f"{name} {metrics['mean_score']:.3f}" for name, metrics in baselines(inputs).items()
                  if not pd.isna(metrics.get("mean_score"))]
    if references:
        lines.append("References (mean gold score): " + "; ".join(references) + ".")
    sft, untrained = (_reference_score(inputs.sft), _reference_score(inputs.untrained))
    lines += [w for w in (collapse_warning(frame, m, sft, untrained) for m in inputs.methods) if w]
    for method in inputs.methods:
        edges = edge_of_grid(frame, method, _swept(inputs, method))
        if edges:
            lines.append(f"Warning: {method}'s best run sits at the edge of its grid ({', '.join(edges)}): its "
                         "optimum may lie outside the grid; widen that range to find out.")
    return lines


def _reference_score(metrics: Optional[dict]) -> Optional[float]:
    score = (metrics or {}).get("mean_score")
    return None if score is None or pd.isna(score) else float(score)


def _unfinished_text(runs: pd.DataFrame, with_outcome_count: int) -> str:
    """'; 1 still running; 2 interrupted (a rerun runs them); 3 stopped early (not counted above)' for a method's
    trials without a final outcome."""
    running = int((runs["status"] == RunStatus.RUNNING).sum())
    stopped = int((runs["status"] == RunStatus.STOPPED).sum())
    interrupted = len(runs) - with_outcome_count - running - stopped
    return ((f"; {running} still running" if running else "")
            + (f"; {interrupted} interrupted (a rerun runs them)" if interrupted else "")
            + (f"; {stopped} stopped early (not counted above)" if stopped else ""))


def _swept(inputs: ReportInputs, method: str) -> list[str]:
    """The hyperparameters that vary across the method's runs: its own (β, γ, ...), then learning rate and
    epochs; the report plots and checks each."""
    runs = inputs.frame[inputs.frame["method"] == method]
    names = [*inputs.hyperparameters.get(method, []), *(g for g in figures.GROUPING
                                                           if g not in inputs.hyperparameters.get(method, []))]
    return [hp for hp in names if hp in runs and runs[hp].nunique() > 1]


def _progress(inputs: ReportInputs, n_boot: int) -> list[Block]:
    unfinished = inputs.frame.index.difference(in_states(inputs.frame, OUTCOMES).index)
    if unfinished.empty:
        return []
    counts = inputs.frame.loc[unfinished, "status"].value_counts()
    states = ", ".join(f"{n} {status}" for status, n in counts.items())
    return [Block("h2", "The sweep is not complete"),
            Block("p", f"{len(unfinished)} trials have no outcome yet ({states}): running now, or left by a "
                       "driver that stopped (`sweep run` again runs those). Every figure and table below covers "
                       "only the trials that finished or failed; make the report again when the sweep is done.")]


def _early_stopping(inputs: ReportInputs, n_boot: int) -> list[Block]:
    if not inputs.stopped:
        return []
    return [Block("h2", "This sweep stopped trials early"),
            Block("p", f"{inputs.stopped} of {len(inputs.frame)} preference trials were stopped at a rung by early "
                       "stopping (ASHA: not in the top of the trials that had reached the same rung). A stopped trial "
                       "has no final score: it is not a sample of the final-score distribution, and the trials that "
                       "finished are the survivors of that selection, not a random draw from the grid. So every "
                       "robustness figure below (expected best-of-k, P(a random config beats SFT), the top-k% "
                       "distributions, the 75th-percentile head-to-head and the findings built on them) is over the "
                       "finished trials only and overstates what a configuration drawn at random gives. Read "
                       "robustness from a full grid's report; read this sweep for its best runs and its budget curve "
                       "(`sweep report NAME --grid FULL_GRID_SWEEP` draws both).")]


def _budget(inputs: ReportInputs, n_boot: int) -> list[Block]:
    sweeps = {inputs.sweep: inputs.frame, **({inputs.grid[0]: inputs.grid[1]} if inputs.grid else {})}
    grid = inputs.grid[0] if inputs.grid else inputs.sweep
    thresholds = {m: top_threshold(sweeps[grid], m) for m in inputs.methods}
    thresholds = {m: t for m, t in thresholds.items() if t is not None}  # a method the grid finished no run of
    if not thresholds:
        return []
    cost = _cost_column(pd.concat(list(sweeps.values())))
    curves = budget_curves(sweeps, list(thresholds), cost)
    against = (f"the full grid {grid!r}" if inputs.grid else "this sweep (no full grid given: "
               "`--grid SWEEP` sets an early-stopped sweep against one)")
    return [*_figure("budget curve: best score found against cost spent",
                     figures.budget_figure(curves, thresholds, cost),
                     f"Per method, the best final gold score found so far against the {cost} spent so far, trial by "
                     "trial in the order the trials ended (stopped and failed trials cost too, and find nothing); "
                     f"dashed: the top 10% of {against}, the score of its ⌈n/10⌉-th best of n finished runs. A curve "
                     "that reaches the line further left found a top configuration for less. The order trials ran "
                     "in shapes a curve: a grid runs in its written order, an early-stopped sweep in a shuffled one.",
                     "Step plots, one panel per method, of best gold score found against device-hours spent, one "
                     "line per sweep, with a dashed line at the grid's top-10% score."),
            Block("table", table=budget_table(sweeps, curves, grid, cost).round(4)),
            Block("p", f"Per method and sweep: the grid's top-10% score, trials with an outcome (stopped among them), "
                       f"the {cost} they spent and its share of the grid's, the best run found, its score and rank "
                       f"among the grid's finished runs (and whether that is in the grid's top 10%), and the {cost} "
                       "spent when the grid's top 10% was first reached (empty: never). "
                       f"{cost} are measured wall-clock hours × devices, so they carry the machine's load.")]


def _findings(inputs: ReportInputs, n_boot: int) -> list[Block]:
    if REFERENCE_METHOD not in inputs.methods or not set(LENGTH_NORMALISED) & set(inputs.methods):
        return []  # a sweep without the methods the paper compares: nothing to check
    found = check_findings(inputs.frame, inputs.samples, inputs.methods, n_boot)
    return [Block("h2", "The paper's findings, checked"),
            Block("table", table=findings_table(found), prose=True),
            Block("p", f"How to read it: {RULE} The paper gives relative changes; this sweep's figures are "
                       "differences, because a relative change is meaningless where DPO's KL or score sits near "
                       "zero (Table 1's relative columns show it). pp: DPO's head-to-head win rate minus 50%, in "
                       "percentage points; ✗ marks a comparison that does not support the paper. The verdicts are "
                       "about this sweep's task, model and grids, not the paper's.")]


def _verdict(inputs: ReportInputs, n_boot: int) -> list[Block]:
    return [Block("h2", "Verdict"), Block("list", items=verdicts(inputs)),
            Block("p", "Best score: the method's best finished run (its ceiling, the grid searched fully). Share of "
                       "random configs that beat SFT: of the method's runs with an outcome (failed ones count as "
                       "not beating it), the share whose gold score is above the selected SFT model's (ties count "
                       "half). Expected best of k: what the best of k configurations drawn at random from the grid "
                       "scores, on average.")]


def _tables_1_and_3(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame, methods = inputs.frame, inputs.methods
    scores_by_key = {k: g.set_index("prompt_id")["score"] for k, g in inputs.samples.groupby("trial_key")}
    table = table1(frame, methods, baselines=baselines(inputs))
    ref = REFERENCE_METHOD
    relative = (f" and each metric's relative change against {ref}'s best run in percent ((m − m_{ref})/|m_{ref}|)"
                if f"mean_score_vs_{ref}" in table else
                f" ({ref} has no finished run yet, so no column relative to it)" if ref in methods else "")
    blocks = [Block("h2", "the best run of each method", numbered="Table"),
              Block("table", table=_relative_as_percent(table.round(3), ref)),
              Block("p", f"The best FINISHED run per method by mean gold score with every metric{relative}; "
                         "below, the references: the selected SFT model the methods start from, the untrained "
                         "model, and the dataset's chosen responses (scored by the same gold reward). Read it for "
                         "the ceiling a method reaches when its grid is searched fully (the paper's Table 1).")]
    if sum(run_at_quantile(frame, m, 1.0) is not None for m in methods) < 2:
        return blocks  # head to head needs two methods with a finished run
    for q, name in ((1.0, "best"), (0.75, "75th-percentile")):
        t3 = table3(frame, scores_by_key, methods, q, n_boot=n_boot)
        blocks += [Block("h2", f"head-to-head win rates at the {name} run", numbered="Table"),
                   Block("table", table=t3.round(3)),
                   Block("p", "Per evaluation prompt, the method's run against the opponent's run on the same "
                              "prompt by gold score (ties count half); low/high: paired bootstrap 95% interval "
                              f"over prompts (the paper's Table 3). At the {name} run a method is judged "
                              + ("by its ceiling." if q == 1.0 else "by what a typical good config gives: "
                                                                    "the run a quarter of the way down its grid."))]
    return blocks


def _relative_as_percent(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Table 1's relative columns (fractions, METRIC_vs_REF) shown as percentages, as the verdict states them:
    -0.181 -> a column "METRIC vs REF (%)" holding -18.1."""
    suffix = f"_vs_{reference}"
    renamed = {c: f"{c.removesuffix(suffix)} vs {reference} (%)" for c in table.columns if c.endswith(suffix)}
    shown = table.copy()
    for column in renamed:
        shown[column] = (table[column] * 100).round(1)
    return shown.rename(columns=renamed)


def _figure(title: str, fig, caption: str, alt: str) -> list[Block]:
    return [Block("h2", title, numbered="Figure"),
            Block("figure", image=figures.png_data_uri(fig), text=caption, alt=alt)]


def _best_of_k(inputs: ReportInputs, n_boot: int) -> list[Block]:
    curves = {}
    for method in inputs.methods:
        scores, failed = _scores(inputs.frame, method)
        if scores:
            curves[method] = best_of_k_curve(scores, failed, n_boot=n_boot)
    if not curves:
        return []
    sft = inputs.sft["mean_score"] if inputs.sft else None
    return _figure("expected best-of-k", figures.best_of_k_figure(curves, sft),
                   "The expected best gold score from k configs drawn at random from each method's grid (exact, "
                   "without replacement; failed configs count as draws that give nothing), with a 95% bootstrap "
                   "band over configs; dashed: the selected SFT model. It answers: with a budget of k runs, "
                   "which method? A curve that is high at small k is robust to its hyperparameters.",
                   "Line chart: expected best gold score against the number of configs tried, one line per "
                   "method with a shaded band, and a dashed horizontal line at SFT's score.")


def _distribution_figures(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame, methods = inputs.frame, inputs.methods
    blocks = _figure("every run's metrics", figures.metric_distributions(frame, methods, inputs.sft),
                     "Per method, the distribution over all finished runs of each metric (box: quartiles; dots: "
                     "runs); dashed: the selected SFT model. Tick labels count runs with an outcome and failures. "
                     "A tall box means the method is sensitive to its hyperparameters (the paper's Figure 1).",
                     "Box plots in two rows, one panel per metric (gold score, win rates, KL, length), a box "
                     "per method with its runs as dots and SFT as a dashed line.")
    notes = {"length": "Longer answers at the top point to length exploitation (the paper's Figure 2).",
             "kl": "Each sample's KL is the single-sample estimate log πθ(y|x) − log π_SFT(y|x) of the policy's "
                   "own sample y: one sample can be negative (y more likely under SFT), their mean cannot be in "
                   "expectation. High KL at the top means the best runs moved far from SFT (the paper's Figure 3)."}
    for column in ("length", "kl"):
        blocks += _figure(f"per-sample {column} of the top runs",
                          figures.topk_distributions(frame, inputs.samples, methods, column, TOP_PERCENTS),
                          f"Pooled per-prompt {column} of each method's top 1%, 10% and 25% runs by score (at "
                          "least one run each; tick labels: the runs pooled, of the method's runs). "
                          + notes[column],
                          f"Violin plots, three panels (top 1%, 10%, 25% of runs), per-sample {column} per method.")
    return blocks


def _hyperparameter_figures(inputs: ReportInputs, n_boot: int) -> list[Block]:
    blocks = []
    for method in inputs.methods:
        for hp in _swept(inputs, method):
            blocks += _figure(f"{method} against {hp}", figures.metric_vs_hyperparameter(inputs.frame, method, hp),
                              f"A point per {method} run, coloured by learning rate and marked by epochs where "
                              "those vary in its grid (the vertical spread at one value is theirs); red crosses: "
                              "failed runs at their setting.",
                              f"Scatter plots of gold score, KL and length against {hp} for {method}'s runs.")
    return blocks


def _pareto(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame = inputs.frame
    fronts = {m: pareto_front(finished_runs(frame, m))
              for m in inputs.methods}
    fronts = {m: f for m, f in fronts.items() if len(f)}
    if not fronts:
        return []
    table = pd.concat([f.assign(method=m) for m, f in fronts.items()])[["method", "run_name", "mean_score", "kl"]]
    return [*_figure("score against KL: the Pareto front", figures.pareto_figure(frame, fronts),
                     "Every finished run (faint) and each method's front: the runs no other run of the same method "
                     "beats on both higher score and lower KL. The table lists the front's runs.",
                     "Scatter plot of gold score against KL to SFT per run, with a line through each method's "
                     "Pareto-optimal runs."),
            Block("table", table=table.round(3))]


def _cost_and_failures(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame, blocks = inputs.frame, []
    cost = _cost_column(frame)
    finished = frame[frame["status"] == RunStatus.FINISHED]["mean_score"].dropna()
    if len(finished):
        threshold = finished.quantile(0.9)
        rows = [{"method": m, "trials with an outcome": len(method_draws(frame, m)),
                 "expected trials to reach the sweep's p90": trials_to_reach(frame, m, threshold),
                 f"expected {cost} to reach the sweep's p90": cost_to_reach(frame, m, threshold, cost),
                 f"{cost} spent": frame[frame["method"] == m][cost].fillna(0).sum()} for m in inputs.methods]
        blocks += [Block("h2", "Cost of reaching the sweep's 90th percentile"),
                   Block("table", table=pd.DataFrame(rows).round(4)),
                   Block("p", f"The sweep's p90 = a score of at least {threshold:.3f}: the 90th percentile of every "
                              "method's finished runs pooled, one bar for all methods (not a method's own top 10%, "
                              "which the budget curve uses: its ⌈n/10⌉ best runs). Expected trials: how many of "
                              "the method's configs a user tries in random "
                              "order until one gets there ((n + 1)/(m + 1), failed configs included); empty: no "
                              f"config of the method reaches it. Expected {cost}: those trials times the method's "
                              f"mean measured {cost} per trial. {cost} are wall-clock hours × devices as measured, "
                              "so they carry the machine's load while each trial ran (on a shared machine a "
                              "method that ran on an idle machine looks cheaper): compare methods by trials, and "
                              f"read {cost} as this sweep's bill.")]
    split = time_split(frame, "method", list(inputs.methods))
    if not split.empty:
        blocks += [Block("h2", "Where a trial's time goes"),
                   Block("table", table=split.round(2)),
                   Block("p", "Mean seconds per finished trial of each method, by phase: loading, reference log-probs, "
                              "training, rung evaluations (early stopping), and the final evaluation, which is "
                              "sampling (generate) + the gold reward + the SFT model's KL pass + the rest; generated "
                              "tokens/s is the method's sampled tokens over its sampling seconds.")]
    failed = frame[frame["status"] == RunStatus.FAILED][["method", "run_name", "failure"]]
    blocks += [Block("h2", f"Failed runs ({len(failed)})"),
               Block("table", table=failed) if len(failed) else Block("p", "None.")]
    return blocks


# The report's sections in order: (inputs, n_boot) -> blocks.
# The answer first (the verdict per method), then the paper's findings and the evidence.
SECTIONS = [_progress, _early_stopping, _verdict, _findings, _tables_1_and_3, _distribution_figures,
            _hyperparameter_figures, _best_of_k, _pareto, _budget, _cost_and_failures]


def _numbered(blocks: list[Block]) -> list[Block]:
    """Tables and figures numbered in the order they appear ("Table 2: ..."), whichever sections a sweep has."""
    counts: dict[str, int] = {}
    for block in blocks:
        if block.numbered:
            counts[block.numbered] = counts.get(block.numbered, 0) + 1
            block.text = f"{block.numbered} {counts[block.numbered]}: {block.text}"
    return blocks


def build_blocks(inputs: ReportInputs, n_boot: int = 1000) -> list[Block]:
    return _numbered([block for section in SECTIONS for block in section(inputs, n_boot)])


def _html_table(table: pd.DataFrame, prose: bool = False) -> str:
    """A table; `prose` (cells of sentences, e.g. the findings) aligns left. Missing values of every dtype
    (NaN, and pandas' NA of nullable integer counts) print as "–"."""
    counts = [c for c, dtype in table.dtypes.items() if isinstance(dtype, pd.Int64Dtype)]  # na_rep skips pd.NA
    shown = table.astype({c: object for c in counts})
    shown[counts] = shown[counts].where(table[counts].notna(), "–")
    return shown.to_html(index=False, na_rep="–", border=0, classes="t prose" if prose else "t", escape=True)


def _md(text: str) -> str:
    """Text (prompts and generations are data, not markup) safe in Markdown: what HTML would read as tags is
    escaped, as the HTML report escapes it."""
    return html.escape(str(text), quote=False)


def _md_table(table: pd.DataFrame) -> str:
    cells = lambda row: "| " + " | ".join("–" if pd.isna(v) else _md(v).replace("|", "\\|") for v in row) + " |"  # noqa: E731
    return "\n".join([cells(table.columns), "| " + " | ".join("---" for _ in table.columns) + " |",
                      *[cells(row) for row in table.itertuples(index=False)]])


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "table.t{border-collapse:collapse;font-size:13px}table.t td,table.t th{padding:3px 8px;"
         "border-bottom:1px solid #ddd;text-align:right}table.prose td,table.prose th{text-align:left;"
         "vertical-align:top}figure{margin:1em 0}img{max-width:100%}"
         "figcaption,p{font-size:14px;color:#444}")


def render(inputs: ReportInputs, fmt: str = "html", n_boot: int = 1000) -> str:
    blocks = build_blocks(inputs, n_boot)
    title = f"Robustness report: sweep {inputs.sweep}"
    if fmt == "md":
        out = [f"# {_md(title)}"]
        for b in blocks:
            out.append({"h2": lambda: f"## {_md(b.text)}", "p": lambda: _md(b.text),
                        "list": lambda: "\n".join(f"- {_md(i)}" for i in b.items),
                        "table": lambda: _md_table(b.table),
                        "figure": lambda: f"![{_md(b.alt)}]({b.image})\n\n*{_md(b.text)}*"}[b.kind]())
        return "\n\n".join(out) + "\n"
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for b in blocks:
        out.append({"h2": lambda: f"<h2>{html.escape(b.text)}</h2>", "p": lambda: f"<p>{html.escape(b.text)}</p>",
                    "list": lambda: "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>",
                    "table": lambda: _html_table(b.table, b.prose),
                    "figure": lambda: f"<figure><img src='{b.image}' alt='{html.escape(b.alt)}'>"
                                      f"<figcaption>{html.escape(b.text)}</figcaption></figure>"}[b.kind]())
    out.append("</body></html>")
    return "\n".join(out)
