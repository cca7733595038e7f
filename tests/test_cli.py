"""The `clinft` command: exit codes and one-line errors for bad input, no traceback, no row text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CANARY = "CANARY-PHI-5521"


def clinft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clinft_ray.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _copy_demo(demo_dir: Path, dest: Path) -> Path:
    outputs = {"ray", "mlflow.db", "mlartifacts", "results.json", "outcomes.jsonl", "report.md"}
    shutil.copytree(demo_dir, dest, ignore=lambda folder, names: [n for n in names if n in outputs])
    return dest / "study.yaml"


def test_validate_demo_study(demo_dir, tmp_path):
    config = _copy_demo(demo_dir, tmp_path / "d")
    res = clinft("validate", str(config))
    assert res.returncode == 0, res.stderr
    assert "uti: train 300 rows, eval 200 rows, dev 100 rows, test 200 rows" in res.stdout
    assert "4 SFT + 12 DPO trials" in res.stdout


def test_missing_config_is_one_line_exit_2(tmp_path):
    res = clinft("run", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "file not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_keys_all_reported_with_did_you_mean(demo_dir, tmp_path):
    config = _copy_demo(demo_dir, tmp_path / "d")
    data = yaml.safe_load(config.read_text())
    data["modle"] = data.pop("model")
    data["tasks"][0]["scorign"] = "loglik"
    config.write_text(yaml.safe_dump(data))
    res = clinft("run", str(config), "--set", "seed=abc")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert any("modle: unknown key; did you mean 'model'?" in line for line in lines)
    assert any("tasks.0.scorign: unknown key; did you mean 'scoring'?" in line for line in lines)
    assert any(line.endswith("model: required key is missing; add it") for line in lines)
    assert any("seed:" in line for line in lines)
    assert not (tmp_path / "d" / "ray").exists()  # nothing ran


def test_bad_data_rows_named_without_text(demo_dir, tmp_path):
    config = _copy_demo(demo_dir, tmp_path / "d")
    dev = tmp_path / "d" / "data" / "classification" / "dev.jsonl"
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    rows[3]["prompt"] += " " + CANARY
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[7]["chosen"] = "maybe " + CANARY
    rows[9]["id"] = rows[8]["id"]
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = clinft("validate", str(config))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert CANARY not in res.stderr + res.stdout
    assert "dev.jsonl: row 4 (id dev-0003): 'chosen' equals 'rejected'" in res.stderr
    assert "dev.jsonl: row 8 (id dev-0007): 'chosen' is not one of the task's labels" in res.stderr
    assert "dev.jsonl: row 10: id 'dev-0008' repeats row 9" in res.stderr


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_leakage_and_overlong_prompts(demo_dir, tmp_path):
    config = _copy_demo(demo_dir, tmp_path / "d")
    data = tmp_path / "d" / "data" / "classification"
    train, test = _rows(data / "train.jsonl"), _rows(data / "test.jsonl")
    test[5]["prompt"] = train[2]["prompt"]  # a test case that is also a training case
    _write(data / "test.jsonl", test)
    res = clinft("validate", str(config))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "test.jsonl: id test-0005: the same prompt is in train.jsonl (id train-0002)" in res.stderr
    res = clinft("validate", str(config), "--set", "model.max_length=30")
    for split in ("train", "eval", "dev", "test"):  # every split's rows that would be cut, not only train's
        assert f"{split}.jsonl: rows " in res.stderr, split
    assert "(ids train-0000, " in res.stderr and ": column 'chosen': prompt + answer + end-of-turn is up to" in res.stderr
    assert "truncation at model.max_length 30 would cut the answer's end" in res.stderr
    assert "Urinalysis" not in res.stderr  # never the text


def test_chat_data_needs_a_chat_template(demo_dir, tmp_path):
    config = _copy_demo(demo_dir, tmp_path / "d")
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
    res = clinft("validate", str(config))
    assert res.returncode == 2
    assert "dev.jsonl: prompts are chat messages but the model" in res.stderr and "has no chat template" in res.stderr


def test_saved_dataset_folder_and_csv_splits(demo_dir, tmp_path):
    import csv

    from datasets import Dataset

    config = _copy_demo(demo_dir, tmp_path / "d")
    data = tmp_path / "d" / "data" / "classification"
    Dataset.from_list(_rows(data / "dev.jsonl")).save_to_disk(str(tmp_path / "d" / "dev_saved"))
    with (tmp_path / "d" / "test.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(_rows(data / "test.jsonl"))
    res = clinft("validate", str(config), "--set", "tasks.0.splits.dev=dev_saved", "--set",
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


@pytest.mark.slow
def test_report_rebuilds_a_finished_study_at_new_alpha_and_price_without_training(demo_run, tmp_path):
    """`clinft report` on a copy of the finished demo: the new alpha and price reach results.json,
    the reports, the figures and the MLflow study and task runs; no run is added, nothing trains."""
    from mlflow.tracking import MlflowClient

    study, before = demo_run
    out = tmp_path / "done"
    shutil.copytree(study.config.output_dir, out, ignore=shutil.ignore_patterns("ray", "data", "model"))
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs_before = {r.info.run_id for r in client.search_runs([before["mlflow"]["experiment_id"]], max_results=1000)}
    figure = out / "figures" / "uti_test.png"
    stamp = figure.stat().st_mtime_ns
    res = clinft("report", str(out), "--set", "stats.alpha=0.01", "--set", "cost.cpu_hour_usd=3.1",
                 "--set", "cost.gpu_hour_usd=3.1", "--set", f"mlflow.tracking_uri={uri}")
    assert res.returncode == 0, res.stderr
    # nothing is trained or scored: the copy has no model, data or Ray folder to do it with
    after = json.loads((out / "results.json").read_text())
    assert after["alpha"] == 0.01 and after["threshold"] == pytest.approx(0.01 / 1)
    assert after["fingerprint"] == before["fingerprint"]
    task = after["tasks"]["uti"]
    for c in task["comparisons"]:
        assert c["significant"] == (c["p_value"] < 0.01)
    for s in ("base", "sft", "dpo"):
        st = task["stages"][s]
        assert st["cost_usd"] == pytest.approx(st["cpu_hours"] * 3.1) and st["cost_usd"] > 0
        assert st["test"] == before["tasks"]["uti"]["stages"][s]["test"]  # scores are not redone
    assert after["totals"]["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in after["tasks"].values()))
    report = (out / "report.md").read_text()
    assert "alpha / m = 0.01 / 1 = 0.01" in report and "Effect sizes" in report and "sensitivity" in report
    assert figure.stat().st_mtime_ns > stamp
    runs = {r.info.run_id: r for r in client.search_runs([before["mlflow"]["experiment_id"]], max_results=1000)}
    assert set(runs) == runs_before  # no new trial (or any other) run
    study_run = runs[before["mlflow"]["study_run_id"]]
    assert study_run.data.metrics["stats/alpha"] == 0.01
    assert study_run.data.metrics["cost_usd"] == pytest.approx(after["totals"]["cost_usd"])
    task_run = [r for r in runs.values() if r.info.run_name == "uti"
                and r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id][0]
    assert task_run.data.metrics["cost_usd"] == pytest.approx(task["cost_usd"])
    assert "report.md" in {a.path for a in client.list_artifacts(study_run.info.run_id)}
    # a setting that changes training is refused, naming it
    res = clinft("report", str(out), "--set", "seed=7")
    assert res.returncode == 2 and "seed: would change what was trained" in res.stderr
