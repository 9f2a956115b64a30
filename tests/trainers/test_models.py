"""Folders shared by concurrent trials (the built base model, dequantized GGUF weights) are written once."""

import multiprocessing
import time
from pathlib import Path

from orchestrator.infra.files import write_folder_atomically


def _build(target: str, seconds: float, results) -> None:
    target = Path(target)

    def write(tmp):
        with open(target.parent / "writes.log", "a") as log:  # one line per time the folder is written
            log.write("write\n")
        time.sleep(seconds)
        (Path(tmp) / "weights").write_text("w")

    out = write_folder_atomically(target, write)
    seen = []
    for _ in range(40):  # a reader that uses the folder for a while after it was returned
        seen.append((out / "weights").is_file())
        time.sleep(0.02)
    results.put(all(seen))


def test_concurrent_writers_build_a_folder_once_and_never_delete_it_under_a_reader(tmp_path):
    target = tmp_path / "models" / "base"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_build, args=(str(target), seconds, results)) for seconds in (0.1, 0.6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert [results.get(timeout=5) for _ in workers] == [True, True]
    assert (tmp_path / "models" / "writes.log").read_text().count("write") == 1
    assert (target / "weights").read_text() == "w"
