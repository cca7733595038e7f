"""A sweep whose space has `scheduler: {asha: ...}`: Ray's ASHA stops the trials that trail on dev at
the grace step, their runs end FINISHED in MLflow, and their checkpoints stay candidates for selection."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clinft_ray.config import load_study
from clinft_ray.modeling import read_manifest
from clinft_ray.preflight import trial_resources
from clinft_ray.selection import candidates
from clinft_ray.sft import sft_train
from clinft_ray.sweep import run_sweep, summarize, trainable
from clinft_ray.tracking import Tracker, TrialRuns

from helpers import small_study

pytestmark = pytest.mark.slow

# lr 1e-2 lifts the tiny model's dev F1 from 0 to about 0.67 by step 20; 1e-5 and below barely move
# it (see demo_sft.yaml), so at the grace step they trail the first trial and ASHA stops them there.
# Rungs: 20 only (20 x 3 > 40 = max_steps).
SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-2, 1.0e-5, 1.0e-6, 1.0e-7]}, "max_steps": 40,
       "eval_steps": 20, "batch_size": 8, "lr_scheduler": "constant",
       "scheduler": {"asha": {"grace_steps": 20, "reduction_factor": 3}}}


def test_asha_stops_trailing_trials_and_selection_still_sees_them(demo_dir, ray_session, tmp_path):
    import ray

    # Two CPUs per trial on the 2-CPU test Ray: trials run one at a time in grid order, so which of
    # them reach a rung first (and so what ASHA stops) does not depend on timing.
    study = load_study(small_study(demo_dir, tmp_path, sft=SFT, sets=("resources.cpus_per_trial=2",)),
                       output_dir=str(tmp_path / "out"))
    cfg, task = study.config, study.config.tasks[0]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "asha", tmp_path / "artifacts")
    stage_run = tracker.start("sft")
    resources = trial_resources(cfg.resources, ray.cluster_resources())
    runs = TrialRuns(tracker, stage_run, resources.total(), cfg.cost, fixed_params={}, tags={"clinft.stage": "sft"})

    grid = run_sweep(trainable(partial(sft_train, study=study, task=task), resources, cfg.storage_path, task.metric),
                     name="asha-sft", space=study.sft_space, storage_path=cfg.storage_path, callbacks=[runs],
                     retries=0, resume=False, metric=task.metric)
    tracker.flush()

    last = {r.metrics["trial_id"]: int(r.metrics_dataframe["step"].max()) for r in grid}
    assert len(last) == 4 and all(r.error is None for r in grid)
    stopped = [t for t, step in last.items() if step < SFT["max_steps"]]
    assert stopped, f"ASHA stopped no trial: last steps {last}"
    assert max(last.values()) == SFT["max_steps"]
    assert all(last[t] == 20 for t in stopped)  # at the grace step, the only rung below max_steps

    # every trial, stopped or not, is a candidate with its best checkpoint, and one is selected
    found = {c.trial: c for c in candidates(grid, task.metric)}
    assert set(found) == set(last)
    for t in stopped:
        assert found[t].step <= last[t] and read_manifest(Path(found[t].checkpoint))["step"] == found[t].step
    stage = summarize("sft", stage_run, grid, runs, task.metric, task.name, cfg.storage_path)
    assert stage.selected.dev == max(c.dev for c in found.values())
    assert stage.trials == 4 and stage.hours_by["train"]["cpu_hours"] > 0

    # MLflow: one FINISHED run per trial, whose curve ends where the trial stopped
    client = MlflowClient(uri)
    for trial, step in last.items():
        run = client.get_run(runs.run_id(trial))
        assert run.info.status == "FINISHED"
        assert max(m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")) == step
