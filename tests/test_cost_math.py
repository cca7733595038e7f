"""Device-hours, cost and the DPO/SFT ratio against hand-worked values; secrets kept out of URIs."""

from __future__ import annotations

import pytest

from clinft_ray.analysis import task_costs
from clinft_ray.config import CostConfig
from clinft_ray.tracking import device_hours, error_kind, redact_uri


def test_device_hours_hand_worked():
    """2 GPUs + 8 CPUs held for 90 min (5400 s): 2 x 1.5 = 3.0 GPU-hours, 8 x 1.5 = 12.0 CPU-hours;
    at $2.50 per GPU-hour and $0.05 per CPU-hour: 3.0 x 2.5 + 12.0 x 0.05 = 7.50 + 0.60 = $8.10."""
    h = device_hours({"GPU": 2.0, "CPU": 8.0}, 5400.0, CostConfig(gpu_hour_usd=2.5, cpu_hour_usd=0.05))
    assert h == pytest.approx({"gpu_hours": 3.0, "cpu_hours": 12.0, "cost_usd": 8.10})
    assert device_hours({"CPU": 1.0}, 3600.0, CostConfig())["gpu_hours"] == 0.0  # CPU-only: 0 GPU-hours


def test_fractional_gpu_trials_count_their_share():
    """Two trials packed on one GPU (0.5 each) for 1 h: 0.5 GPU-hours each, 1.0 together."""
    assert device_hours({"GPU": 0.5, "CPU": 1.0}, 3600.0, CostConfig())["gpu_hours"] == 0.5


def test_task_costs_ratio_from_gpu_hours_else_cpu_hours():
    """SFT 2 GPU-h, DPO 5 GPU-h: ratio 5 / 2 = 2.5 on GPU-hours; with no GPU, CPU-hours 4 and 10: 2.5."""
    def stage(g, c):
        return {"gpu_hours": g, "cpu_hours": c, "cost_usd": 0.0}

    gpu = task_costs({"base": stage(0.1, 0.4), "sft": stage(2.0, 8.0), "dpo": stage(5.0, 20.0)})
    assert gpu["dpo_sft_cost_ratio"] == pytest.approx(2.5) and gpu["cost_basis"] == "gpu_hours"
    assert gpu["gpu_hours"] == pytest.approx(7.1)
    cpu = task_costs({"base": stage(0, 1.0), "sft": stage(0, 4.0), "dpo": stage(0, 10.0)})
    assert cpu["dpo_sft_cost_ratio"] == pytest.approx(2.5) and cpu["cost_basis"] == "cpu_hours"


def test_secrets_are_cut_from_uris_and_errors_named_not_quoted():
    assert redact_uri("https://alice:s3cret@mlflow.hospital.internal/") == "https://mlflow.hospital.internal/"
    assert redact_uri("sqlite:////runs/mlflow.db") == "sqlite:////runs/mlflow.db"

    class Wrapped(RuntimeError):
        def __init__(self):
            super().__init__("row text would be here")
            self.cause = KeyError("patient text")

    assert error_kind(Wrapped()) == "KeyError" and error_kind(None) == "unknown"


def test_stage_hours_split_by_what_they_paid_for_and_the_two_ratios():
    """SFT: training 2 GPU-h + dev scoring 0.5 + test scoring 0.5 = 3; DPO: training 5 + dev 1.5 +
    reference 1 + test 0.5 = 8. Everything: 8 / 3 = 2.667; training alone: 5 / 2 = 2.5. At $3 per
    GPU-hour DPO costs 8 x 3 = $24."""
    from clinft_ray.study import hours_split

    def h(g):
        return {"gpu_hours": g, "cpu_hours": 4 * g, "cost_usd": 3 * g}

    sft = hours_split({"train": h(2.0), "dev_eval": h(0.5), "reference": {}, "test_eval": h(0.5)})
    dpo = hours_split({"train": h(5.0), "dev_eval": h(1.5), "reference": h(1.0), "test_eval": h(0.5)})
    assert set(sft["hours_by"]) == {"train", "dev_eval", "test_eval"}  # SFT has no reference pass
    assert dpo["gpu_hours"] == pytest.approx(8.0) and dpo["cpu_hours"] == pytest.approx(32.0)
    assert dpo["cost_usd"] == pytest.approx(24.0)
    costs = task_costs({"base": hours_split({"test_eval": h(0.5)}), "sft": sft, "dpo": dpo})
    assert costs["dpo_sft_cost_ratio"] == pytest.approx(8 / 3)
    assert costs["dpo_sft_train_cost_ratio"] == pytest.approx(2.5)
    assert costs["gpu_hours"] == pytest.approx(0.5 + 3.0 + 8.0)


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
