"""Bad input never costs what is already done: each malformed config or dataset given to `clinft run`
gets its one-line error naming the key, file or row, exit code 2, no traceback, no row text, and the
output directory of the finished demo study it points at is left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import clinft_in_process, copy_demo, free_port

CANARY = "CANARY-PHI-8113"


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file of an output folder (results, MLflow store, checkpoints, Tune state) by content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != "bad"}


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
                                        f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}"], "does not answer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_damages_nothing(case, demo_run, capsys):
    """`clinft run` (in this process; the real command is run below) on the finished demo study's own
    folder: its results, MLflow store, checkpoints and Tune state are byte for byte the same after."""
    study, _ = demo_run
    folder = study.config.output_dir
    (folder / "bad").mkdir(exist_ok=True)
    args, expected = CASES[case]
    extra = args(folder)
    before = _snapshot(folder)
    code, errors, text = clinft_in_process(capsys, "run", str(folder / "study.yaml"), *extra)
    assert code == 2, text[-2000:]
    assert errors and any(expected in line for line in errors), text[-2000:]
    assert "Traceback" not in text and CANARY not in text
    assert _snapshot(folder) == before  # nothing trained, nothing rewritten


# -- The same promise for each category of bad input, without the demo run: `clinft` in-process (fast),
# pointed at an earlier run's output folder, and a few cases through the real command. ----------------

CANARY2 = "CANARY-PHI-4470"  # in every bad row's text; must never reach the console


def _outputs_of_an_earlier_run(folder: Path) -> Path:
    """A finished-looking output folder: results, an MLflow store, a checkpoint, Tune state."""
    files = {"results.json": json.dumps({"study": "uti-demo", "fingerprint": "an-earlier-one"}),
             "outcomes.jsonl": '{"task": "uti", "stage": "base", "id": "t1", "correct": true}\n',
             "progress.json": "{}", "mlflow.db": "sqlite", "report.md": "# report\n",
             "ray/sft/trial_0/checkpoint_000001/model.safetensors": "weights"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under `folder`, with its content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                         p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def study(demo_dir, tmp_path_factory) -> Path:
    """A copy of the demo's study (data, tiny model, spaces) with an earlier run's outputs in `earlier/`."""
    root = tmp_path_factory.mktemp("badin") / "study"
    copy_demo(demo_dir, root, also_skip=("bad",))  # the bad inputs other tests wrote into the demo folder
    (root / "bad").mkdir()
    (root / "earlier").mkdir()
    _outputs_of_an_earlier_run(root / "earlier")
    return root


def _dev_rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "data" / "classification" / "dev.jsonl").read_text().splitlines()]


def _bad_dev(root: Path, name: str, change) -> list[str]:  # noqa: ANN001
    rows = _dev_rows(root)
    change(rows)
    path = root / "bad" / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--set", f"tasks.uti.splits.dev={path}"]


def _rows_at(indexes, edit):  # noqa: ANN001
    def change(rows):
        for i in indexes:
            rows[i]["prompt"] += " " + CANARY2
            edit(rows[i])
    return change


def _csv_without_rejected(root: Path) -> list[str]:
    import csv

    path = root / "bad" / "dev.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt", "chosen"])
        w.writeheader()
        w.writerows({"id": r["id"], "prompt": r["prompt"] + CANARY2, "chosen": r["chosen"]} for r in _dev_rows(root))
    return ["--set", f"tasks.uti.splits.dev={path}"]


def _dpo_beta(root: Path) -> Path:
    path = root / "bad" / "dpo-beta.yaml"
    path.write_text("stage: dpo\nlearning_rate: 1.0e-3\nbeta: {grid: [0, 0.1]}\nmax_steps: 20\neval_steps: 10\n")
    return path


def _space(root: Path, stage: str, text: str) -> list[str]:
    path = root / "bad" / f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    head = "stage: sft\n" if stage == "sft" else "stage: dpo\nbeta: 0.1\n"
    path.write_text(head + "max_steps: 20\neval_steps: 10\n" + text)
    return ["--set", f"{stage}.space={path}"]


BAD = {
    # data: one line per problem and file, naming the rows
    "csv without a column": (_csv_without_rejected, "dev.csv: column 'rejected' is missing (all 100 rows); every "
                             "row needs id, prompt, chosen, rejected"),
    "null ids on many rows": (lambda d: _bad_dev(d, "null-ids.jsonl", _rows_at([2, 9, 19, 29, 39, 49],
                                                                                lambda r: r.update(id=None))),
                              "null-ids.jsonl: rows 3, 10, 20, 30 and 2 more: 'id' is empty; give every row a unique id"),
    "id that is a list": (lambda d: _bad_dev(d, "list-id.jsonl", _rows_at([4], lambda r: r.update(id=[CANARY2]))),
                          "list-id.jsonl: row 5: 'id' is a list or mapping, not a single value"),
    "chat message without content": (
        lambda d: _bad_dev(d, "no-content.jsonl", _rows_at([1], lambda r: r.update(prompt=[{"role": "user",
                                                                                           "text": r["prompt"]}]))),
        "no-content.jsonl: row 2 (id dev-0001): chat message 1 has no 'content'"),
    "chat message with an unknown role": (
        lambda d: _bad_dev(d, "role.jsonl", _rows_at([1], lambda r: r.update(prompt=[{"role": CANARY2,
                                                                                     "content": r["prompt"]}]))),
        "role.jsonl: row 2 (id dev-0001): chat message 1 has an unknown role (roles: system, user, assistant)"),
    "chat content that is not text": (
        lambda d: _bad_dev(d, "content.jsonl", _rows_at([1], lambda r: r.update(prompt=[{"role": "user",
                                                                                        "content": [r["prompt"]]}]))),
        "content.jsonl: row 2 (id dev-0001): chat message 1's content is not text"),
    "NUL byte": (lambda d: _bad_dev(d, "nul.jsonl", _rows_at([6], lambda r: r.update(prompt=r["prompt"] + "\x00"))),
                 "nul.jsonl: row 7 (id dev-0006): column 'prompt' holds a NUL byte"),
    "lone surrogate": (lambda d: _bad_dev(d, "surrogate.jsonl", _rows_at([6], lambda r: r.update(
        chosen="UTI\ud800"))), "surrogate.jsonl: row 7 (id dev-0006): column 'chosen' holds a lone surrogate"),
    # config and --set: the override is named, in the user's words
    "task kind typo": (lambda d: ["--set", "tasks.uti.kind=classifcation"],
                       "--set tasks.uti.kind=classifcation: tasks.0.kind: 'classifcation' is not a task kind; did you "
                       "mean 'classification'?"),
    "resources not a number": (lambda d: ["--set", "resources.gpus_per_trial=lots"],
                               "--set resources.gpus_per_trial=lots: resources.gpus_per_trial: got 'lots'; it takes a "
                               "number or 'auto'"),
    "no task of that name": (lambda d: ["--set", "tasks.sepsis.scoring=generate"],
                             "--set tasks.sepsis.scoring=generate: tasks: 'sepsis' is neither an index"),
    # search spaces: values outside their meaning
    "learning rate not positive": (lambda d: _space(d, "sft", "learning_rate: {grid: [1.0e-3, -1.0e-3]}\n"),
                                   "learning_rate: -0.001 is not positive"),
    "beta not positive": (lambda d: ["--set", f"dpo.space={_dpo_beta(d)}"], "beta: 0 is not positive"),
    "duplicate grid values": (lambda d: _space(d, "sft", "learning_rate: {grid: [1.0e-3, 1.0e-3]}\n"),
                              "learning_rate.grid: grid lists 0.001 more than once"),
    "empty grid": (lambda d: _space(d, "sft", "learning_rate: {grid: []}\n"), "learning_rate.grid: got an empty list"),
    "batch size below 1": (lambda d: _space(d, "sft", "learning_rate: 1.0e-3\nbatch_size: 0\n"),
                           "batch_size: got 0; it takes a whole number of at least 1"),
    "patience below 1": (lambda d: _space(d, "sft", "learning_rate: 1.0e-3\npatience: 0\n"),
                         "patience: got 0; it takes a whole number of at least 1"),
    "grace period as long as the trial": (
        lambda d: _space(d, "sft", "learning_rate: 1.0e-3\nscheduler: {asha: {grace_steps: 20}}\n"),
        "scheduler.asha.grace_steps: 20 is not shorter than the trial (max_steps 20)"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_wrong_input_is_one_line_exit_2_and_changes_no_earlier_output(study, capsys, command, case):
    make, expected = BAD[case]
    extra = make(study)
    before = _tree(study / "earlier")
    code, errors, text = clinft_in_process(capsys, command, str(study / "study.yaml"), "--out", str(study / "earlier"),
                                     *extra)
    assert code == 2, text
    assert len(errors) == 1 and expected in errors[0], text
    assert "Traceback" not in text and CANARY2 not in text
    assert _tree(study / "earlier") == before


def _a_file(root: Path) -> Path:
    (root / "bad" / "a-file").write_text("not a folder")
    return root / "bad" / "a-file"


LOCATIONS = {
    "output folder is a file": (lambda d: ["--out", str(_a_file(d))], "output_dir {d}/bad/a-file is a file, not a "
                                "folder; pass another --out (or output_dir)"),
    "output folder under a file": (lambda d: ["--out", str(_a_file(d) / "out")],
                                   "output_dir {d}/bad/a-file/out is under {d}/bad/a-file, which is a file"),
    "output folder inside the data": (lambda d: ["--out", str(d / "data" / "classification" / "runs")],
                                      "output_dir {d}/data/classification/runs is inside the data folder "
                                      "{d}/data/classification of tasks.uti.splits.train; keep outputs out of the data"),
    "storage inside the data": (lambda d: ["--set", f"storage_path={d}/data/classification/ray"],
                                "storage_path {d}/data/classification/ray is inside the data folder"),
    "storage under a file": (lambda d: ["--set", f"storage_path={_a_file(d)}/ray"],
                             "storage_path {d}/bad/a-file/ray is under {d}/bad/a-file, which is a file"),
}


@pytest.mark.parametrize("case", list(LOCATIONS))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_unusable_locations_are_reported_before_ray_starts(study, capsys, monkeypatch, command, case):
    import clinft_ray.study

    started = []  # the session's Ray may already run (another test's study): watch the study's own start
    monkeypatch.setattr(clinft_ray.study, "start_ray", lambda *a, **k: started.append(1) or pytest.fail("Ray started"))
    make, expected = LOCATIONS[case]
    extra = make(study)
    if "--out" not in extra:
        extra += ["--out", str(study / "bad" / "fresh")]
    before = _tree(study)
    code, errors, text = clinft_in_process(capsys, command, str(study / "study.yaml"), *extra)
    assert code == 2, text
    assert errors == [f"clinft: error: {expected.format(d=study)}"] or expected.format(d=study) in errors[0], text
    assert len(errors) == 1 and not started
    assert _tree(study) == before  # nothing created, not even the folders asked for


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to any folder")
def test_an_output_folder_this_user_cannot_write(study, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, errors, _ = clinft_in_process(capsys, "validate", str(study / "study.yaml"), "--out", str(locked / "out"))
    finally:
        locked.chmod(0o700)
    assert code == 2 and errors == [f"clinft: error: output_dir {locked / 'out'} cannot be created: {locked} is not "
                                    "writable; pass another --out (or output_dir)"]


def test_validate_says_it_did_not_try_the_services_and_tries_them_when_asked(study, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    sets = ["--set", f"mlflow.tracking_uri={url}", "--out", str(study / "bad" / "fresh")]
    code, errors, text = clinft_in_process(capsys, "validate", str(study / "study.yaml"), *sets)
    assert code == 0, text
    assert f"mlflow.tracking_uri {url}: not checked; pass --check-services to check that it answers" in text
    code, errors, text = clinft_in_process(capsys, "validate", str(study / "study.yaml"), *sets, "--check-services")
    assert code == 2 and len(errors) == 1 and f"mlflow.tracking_uri {url} does not answer" in errors[0], text
    assert not (study / "bad" / "fresh").exists()


def test_validate_checks_the_judge_when_asked(study, capsys):
    from clinft_ray.demo import judge_server

    config, out = yaml_study(study), ["--out", str(study / "bad" / "fresh")]
    code, errors, text = clinft_in_process(capsys, "validate", str(config), *out)
    assert code == 0 and "judge.base_url http://127.0.0.1:" in text and "not checked; pass --check-services" in text
    code, errors, text = clinft_in_process(capsys, "validate", str(config), *out, "--check-services")
    assert code == 2 and len(errors) == 1 and "judge.base_url http://127.0.0.1:" in errors[0], text
    assert "does not answer a chat completion for judge.model 'm'" in errors[0]
    server, url = judge_server.start()
    try:
        code, _, text = clinft_in_process(capsys, "validate", str(config), *out, "--check-services", "--set",
                                    f"judge.base_url={url}")
    finally:
        server.shutdown()
    assert code == 0, text


def yaml_study(root: Path) -> Path:
    """The demo study as a reasoning task graded by a judge at a port nobody listens on."""
    import yaml

    cfg = yaml.safe_load((root / "study.yaml").read_text())
    task = cfg["tasks"][0]
    cfg["tasks"][0] = {"name": task["name"], "kind": "reasoning", "grading": "judge", "splits": task["splits"]}
    cfg["judge"] = {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "m"}
    path = root / "judged.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_unusual_exports_are_read(study, capsys, caplog):
    """Excel's CSV (BOM, CRLF, a quoted cell over lines, loose header, an extra column) and a JSONL with a
    byte-order mark are read; the extra column is said once per file."""
    import csv

    rows = _dev_rows(study)
    path = study / "bad" / "dev-excel.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow([" ID", "Prompt ", "CHOSEN", "Rejected", "Ward"])
        w.writerows([r["id"], r["prompt"].replace(". ", ".\r\n", 1), r["chosen"], r["rejected"], "4B"] for r in rows)
    test = study / "bad" / "test-bom.jsonl"
    test.write_bytes(b"\xef\xbb\xbf" + (study / "data" / "classification" / "test.jsonl").read_bytes())
    with caplog.at_level("INFO", logger="clinft"):
        code, _, text = clinft_in_process(capsys, "validate", str(study / "study.yaml"), "--out", str(study / "o"),
                                    "--set", f"tasks.uti.splits.dev={path}", "--set", f"tasks.uti.splits.test={test}")
    assert code == 0, text
    assert "uti: train 300 rows, eval 200 rows, dev 100 rows, test 200 rows" in text
    said = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert said == [f"{path}: column(s) 'ward' are not used and are ignored"]


def _clinft() -> list[str]:
    """The installed `clinft` command beside this Python (the console script), else the module."""
    script = Path(sys.executable).with_name("clinft")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clinft_ray.cli"]


def test_the_real_command_refuses_bad_rows_in_one_line(study):
    extra = BAD["null ids on many rows"][0](study)
    before = _tree(study / "earlier")
    res = subprocess.run([*_clinft(), "run", str(study / "study.yaml"), "--out", str(study / "earlier"), *extra],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("clinft: error:")]
    assert len(errors) == 1 and BAD["null ids on many rows"][1] in errors[0]
    assert "Traceback" not in res.stderr and CANARY2 not in res.stderr + res.stdout
    assert _tree(study / "earlier") == before


def test_an_unexpected_error_is_one_line_with_a_local_log(study, tmp_path, capsys):
    """A tokenizer file that is JSON but not a tokenizer makes `tokenizers` raise a KeyError nobody
    expects: one line with the type, where, and the log file; the traceback only in that file."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(study / "model", model)
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": CANARY2}}))
    logs = tmp_path / "logs"
    env = {**os.environ, "CLINFT_LOG_DIR": str(logs)}
    args = ["validate", str(study / "study.yaml"), "--out", str(tmp_path / "o"), "--set", f"model.name_or_path={model}"]
    res = subprocess.run([*_clinft(), *args], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 1, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("clinft: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    (log,) = logs.glob("error-*.log")
    assert errors[0] == (f"clinft: error: unexpected KeyError in clinft_ray.modeling:load_tokenizer (raised in "
                         f"{errors[0].split('(raised in ')[1].split(')')[0]}); the traceback is in {log} (or rerun "
                         "with --debug to see it here)")
    assert "Traceback (most recent call last)" in log.read_text() and oct(log.stat().st_mode & 0o777) == "0o600"
    from clinft_ray.cli import main

    assert main(["--debug", *args]) == 1  # --debug: the traceback itself, on the console
    assert "Traceback (most recent call last)" in capsys.readouterr().err
