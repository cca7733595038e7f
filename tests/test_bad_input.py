"""Bad input never costs what is already done: each malformed config or dataset given to `clinft run`
gets its one-line error naming the key, file or row, exit code 2, no traceback, no row text, and the
output directory of the finished demo study it points at is left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CANARY = "CANARY-PHI-8113"


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file of an output folder (results, MLflow store, checkpoints, Tune state) by content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != "bad"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broken_jsonl(folder: Path) -> Path:
    rows = [json.loads(line) for line in (folder / "data" / "classification" / "dev.jsonl").read_text().splitlines()]
    lines = [json.dumps(r) for r in rows]
    lines[4] = lines[4][: len(lines[4]) // 2] + " " + CANARY  # a row cut in half
    path = folder / "bad" / "dev-cut.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _same_answers(folder: Path) -> Path:
    rows = [json.loads(line) for line in (folder / "data" / "classification" / "dev.jsonl").read_text().splitlines()]
    rows[2]["prompt"] += " " + CANARY
    rows[2]["rejected"] = rows[2]["chosen"]
    path = folder / "bad" / "dev-same.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bad_space(folder: Path) -> Path:
    path = folder / "bad" / "sft.yaml"
    path.write_text("stage: sft\nlearning_rate: {grid: [fast]}\nmax_steps: 10\neval_steps: 5\n")
    return path


CASES = {
    "unknown key": (lambda d: ["--set", "modle.name=x"], "modle: unknown key"),
    "wrong type": (lambda d: ["--set", "seed=abc"], "seed:"),
    "impossible resources": (lambda d: ["--set", "resources.gpus_per_trial=1.5"], "whole number"),
    "missing split": (lambda d: ["--set", "tasks.0.splits.dev=nope.jsonl"], "tasks.uti.splits.dev"),
    "row cut in half": (lambda d: ["--set", f"tasks.0.splits.dev={_broken_jsonl(d)}"], "dev-cut.jsonl: row 5"),
    "chosen equals rejected": (lambda d: ["--set", f"tasks.0.splits.dev={_same_answers(d)}"],
                               "row 3 (id dev-0002): 'chosen' equals 'rejected'"),
    "bad search space": (lambda d: ["--set", f"sft.space={_bad_space(d)}"], "sft.space"),
    "another study in the folder": (lambda d: ["--set", "seed=7"], "holds the finished study 'uti-demo'"),
    "tracking server down": (lambda d: ["--set", "seed=8", "--out", str(d / "bad" / "fresh"), "--set",
                                        f"mlflow.tracking_uri=http://127.0.0.1:{_closed_port()}"], "does not answer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_damages_nothing(case, demo_run, tmp_path):
    study, _ = demo_run
    folder = study.config.output_dir
    (folder / "bad").mkdir(exist_ok=True)
    args, expected = CASES[case]
    extra = args(folder)
    before = _snapshot(folder)
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "clinft_ray.cli", "run", str(folder / "study.yaml"), *extra],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("clinft: error:")]
    assert errors and any(expected in line for line in errors), res.stderr[-2000:]
    assert "Traceback" not in res.stderr and CANARY not in res.stderr + res.stdout
    assert time.monotonic() - start < 120
    assert _snapshot(folder) == before
