"""Nothing lost when the tracking server goes away: a real `mlflow server` on 127.0.0.1 is stopped and
started again (same port, same store) under the outbox alone, then for 30 s in the middle of a study.
Training goes on through the outage and every value is in MLflow afterwards, once."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import MlflowServer
from mlflow.tracking import MlflowClient

from clinft_ray.tracking import PendingRun, Tracker


def test_writes_are_held_while_the_server_is_down_and_sent_once_when_it_is_back(tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        tracker = Tracker(server.url, "outbox")
        stage = tracker.start("sft")
        tracker.metrics(stage, {"dev/f1": 0.5}, step=1)
        server.stop()
        # Nothing raises and nothing waits: a trial started now gets its run when MLflow is back.
        trial = tracker.start_later("trial-0", parent=stage, tags={"clinft.trial_id": "t0"})
        assert isinstance(trial, PendingRun) and trial.id is None
        tracker.params(trial, {"learning_rate": 1e-3})
        for step in (10, 20, 30):
            tracker.metrics(trial, {"eval/loss": 1.0 / step, "nan": float("nan")}, step=step)
        tracker.tag(trial, "clinft.stopped", "non-finite train loss at step 30")
        tracker.end(trial, "FAILED")
        tracker.metrics(stage, {"dev/f1": 0.7}, step=2)
        time.sleep(5)  # the outbox retries against the dead server meanwhile
        server.start()
        tracker.flush()
        assert trial.id is not None and tracker.refused == []

        client = MlflowClient(server.url)
        run = client.get_run(trial.id)
        assert run.data.tags["mlflow.parentRunId"] == stage and run.data.tags["clinft.trial_id"] == "t0"
        assert run.data.params == {"learning_rate": "0.001"} and run.info.status == "FAILED"
        assert run.data.tags["clinft.stopped"] == "non-finite train loss at step 30"
        assert [(m.step, m.value) for m in client.get_metric_history(trial.id, "eval/loss")] == \
               [(10, 0.1), (20, 0.05), (30, 1.0 / 30)]
        assert [m.value for m in client.get_metric_history(stage, "dev/f1")] == [0.5, 0.7]
        # the run ended at the moment the study ended it, not when the outbox caught up
        assert run.info.end_time < (time.time() - 4) * 1000
    finally:
        server.stop()


def test_writes_still_held_at_the_end_are_saved_and_sent_by_the_next_process(tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        tracker = Tracker(server.url, "saved")
        stage = tracker.start("sft")
        server.stop()
        trial = tracker.start_later("trial-0", parent=stage, tags={"clinft.trial_id": "t0"})
        tracker.metrics(trial, {"eval/loss": 0.25}, step=10)
        tracker.end(trial)
        tracker.end(stage, "KILLED")
        assert tracker.flush(timeout=1) is False  # still down: the study would stop here
        assert tracker.save_held(tmp_path / "outbox.pkl") == 4
        del tracker

        server.start()
        later = Tracker(server.url, "saved")  # the next `clinft run` of the study
        later.send_saved(tmp_path / "outbox.pkl")
        assert not (tmp_path / "outbox.pkl").exists()
        client = MlflowClient(server.url)
        (run,) = client.search_runs([later.experiment_id], "tags.clinft.trial_id = 't0'")
        assert run.data.tags["mlflow.parentRunId"] == stage and run.info.status == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [(10, 0.25)]
        assert client.get_run(stage).info.status == "KILLED"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_study_trains_through_a_30_s_outage_and_mlflow_ends_complete(demo_dir, ray_session, tmp_path):
    from clinft_ray.config import load_study
    from clinft_ray.study import run_study

    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    out = tmp_path / "study"
    for sub in ("data", "model", "tune_spaces"):
        shutil.copytree(demo_dir / sub, out / sub)
    shutil.copyfile(demo_dir / "study.yaml", out / "study.yaml")
    dpo = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1]}, "max_steps": 4,
           "eval_steps": 2, "batch_size": 8}
    (out / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    study = load_study(out / "study.yaml", [f"mlflow.tracking_uri={server.url}", "study=outage", "dpo.space=dpo.yaml"])
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(run_study(study))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    try:
        client = MlflowClient(server.url)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not errors:  # the first SFT curve point is in: pull the plug
            experiment = client.get_experiment_by_name("outage")
            runs = client.search_runs([experiment.experiment_id], "tags.clinft.stage = 'sft'") if experiment else []
            if any("eval/loss" in r.data.metrics and "clinft.trial" in r.data.tags for r in runs):
                break
            time.sleep(0.5)
        server.stop()
        down = time.time()
        time.sleep(30)
        up = time.time()
        server.start()
        driver.join(timeout=900)
        assert not driver.is_alive() and not errors, errors
        _check_complete(client, results[0], out, down, up)
    finally:
        server.stop()


def _check_complete(client: MlflowClient, results: dict, out: Path, down: float, up: float) -> None:
    runs = client.search_runs([results["mlflow"]["experiment_id"]], max_results=1000)
    assert {r.info.status for r in runs} == {"FINISHED"}
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 4 + 1 and len({r.data.tags["clinft.trial_id"] for r in trials}) == 5
    reported = {}  # Tune trial id -> the rows the trial reported, as Tune stored them
    for path in out.glob("ray/*/*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        reported[rows[0]["trial_id"]] = rows
    reported_during_outage = 0
    for run in trials:
        rows = reported[run.data.tags["clinft.trial_id"]]
        reported_during_outage += sum(down < row["timestamp"] < up for row in rows)
        for key in ("eval/loss", "dev/f1"):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            expected = [(row["step"], row[key]) for row in rows if key in row]
            # Steps must match exactly (each point once); values only to float precision, since MLflow
            # stores doubles that went through JSON.
            assert [step for step, _ in logged] == [step for step, _ in expected], (run.info.run_name, key)
            assert [v for _, v in logged] == pytest.approx([v for _, v in expected]), (run.info.run_name, key)
        assert run.data.metrics["cpu_hours"] > 0
    assert reported_during_outage > 0  # trials trained and reported while MLflow was down
    stage_sft = [r for r in runs if r.data.tags.get("clinft.stage") == "sft" and "clinft.trial" not in r.data.tags]
    assert stage_sft[0].data.tags["clinft.selected_run_id"] in {r.info.run_id for r in trials}
