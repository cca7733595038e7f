"""progress.json's stage entries: a finished stage round-trips through JSON, and one written before the
sweep figure (eval-loss points only) still loads, for `clinft report` on an older study."""

from __future__ import annotations

import json

from clinft_ray.progress import stage_from_json, stage_to_json
from clinft_ray.selection import Candidate
from clinft_ray.sweep import StageResult


def stage(curves) -> StageResult:
    return StageResult(stage="dpo", run_id="r", selected=Candidate(trial="t_00001", step=10, dev=0.9, order=1),
                       selected_run_id="s", checkpoint="/c", hparams={"learning_rate": 1e-3, "beta": 0.3}, trials=2,
                       hours_by={"train": {"cpu_hours": 0.1}}, curves=curves, selected_trial="uti-dpo-x")


def test_a_stage_round_trips_with_its_trial_curves():
    curves = {"uti-dpo-x": {"hparams": {"learning_rate": 1e-3, "beta": 0.3}, "dev": [[10, 0.9]], "eval_loss": [[10, 0.5]]}}
    back = stage_from_json(json.loads(json.dumps(stage_to_json(stage(curves)))))
    assert back == stage(curves)


def test_an_older_stage_with_eval_loss_points_only_still_loads():
    data = json.loads(json.dumps(stage_to_json(stage({}))))
    data["curves"] = {"uti-dpo-x": [[10, 0.5], [20, 0.4]]}
    assert stage_from_json(data).curves == {"uti-dpo-x": {"hparams": {}, "dev": [], "eval_loss": [[10, 0.5], [20, 0.4]]}}
