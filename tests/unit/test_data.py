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
        "row 2: column 'rejected' is missing; every row needs id, prompt, chosen, rejected",
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


# -- what hospitals export: unusual but fine ---------------------------------------------------------

def test_excel_csv_with_bom_crlf_multiline_cells_and_loose_header(tmp_path, caplog):
    """Excel's "CSV UTF-8": a byte-order mark, Windows line ends, a quoted cell over three lines, header
    names with stray spaces and capitals, and a column the contract does not use (said once)."""
    path = tmp_path / "dev.csv"
    text = (' ID ,Prompt,CHOSEN , rejected,MRN\r\n'
            '1,"Dipstick:\r\nnitrite +\r\nleukocytes +",UTI,pyuria,0001\r\n'
            '2,WBC 20,pyuria,UTI,0002\r\n')
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    with caplog.at_level("INFO", logger="clinft"):
        assert load_split(path, LABELS) == [
            Example("1", "Dipstick:\r\nnitrite +\r\nleukocytes +", "UTI", "pyuria"),
            Example("2", "WBC 20", "pyuria", "UTI"),
        ]
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{path}: column(s) 'mrn' are not used and are ignored"]


def test_jsonl_with_bom_and_capitalised_keys(tmp_path):
    path = tmp_path / "dev.jsonl"
    rows = [{"ID": 1, "Prompt": "a", "Chosen": "UTI", "Rejected": "pyuria"}, {**GOOD, "id": "2"}]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert [e.id for e in load_split(path, LABELS)] == ["1", "2"]


def test_parquet_with_numeric_ids_and_an_unused_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "dev.parquet"
    pq.write_table(pa.table({"Id": [7.0, 8.0], "prompt ": ["a", "b"], "chosen": ["UTI", "pyuria"],
                             "rejected": ["pyuria", "UTI"], "ward": ["4B", "ICU"]}), path)
    assert [e.id for e in load_split(path, LABELS)] == ["7", "8"]


def test_numeric_and_text_ids_are_the_same_id(tmp_path):
    """7 and "7" are one id, so a file mixing them is caught repeating it."""
    path = jsonl(tmp_path, [{**GOOD, "id": 7}, {**GOOD, "id": "7", "chosen": "pyuria", "rejected": "UTI"}])
    assert problems(path) == [f"{path}: row 2: id '7' repeats row 1; ids must be unique"]


# -- wrong: refused, one line per problem and file ---------------------------------------------------

WRONG_ROWS = {
    "null id": ({**GOOD, "id": None}, "row 2: 'id' is empty; give every row a unique id"),
    "empty id": ({**GOOD, "id": "  "}, "row 2: 'id' is empty;"),
    "list id": ({**GOOD, "id": [CANARY]}, "row 2: 'id' is a list or mapping, not a single value;"),
    "mapping id": ({**GOOD, "id": {"mrn": CANARY}}, "row 2: 'id' is a list or mapping"),
    "boolean id": ({**GOOD, "id": True}, "row 2: 'id' is true/false, not an id"),
    "id with a NUL": ({**GOOD, "id": "b\x00"}, "row 2: 'id' holds characters that are not printable text"),
    "message without content": ({**GOOD, "id": "b", "prompt": [{"role": "user", "text": CANARY}]},
                                "row 2 (id b): chat message 1 has no 'content'"),
    "unknown role": ({**GOOD, "id": "b", "prompt": [{"role": CANARY, "content": CANARY}]},
                     "row 2 (id b): chat message 1 has an unknown role (roles: system, user, assistant)"),
    "content not text": ({**GOOD, "id": "b", "prompt": [{"role": "system", "content": CANARY},
                                                         {"role": "user", "content": [CANARY]}]},
                         "row 2 (id b): chat message 2's content is not text"),
    "message not a mapping": ({**GOOD, "id": "b", "prompt": [CANARY]}, "row 2 (id b): chat message 1 is not a mapping"),
    "ends with the assistant": ({**GOOD, "id": "b", "prompt": [{"role": "user", "content": CANARY},
                                                               {"role": "assistant", "content": CANARY}]},
                                "row 2 (id b): the chat prompt ends with an assistant message"),
    "NUL byte": ({**GOOD, "id": "b", "prompt": f"{CANARY}\x00"}, "row 2 (id b): column 'prompt' holds a NUL byte"),
    "lone surrogate": ('{"id": "b", "prompt": "' + CANARY + '\\ud800", "chosen": "UTI", "rejected": "pyuria"}',
                       "row 2 (id b): column 'prompt' holds a lone surrogate"),
}


@pytest.mark.parametrize("row, expected", WRONG_ROWS.values(), ids=WRONG_ROWS.keys())
def test_wrong_row_is_one_line_naming_the_row(tmp_path, row, expected):
    lines = problems(jsonl(tmp_path, [GOOD, row]))
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'dev.jsonl'}: {expected}"), lines


def test_a_problem_on_many_rows_is_one_line_with_the_first_rows_and_the_count(tmp_path):
    """Rows 2-7 of 8 lack a prompt: rows 2, 3, 4, 5 named, 6 and 7 counted ("and 2 more")."""
    rows = [GOOD] + [{**GOOD, "id": f"r{i}", "prompt": ""} for i in range(6)] + [{**GOOD, "id": "z"}]
    rows[-1]["id"] = "a"  # and one different problem, which must not drown in the others
    assert problems(jsonl(tmp_path, rows)) == [
        f"{tmp_path / 'dev.jsonl'}: rows 2, 3, 4, 5 and 2 more: column 'prompt' is empty or not text; fill it in",
        f"{tmp_path / 'dev.jsonl'}: row 8: id 'a' repeats row 1; ids must be unique",
    ]


def test_a_column_missing_from_every_row_is_one_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,prompt,chosen\n" + "".join(f"{i},{CANARY},UTI\n" for i in range(4500)))
    assert problems(path) == [f"{path}: column 'rejected' is missing (all 4,500 rows); every row needs id, prompt, "
                              "chosen, rejected"]


def test_two_headers_that_read_the_same_are_refused(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text(f"id,ID ,prompt,chosen,rejected\n1,2,{CANARY},UTI,pyuria\n")
    assert problems(path) == [f"{path}: row 1: two columns read as 'id'; rename one of them (names are compared "
                              "without case or surrounding spaces)"]


def test_headerless_csv_names_no_cell(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text(f"1,{CANARY},UTI,pyuria\n2,{CANARY},pyuria,UTI\n")
    assert problems(path) == [f"{path}: no column is named id, prompt, chosen, rejected; the first row must be a "
                              "header naming the columns (JSONL: keys of each object)"]


def test_csv_row_with_more_cells_than_the_header(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text(f"id,prompt,chosen,rejected\n1,{CANARY},more,UTI,pyuria\n2,b,UTI,pyuria\n")
    assert problems(path)[0] == (f"{path}: row 1: the row has more cells than the header has columns; quote cells "
                                 "that contain the delimiter")


def test_not_a_parquet_file(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "dev.parquet"
    path.write_text(CANARY)
    assert problems(path) == [f"{path}: not a readable Parquet file; re-export it"]
