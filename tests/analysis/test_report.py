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
    assert headings[:5] == ["Verdict", "Table 1: the best run of each method",
                            "Table 3: head-to-head win rates at the best run",
                            "Table 3: head-to-head win rates at the 75th-percentile run", "Expected best-of-k"]
    assert {"Figure 1: every run&#x27;s metrics", "Figure 2: per-sample length of the top runs",
            "Figure 3: per-sample kl of the top runs", "Figure 4: dpo against beta", "Figure 5: simpo against beta",
            "Score against KL: the Pareto front", "Cost of reaching the top 10%", "Failed runs (2)"} <= set(headings)
    images = re.findall(r"<img src='([^']*)'", page)
    assert len(images) == 6 and all(i.startswith("data:image/png;base64,") for i in images)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("<figcaption>") == 6


def test_verdicts_say_best_versus_dpo_chance_to_beat_sft_and_failures(toy_sweep):
    lines = verdicts(inputs(toy_sweep))
    # dpo: scores 0..6 and 1 failed (8 configs), SFT 2: beats = (4 above + 0.5 tie) / 8 = 0.5625;
    # best of 5 from 8: (3·C(4,4) + 4·C(5,4) + 5·C(6,4) + 6·C(7,4)) / C(8,5) = 308 / 56 = 5.5
    assert lines[0] == ("dpo: best score 6.000; a random config beats SFT with p=0.56; expected best of 5 random "
                        "configs 5.500; 1 of 8 runs failed.")
    assert lines[1].startswith("simpo: best score 9.000 (+50% vs dpo's best)")


def test_markdown_report_has_tables_and_the_same_figures(toy_sweep):
    page = render(inputs(toy_sweep), "md", n_boot=50)
    assert page.startswith("# Robustness report: sweep toy")
    assert "| method | run_name | finished | failed |" in page
    assert len(re.findall(r"!\[[^\]]*\]\(data:image/png;base64,", page)) == 6
