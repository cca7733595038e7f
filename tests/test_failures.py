"""A study whose every SFT trial fails: trial runs FAILED with the reason as a tag, no MLflow run left
RUNNING, and a one-line error from `clinft run` (exit 1) that names the stage and where the
tracebacks are."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from clinft_ray.config import load_study
from clinft_ray.errors import StudyError
from clinft_ray.study import run_study

pytestmark = pytest.mark.slow

SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-3, 1.0e-4]}, "max_steps": 4, "eval_steps": 2, "batch_size": 8}
BROKEN = ["model.finetune=lora", "model.lora.target_modules=[no_such_module]", "sft.space=sft.yaml"]


@pytest.fixture()
def broken_study(demo_dir, tmp_path):
    for sub in ("data", "model", "tune_spaces"):
        shutil.copytree(demo_dir / sub, tmp_path / sub)
    shutil.copyfile(demo_dir / "study.yaml", tmp_path / "study.yaml")
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(SFT))
    return tmp_path / "study.yaml"


def test_failed_trials_are_recorded_and_nothing_is_left_running(broken_study, ray_session):
    study = load_study(broken_study, BROKEN)
    with pytest.raises(StudyError, match=r"every sft trial of task uti failed .*NoMatchingPeftModuleError"):
        run_study(study)
    client = MlflowClient(f"sqlite:///{study.config.output_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("uti-demo").experiment_id])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2
    assert all(r.info.status == "FAILED" and r.data.tags["clinft.failure"] == "NoMatchingPeftModuleError" for r in trials)
    assert all(r.data.metrics["cpu_hours"] > 0 for r in trials)  # a failed attempt's time still counts
    status = {r.data.tags.get("clinft.stage", r.data.tags.get("clinft.kind", "task")): r.info.status for r in runs
              if "clinft.trial" not in r.data.tags}
    assert status == {"study": "FAILED", "task": "FAILED", "sft": "FAILED", "base": "FINISHED"}


def test_cli_reports_the_failure_in_one_line(broken_study):
    res = subprocess.run([sys.executable, "-m", "clinft_ray.cli", "run", str(broken_study), *sum(
        (["--set", s] for s in [*BROKEN, "ray.num_cpus=2"]), [])], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("clinft: error:")]
    assert len(errors) == 1 and "every sft trial of task uti failed" in errors[0] and "Traceback" not in res.stderr


def test_ctrl_c_stops_the_study_marks_runs_killed_and_a_rerun_resumes(demo_dir, tmp_path):
    """SIGINT while the SFT sweep runs: exit 130, no selection from a half-run sweep, no results.json,
    and every MLflow run ended (the interrupted trials and the stages above them KILLED). The same
    command again goes on where it stopped: the trials continue from their checkpoints in the same
    MLflow runs, which end FINISHED."""
    import json
    import signal
    import time

    for sub in ("data", "model", "tune_spaces"):
        shutil.copytree(demo_dir / sub, tmp_path / sub)
    shutil.copyfile(demo_dir / "study.yaml", tmp_path / "study.yaml")
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({**SFT, "max_steps": 60, "eval_steps": 10}))
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump({"stage": "dpo", "learning_rate": {"grid": [1.0e-3]},
                                                       "beta": {"grid": [0.1]}, "max_steps": 4, "eval_steps": 2,
                                                       "batch_size": 8}))
    command = [sys.executable, "-m", "clinft_ray.cli", "run", str(tmp_path / "study.yaml"),
               "--set", "sft.space=sft.yaml", "--set", "dpo.space=dpo.yaml", "--set", "ray.num_cpus=2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    # wait until Tune has taken a trial's first checkpoint (its row is in the trial's result.json)
    while not any(f.stat().st_size for f in (tmp_path / "ray" / "uti-sft").glob("*/result.json")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert not (tmp_path / "results.json").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("uti-demo").experiment_id
    runs = client.search_runs([experiment])
    status = {r.info.run_name: r.info.status for r in runs}
    assert "RUNNING" not in status.values()
    assert status["uti-demo"] == status["uti"] == status["sft"] == "KILLED"
    assert "dpo" not in status
    killed = {r.info.run_id for r in runs if r.info.status == "KILLED"}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "going on where it stopped" in rerun.stderr
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["uti"]["stages"]["dpo"]["selected"]
    runs = client.search_runs([experiment], max_results=100)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert killed <= {r.info.run_id for r in runs}  # the interrupted runs were continued, not duplicated
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2 + 1 and len({r.data.tags["clinft.trial_id"] for r in trials}) == 3
    rows = [json.loads(line) for f in (tmp_path / "ray" / "uti-sft").glob("*/result.json")
            for line in f.read_text().splitlines()]
    assert max(r["step"] for r in rows) == 60
    resumed = [r for r in rows if r.get("iterations_since_restore") == 1 and r["step"] > 10]
    assert resumed, "the interrupted trials started over instead of going on from their checkpoints"
