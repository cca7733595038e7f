"""Reading and checking splits: every problem names the file and row, never the row's text."""

import json
from pathlib import Path

import pytest

from clinft_ray.config import ClassificationTask
from clinft_ray.data import DataError, Example, load_split
from clinft_ray.tasks import gold_check

SPLITS = {s: f"{s}.jsonl" for s in ("train", "eval", "dev", "test")}
LABELS = gold_check(ClassificationTask(name="t", kind="classification", labels=["UTI", "pyuria"], splits=SPLITS))
CANARY = "CANARY-PHI-7731"  # stands in for patient text; must never reach an error message
GOOD = {"id": "a", "prompt": f"Urinalysis for {CANARY}", "chosen": "UTI", "rejected": "pyuria"}


def jsonl(tmp_path: Path, rows: list, name: str = "dev.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def problems(path: Path, labels=LABELS) -> list[str]:
    with pytest.raises(DataError) as err:
        load_split(path, labels)
    assert CANARY not in str(err.value)
    return err.value.problems


# Each bad row is row 2, after a good row 1; all plant the canary in their text.
BAD_ROWS = {
    "missing column": (
        {"id": "b", "prompt": CANARY, "chosen": "UTI"},
        "row 2: missing column(s) rejected",
    ),
    "empty prompt": (
        {"id": "b", "prompt": "   ", "chosen": "UTI", "rejected": f"pyuria {CANARY}"},
        "row 2 (id b): column 'prompt' is empty or not text",
    ),
    "chosen equals rejected": (
        {"id": "b", "prompt": CANARY, "chosen": f"UTI {CANARY}", "rejected": f"UTI {CANARY}"},
        "row 2 (id b): 'chosen' equals 'rejected'",
    ),
    "duplicate id": (
        {**GOOD, "chosen": "pyuria", "rejected": f"UTI {CANARY}"},
        "row 2: id 'a' repeats row 1",
    ),
    "label outside the label set": (
        {"id": "b", "prompt": CANARY, "chosen": f"cystitis {CANARY}", "rejected": "UTI"},
        "row 2 (id b): 'chosen' is not one of the task's labels",
    ),
    "invalid JSON": (
        '{"id": "b", "prompt": "' + CANARY + '", ',
        "row 2: not valid JSON",
    ),
    "not an object": (
        f'["{CANARY}"]',
        "row 2: not a JSON object",
    ),
}


@pytest.mark.parametrize("row, expected", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_is_named_by_file_and_row(tmp_path, row, expected):
    path = jsonl(tmp_path, [GOOD, row])
    lines = problems(path)
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: {expected}")


def test_every_bad_row_is_reported_together(tmp_path):
    empty_prompt = {**BAD_ROWS["empty prompt"][0], "id": "c"}
    rows = [GOOD, BAD_ROWS["missing column"][0], empty_prompt, BAD_ROWS["duplicate id"][0]]
    lines = problems(jsonl(tmp_path, rows))
    assert [line.split(": ")[1] for line in lines] == ["row 2", "row 3 (id c)", "row 4"]


def test_non_utf8_file(tmp_path):
    path = tmp_path / "dev.jsonl"
    row = json.dumps({**GOOD, "prompt": f"caf\u00e9 {CANARY}"}, ensure_ascii=False)
    path.write_bytes(row.encode("latin-1"))  # the \u00e9 becomes byte 0xE9, invalid in UTF-8
    assert problems(path) == [f"{path}: not UTF-8 text; re-save the file as UTF-8"]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "dev.jsonl"
    path.write_text(content)
    assert problems(path) == [f"{path}: the split is empty; it needs at least one row"]


def test_unsupported_extension(tmp_path):
    path = jsonl(tmp_path, [GOOD], name="dev.txt")
    assert problems(path) == [f"{path}: unsupported file type '.txt'; use .jsonl, .csv or .parquet"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert problems(path) == [f"{path}: file not found; fix the split's path in the config"]


def test_jsonl_loads_with_chat_prompt_and_stripped_answers(tmp_path):
    chat = [{"role": "user", "content": "Is this a UTI?"}]
    path = jsonl(tmp_path, [GOOD, {"id": 2, "prompt": chat, "chosen": " pyuria\n", "rejected": "UTI"}])
    assert load_split(path, LABELS) == [
        Example("a", GOOD["prompt"], "UTI", "pyuria"),
        Example("2", chat, "pyuria", "UTI"),
    ]


def test_labels_not_checked_without_a_label_set(tmp_path):
    path = jsonl(tmp_path, [{"id": "a", "prompt": "p", "chosen": "free text", "rejected": "worse"}])
    assert load_split(path).pop().chosen == "free text"


def test_csv_loads(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text('id,prompt,chosen,rejected\n1,"Dipstick, nitrite +",UTI,pyuria\n2,WBC 20,pyuria,UTI\n')
    assert load_split(path, LABELS) == [
        Example("1", "Dipstick, nitrite +", "UTI", "pyuria"),
        Example("2", "WBC 20", "pyuria", "UTI"),
    ]


def test_csv_short_row_is_reported(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text(f"id,prompt,chosen,rejected\n1,{CANARY},UTI\n")
    assert problems(path) == [f"{path}: row 1 (id 1): column 'rejected' is empty or not text; fill it in"]


def test_parquet_loads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "dev.parquet"
    table = pa.table({"id": [7, 8], "prompt": ["a", "b"], "chosen": ["UTI", "pyuria"], "rejected": ["pyuria", "UTI"]})
    pq.write_table(table, path)
    assert load_split(path, LABELS) == [Example("7", "a", "UTI", "pyuria"), Example("8", "b", "pyuria", "UTI")]


def test_parquet_null_is_reported(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "dev.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": [CANARY], "chosen": [None], "rejected": ["UTI"]}), path)
    assert problems(path) == [f"{path}: row 1 (id a): column 'chosen' is empty or not text; fill it in"]
