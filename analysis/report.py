"""The robustness report: one self-contained HTML (or Markdown) document built from a sweep's frames.

A short verdict per method, then Table 1, Table 3 (best and 75th-percentile run), expected best-of-k, the
distributions (Figure 1), top-k% per-sample length and KL (Figures 2-3), metrics against each method's own
hyperparameters (Figures 4-7), the score-vs-KL Pareto front, the cost of reaching the top 10%, and every
failed run with its reason. Figures are embedded as PNG data URIs: the file needs no network and no other file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from analysis import figures
from analysis.robustness import (REFERENCE_METHOD, best_of_k_curve, cost_to_reach, expected_best_of_k,
                                 pareto_front, probability_beats, table1, table3)
from orchestrator.contract.runs import RunStatus

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


@dataclass
class ReportInputs:
    sweep: str
    frame: pd.DataFrame                       # analysis.frames.sweep_frame, every trial of the sweep
    samples: pd.DataFrame                     # analysis.frames.samples_frame of the finished trials
    methods: list[str]                        # preference methods, in stage order
    hyperparameters: dict[str, list[str]]     # method -> its own hyperparameters (beta, gamma, ...)
    sft: Optional[dict[str, float]] = None    # the selected SFT run's metrics


def _scores(frame: pd.DataFrame, method: str) -> tuple[list[float], int]:
    runs = frame[frame["method"] == method]
    done = runs[runs["status"] == RunStatus.FINISHED]["mean_score"].dropna()
    return list(done), len(runs) - len(done)


def _cost_column(frame: pd.DataFrame) -> str:
    return "gpu_hours" if frame["gpu_hours"].fillna(0).sum() > 0 else "device_hours"


def verdicts(inputs: ReportInputs) -> list[str]:
    """One line per method: best score (vs DPO's), P(a random config beats SFT), expected best of k, failures."""
    frame, lines = inputs.frame, []
    ref_scores, _ = _scores(frame, REFERENCE_METHOD)
    ref_best = max(ref_scores) if ref_scores else None
    for method in inputs.methods:
        scores, failed = _scores(frame, method)
        n = len(scores) + failed
        if not scores:
            lines.append(f"{method}: no run finished ({failed} failed).")
            continue
        best = max(scores)
        versus = (f" ({(best - ref_best) / abs(ref_best):+.0%} vs {REFERENCE_METHOD}'s best)"
                  if ref_best and method != REFERENCE_METHOD else "")
        beat = (f"; a random config beats SFT with p={probability_beats(scores, failed, inputs.sft['mean_score']):.2f}"
                if inputs.sft else "")
        k = min(BEST_OF_K_SHOWN, n)
        expected, _ = expected_best_of_k(scores, failed, k)
        lines.append(f"{method}: best score {best:.3f}{versus}{beat}; expected best of {k} random configs "
                     f"{expected:.3f}; {failed} of {n} runs failed.")
    return lines


def _tables_1_and_3(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame, methods = inputs.frame, inputs.methods
    scores_by_key = {k: g.set_index("prompt_id")["score"] for k, g in inputs.samples.groupby("trial_key")}
    blocks = [Block("h2", "Table 1: the best run of each method"),
              Block("table", table=table1(frame, methods).round(3)),
              Block("p", f"The best FINISHED run per method by mean gold score, every metric, and each metric's "
                         f"relative change against {REFERENCE_METHOD}'s best run ((m − m_dpo)/|m_dpo|). Read "
                         "it for the ceiling a method reaches when its grid is searched fully.")]
    for q, name in ((1.0, "best"), (0.75, "75th-percentile")):
        t3 = table3(frame, scores_by_key, methods, q, n_boot=n_boot)
        blocks += [Block("h2", f"Table 3: head-to-head win rates at the {name} run"),
                   Block("table", table=t3.round(3)),
                   Block("p", "Per evaluation prompt, the method's run against the opponent's run on the same "
                              "prompt by gold score (ties count half); low/high: paired bootstrap 95% interval "
                              f"over prompts. At the {name} run a method is judged "
                              + ("by its ceiling." if q == 1.0 else "by what a typical good config gives: "
                                                                    "the run a quarter of the way down its grid."))]
    return blocks


def _best_of_k(inputs: ReportInputs, n_boot: int) -> list[Block]:
    curves = {}
    for method in inputs.methods:
        scores, failed = _scores(inputs.frame, method)
        if scores:
            curves[method] = best_of_k_curve(scores, failed, n_boot=n_boot)
    if not curves:
        return []
    return [Block("h2", "Expected best-of-k"),
            Block("figure", image=figures.png_data_uri(figures.best_of_k_figure(curves)),
                  text="The expected best gold score from k configs drawn at random from each method's grid "
                       "(exact, without replacement; failed configs count as draws that give nothing), "
                       "with a 95% bootstrap band over configs. It answers: with a budget of k runs, which "
                       "method? A curve that is high at small k is robust to its hyperparameters.")]


def _distribution_figures(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame, methods = inputs.frame, inputs.methods
    blocks = [Block("h2", "Figure 1: every run's metrics"),
              Block("figure", image=figures.png_data_uri(figures.metric_distributions(frame, methods, inputs.sft)),
                    text="Per method, the distribution over all finished runs of each metric (box: quartiles; "
                         "dots: runs); dashed: the selected SFT model. Tick labels count runs and failures. "
                         "A tall box means the method is sensitive to its hyperparameters.")]
    for column, number in (("length", 2), ("kl", 3)):
        blocks += [Block("h2", f"Figure {number}: per-sample {column} of the top runs"),
                   Block("figure", image=figures.png_data_uri(figures.topk_distributions(
                       frame, inputs.samples, methods, column, TOP_PERCENTS)),
                       text=f"Pooled per-prompt {column} of each method's top 1%, 10% and 25% runs by score "
                            "(at least one run each). "
                            + ("Longer answers at the top point to length exploitation." if column == "length"
                               else "High KL at the top means the best runs moved far from SFT."))]
    return blocks


def _hyperparameter_figures(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame, blocks, number = inputs.frame, [], 4
    for method in inputs.methods:
        for hp in inputs.hyperparameters.get(method, []):
            if frame[frame["method"] == method][hp].nunique() > 1:
                blocks += [Block("h2", f"Figure {number}: {method} against {hp}"),
                           Block("figure", image=figures.png_data_uri(
                               figures.metric_vs_hyperparameter(frame, method, hp)),
                               text=f"A point per {method} run; crosses: failed runs at their setting.")]
                number += 1
    return blocks


def _pareto(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame = inputs.frame
    fronts = [pareto_front(frame[(frame["method"] == m) & (frame["status"] == RunStatus.FINISHED)]).assign(method=m)
              for m in inputs.methods]
    front = pd.concat(fronts)[["method", "run_name", "mean_score", "kl"]] if fronts else pd.DataFrame()
    return [Block("h2", "Score against KL: the Pareto front"),
            Block("table", table=front.round(3)),
            Block("p", "Runs no other run of the same method beats on both higher score and lower KL.")]


def _cost_and_failures(inputs: ReportInputs, n_boot: int) -> list[Block]:
    frame, blocks = inputs.frame, []
    cost = _cost_column(frame)
    finished = frame[frame["status"] == RunStatus.FINISHED]["mean_score"].dropna()
    if len(finished):
        threshold = finished.quantile(0.9)
        rows = [{"method": m, f"expected {cost} to reach top 10%": cost_to_reach(frame, m, threshold, cost),
                 f"{cost} spent": frame[frame["method"] == m][cost].fillna(0).sum()} for m in inputs.methods]
        blocks += [Block("h2", "Cost of reaching the top 10%"),
                   Block("table", table=pd.DataFrame(rows).round(4)),
                   Block("p", f"Top 10% = a score of at least {threshold:.3f} (the 90th percentile of all finished "
                              f"runs). Expected {cost} spent trying the method's configs in random order until one "
                              "gets there (failed configs cost too); empty: no config of the method reaches it.")]
    failed = frame[frame["status"] == RunStatus.FAILED][["method", "run_name", "failure"]]
    blocks += [Block("h2", f"Failed runs ({len(failed)})"),
               Block("table", table=failed) if len(failed) else Block("p", "None.")]
    return blocks


# The report's sections in order: (inputs, n_boot) -> blocks.
SECTIONS = [lambda inputs, n_boot: [Block("h2", "Verdict"), Block("list", items=verdicts(inputs))],
            _tables_1_and_3, _best_of_k, _distribution_figures, _hyperparameter_figures, _pareto, _cost_and_failures]


def build_blocks(inputs: ReportInputs, n_boot: int = 1000) -> list[Block]:
    return [block for section in SECTIONS for block in section(inputs, n_boot)]


def _html_table(table: pd.DataFrame) -> str:
    return table.to_html(index=False, na_rep="–", border=0, classes="t", escape=True)


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
         "border-bottom:1px solid #ddd;text-align:right}figure{margin:1em 0}img{max-width:100%}"
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
                        "figure": lambda: f"![{_md(b.text[:60])}]({b.image})\n\n*{_md(b.text)}*"}[b.kind]())
        return "\n\n".join(out) + "\n"
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for b in blocks:
        out.append({"h2": lambda: f"<h2>{html.escape(b.text)}</h2>", "p": lambda: f"<p>{html.escape(b.text)}</p>",
                    "list": lambda: "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>",
                    "table": lambda: _html_table(b.table),
                    "figure": lambda: f"<figure><img src='{b.image}' alt='{html.escape(b.text[:80])}'>"
                                      f"<figcaption>{html.escape(b.text)}</figcaption></figure>"}[b.kind]())
    out.append("</body></html>")
    return "\n".join(out)
