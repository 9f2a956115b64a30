"""Models and tokenizers: the built-in tiny Llama for the synthetic task, saved as an ordinary HF folder.

Everything downstream loads models with `AutoModelForCausalLM.from_pretrained(folder)`, so the tiny model
and a real one take the same code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from trainers import synthetic

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
_READY_MARKER = "posweep-ready.json"


def build_task_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the synthetic task's vocabulary (one token per word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *synthetic.vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word tokens with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, clean_up_tokenization_spaces=False)


def build_tiny_model(model_spec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_spec.hidden_size,
        intermediate_size=model_spec.intermediate_size,
        num_hidden_layers=model_spec.num_layers,
        num_attention_heads=model_spec.num_heads,
        num_key_value_heads=model_spec.num_heads,
        max_position_embeddings=model_spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(model_spec.seed)
    return LlamaForCausalLM(config)


def model_fingerprint(model_spec) -> str:
    """Hash of everything the built model depends on: its spec and the task vocabulary."""
    payload = json.dumps({"spec": model_spec.model_dump(), "vocab": synthetic.vocabulary()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_folder_atomically(target: Path, write) -> Path:
    """Run `write(tmp_dir)` and move the result to `target` in one rename; readers never see half a folder."""
    if (target / _READY_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        (tmp / _READY_MARKER).write_text(json.dumps({"name": target.name}))
        if target.exists():  # an unfinished earlier attempt (no marker): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        if (target / _READY_MARKER).exists():  # another process finished the same folder first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_base_model(model_spec, cache_dir: Path) -> Path:
    """Build the initial model + tokenizer once per model fingerprint and return its HF folder."""
    target = Path(cache_dir) / f"base-{model_spec.kind}-{model_fingerprint(model_spec)}"

    def write(folder: Path) -> None:
        tokenizer = build_task_tokenizer()
        build_tiny_model(model_spec, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(target, write)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(folder))


def load_causal_lm(folder: Path, device: torch.device) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.to(device)


def save_model(model, tokenizer, target: Path) -> Path:
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return write_folder_atomically(target, write)
