"""`sweep report` on a real (smoke) sweep: HTML and Markdown files, the MLflow artifact, and the HTML rendered
in headless Chromium with every figure loaded and no console error (screenshot kept)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.tags import TAG_KIND, TAG_NOTE
from orchestrator.runtime.sweep_runs import SweepTracker

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".test-artifacts"  # kept after the run (gitignored): screenshots
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

SPEC = """\
name: reported
workdir: {workdir}
data: {{kind: synthetic, n_train: 128, n_eval: 16}}
training: {{batch_size: 16, max_length: 40}}
evaluation: {{num_prompts: 16, max_new_tokens: 16}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [1]}}}}
  methods:
    dpo: {{grid: {{beta: [0.1, 0.5], learning_rate: [1.0e-4, 3.0e-4]}}}}
    simpo: {{grid: {{beta: [2.0], gamma: [0.5, 1.0], learning_rate: [3.0e-4]}}}}
"""


def sweep(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    spec = root / "spec.yaml"
    spec.write_text(SPEC.format(workdir=root / "work"))
    run = sweep("run", str(spec), cwd=root)  # progress asked for, but stdout and stderr are pipes
    assert run.returncode == 0, run.stderr
    (root / "run.log").write_text(run.stdout + run.stderr)
    html = sweep("report", str(spec), "--out", "report.html", "--no-progress", cwd=root)
    assert html.returncode == 0, html.stderr
    md = sweep("report", str(spec), "--format", "md", "--no-progress", cwd=root)
    assert md.returncode == 0, md.stderr
    return root, html.stdout


def test_a_piped_run_prints_one_line_per_trial_and_stage_and_no_carriage_return(reported):
    root, _ = reported
    log = (root / "run.log").read_text()
    assert "\r" not in log
    trial_lines = [line for line in log.splitlines() if re.match(r"\[\d+/8\] ", line)]
    assert [line.split("]")[0] for line in trial_lines] == [f"[{i}/8" for i in range(1, 9)]
    assert all(re.search(r": FINISHED in \d+\.\d s, mean_score -?\d+\.\d{3}$", line) for line in trial_lines)
    stage_lines = [line for line in log.splitlines() if re.match(r"stage \w+: ", line)]
    assert sorted(stage_lines) == ["stage base: 1 of 1 finished, 0 failed", "stage dpo: 4 of 4 finished, 0 failed",
                                   "stage sft: 1 of 1 finished, 0 failed", "stage simpo: 2 of 2 finished, 0 failed"]


def test_report_files_and_the_mlflow_artifact(reported):
    root, out = reported
    page = (root / "report.html").read_text()
    assert "report: report.html" in out and "artifact report.html" in out
    # Figures 1, 2, 3, dpo vs beta and vs learning rate, simpo vs gamma (one β: no figure), best-of-k, Pareto,
    # the budget curve
    assert len(re.findall(r"<img src='data:image/png;base64,", page)) == 9
    assert re.search(r"<td>SFT \(selected\)</td>\s*<td>sft lr=0.003 e=1</td>", page)  # Table 1's references
    assert re.search(r"<td>untrained</td>\s*<td>untrained</td>", page)
    assert "Failed runs (0)" in page
    # it opens with the answer (the verdict per method), then the paper's findings, one row each, in HTML and in
    # Markdown
    assert re.findall(r"<h2>(.*?)</h2>", page)[:2] == ["Verdict", "The paper&#x27;s findings, checked"]
    findings = page.split("The paper&#x27;s findings, checked")[1].split("</table>")[0]
    assert re.findall(r"<td>(F\d)</td>", findings) == ["F1", "F2", "F3", "F4", "F5"]
    assert len(re.findall(r"<td>(holds|fails|mixed|not testable)</td>", findings)) == 5
    markdown = (root / "work" / "reports" / "reported-report.md").read_text()  # by default beside the sweep's runs
    assert markdown.split("\n## ")[2].startswith("The paper's findings, checked")
    assert len(re.findall(r"^\| F\d \|.*\| (holds|fails|mixed|not testable) \|$", markdown, re.M)) == 5
    assert markdown.startswith("# Robustness report: sweep reported")
    tracker = SweepTracker(f"sqlite:///{root / 'mlflow.db'}", "reported")
    [run] = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG_KIND}` = 'sweep'")
    assert run.info.run_name == "sweep reported" and "report.html" in run.data.tags[TAG_NOTE]
    assert {a.path for a in tracker.client.list_artifacts(run.info.run_id)} == {"report.html", "report.md"}


def test_report_by_sweep_name_without_the_spec(reported, tmp_path):
    root, _ = reported
    proc = sweep("report", "reported", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--out",
                 str(tmp_path / "by-name.html"), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "by-name.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 9 and "Robustness report: sweep reported" in page


def test_report_without_a_sweep_says_so(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(workdir=tmp_path / "work"))
    proc = sweep("report", str(spec), cwd=tmp_path)
    assert proc.returncode == 1 and "no trial of sweep 'reported'" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true", reason="Debian chromium not installed")
def test_the_report_renders_in_headless_chromium_with_every_figure_and_no_console_error(reported, tmp_path):
    root, _ = reported
    page = (root / "report.html").read_text()
    # The harness (not the report) reports on load how many images decoded, through the console.
    probe = ("<script>window.addEventListener('load', () => { const i = [...document.images]; console.log("
             "'IMAGES ' + i.filter(x => x.complete && x.naturalWidth > 0).length + '/' + i.length); "
             # the headings within the first 800 pixels: what a reader sees before scrolling
             "console.log('FIRST ' + [...document.querySelectorAll('h2')].filter(h => h.getBoundingClientRect().top "
             "< 800).map(h => h.textContent).join('|')); });</script>")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--window-size=1280,6000",
                           f"--screenshot={shot}", probed.as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert any('"IMAGES 9/9"' in line for line in console), proc.stderr[-2000:]
    first = next(line for line in console if '"FIRST ' in line)
    assert '"FIRST Verdict' in first, first  # the answer opens the report, before the paper's findings
    assert not [line for line in console if "IMAGES" not in line and "FIRST" not in line], console  # no error
    assert shot.stat().st_size > 100_000


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dom(url: str, shot: Path) -> str:
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
              "--window-size=1600,1000"]
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true", reason="Debian chromium not installed")
def test_sweep_ui_lands_on_the_trial_runs_with_their_metrics(reported):
    """`sweep ui` prints its URLs only once the server answers; the sweep's link, rendered by Chromium, is the
    runs table (not MLflow 3's GenAI overview) with every trial and its metrics as columns (screenshot kept);
    the compare view of the trial runs lists every one by its method-and-hyperparameter name."""
    import urllib.request

    root, _ = reported
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = SweepTracker(uri, "reported")
    trials = tracker.trials()
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                          cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True)
    try:
        assert f"at http://127.0.0.1:{port}" in ui.stdout.readline()
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)  # answers at once
        link = ui.stdout.readline().strip()
        assert link == (f"sweep reported: http://127.0.0.1:{port}/#/experiments/{tracker.experiment_id}/runs"
                        "?workflowType=machine_learning&viewStateShareKey=posweep"), link
        ARTIFACTS.mkdir(exist_ok=True)
        runs = _dom(link.split(": ", 1)[1], ARTIFACTS / "mlflow-runs.png")
        missing = [t.run_name for t in trials if t.run_name not in runs]
        assert not missing, missing
        assert "mean_score" in runs and "win_vs_sft" in runs
        assert "No data available" not in runs
        base = f"http://127.0.0.1:{port}/#"
        models = _dom(f"{base}/models", ARTIFACTS / "mlflow-models.png")  # the Model Registry's page
        assert "reported-dpo" in models and "reported-simpo" in models
        ids = ",".join(f"%22{t.run_id}%22" for t in trials)
        compare = _dom(f"{base}/compare-runs?runs=[{ids}]&experiments=[%22{tracker.experiment_id}%22]",
                       ARTIFACTS / "mlflow-trials.png")
        missing = [t.run_name for t in trials if t.run_name not in compare]
        assert len(trials) == 8 and not missing, missing
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(30)


def test_report_before_any_preference_trial_finished_says_so(tmp_path):
    from cluster.probe import probe_trial
    from orchestrator.core.spec_file import parse_spec
    from orchestrator.core.task import TrialRuntime, TrialTask
    from orchestrator.grid import plan_sweep

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC.format(workdir=tmp_path / "work"))
    spec = parse_spec(spec_file.read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "reported")
    base = plan_sweep(spec)[0]
    runtime = TrialRuntime(sweep="reported", tracking_uri=uri, experiment_id=tracker.experiment_id,
                           parent_run_id=tracker.stage_run("base"), workdir=str(tmp_path / "work"))
    assert probe_trial(TrialTask(trial=base.trials[0], runtime=runtime)).status == "FINISHED"
    proc = sweep("report", str(spec_file), cwd=tmp_path)
    assert proc.returncode == 1 and "no FINISHED preference trial yet" in proc.stderr


def test_a_budget_comparison_against_another_grid_is_refused(reported):
    """`--grid` names a sweep whose grids differ (here: one DPO setting, no SimPO): one line, exit 2, no report,
    where the budget table used to print shares and ranks against the wrong grid."""
    root, _ = reported
    other = root / "other.yaml"
    other.write_text(SPEC.format(workdir=root / "work").replace("name: reported", "name: other").replace(
        "beta: [0.1, 0.5], learning_rate: [1.0e-4, 3.0e-4]", "beta: [0.2], learning_rate: [1.0e-4]").replace(
        "    simpo: {grid: {beta: [2.0], gamma: [0.5, 1.0], learning_rate: [3.0e-4]}}\n", ""))
    assert sweep("run", str(other), "--no-progress", cwd=root).returncode == 0
    refused = sweep("report", str(root / "spec.yaml"), "--grid", "other", "--out", "vs-other.html", "--no-progress",
                    cwd=root)
    assert refused.returncode == 2, refused.stderr
    assert ("error: --grid: sweep 'other' is not the full grid of sweep 'reported': its dpo grid differs: 4 of this "
            "sweep's 4 settings are not in it") in refused.stderr
    assert not (root / "vs-other.html").exists()
