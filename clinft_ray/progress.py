"""What a study has done so far, so that running it again goes on where it stopped.

`OUTPUT/progress.json` holds the study's fingerprint, the MLflow run id of every run the study opened
(study, task, stage) and the result of every finished step (base scoring; a sweep with its selection
and its test scoring). It is rewritten whole (a temporary file, then a rename) after each step, so a
kill at any moment leaves the last complete version. A sweep that was running resumes through Ray
Tune's own experiment state, each unfinished trial from its latest checkpoint (see `sweep.run_sweep`).
Only numbers, ids, paths and labels from the config are kept: test answers are not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from clinft_ray.errors import PreflightError
from clinft_ray.evaluate import Scored
from clinft_ray.selection import Candidate
from clinft_ray.sweep import StageResult
from clinft_ray.tracking import Tracker


class Progress:
    def __init__(self, path: Path, study: str, fingerprint: str):
        self.path = path
        data = json.loads(path.read_text()) if path.is_file() else None
        if data and data.get("fingerprint") != fingerprint:
            raise PreflightError(f"{path.parent} holds an unfinished study {data.get('study')!r} with another config or "
                                 "data; rerun that one, or pass a new --out (or output_dir)")
        self.resumed = data is not None
        self.data = data or {"study": study, "fingerprint": fingerprint, "runs": {}, "done": {}}

    def run(self, name: str, tracker: Tracker, start: Callable[[], str]) -> str:
        """The MLflow run for `name`: the one opened before (reopened), or a new one from `start()`."""
        if name in self.data["runs"]:
            run_id = self.data["runs"][name]
            tracker.reopen(run_id)
            return run_id
        run_id = start()
        self.data["runs"][name] = run_id
        self.save()
        return run_id

    def started(self, name: str) -> bool:
        return name in self.data["runs"]

    def get(self, name: str) -> Any | None:
        return self.data["done"].get(name)

    def put(self, name: str, value: Any) -> None:
        self.data["done"][name] = value
        self.save()

    def save(self) -> None:
        part = self.path.with_name(f"{self.path.name}.part")
        part.write_text(json.dumps(self.data, indent=1))
        os.replace(part, self.path)


def scored_to_json(scored: Scored) -> dict[str, Any]:
    return {"metrics": scored.metrics, "ids": scored.ids, "outcomes": scored.outcomes}


def scored_from_json(data: dict[str, Any]) -> Scored:
    return Scored(metrics=data["metrics"], ids=data["ids"], outcomes=data["outcomes"], answers=[])


def stage_to_json(stage: StageResult) -> dict[str, Any]:
    data = {f.name: getattr(stage, f.name) for f in fields(stage)}
    data["selected"] = {f.name: getattr(stage.selected, f.name) for f in fields(stage.selected) if f.name != "payload"}
    return data


def stage_from_json(data: dict[str, Any]) -> StageResult:
    # progress.json of clinft-ray before the sweep figure kept only the eval-loss points of each trial
    curves = {k: v if isinstance(v, dict) else {"hparams": {}, "dev": [], "eval_loss": v} for k, v in data["curves"].items()}
    return StageResult(**{**data, "selected": Candidate(**data["selected"]), "curves": curves})
