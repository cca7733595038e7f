"""Faults inside a sweep: a trial whose process dies is retried from its latest whole checkpoint (the
newest one, cut short by the kill, is passed over), and a trial whose loss goes non-finite stops at
once with the reason recorded, while the study goes on."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clinft_ray.config import load_study
from clinft_ray.modeling import MANIFEST, incomplete
from clinft_ray.study import run_study

from helpers import small_study

pytestmark = pytest.mark.slow

# lr 1e30 blows the tiny model's loss up to NaN at step 3; lr 1e-2 learns (see demo_sft.yaml)
SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e30, 1.0e-2]}, "max_steps": 40, "eval_steps": 10, "batch_size": 8}
DPO = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1]}, "max_steps": 10,
       "eval_steps": 5, "batch_size": 8}


def _kill_trial_once(storage: Path, deadline: float) -> list[int]:
    """SIGKILL the process of the lr 1e-2 SFT trial once it has reported two checkpoints, as a
    preempted node would, and cut its newest checkpoint short as a kill in the middle of a copy would.
    The process is the one Tune recorded with the trial's rows (other tests' trials may share its
    name). Returns the step of the broken checkpoint."""
    while time.monotonic() < deadline:
        rows = [json.loads(line) for f in storage.glob("uti-sft/uti-sft-lr1e-02-*/result.json")
                for line in f.read_text().splitlines()]
        found = sorted(storage.glob("uti-sft/uti-sft-lr1e-02-*/checkpoint_*"))
        if len(rows) >= 2 and len(found) >= 2 and (found[-1] / MANIFEST).is_file():
            os.kill(rows[-1]["pid"], signal.SIGKILL)
            newest = found[-1]
            weights = max((f for f in newest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
            with weights.open("r+b") as f:
                f.truncate(weights.stat().st_size // 2)
            return [json.loads((newest / MANIFEST).read_text())["step"]]
        time.sleep(0.2)
    return []


def test_trial_retried_from_checkpoint_and_nan_trial_stopped(demo_dir, ray_session, tmp_path):
    study = load_study(small_study(demo_dir, tmp_path, sft=SFT, dpo=DPO, sets=("trial_retries=1",)),
                       output_dir=str(tmp_path / "out"))
    killed: list[int] = []  # the step of the checkpoint the kill broke
    killer = threading.Thread(target=lambda: killed.extend(_kill_trial_once(tmp_path / "out" / "ray",
                                                                            time.monotonic() + 600)))
    killer.start()
    results = run_study(study)
    killer.join()
    assert killed, "no trial process was found to kill"

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("uti-demo").experiment_id], max_results=100)
    sft = {r.data.params["learning_rate"]: r for r in runs if r.data.tags.get("clinft.stage") == "sft"
           and "clinft.trial" in r.data.tags}
    assert len(sft) == 2 and {r.info.status for r in runs} == {"FINISHED"}

    # the NaN trial: stopped at the first non-finite loss, the reason on its run, never selected
    nan_run = sft["1e+30"]
    assert "non-finite" in nan_run.data.tags["clinft.stopped"]
    stopped_at = int(nan_run.data.tags["clinft.stopped"].rsplit(" ", 1)[1])
    assert stopped_at < SFT["max_steps"]
    assert results["tasks"]["uti"]["stages"]["sft"]["selected"]["learning_rate"] == 1.0e-2

    # the killed trial: one run, every eval step once, up to max_steps, after going on from its checkpoint
    ok = sft["0.01"]
    steps = [m.step for m in client.get_metric_history(ok.info.run_id, "eval/loss")]
    assert sorted(steps) == [10, 20, 30, 40]
    trial_dir = next((tmp_path / "out" / "ray" / "uti-sft").glob("uti-sft-lr1e-02-*"))
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    resumed = [r["step"] for r in rows if r.get("iterations_since_restore") == 1 and r["step"] > 10]
    assert resumed, "the retry started over instead of going on from a checkpoint"
    # it went on from a whole checkpoint before the broken one: the broken step was trained again
    assert resumed[-1] <= killed[0]
    assert incomplete(results["tasks"]["uti"]["stages"]["sft"]["checkpoint"]) is None  # selection passed it over too
    # the failed attempt's device time is billed once: the run's wall time covers both attempts
    assert ok.data.metrics["wall_s"] >= sum(r["time_this_iter_s"] for r in rows) * 0.5
