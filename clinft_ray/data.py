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
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinft_ray.errors import DataError

COLUMNS = ("id", "prompt", "chosen", "rejected")
log = logging.getLogger("clinft")
Prompt = str | list[dict[str, str]]




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
    Parquet file. Column names are as written; `_normalize_columns` cleans them."""
    if path.is_dir():  # a dataset saved with `datasets.Dataset.save_to_disk`
        from datasets import load_from_disk

        try:
            return list(enumerate(load_from_disk(str(path)).to_list(), start=1))
        except (FileNotFoundError, ValueError):
            raise DataError([f"{path}: a folder but not a saved dataset; pass a file, or a folder written by "
                             "datasets' save_to_disk"]) from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(path).to_pylist(), start=1))
        except ValueError:  # pyarrow's ArrowInvalid: not Parquet, or cut short
            raise DataError([f"{path}: not a readable Parquet file; re-export it"]) from None
    raise DataError([f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet"])


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark before the first row is dropped
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


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Spreadsheet exports as they come: a byte-order mark (Excel's "CSV UTF-8"), Windows line ends and
    quoted cells over several lines are read as written (`newline=""` leaves line ends to the csv module)."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))  # a long discharge note is one cell
    with path.open(encoding="utf-8-sig", newline="") as f:
        try:
            return list(enumerate(csv.DictReader(f, restkey=_EXTRA_CELLS), start=1))
        except csv.Error:
            raise DataError([f"{path}: not a readable CSV file; re-export it as CSV (UTF-8)"]) from None


_EXTRA_CELLS = "\0extra"  # DictReader's key for cells beyond the header; no real column has this name
_SAFE_NAME = re.compile(r"^[\w .()/#-]{1,40}$")


def _shown(name: Any) -> str:
    """A column or role name as it may be printed: a headerless CSV makes a data row its header, so a
    name that does not look like one is not echoed."""
    if name == "":
        return "(unnamed)"
    return repr(name) if isinstance(name, str) and _SAFE_NAME.match(name) else "(a name that is not shown)"


def _normalize_columns(raw: list[tuple[int, dict[str, Any]]], found: _Found) -> set[str]:
    """Column names stripped and lower-cased in place (" ID" reads as "id"); two names that become the
    same are a problem. Returns every column name seen, normalized."""
    seen: set[str] = set()
    for i, (n, row) in enumerate(raw):
        clean: dict[str, Any] = {}
        for key, value in row.items():
            if key == _EXTRA_CELLS:
                found.add("the row has more cells than the header has columns",
                          "quote cells that contain the delimiter", n)
                continue
            name = key.strip().lower() if isinstance(key, str) else str(key)
            if name in clean:
                found.add(f"two columns read as {_shown(name)}", "rename one of them (names are compared "
                          "without case or surrounding spaces)", n)
            clean[name] = value
        raw[i] = (n, clean)
        seen |= set(clean)
    return seen


class _Found:
    """Problems on rows, one line per problem and file: a problem on one row names it (and its id), on
    many rows the first few and the count, on every row says so."""

    SHOWN = 4

    def __init__(self, path: Path, total: int):
        self.path, self.total = path, total
        self.hits: dict[tuple[str, str], list[tuple[int, str | None, str]]] = {}

    def add(self, what: str, fix: str, n: int, rid: str | None = None, detail: str | None = None) -> None:
        """`what` is the same on every row it is found on; `detail` is the one-row wording."""
        self.hits.setdefault((what, fix), []).append((n, rid, detail or what))

    def count(self) -> int:
        return sum(len(h) for h in self.hits.values())

    def lines(self) -> list[str]:
        out = []
        for (what, fix), hits in self.hits.items():
            if len(hits) == 1:
                n, rid, detail = hits[0]
                out.append(f"{self.path}: row {n}{f' (id {rid})' if rid else ''}: {detail}; {fix}")
            elif len(hits) == self.total:
                out.append(f"{self.path}: {what} (all {self.total:,} rows); {fix}")
            else:
                out.append(f"{self.path}: {row_list([n for n, _, _ in hits])}: {what}; {fix}")
        return out


def row_list(numbers: list[int], shown: int = _Found.SHOWN) -> str:
    """`[3, 17, 40, 212, 300]` -> "rows 3, 17, 40, 212 and 1 more"; a short list names them all."""
    if len(numbers) <= shown + 1:
        head = ", ".join(str(n) for n in numbers[:-1])
        return f"rows {head} and {numbers[-1]}"
    return f"rows {', '.join(str(n) for n in numbers[:shown])} and {len(numbers) - shown:,} more"


def _row_id(value: Any) -> tuple[str | None, str | None]:
    """(the id as text, None) or (None, what is wrong). Whole numbers are ids too, kept as text, so
    7 and "7" are the same id."""
    if isinstance(value, bool):
        return None, "'id' is true/false, not an id"
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if value != value:  # NaN: how pandas writes an empty cell
            return None, "'id' is empty"
        return (str(int(value)), None) if value.is_integer() else (None, "'id' is a decimal number")
    if isinstance(value, str):
        if not value.strip():
            return None, "'id' is empty"
        if _bad_text(value) or not value.strip().isprintable():
            return None, "'id' holds characters that are not printable text"
        return value.strip(), None
    if value is None:
        return None, "'id' is empty"
    return None, "'id' is a list or mapping, not a single value"


def _bad_text(value: str) -> str | None:
    """Why a text cannot be encoded for a tokenizer (a NUL byte, a lone surrogate), or None."""
    if "\x00" in value:
        return "a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "a lone surrogate (text that is not valid Unicode)"
    return None


ROLES = ("system", "user", "assistant")


def _message_problem(messages: list[Any]) -> tuple[str, str] | None:
    """(what, detail) for the first malformed chat message of a prompt, or None."""
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            return "a chat message is not a mapping", f"chat message {i} is not a mapping"
        if "role" not in m or m["role"] not in ROLES:
            what = "a chat message has no role" if "role" not in m else "a chat message has an unknown role"
            detail = f"chat message {i} has no 'role'" if "role" not in m else \
                f"chat message {i} has an unknown role"  # not echoed: the role is row content
            return what, f"{detail} (roles: {', '.join(ROLES)})"
        if "content" not in m:
            return "a chat message has no 'content'", f"chat message {i} has no 'content'"
        if not isinstance(m["content"], str):
            return "a chat message's content is not text", f"chat message {i}'s content is not text"
        if not m["content"].strip():
            return "a chat message's content is empty", f"chat message {i}'s content is empty"
    if messages[-1]["role"] == "assistant":
        return ("the chat prompt ends with an assistant message", "the chat prompt ends with an assistant "
                "message (the answer follows the last user message)")
    return None


def _texts(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(column, text) for every text a row gives the tokenizer."""
    out = [(c, row[c]) for c in ("chosen", "rejected") if isinstance(row.get(c), str)]
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        out.append(("prompt", prompt))
    elif isinstance(prompt, list):
        out += [("prompt", m["content"]) for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), str)]
    options = row.get("options")
    if isinstance(options, dict):
        out += [("options", v) for v in options.values() if isinstance(v, str)]
    return out


def _row_problems(found: _Found, n: int, row: dict[str, Any], check: GoldCheck | None) -> str | None:
    """Record the row's problems in `found`; returns its id (None if it has no usable one)."""
    missing = [c for c in COLUMNS if c not in row]
    for c in missing:
        found.add(f"column {c!r} is missing", f"every row needs {', '.join(COLUMNS)}", n)
    rid, id_problem = _row_id(row["id"]) if "id" in row else (None, None)
    if id_problem:
        found.add(id_problem, "give every row a unique id (text or a whole number)", n)
    if missing:
        return rid
    before = found.count()
    for col, text in _texts(row):
        if why := _bad_text(text):
            found.add(f"column {col!r} holds {why}", "remove it, or re-export the file as UTF-8 text", n, rid)
    for col in ("prompt", "chosen", "rejected"):
        value = row[col]
        if col == "prompt" and isinstance(value, list) and value:
            if problem := _message_problem(value):
                found.add(problem[0], "write each message as {\"role\": \"user\", \"content\": \"...\"}", n, rid,
                          problem[1])
        elif not (isinstance(value, str) and value.strip()):
            found.add(f"column {col!r} is empty or not text", "fill it in", n, rid)
    if found.count() > before or id_problem:
        return rid
    if row["chosen"].strip() == row["rejected"].strip():
        found.add("'chosen' equals 'rejected'", "DPO needs them to differ", n, rid)
    elif check is not None and (problem := check(row)):
        what, _, fix = problem.partition("; ")
        found.add(what, fix or "fix it", n, rid)
    return rid


def load_split(path: str | Path, check: GoldCheck | None = None) -> list[Example]:
    """Read and check one split; `check(row)` adds the task kind's own check of the gold answer
    (see `tasks.gold_check`). Raises `DataError` listing every problem in the split, one line per
    problem (not per row). Columns the contract does not use are ignored, said once per file."""
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
    found = _Found(path, len(raw))
    columns = _normalize_columns(raw, found)
    if not columns & set(COLUMNS):
        raise DataError([f"{path}: no column is named {', '.join(COLUMNS)}; the first row must be a header "
                         "naming the columns (JSONL: keys of each object)"])
    unused = sorted(columns - set(COLUMNS) - {"options"})
    if unused:
        log.info("%s: column(s) %s are not used and are ignored", path, ", ".join(_shown(c) for c in unused))
    seen: dict[str, int] = {}
    for n, row in raw:
        rid = _row_problems(found, n, row, check)
        if rid is None:
            continue
        if rid in seen:
            found.add("the id repeats an earlier row", "ids must be unique", n,
                      detail=f"id {rid!r} repeats row {seen[rid]}")
        seen.setdefault(rid, n)
    if problems := found.lines():
        raise DataError(problems)
    return [Example(_row_id(r["id"])[0], r["prompt"], r["chosen"].strip(), r["rejected"].strip(), _options(r), row=n)
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
