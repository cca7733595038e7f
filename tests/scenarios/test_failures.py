"""Scenario: a study whose every SFT trial fails, run by `clinft run`: trial runs FAILED with the reason
as a tag, no MLflow run left RUNNING, and a one-line error (exit 1) that names the stage, the failure
and where the tracebacks are."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from helpers import clinft, small_study

pytestmark = pytest.mark.slow

SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-3, 1.0e-4]}, "max_steps": 4, "eval_steps": 2, "batch_size": 8}
# No retries: a trial that cannot start fails the same way on every attempt (retries are test_trial_faults').
BROKEN = ["model.finetune=lora", "model.lora.target_modules=[no_such_module]", "trial_retries=0"]


@pytest.fixture(scope="module")
def broken_run(demo_dir, tmp_path_factory):
    """`clinft run` of a small copy of the demo study (trimmed splits) whose every SFT trial fails: its
    LoRA targets a module the model does not have. Returns (the folder, what the command printed)."""
    folder = tmp_path_factory.mktemp("broken")
    config = small_study(demo_dir, folder, sft=SFT)
    return folder, clinft("run", str(config), *sum((["--set", s] for s in [*BROKEN, "ray.num_cpus=2"]), []))


def test_failed_trials_are_recorded_and_nothing_is_left_running(broken_run):
    folder, _ = broken_run
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("uti-demo").experiment_id])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2
    assert all(r.info.status == "FAILED" and r.data.tags["clinft.failure"] == "NoMatchingPeftModuleError" for r in trials)
    assert all(r.data.metrics["cpu_hours"] > 0 for r in trials)  # a failed attempt's time still counts
    status = {r.data.tags.get("clinft.stage", r.data.tags.get("clinft.kind", "task")): r.info.status for r in runs
              if "clinft.trial" not in r.data.tags}
    assert status == {"study": "FAILED", "task": "FAILED", "sft": "FAILED", "base": "FINISHED"}
    assert not (folder / "results.json").exists()


def test_cli_reports_the_failure_in_one_line(broken_run):
    folder, res = broken_run
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("clinft: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr
    assert "every sft trial of task uti failed before its first eval (NoMatchingPeftModuleError)" in errors[0], errors
    assert f"{folder / 'ray' / 'uti-sft'}/*/error.txt" in errors[0]  # where the tracebacks are
