"""Reading a task's splits, checking them, and shaping them for TRL.

Each split is a JSONL, CSV or Parquet file whose rows have `id`, `prompt`, `chosen` (the gold answer)
and `rejected` (a worse answer); in JSONL the prompt may also be a list of chat messages
(`[{"role": "user", "content": ...}]`). Problems are reported as one line per problem naming the file,
the row and the column, never the row's text: it may be patient data.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = ("id", "prompt", "chosen", "rejected")
Prompt = str | list[dict[str, str]]


class DataError(ValueError):
    """A split is malformed. `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Example:
    id: str
    prompt: Prompt
    chosen: str
    rejected: str


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number, row) pairs. Row N is line N of a JSONL file (blank lines skipped but counted, so
    the number is the line an editor shows), or the Nth data row of a CSV (after its header) or
    Parquet file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError([f"{path}: row {n}: not valid JSON; write one JSON object per line"]) from None
                if not isinstance(row, dict):
                    raise DataError([f"{path}: row {n}: not a JSON object; write one object per line"])
                rows.append((n, row))
        return rows
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(enumerate(csv.DictReader(f), start=1))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    raise DataError([f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet"])


def _row_problems(path: Path, n: int, row: dict[str, Any], labels: list[str] | None) -> list[str]:
    where = f"{path}: row {n}"
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        return [f"{where}: missing column(s) {', '.join(missing)}; every row needs {', '.join(COLUMNS)}"]
    out = []
    for col in ("prompt", "chosen", "rejected"):
        value = row[col]
        ok = isinstance(value, str) and value.strip() or (col == "prompt" and isinstance(value, list) and value)
        if not ok:
            out.append(f"{where} (id {row['id']}): column {col!r} is empty or not text; fill it in")
    if not out and row["chosen"].strip() == row["rejected"].strip():
        out.append(f"{where} (id {row['id']}): 'chosen' equals 'rejected'; DPO needs them to differ")
    if not out and labels is not None and row["chosen"].strip() not in labels:
        out.append(f"{where} (id {row['id']}): 'chosen' is not one of the task's labels {labels}; fix the label")
    return out


def load_split(path: str | Path, labels: list[str] | None = None) -> list[Example]:
    """Read and check one split. Raises `DataError` listing every problem in it."""
    path = Path(path)
    try:
        raw = _read_rows(path)
    except FileNotFoundError:
        raise DataError([f"{path}: file not found; fix the split's path in the config"]) from None
    except UnicodeDecodeError:
        raise DataError([f"{path}: not UTF-8 text; re-save the file as UTF-8"]) from None
    if not raw:
        raise DataError([f"{path}: the split is empty; it needs at least one row"])
    problems: list[str] = []
    seen: dict[str, int] = {}
    for n, row in raw:
        problems += _row_problems(path, n, row, labels)
        rid = str(row.get("id", ""))
        if rid in seen:
            problems.append(f"{path}: row {n}: id {rid!r} repeats row {seen[rid]}; ids must be unique")
        seen.setdefault(rid, n)
    if problems:
        raise DataError(problems)
    return [Example(str(r["id"]), r["prompt"], r["chosen"].strip(), r["rejected"].strip()) for _, r in raw]


def fingerprint(path: str | Path) -> str:
    """sha256 of a split file: logged instead of its content, to tell datasets apart without PHI."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def sft_rows(examples: list[Example], chat: bool) -> list[dict[str, Any]]:
    """TRL prompt/completion rows (conversational when the model has a chat template)."""
    if chat:
        return [
            {"prompt": as_messages(e.prompt), "completion": [{"role": "assistant", "content": e.chosen}]}
            for e in examples
        ]
    return [{"prompt": _plain(e.prompt), "completion": e.chosen} for e in examples]


def dpo_rows(examples: list[Example], chat: bool) -> list[dict[str, Any]]:
    """TRL preference rows: prompt, chosen, rejected."""
    if chat:
        return [
            {
                "prompt": as_messages(e.prompt),
                "chosen": [{"role": "assistant", "content": e.chosen}],
                "rejected": [{"role": "assistant", "content": e.rejected}],
            }
            for e in examples
        ]
    return [{"prompt": _plain(e.prompt), "chosen": e.chosen, "rejected": e.rejected} for e in examples]


def _plain(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    raise DataError(["a prompt is a list of chat messages but the model has no chat template; use a chat model"])
