"""The reference-log-prob cache: same inputs hit, any input that changes the value misses, and a trial
trained from the cache follows the same loss curve as one that computed its reference."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainers.cache import cached_reference_logps, reference_cache_key
from trainers.data import encode_pairs
from trainers.models import build_task_tokenizer, build_tiny_model, save_model
from trainers.objectives import preference_objective
from trainers.synthetic import generate_split
from trainers.train import LoopSettings, make_accelerator, reference_logps, train

TINY = SimpleNamespace(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_positions=64, seed=0)


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    tokenizer = build_task_tokenizer()
    return save_model(build_tiny_model(TINY, tokenizer), tokenizer, tmp_path / "sft")


def test_key_changes_with_max_length_data_and_checkpoint(tmp_path, checkpoint):
    pairs = generate_split("train", 32, seed=0)
    key = reference_cache_key(checkpoint, pairs, 40)
    assert key == reference_cache_key(checkpoint, pairs, 40)
    assert key != reference_cache_key(checkpoint, pairs, 41)
    assert key != reference_cache_key(checkpoint, generate_split("train", 32, seed=1), 40)
    assert key != reference_cache_key(checkpoint, pairs[:-1], 40)
    tokenizer = build_task_tokenizer()
    other = save_model(build_tiny_model(SimpleNamespace(**{**vars(TINY), "seed": 1}), tokenizer), tokenizer,
                       tmp_path / "other-sft")
    assert key != reference_cache_key(other, pairs, 40)


def test_second_call_hits_and_never_recomputes(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(3.0), -torch.arange(3.0)

    first, hit1 = cached_reference_logps(tmp_path, "k", 3, compute)
    second, hit2 = cached_reference_logps(tmp_path, "k", 3, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    leftovers = [p for p in (tmp_path / "ref_logps").iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    assert not leftovers  # no temporary files (the lock file stays: flock needs a file)


def test_unreadable_cache_file_is_recomputed(tmp_path):
    (tmp_path / "ref_logps").mkdir()
    (tmp_path / "ref_logps" / "k.pt").write_bytes(b"truncated")
    values, hit = cached_reference_logps(tmp_path, "k", 2, lambda: (torch.zeros(2), torch.ones(2)))
    assert not hit and torch.equal(values[1], torch.ones(2))


def test_training_from_cache_follows_the_same_loss_curve(tmp_path, checkpoint):
    tokenizer = build_task_tokenizer()
    pairs = encode_pairs(tokenizer, generate_split("train", 64, seed=0), 40)
    settings = LoopSettings(learning_rate=1e-3, epochs=2, batch_size=16, warmup_ratio=0.0, weight_decay=0.0,
                            max_grad_norm=1.0, max_steps=None, seed=0, log_every=1)

    def curve(reference):
        model = build_tiny_model(SimpleNamespace(**{**vars(TINY), "seed": 2}), tokenizer)
        history = train(model, pairs, preference_objective("dpo", {"beta": 0.5}, reference), settings,
                        make_accelerator())
        return torch.tensor([h["loss"] for h in history])

    def compute():
        from trainers.models import load_causal_lm
        return reference_logps(load_causal_lm(checkpoint, torch.device("cpu")), pairs, tokenizer.pad_token_id, 16,
                               torch.device("cpu"))

    fresh, hit = cached_reference_logps(tmp_path / "cache", "key", len(pairs), compute)
    cached, hit_again = cached_reference_logps(tmp_path / "cache", "key", len(pairs), compute)
    assert (hit, hit_again) == (False, True)
    torch.testing.assert_close(curve(cached), curve(compute()), rtol=0, atol=1e-5)


def test_encoded_pairs_are_shared_within_a_process_by_tokenizer_data_and_length(tmp_path, checkpoint):
    from trainers.cache import shared_encoded_pairs

    tokenizer = build_task_tokenizer()
    raw = generate_split("train", 16, seed=0)
    calls = []

    def encode(max_length):
        calls.append(max_length)
        return encode_pairs(tokenizer, raw, max_length)

    first = shared_encoded_pairs(checkpoint, raw, 40, lambda: encode(40))
    assert shared_encoded_pairs(checkpoint, raw, 40, lambda: encode(40)) is first
    shared_encoded_pairs(checkpoint, raw, 32, lambda: encode(32))
    shared_encoded_pairs(checkpoint, raw[:-1], 40, lambda: encode(40))
    (checkpoint / "tokenizer_config.json").write_text((checkpoint / "tokenizer_config.json").read_text() + " ")
    shared_encoded_pairs(checkpoint, raw, 40, lambda: encode(40))  # tokenizer files changed: a miss
    assert calls == [40, 32, 40, 40]


def test_checkpoint_fingerprint_follows_content_changes(checkpoint):
    from trainers.cache import folder_fingerprint

    before = folder_fingerprint(checkpoint)
    assert folder_fingerprint(checkpoint) == before
    config = checkpoint / "config.json"
    config.write_text(config.read_text() + "\n")
    assert folder_fingerprint(checkpoint) != before


def _miss_slowly(cache_dir: str, marker: str) -> None:
    import time

    def compute():
        with open(marker, "a") as f:
            f.write("computed\n")
        time.sleep(1.0)
        return torch.arange(3.0), -torch.arange(3.0)

    cached_reference_logps(Path(cache_dir), "k", 3, compute)


def test_concurrent_misses_compute_once(tmp_path):
    """Two processes (trials of a sweep, ranks of one trial) missing the same key at once: one computes, the
    other waits on the key's lock and reads the file."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    marker = tmp_path / "computed.txt"
    workers = [context.Process(target=_miss_slowly, args=(str(tmp_path), str(marker))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert marker.read_text().count("computed") == 1
