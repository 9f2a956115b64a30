"""How long planning a big grid takes: `plan_sweep` of a spec with N preference trials (a β × learning-rate grid
on the built-in task) and every trial's key, as `sweep plan` and `sweep run` need them.

    python benchmarks/bench_plan.py --trials 100000 --repeats 3

Prints seconds and microseconds per trial (median of --repeats); the target is 100,000 trials in 5 s or less.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.core.spec_file import parse_spec  # noqa: E402
from orchestrator.grid import plan_sweep  # noqa: E402

SPEC = """\
name: big
max_trials: {cap}
stages:
  sft: {{grid: {{learning_rate: [1.0e-3]}}}}
  methods:
    dpo: {{grid: {{beta: [{betas}], learning_rate: [{lrs}]}}}}
"""


def spec_text(trials: int) -> str:
    side = math.isqrt(trials)
    betas = ", ".join(f"{0.0001 * (i + 1):.4f}" for i in range(side))
    lrs = ", ".join(f"{1e-7 * (i + 1):.3e}" for i in range(math.ceil(trials / side)))
    return SPEC.format(cap=trials * 2, betas=betas, lrs=lrs)


def plan_seconds(text: str) -> tuple[float, int]:
    started = time.perf_counter()
    stages = plan_sweep(parse_spec(text))
    keys = {t.trial_key for s in stages for t in s.trials}
    return time.perf_counter() - started, len(keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    text = spec_text(args.trials)
    runs = [plan_seconds(text) for _ in range(args.repeats)]
    seconds = statistics.median(r[0] for r in runs)
    print(f"planned {runs[0][1]:,} distinct trials (spec parsing, expansion, keys): median {seconds:.2f} s of "
          f"{[round(r[0], 2) for r in runs]}, {1e6 * seconds / runs[0][1]:.0f} µs per trial (target: 100,000 "
          "in 5 s or less)")


if __name__ == "__main__":
    main()
