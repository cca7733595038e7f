"""The `clinft` command (`clinft_ray.cli`): exit codes and one-line errors for bad input, no traceback,
no row text. The cases run `cli.main` in this process (`clinft_here`); the command itself, in its own
interpreter, has its case here and in the scenarios (bad input, a failing study, a killed one)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from helpers import clinft, clinft_here, copy_demo

CANARY = "CANARY-PHI-5521"


def test_validate_demo_study(demo_dir, tmp_path, capsys):
    config = copy_demo(demo_dir, tmp_path / "d")
    res = clinft_here(capsys, "validate", str(config))
    assert res.returncode == 0, res.stderr
    assert "uti: train 300 rows, eval 200 rows, dev 100 rows, test 200 rows" in res.stdout
    assert "4 SFT + 12 DPO trials" in res.stdout


def test_missing_config_is_one_line_exit_2(tmp_path):
    res = clinft("run", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "file not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_keys_all_reported_with_did_you_mean(demo_dir, tmp_path, capsys):
    config = copy_demo(demo_dir, tmp_path / "d")
    data = yaml.safe_load(config.read_text())
    data["modle"] = data.pop("model")
    data["tasks"][0]["scorign"] = "loglik"
    config.write_text(yaml.safe_dump(data))
    res = clinft_here(capsys, "run", str(config), "--set", "seed=abc")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert any("modle: unknown key; did you mean 'model'?" in line for line in lines)
    assert any("tasks.0.scorign: unknown key; did you mean 'scoring'?" in line for line in lines)
    assert any(line.endswith("model: required key is missing; add it") for line in lines)
    assert any("seed:" in line for line in lines)
    assert not (tmp_path / "d" / "ray").exists()  # nothing ran


def test_bad_data_rows_named_without_text(demo_dir, tmp_path, capsys):
    config = copy_demo(demo_dir, tmp_path / "d")
    dev = tmp_path / "d" / "data" / "classification" / "dev.jsonl"
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    rows[3]["prompt"] += " " + CANARY
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[7]["chosen"] = "maybe " + CANARY
    rows[9]["id"] = rows[8]["id"]
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = clinft_here(capsys, "validate", str(config))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert CANARY not in res.stderr + res.stdout
    assert "dev.jsonl: row 4 (id dev-0003): 'chosen' equals 'rejected'" in res.stderr
    assert "dev.jsonl: row 8 (id dev-0007): 'chosen' is not one of the task's labels" in res.stderr
    assert "dev.jsonl: row 10: id 'dev-0008' repeats row 9" in res.stderr


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_leakage_and_overlong_prompts(demo_dir, tmp_path, capsys):
    config = copy_demo(demo_dir, tmp_path / "d")
    data = tmp_path / "d" / "data" / "classification"
    train, test = _rows(data / "train.jsonl"), _rows(data / "test.jsonl")
    test[5]["prompt"] = train[2]["prompt"]  # a test case that is also a training case
    _write(data / "test.jsonl", test)
    res = clinft_here(capsys, "validate", str(config))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "test.jsonl: id test-0005: the same prompt is in train.jsonl (id train-0002)" in res.stderr
    res = clinft_here(capsys, "validate", str(config), "--set", "model.max_length=30")
    for split in ("train", "eval", "dev", "test"):  # every split's rows that would be cut, not only train's
        assert f"{split}.jsonl: rows " in res.stderr, split
    assert "(ids train-0000, " in res.stderr and ": column 'chosen': prompt + answer + end-of-turn is up to" in res.stderr
    assert "truncation at model.max_length 30 would cut the answer's end" in res.stderr
    assert "Urinalysis" not in res.stderr  # never the text


def test_chat_data_needs_a_chat_template(demo_dir, tmp_path, capsys):
    config = copy_demo(demo_dir, tmp_path / "d")
    model = tmp_path / "d" / "model"
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in model.glob("chat_template.*"):
        f.unlink()
    dev = tmp_path / "d" / "data" / "classification" / "dev.jsonl"
    rows = _rows(dev)
    rows[0]["prompt"] = [{"role": "user", "content": rows[0]["prompt"]}]
    _write(dev, rows)
    res = clinft_here(capsys, "validate", str(config))
    assert res.returncode == 2
    assert "dev.jsonl: prompts are chat messages but the model" in res.stderr and "has no chat template" in res.stderr


def test_saved_dataset_folder_and_csv_splits(demo_dir, tmp_path, capsys):
    import csv

    from datasets import Dataset

    config = copy_demo(demo_dir, tmp_path / "d")
    data = tmp_path / "d" / "data" / "classification"
    Dataset.from_list(_rows(data / "dev.jsonl")).save_to_disk(str(tmp_path / "d" / "dev_saved"))
    with (tmp_path / "d" / "test.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(_rows(data / "test.jsonl"))
    res = clinft_here(capsys, "validate", str(config), "--set", "tasks.0.splits.dev=dev_saved", "--set",
                 "tasks.0.splits.test=test.csv")
    assert res.returncode == 0, res.stderr
    assert "dev 100 rows, test 200 rows" in res.stdout


def test_debug_is_taken_before_or_after_the_command():
    from clinft_ray.cli import make_parser

    parser = make_parser()
    assert parser.parse_args(["--debug", "validate", "s.yaml"]).debug
    assert parser.parse_args(["run", "s.yaml", "--debug"]).debug
    assert not parser.parse_args(["validate", "s.yaml", "--check-services"]).debug


def test_where_names_our_frame_and_the_library_frame_that_raised():
    from clinft_ray import cli
    from clinft_ray.data import _prompt_key

    try:
        _prompt_key([object()])  # json cannot encode it: raised inside the json library
    except TypeError as exc:
        assert cli.where(exc) == "clinft_ray.data:_prompt_key (raised in json.encoder:default)"
    try:
        raise KeyError("x")
    except KeyError as exc:  # no clinft_ray frame: the innermost frame
        assert cli.where(exc) == f"{__name__}:test_where_names_our_frame_and_the_library_frame_that_raised"


def test_an_unreachable_hub_is_said_once_not_ten_times():
    """The hub's five retries of a HEAD request (a failure and a retry notice each) reach the console
    as its first failure and first retry notice, through clinft's handler alone (the hub's own removed)."""
    import logging

    import huggingface_hub.utils.logging as hub_logging

    from clinft_ray.cli import RetriesOnce, console_logging

    console_logging("normal")
    assert not hub_logging.get_logger().handlers  # no second copy of each line from the hub's own handler
    http = logging.getLogger("huggingface_hub.utils._http")
    failure = "'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/m/resolve/main/config.json"
    records = [http.makeRecord(http.name, logging.WARNING, __file__, 1, msg, (), None)
               for k in range(1, 6) for msg in (failure, f"Retrying in {2 ** k}s [Retry {k}/5].")]
    records.append(http.makeRecord(http.name, logging.WARNING, __file__, 1, "some other warning", (), None))
    once = RetriesOnce()
    assert [r.getMessage() for r in records if once.filter(r)] == [failure, "Retrying in 2s [Retry 1/5].",
                                                                   "some other warning"]


def test_rays_token_notice_is_dropped_and_its_auth_off_warning_kept():
    import logging

    from clinft_ray.cli import console_logging

    console_logging("normal")
    console_logging("normal")  # called again in one process (as in-process tests do): still one filter
    ray_auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert len(ray_auth.filters) == 1

    def record(msg: str) -> logging.LogRecord:
        return ray_auth.makeRecord(ray_auth.name, logging.WARNING, __file__, 1, msg, (), None)

    assert not ray_auth.filter(record("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=..."))
    assert ray_auth.filter(record("Token authentication is disabled for this Ray cluster. Anyone with network ..."))


def test_sigterm_and_ctrl_c_stop_the_study_where_it_is_and_a_second_one_at_once():
    """Outside a sweep (loading data, scoring the base model) SIGTERM and Ctrl-C raise KeyboardInterrupt
    where the driver is, so the study marks its runs KILLED; SIGTERM is noted for the exit code (143).
    During a sweep Tune ends it first (`sweep.request_stop`, shown by the resume and cluster scenarios).
    The handler is for one signal: a second SIGTERM gets Python's default, which ends the process."""
    import os
    import signal

    import pytest

    from clinft_ray import cli, sweep

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        cli.stop_on_signals()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.5)  # let the handler run
        assert cli.TERMINATED.is_set() and sweep.STOP.is_set()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        cli.TERMINATED.clear()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0.5)
        assert not cli.TERMINATED.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        sweep.STOP.clear()
        cli.TERMINATED.clear()
