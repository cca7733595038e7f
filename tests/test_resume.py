"""Nothing lost: a study killed in the middle of its DPO sweep, run again, ends as if never interrupted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def _copy_demo(demo_dir: Path, dest: Path) -> Path:
    for sub in ("data", "model", "tune_spaces"):
        shutil.copytree(demo_dir / sub, dest / sub)
    shutil.copyfile(demo_dir / "study.yaml", dest / "study.yaml")
    return dest / "study.yaml"


def _clinft_run(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clinft_ray.cli", "run", str(config), "--set", "ray.num_cpus=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_dpo_then_rerun_gives_the_uninterrupted_result(demo_dir, demo_run, tmp_path):
    _, uninterrupted = demo_run
    config = _copy_demo(demo_dir, tmp_path)
    proc = _clinft_run(config)
    deadline = time.monotonic() + 600
    # wait until the DPO sweep has checkpointed some trials, then kill the driver without warning
    while len(list((tmp_path / "ray" / "uti-dpo").glob("*/checkpoint_*"))) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "results.json").exists()
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert "uti/sft" in progress["done"] and "uti/dpo" not in progress["done"]
    sft_checkpoint = progress["done"]["uti/sft"]["entry"]["checkpoint"]

    rerun = _clinft_run(config)
    _, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-3000:]
    assert "going on where it stopped" in err
    results = json.loads((tmp_path / "results.json").read_text())

    # SFT was not trained again, and the selections and test scores are those of the run never stopped
    assert results["tasks"]["uti"]["stages"]["sft"]["checkpoint"] == sft_checkpoint
    for stage in ("base", "sft", "dpo"):
        got, want = results["tasks"]["uti"]["stages"][stage], uninterrupted["tasks"]["uti"]["stages"][stage]
        assert got["test"] == want["test"], stage
        if stage != "base":
            assert {k: v for k, v in got["selected"].items() if k in ("learning_rate", "beta", "step")} == \
                   {k: v for k, v in want["selected"].items() if k in ("learning_rate", "beta", "step")}, stage
    assert [c["p_value"] for c in results["tasks"]["uti"]["comparisons"]] == pytest.approx(
        [c["p_value"] for c in uninterrupted["tasks"]["uti"]["comparisons"]])

    # MLflow: one run per trial (no duplicates from the second process), none left RUNNING, each
    # curve point logged once
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("uti-demo").experiment_id], max_results=1000)
    assert {r.info.status for r in runs} == {"FINISHED"}
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 16 and len({r.data.tags["clinft.trial_id"] for r in trials}) == 16
    assert len([r for r in runs if r.data.tags.get("clinft.kind") == "study"]) == 1
    assert len([r for r in runs if r.data.tags.get("clinft.stage") == "base"]) == 1
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")]
        assert len(steps) == len(set(steps)), run.info.run_name
        assert run.data.metrics["cpu_hours"] > 0
