"""Scenario: a trial trained by two Ray Train workers (gloo) under Tune, the way `gpus_per_trial: 4` runs
on a GPU node, with the trials' storage outside the output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinft_ray.config import load_study

from helpers import small_study

SMALL_SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-2]}, "max_steps": 20, "eval_steps": 10, "batch_size": 8}
SMALL_DPO = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1]}, "max_steps": 10,
             "eval_steps": 5, "batch_size": 8}


@pytest.mark.slow
def test_two_worker_trials_train_under_tune_with_storage_outside_the_output(demo_dir, ray_session, tmp_path):
    """gpus_per_trial: 4 on a GPU cluster; here 2 CPU workers on gloo: a TorchTrainer inside each trial."""
    from mlflow.tracking import MlflowClient

    from clinft_ray.modeling import read_manifest
    from clinft_ray.study import run_study

    storage = tmp_path / "shared"
    study = load_study(small_study(demo_dir, tmp_path, sft=SMALL_SFT, dpo=SMALL_DPO), [
        f"storage_path={storage}", "resources.workers_per_trial=2", "resources.cpus_per_trial=0.5"],
        output_dir=str(tmp_path / "out"))
    results = run_study(study)

    stages = results["tasks"]["uti"]["stages"]
    sft_ckpt, dpo_ckpt = Path(stages["sft"]["checkpoint"]), Path(stages["dpo"]["checkpoint"])
    assert sft_ckpt.is_relative_to(storage) and dpo_ckpt.is_relative_to(storage)  # the trials' shared storage
    assert not (tmp_path / "out" / "ray").exists()
    assert read_manifest(dpo_ckpt)["init_from"] == str(sft_ckpt)
    assert stages["sft"]["test"]["f1"] > stages["base"]["test"]["f1"]  # the 2-worker SFT trial learned
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("uti-demo").experiment_id])
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in trials:
        assert run.data.metrics["system/workers"] == 2
        # device-hours bill both workers: 2 x 0.5 CPUs for the trial's wall time
        assert run.data.metrics["cpu_hours"] == pytest.approx(run.data.metrics["wall_s"] / 3600, rel=1e-6)
