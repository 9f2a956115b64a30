"""The bad-input corpus (tests/reliability/bad_input/*.yaml, one mistake each; its header says the field, the
words of the message and, where it matters, the line). `sweep run` and `sweep plan` must each exit 2 with one
line `error: FILE[:LINE]: FIELD: message`, no traceback, no MLflow store or run, and nothing written.

Run in-process (cli.main) for speed; tests/orchestrator/test_spec.py runs the same checks through a real
subprocess for a few cases."""

import re
import shutil
from pathlib import Path

import pytest

from orchestrator import cli

CORPUS = Path(__file__).parent / "bad_input"
CASES = sorted(p.stem for p in CORPUS.glob("*.yaml"))


def _header(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# (field|says|line): (.*)$", text, flags=re.M))


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _tokenizer_folders(root: Path) -> None:
    """A model folder (config.json + tokenizer) without a chat template, and one whose tokenizer has neither a
    pad nor an EOS token; built here from the task tokenizer so the corpus holds no binary files."""
    from transformers import LlamaConfig

    from trainers.models import build_task_tokenizer

    for name in ("plain", "no_pad_no_eos"):
        folder = root / "tokenizers" / name
        tokenizer = build_task_tokenizer()
        if name == "no_pad_no_eos":
            tokenizer.pad_token, tokenizer.eos_token = None, None
        tokenizer.save_pretrained(folder)
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2).save_pretrained(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    shutil.copytree(CORPUS, root, dirs_exist_ok=True)
    _tokenizer_folders(root)
    return root


def test_the_corpus_has_at_least_30_cases_each_with_a_header():
    assert len(CASES) >= 30
    for name in CASES:
        header = _header((CORPUS / f"{name}.yaml").read_text())
        assert {"field", "says"} <= set(header), name


@pytest.mark.parametrize("name", CASES)
def test_rejected_with_exit_2_and_one_line(name, corpus, monkeypatch, capsys):
    monkeypatch.chdir(corpus)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = f"{name}.yaml"
    header = _header((corpus / spec).read_text())
    before = _tree(corpus)
    for command in ("run", "plan"):
        code = cli.main([command, spec, "--no-progress"] if command == "run" else [command, spec])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, f"{command} {spec}: exit {code}\n{err}"
        assert len(lines) == 1 and "Traceback" not in err, err
        line = lines[0]
        assert line.startswith(f"error: {spec}:"), line
        if header["field"] != "-":
            assert f": {header['field']}: " in line, line
        assert header["says"] in line, line
        if "line" in header:
            assert line.startswith(f"error: {spec}:{header['line']}: "), line
    assert _tree(corpus) == before  # no mlflow.db, no workdir, no cache: nothing written
