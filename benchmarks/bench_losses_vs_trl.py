"""Side by side: our training loop vs TRL's trainers on the same tiny model, batch, length and steps; and a
12-trial sweep with shared work on vs off. Prints medians of --repeats runs and the ratios.

    python benchmarks/bench_losses_vs_trl.py --repeats 3

What is timed:
- ours DPO: the training loop of a trial whose reference log-probs come from the sweep's cache (a hit: no
  reference model at all); the one-off cost of filling the cache is printed on its own line.
- TRL DPOTrainer `sigmoid`: trainer.train() (a reference forward every step); with
  precompute_ref_log_probs=True TRL 1.16 runs its precompute pass in __init__, so like our cache fill it is
  not in the timed part.
- ours SimPO vs TRL CPOTrainer `simpo` (cpo_alpha=0): trainer.train() vs our loop.
- sweep: `run_sweep` wall time of 1 SFT + 4 DPO + 4 LN-DPO + 4 SimPO trials (12 preference trials), with
  shared work (reference cache, SFT baseline reused) vs without (--no-shared-work).
Throughput is preference pairs per second of training. Dataset tokenization (TRL's __init__) is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainers.data import encode_pairs  # noqa: E402
from trainers.models import build_task_tokenizer, build_tiny_model  # noqa: E402
from trainers.objectives import preference_objective  # noqa: E402
from trainers.synthetic import generate_split  # noqa: E402
from trainers.train import LoopSettings, make_accelerator, reference_logps, train  # noqa: E402


def tiny(args, seed=0):
    return SimpleNamespace(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_layers=args.layers,
                           num_heads=4, max_positions=128, seed=seed)


def ours(args, method: str, hparams: dict) -> float:
    """Seconds of our loop for args.steps steps (reference log-probs precomputed, as after a cache hit)."""
    tokenizer = build_task_tokenizer()
    pairs = encode_pairs(tokenizer, generate_split("train", args.pairs, seed=0), args.max_length)
    reference = None
    if method == "dpo":
        reference = reference_logps(build_tiny_model(tiny(args, seed=1), tokenizer), pairs, tokenizer.pad_token_id,
                                    args.batch, torch.device("cpu"))
    model = build_tiny_model(tiny(args), tokenizer)
    settings = LoopSettings(learning_rate=1e-4, epochs=100, batch_size=args.batch, warmup_ratio=0.0,
                            weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps, seed=0, log_every=10)
    started = time.perf_counter()
    train(model, pairs, preference_objective(method, hparams, reference), settings, make_accelerator())
    return time.perf_counter() - started


def reference_fill(args) -> float:
    tokenizer = build_task_tokenizer()
    pairs = encode_pairs(tokenizer, generate_split("train", args.pairs, seed=0), args.max_length)
    ref = build_tiny_model(tiny(args, seed=1), tokenizer)
    started = time.perf_counter()
    reference_logps(ref, pairs, tokenizer.pad_token_id, args.batch, torch.device("cpu"))
    return time.perf_counter() - started


def trl_run(args, kind: str) -> float:
    from datasets import Dataset

    tokenizer = build_task_tokenizer()
    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": " " + p.chosen, "rejected": " " + p.rejected}
                                 for p in generate_split("train", args.pairs, seed=0)])
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
                  learning_rate=1e-4, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                  bf16=False,  # TRL's configs default to bf16; both sides fp32 here, like our loop's default
                  save_strategy="no", logging_steps=10, max_length=args.max_length, disable_tqdm=True,
                  dataloader_num_workers=0)
    model = build_tiny_model(tiny(args), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer
            config = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, **common)
            trainer = CPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        else:
            from trl import DPOConfig, DPOTrainer
            config = DPOConfig(loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=(kind == "dpo_precompute"),
                               **common)
            trainer = DPOTrainer(model=model, ref_model=build_tiny_model(tiny(args, seed=1), tokenizer), args=config,
                                 train_dataset=dataset, processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
    return time.perf_counter() - started


SWEEP = """\
name: bench-sharing
workdir: {workdir}
data: {{kind: synthetic, n_train: 2000, n_eval: 64}}
training: {{batch_size: 32, max_length: 48}}
evaluation: {{num_prompts: 64, max_new_tokens: 24}}
stages:
  sft: {{grid: {{learning_rate: [3.0e-3], epochs: [3]}}}}
  methods:
    dpo: {{grid: {{beta: [0.05, 0.1, 0.3, 0.5], learning_rate: [3.0e-4]}}}}
    ln_dpo: {{grid: {{beta: [1.0, 1.5, 2.0, 3.0], learning_rate: [3.0e-4]}}}}
    simpo: {{zip: {{beta: [2.0, 2.0, 2.5, 2.5], gamma: [0.5, 1.0, 0.5, 1.0]}}, grid: {{learning_rate: [3.0e-4]}}}}
"""


def sweep_seconds(share_work: bool) -> float:
    from orchestrator.core.spec_file import parse_spec
    from orchestrator.pipeline import run_sweep
    from orchestrator.progress import QUIET

    root = Path(tempfile.mkdtemp())
    spec = parse_spec(SWEEP.format(workdir=root / "work"))
    started = time.perf_counter()
    outcome = run_sweep(spec, f"sqlite:///{root / 'mlflow.db'}", output=QUIET,
                        share_work=share_work)
    assert outcome.failed == 0 and outcome.ran == 14
    return time.perf_counter() - started


def median_of(repeats: int, fn, *a) -> float:
    return statistics.median(fn(*a) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--only-sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    pairs_done = args.steps * args.batch
    if not args.only_sweep:
        trainer_table(args, pairs_done)
    if not args.skip_sweep:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits both sides alike
            for share in (True, False):
                times[share].append(sweep_seconds(share))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"\n12-trial DPO/LN-DPO/SimPO sweep (+1 SFT, +1 untrained): shared work on {on:.1f} s, off {off:.1f} s,"
              f" ratio {off / on:.2f}x  (target >= 1.3x)   [on: {times[True]}, off: {times[False]}]")


def trainer_table(args, pairs_done: int) -> None:
    rows = [
        ("ours DPO (reference cache hit)", median_of(args.repeats, ours, args, "dpo", {"beta": 0.1})),
        ("TRL DPOTrainer sigmoid", median_of(args.repeats, trl_run, args, "dpo")),
        ("TRL DPOTrainer sigmoid + precompute_ref_log_probs", median_of(args.repeats, trl_run, args, "dpo_precompute")),
        ("ours SimPO", median_of(args.repeats, ours, args, "simpo", {"beta": 2.0, "gamma": 0.5})),
        ("TRL CPOTrainer simpo (cpo_alpha=0)", median_of(args.repeats, trl_run, args, "simpo")),
    ]
    fill = median_of(args.repeats, reference_fill, args)
    print(f"tiny Llama hidden={args.hidden} layers={args.layers}, batch {args.batch} pairs, max_length "
          f"{args.max_length}, {args.steps} steps, median of {args.repeats}, {torch.get_num_threads()} threads\n")
    print(f"{'run':<52} {'seconds':>8} {'pairs/s':>8}")
    for name, seconds in rows:
        print(f"{name:<52} {seconds:>8.2f} {pairs_done / seconds:>8.1f}")
    print(f"{'(one-off: filling the reference cache, ' + str(args.pairs) + ' pairs)':<52} {fill:>8.2f}")
    t = dict(rows)
    print("\nratios (throughput, higher is better for ours)")
    print(f"  ours DPO / TRL DPO (no precompute):   {t['TRL DPOTrainer sigmoid'] / t['ours DPO (reference cache hit)']:.2f}x"
          "  (target >= 1.25x)")
    print(f"  ours DPO / TRL DPO (precompute):      "
          f"{t['TRL DPOTrainer sigmoid + precompute_ref_log_probs'] / t['ours DPO (reference cache hit)']:.2f}x")
    print(f"  ours SimPO / TRL CPO simpo:           {t['TRL CPOTrainer simpo (cpo_alpha=0)'] / t['ours SimPO']:.2f}x"
          "  (target >= 1.0x)")


if __name__ == "__main__":
    main()
