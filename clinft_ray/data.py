"""Reading a task's splits, checking them, and shaping them for TRL.

Each split is a JSONL, CSV or Parquet file whose rows have `id`, `prompt`, `chosen` (the gold answer)
and `rejected` (a worse answer); in JSONL the prompt may also be a list of chat messages
(`[{"role": "user", "content": ...}]`), and a reasoning row may carry `options` (letter -> text). Problems are reported as one line per problem naming the file,
the row and the column, never the row's text: it may be patient data.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = ("id", "prompt", "chosen", "rejected")
Prompt = str | list[dict[str, str]]


class DataError(ValueError):
    """A split is malformed. `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


GoldCheck = Callable[[dict[str, Any]], "str | None"]


@dataclass(frozen=True)
class Example:
    id: str
    prompt: Prompt
    chosen: str
    rejected: str
    options: dict[str, str] | None = None  # multiple-choice options by letter, when the task has them
    # The row number in its file (as `load_split` counts them), for messages; not part of the example's value.
    row: int = field(default=0, compare=False)


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number, row) pairs. Row N is line N of a JSONL file (blank lines skipped but counted, so
    the number is the line an editor shows), or the Nth data row of a CSV (after its header) or
    Parquet file."""
    if path.is_dir():  # a dataset saved with `datasets.Dataset.save_to_disk`
        from datasets import load_from_disk

        try:
            return list(enumerate(load_from_disk(str(path)).to_list(), start=1))
        except (FileNotFoundError, ValueError):
            raise DataError([f"{path}: a folder but not a saved dataset; pass a file, or a folder written by "
                             "datasets' save_to_disk"]) from None
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


def _row_problems(path: Path, n: int, row: dict[str, Any], check: GoldCheck | None) -> list[str]:
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
    if not out and check is not None and (problem := check(row)):
        out.append(f"{where} (id {row['id']}): {problem}")
    return out


def load_split(path: str | Path, check: GoldCheck | None = None) -> list[Example]:
    """Read and check one split; `check(row)` adds the task kind's own check of the gold answer
    (see `tasks.gold_check`). Raises `DataError` listing every problem in the split."""
    path = Path(path)
    try:
        raw = _read_rows(path)
    except FileNotFoundError:
        raise DataError([f"{path}: file not found; fix the split's path in the config"]) from None
    except UnicodeDecodeError:
        raise DataError([f"{path}: not UTF-8 text; re-save the file as UTF-8"]) from None
    except PermissionError:
        raise DataError([f"{path}: cannot be read (permission denied); make it readable by this user"]) from None
    except OSError as exc:
        raise DataError([f"{path}: cannot be read ({type(exc).__name__}); check the file"]) from None
    if not raw:
        raise DataError([f"{path}: the split is empty; it needs at least one row"])
    problems: list[str] = []
    seen: dict[str, int] = {}
    for n, row in raw:
        problems += _row_problems(path, n, row, check)
        rid = str(row.get("id", ""))
        if rid in seen:
            problems.append(f"{path}: row {n}: id {rid!r} repeats row {seen[rid]}; ids must be unique")
        seen.setdefault(rid, n)
    if problems:
        raise DataError(problems)
    return [Example(str(r["id"]), r["prompt"], r["chosen"].strip(), r["rejected"].strip(), _options(r), row=n)
            for n, r in raw]


def _options(row: dict[str, Any]) -> dict[str, str] | None:
    options = row.get("options")
    return {str(k).upper(): str(v) for k, v in options.items()} if isinstance(options, dict) and options else None


def leakage_problems(train: list[Example], other: list[Example], train_path: Path, other_path: Path) -> list[str]:
    """Rows of `other` (test or dev) whose prompt also appears in train: their scores would be
    inflated by memorisation."""
    seen = {_prompt_key(e.prompt): e.id for e in train}
    return [f"{other_path}: id {e.id}: the same prompt is in {train_path.name} (id {seen[_prompt_key(e.prompt)]}); "
            f"remove it from one of the two splits" for e in other if _prompt_key(e.prompt) in seen]


def _prompt_key(prompt: Prompt) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return hashlib.sha256(" ".join(text.split()).lower().encode()).hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 of a split file (or of a saved dataset folder's files): logged instead of its content,
    to tell datasets apart without PHI."""
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023 (consumed at once)
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
