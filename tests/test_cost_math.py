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
    """SFT: trials 2 GPU-h + test scoring 0.5 = 2.5; DPO: trials 5 + reference 1 + test 0.5 = 6.5.
    Everything: 6.5 / 2.5 = 2.6; training alone: 5 / 2 = 2.5. At $3 per GPU-hour DPO costs 6.5 x 3 = $19.5."""
    from clinft_ray.study import hours_split

    def h(g):
        return {"gpu_hours": g, "cpu_hours": 4 * g, "cost_usd": 3 * g}

    sft = hours_split({"trials": h(2.0), "reference": {}, "test_eval": h(0.5)})
    dpo = hours_split({"trials": h(5.0), "reference": h(1.0), "test_eval": h(0.5)})
    assert set(sft["hours_by"]) == {"trials", "test_eval"}  # SFT has no reference pass
    assert dpo["gpu_hours"] == pytest.approx(6.5) and dpo["cpu_hours"] == pytest.approx(26.0)
    assert dpo["cost_usd"] == pytest.approx(19.5)
    costs = task_costs({"base": hours_split({"test_eval": h(0.5)}), "sft": sft, "dpo": dpo})
    assert costs["dpo_sft_cost_ratio"] == pytest.approx(2.6)
    assert costs["dpo_sft_train_cost_ratio"] == pytest.approx(2.5)
    assert costs["gpu_hours"] == pytest.approx(0.5 + 2.5 + 6.5)
