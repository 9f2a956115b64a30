"""Models and tokenizers. Every model spec kind becomes an ordinary HF folder once (ensure_base_model):
the built-in tiny Llama is built and saved; a Hugging Face model is used in place (local folder or hub
snapshot); a GGUF file is dequantized into a plain, trainable folder and cached. Everything downstream loads
with `AutoModelForCausalLM.from_pretrained(folder)`, so the tiny model and a real one take the same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from orchestrator.core.registry import Registry
from orchestrator.infra.files import write_folder_atomically
from trainers import synthetic

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


class WithoutProgressFrames(io.TextIOBase):
    """A text stream that passes writes on to `target` except progress-bar frames: a write holding a carriage
    return (how tqdm redraws its bar) and the line end that closes a run of them."""

    def __init__(self, target):
        self.target, self._in_bar = target, False

    def write(self, text: str) -> int:
        if "\r" in text:
            self._in_bar = True
        elif not (self._in_bar and text == "\n"):
            self._in_bar = False
            self.target.write(text)
        else:
            self._in_bar = False
        return len(text)

    def flush(self) -> None:
        self.target.flush()


@contextlib.contextmanager
def progress_frames_off():
    """While the block runs, and stderr is not a terminal (a log file, a pipe): transformers' progress bars off and
    any other library's (the GGUF conversion's tqdm) kept out of stderr, so a log holds no carriage-return frames.
    On a terminal, bars show as they are."""
    if sys.stderr.isatty():
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(WithoutProgressFrames(sys.stderr)):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


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


def _tiny_base(model_spec, cache_dir: Path) -> Path:
    target = Path(cache_dir) / f"base-tiny-{model_fingerprint(model_spec)}"

    def write(folder: Path) -> None:
        tokenizer = build_task_tokenizer()
        build_tiny_model(model_spec, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(target, write)


def _hf_source_folder(model_spec) -> Path:
    if model_spec.path:
        return Path(model_spec.path).expanduser().resolve()
    from huggingface_hub import snapshot_download

    patterns = [model_spec.gguf_file] if model_spec.gguf_file else None
    return Path(snapshot_download(model_spec.hub_id, revision=model_spec.revision, allow_patterns=patterns))


def dequantize_gguf(source: Path, gguf_file: str, target: Path) -> Path:
    """A GGUF load is quantized and cannot be trained or saved: rebuild a plain model of the same config
    from its (dequantized) state dict, once, into `target`."""
    def write(folder: Path) -> None:
        with progress_frames_off():
            loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file, dtype=torch.float32)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(loaded.state_dict())
            plain.save_pretrained(folder)
            AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file).save_pretrained(folder)

    return write_folder_atomically(target, write)


def _hf_base(model_spec, cache_dir: Path) -> Path:
    source = _hf_source_folder(model_spec)
    if not model_spec.gguf_file:
        return source
    gguf = source / model_spec.gguf_file
    stamp = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode())
    return dequantize_gguf(source, model_spec.gguf_file,
                           Path(cache_dir) / f"gguf-{gguf.stem}-{stamp.hexdigest()[:16]}")


BASE_MODELS: Registry[Callable[..., Path]] = Registry("model kind", {"tiny": _tiny_base, "hf": _hf_base})


def ensure_base_model(model_spec, cache_dir: Path) -> Path:
    """The HF folder of the spec's initial model (built or converted once, then reused)."""
    return BASE_MODELS[model_spec.kind](model_spec, Path(cache_dir))


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {folder} has neither a pad nor an EOS token; add a pad token")
        logging.getLogger(__name__).warning("tokenizer in %s has no pad token; using its EOS token", folder)
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {folder} has no EOS token; responses need one to end")
    return tokenizer


def load_causal_lm(folder: Path, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    if trust_remote_code:
        logging.getLogger(__name__).warning("loading %s with trust_remote_code=True (the spec asked for it)", folder)
    with progress_frames_off():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    return model.to(device)


def save_model(model, tokenizer, target: Path) -> Path:
    """A trial's checkpoint: always written (its own weights, even where an earlier attempt left a folder)."""
    def write(folder: Path) -> None:
        with progress_frames_off():
            model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return write_folder_atomically(target, write, reuse=False)
