"""The one module that talks to MLflow (`clinft_ray.tracking`): device-hours and cost against hand-worked
values, a trial's hours by attempt and part, secrets kept out of URIs, and writes held in the outbox
while the session's real `mlflow server` on 127.0.0.1 cannot be reached, sent once when it is back (or by the next process)."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from clinft_ray.config import CostConfig
from clinft_ray.tracking import PendingRun, Tracker, device_hours, error_kind, redact_uri


def test_device_hours_hand_worked():
    """2 GPUs + 8 CPUs held for 90 min (5400 s): 2 x 1.5 = 3.0 GPU-hours, 8 x 1.5 = 12.0 CPU-hours;
    at $2.50 per GPU-hour and $0.05 per CPU-hour: 3.0 x 2.5 + 12.0 x 0.05 = 7.50 + 0.60 = $8.10."""
    h = device_hours({"GPU": 2.0, "CPU": 8.0}, 5400.0, CostConfig(gpu_hour_usd=2.5, cpu_hour_usd=0.05))
    assert h == pytest.approx({"gpu_hours": 3.0, "cpu_hours": 12.0, "cost_usd": 8.10})
    assert device_hours({"CPU": 1.0}, 3600.0, CostConfig())["gpu_hours"] == 0.0  # CPU-only: 0 GPU-hours


def test_fractional_gpu_trials_count_their_share():
    """Two trials packed on one GPU (0.5 each) for 1 h: 0.5 GPU-hours each, 1.0 together."""
    assert device_hours({"GPU": 0.5, "CPU": 1.0}, 3600.0, CostConfig())["gpu_hours"] == 0.5


def test_secrets_are_cut_from_uris_and_errors_named_not_quoted():
    assert redact_uri("https://alice:s3cret@mlflow.hospital.internal/") == "https://mlflow.hospital.internal/"
    assert redact_uri("sqlite:////runs/mlflow.db") == "sqlite:////runs/mlflow.db"

    class Wrapped(RuntimeError):
        def __init__(self):
            super().__init__("row text would be here")
            self.cause = KeyError("patient text")

    assert error_kind(Wrapped()) == "KeyError" and error_kind(None) == "unknown"


def test_trial_hours_count_each_attempt_and_split_dev_scoring(tmp_path, monkeypatch):
    """A trial on 2 CPUs: attempt 1 holds them from t=0 to its failure at t=100 (it scored dev for 10 s),
    Tune retries it and grants the resources again at t=130, attempt 2 scores dev for 5 s and ends at
    t=180. Held: 100 + 50 = 150 s (the 30 s wait holds nothing); dev scoring 10 + 5 = 15 s, training
    150 - 15 = 135 s. CPU-hours: 2 x 150 / 3600 = 0.08333, of which dev 2 x 15 / 3600 = 0.008333."""
    from mlflow.tracking import MlflowClient

    from clinft_ray import tracking
    from clinft_ray.tracking import Tracker, TrialRuns

    clock = [0.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "hours", tmp_path / "artifacts")
    stage = tracker.start("sft", tags={})
    runs = TrialRuns(tracker, stage, {"CPU": 2.0}, CostConfig(), fixed_params={}, tags={})
    class Trial:  # what TrialRuns reads of a Tune trial
        trial_id, config = "t1", {"learning_rate": 0.01}

        def __str__(self):
            return "sft-lr1e-02"

    trial = Trial()

    runs.on_trial_start(0, [], trial)
    clock[0] = 60.0
    runs.on_trial_result(0, [], trial, {"step": 10, "dev_eval_s": 10.0})
    clock[0] = 100.0
    runs.on_trial_recover(0, [], trial)
    clock[0] = 130.0
    runs.on_trial_start(0, [], trial)
    runs.on_trial_result(0, [], trial, {"step": 10, "dev_eval_s": 2.0})  # the retry repeats step 10 from its checkpoint
    runs.on_trial_result(0, [], trial, {"step": 20, "dev_eval_s": 5.0})
    clock[0] = 180.0
    runs.on_trial_complete(0, [], trial)
    tracker.flush()

    assert runs.hours["t1"]["train"]["cpu_hours"] == pytest.approx(2 * 135 / 3600)
    assert runs.hours["t1"]["dev_eval"]["cpu_hours"] == pytest.approx(2 * 15 / 3600)
    m = MlflowClient(uri).get_run(runs.run_id("t1")).data.metrics
    assert m["wall_s"] == pytest.approx(150.0) and m["dev_eval_s"] == pytest.approx(15.0)
    assert m["cpu_hours"] == pytest.approx(2 * 150 / 3600) and m["cpu_hours/dev_eval"] == pytest.approx(2 * 15 / 3600)


def test_writes_are_held_while_the_server_is_down_and_sent_once_when_it_is_back(mlflow_server):
    server = mlflow_server
    try:
        tracker = Tracker(server.url, "outbox")
        stage = tracker.start("sft")
        tracker.metrics(stage, {"dev/f1": 0.5}, step=1)
        server.outage()
        # Nothing raises and nothing waits: a trial started now gets its run when MLflow is back.
        trial = tracker.start_later("trial-0", parent=stage, tags={"clinft.trial_id": "t0"})
        assert isinstance(trial, PendingRun) and trial.id is None
        tracker.params(trial, {"learning_rate": 1e-3})
        for step in (10, 20, 30):
            tracker.metrics(trial, {"eval/loss": 1.0 / step, "nan": float("nan")}, step=step)
        tracker.tag(trial, "clinft.stopped", "non-finite train loss at step 30")
        tracker.end(trial, "FAILED")
        tracker.metrics(stage, {"dev/f1": 0.7}, step=2)
        time.sleep(5)  # the outbox retries against the unreachable server meanwhile
        server.back()
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
        server.back()  # the session's server stays up for the tests after


def test_writes_still_held_at_the_end_are_saved_and_sent_by_the_next_process(mlflow_server, tmp_path):
    server = mlflow_server
    try:
        tracker = Tracker(server.url, "saved")
        stage = tracker.start("sft")
        server.outage()
        trial = tracker.start_later("trial-0", parent=stage, tags={"clinft.trial_id": "t0"})
        tracker.metrics(trial, {"eval/loss": 0.25}, step=10)
        tracker.end(trial)
        tracker.end(stage, "KILLED")
        assert tracker.flush(timeout=1) is False  # still down: the study would stop here
        assert tracker.save_held(tmp_path / "outbox.pkl") == 4
        del tracker

        server.back()
        later = Tracker(server.url, "saved")  # the next `clinft run` of the study
        later.send_saved(tmp_path / "outbox.pkl")
        assert not (tmp_path / "outbox.pkl").exists()
        client = MlflowClient(server.url)
        (run,) = client.search_runs([later.experiment_id], "tags.clinft.trial_id = 't0'")
        assert run.data.tags["mlflow.parentRunId"] == stage and run.info.status == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [(10, 0.25)]
        assert client.get_run(stage).info.status == "KILLED"
    finally:
        server.back()  # the session's server stays up for the tests after


def test_every_filter_the_readme_gives_runs_in_mlflows_own_search(tmp_path):
    """The README's filter strings go through MLflow's search API (what the UI's search box calls) over
    runs tagged as a study tags them: each parses, and the cost filter finds the SFT and DPO stage runs
    and nothing else."""
    import re

    from mlflow.tracking import MlflowClient

    from helpers import REPO

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("filters")
    for level, stage in [("study", None), ("task", None), ("stage", "base"), ("stage", "sft"), ("stage", "dpo"),
                         ("trial", "sft"), ("trial", "dpo")]:
        client.create_run(experiment, tags={"clinft.level": level, **({"clinft.stage": stage} if stage else {})})
    filters = re.findall(r"`(tags\.clinft\.[^`]+)`", (REPO / "README.md").read_text())
    assert filters, "the README gives a filter"
    found = {f: client.search_runs([experiment], f) for f in filters}  # raises on a filter MLflow refuses
    cost = [f for f in filters if "!= 'base'" in f]
    assert [sorted(r.data.tags["clinft.stage"] for r in found[f]) for f in cost] == [["dpo", "sft"]]
    assert len(found["tags.clinft.level = 'trial'"]) == 2
