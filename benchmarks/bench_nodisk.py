"""What a sweep without a shared workdir costs: the quickstart on Ray with its artifacts through the server
(executor.shared_workdir: false) against direct writes to the shared workdir (true), and the bytes that cross the
network per trial, measured on the toy and estimated for the paper's SmolLM2-135M and Phi-3-medium (14B) sweeps.

    python benchmarks/bench_nodisk.py --rounds 3

Each round runs both modes, one after the other (interleaved, the order alternating), on a local Ray of 2 CPUs, each
sweep into a fresh store, workdir and node folder; the table holds the medians of the sweeps' wall times. Bytes:
with shared_workdir false every artifact goes up through the server, and a node fetches the selected SFT checkpoint,
its samples and reference log-prob entries it did not compute (posweep.init_from and posweep.ref_cache tags).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.api import builtin_spec_path  # noqa: E402
from orchestrator.core.spec import RayExecutorSpec  # noqa: E402
from orchestrator.core.spec_file import load_spec  # noqa: E402
from orchestrator.pipeline import run_sweep  # noqa: E402
from orchestrator.planner import model_shape, parameter_count, train_pairs  # noqa: E402
from orchestrator.progress import QUIET  # noqa: E402
from orchestrator.runtime.sweep_runs import SweepTracker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = {"shared workdir (direct writes)": True, "no shared disk (through the server)": False}


def _folder_bytes(root: Path, pattern: str) -> list[int]:
    return [sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) for folder in root.rglob(pattern)
            if folder.is_dir()]


def one_sweep(shared: bool) -> dict:
    spec = load_spec(builtin_spec_path("quickstart"))
    with tempfile.TemporaryDirectory(prefix="bench-nodisk-") as tmp:
        executor = RayExecutorSpec(kind="ray", num_cpus=2, shared_workdir=shared, node_dir=str(Path(tmp) / "node"))
        run_spec = spec.model_copy(update={"workdir": str(Path(tmp) / "work"), "executor": executor})
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        started = time.monotonic()
        outcome = run_sweep(run_spec, uri, output=QUIET)
        wall = time.monotonic() - started
        assert not outcome.failed, outcome.summary
        root = Path(tmp) / "mlartifacts"
        uploaded = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        runs = SweepTracker(uri, spec.name).trials()
        fetched = sum(int(m.group(1).replace(",", "")) for r in runs
                      for m in [re.search(r"the store \(([\d,]+) bytes\)", r.tags.get("posweep.init_from", ""))] if m)
        ref_entries = [f.stat().st_size for f in root.rglob("shared/ref_logps/*.pt")]
        fetched += sum(r.tags.get("posweep.ref_cache") == "fetched from the store" for r in runs) * (
            max(ref_entries) if ref_entries else 0)
        checkpoints = _folder_bytes(root, "checkpoint")
        return {"wall": wall, "trials": len(runs), "uploaded": uploaded, "fetched": fetched,
                "checkpoint": max(checkpoints) if checkpoints else 0, "ref_entry": max(ref_entries or [0])}


def estimate(spec_file: Path) -> tuple[str, int, int, int]:
    """(model, parameters, SFT checkpoint bytes in fp32, one reference-log-prob entry's bytes) of a paper sweep."""
    spec = load_spec(spec_file)
    shape, _ = model_shape(spec)
    parameters = parameter_count(shape)
    pairs = train_pairs(spec) or 0
    return spec.model.hub_id if hasattr(spec.model, "hub_id") else spec.name, parameters, 4 * parameters, 8 * pairs


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in MODES}
    for round_ in range(args.rounds):
        order = list(MODES) if round_ % 2 == 0 else list(reversed(MODES))
        for name in order:
            results[name].append(one_sweep(MODES[name]))
            print(f"round {round_ + 1} {name}: {results[name][-1]['wall']:.1f} s", flush=True)
    print(f"\nquickstart on Ray (2 CPUs, 21 trials), medians of {args.rounds} interleaved rounds")
    print(f"{'mode':38} {'wall s':>8} {'runs':>20}  {'uploaded':>10} {'fetched':>10}")
    walls = {}
    for name, runs in results.items():
        walls[name] = statistics.median(r["wall"] for r in runs)
        each = ", ".join(f"{r['wall']:.1f}" for r in runs)
        print(f"{name:38} {walls[name]:8.1f} {each:>20}  "
              f"{_gb(statistics.median(r['uploaded'] for r in runs)):>10} "
              f"{_gb(statistics.median(r['fetched'] for r in runs)):>10}")
    shared, store = (walls[name] for name in MODES)
    print(f"ratio (no shared disk / shared workdir): {store / shared:.3f}x")
    toy = results[list(MODES)[1]][0]
    print(f"\nper trial on the toy: SFT checkpoint {_gb(toy['checkpoint'])} up (every SFT trial), down once per node; "
          f"reference log-probs {_gb(toy['ref_entry'])} up once, down once per other node")
    for spec_file in (REPO / "sweeps/paper/smollm2_hh.yaml", REPO / "sweeps/paper/phi3_saferlhf.yaml"):
        model, parameters, checkpoint, ref = estimate(spec_file)
        print(f"{model}: {parameters / 1e9:.2f}B parameters: SFT checkpoint {_gb(checkpoint)} (fp32) up per SFT trial "
              f"and down once per node; reference log-probs {_gb(ref)} per entry")


if __name__ == "__main__":
    main()
