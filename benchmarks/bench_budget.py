"""The same grid run in full and with early stopping (ASHA), both on the local executor: what each spends and how
good a configuration each finds.

    python benchmarks/bench_budget.py [--workdir DIR] [--grid paper_mini] [--asha quickstart_asha]
                                      [--order-seeds 0 1 2]

Runs `sweep run GRID` and, per start-order seed, `sweep run ASHA` with that search.early_stopping.order_seed (as
sweep ASHA-sSEED; on the local executor every decision then follows from the seed) into one tracking store in
DIR (an existing DIR resumes: finished trials are skipped), then prints per seed and method: the
device-hours each sweep spent on the method's trials (every trial with an outcome, stopped and failed ones
included), their ratio, the configuration each picks (its best finished trial) and that configuration's rank
among the full grid's finished trials by final mean score, whether it is in the grid's top 10% (the ⌈n/10⌉ best),
and the device-hours each spent before its best-so-far first reached that top 10%. The two specs must plan the
same grids: rung settings are not part of a trial's key, so a configuration is the same trial in both sweeps.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from analysis.budget import budget_curves, budget_table
from orchestrator import api
from orchestrator.core.spec_file import load_spec

COST = "device_hours"


def run(spec: str, workdir: Path) -> float:
    """`sweep run SPEC` in `workdir` (its own ./mlflow.db); wall seconds."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", spec, "--no-progress"], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def seed_table(grid: pd.DataFrame, asha: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """analysis.budget.budget_table of the grid and one early-stopped sweep (the report's budget table)."""
    sweeps = {"grid": grid, "asha": asha}
    return budget_table(sweeps, budget_curves(sweeps, methods, COST), "grid", COST)


def seeded_spec(path: Path, seed: int, workdir: Path) -> Path:
    """A copy of the early-stopping spec with `order_seed` = seed, named NAME-sSEED (one sweep per seed)."""
    spec = yaml.safe_load(path.read_text())
    spec["name"] = f"{spec['name']}-s{seed}"
    spec["search"]["early_stopping"]["order_seed"] = seed
    copy = workdir / f"{spec['name']}.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    return copy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the sweeps run (default: a new temporary folder)")
    parser.add_argument("--grid", default="paper_mini", help="the full grid's spec (a built-in name or a file)")
    parser.add_argument("--asha", default="quickstart_asha", help="the same grid with early stopping")
    parser.add_argument("--order-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one early-stopped sweep per start-order seed (search.early_stopping.order_seed)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_budget_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    grid_path = api.builtin_spec_path(args.grid) or Path(args.grid).resolve()
    asha_path = api.builtin_spec_path(args.asha) or Path(args.asha).resolve()
    paths = {"grid": grid_path, **{f"s{seed}": seeded_spec(asha_path, seed, workdir) for seed in args.order_seeds}}
    walls = {name: run(str(path), workdir) for name, path in paths.items()}
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    names = {name: load_spec(path).name for name, path in paths.items()}
    frames = {name: api.trials(names[name], tracking_uri=uri) for name in paths}
    methods = list(load_spec(grid_path).stages.methods)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print(f"workdir {workdir}; wall seconds per sweep (a resumed sweep's is only what it ran): "
          + ", ".join(f"{names[n]} {w:.0f}" for n, w in walls.items()))
    totals = []
    for seed in args.order_seeds:
        table = seed_table(frames["grid"], frames[f"s{seed}"], methods)
        total = table.groupby("sweep")[f"{COST} spent"].sum()
        totals.append(total["asha"] / total["grid"])
        print(f"\n== order_seed {seed} ({names[f's{seed}']}) ==")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"all methods: grid {total['grid']:.4f} device-h, asha {total['asha']:.4f} device-h, ratio "
              f"{total['asha'] / total['grid']:.3f}")
    print(f"\nratio over all methods, median of {len(totals)} order seeds: {statistics.median(totals):.3f}")
    print(f"report: sweep report {names[f's{args.order_seeds[0]}']} --grid {names['grid']} --tracking-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
