"""The one module that talks to MLflow.

Layout of a study in MLflow (one experiment per study):

    study run                      clinft.kind=study
      task run (one per task)      clinft.task=<task>      sums of GPU/CPU-hours, dpo_sft_cost_ratio
        stage run base|sft|dpo     clinft.stage=<stage>    selected hyperparameters, dev/test metrics
          trial run (sft, dpo)     params, curves train/loss eval/loss dev/<metric>, gpu_hours, cpu_hours
                                   (dpo trials: clinft.init_from = run id of the selected SFT trial)

Runs are created and written from the driver only, through explicit run ids (`MlflowClient`), so a
sqlite store never sees concurrent writers and no global "active run" is involved. Only numbers,
hyperparameters, ids, paths and dataset fingerprints are logged: never prompts, answers or rows.
Ray's own `MLflowLoggerCallback` is not used because it logs every result key against Tune's
iteration counter; here curves are keyed by optimizer step so SFT and DPO line up, and each trial run
gets its stage's tags and its cost when it ends.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from clinft_ray.config import CostConfig

METRIC_PREFIXES = ("train/", "eval/", "dev/", "rewards/", "logps/", "system/")


def redact_uri(uri: str) -> str:
    """A URI with any user:password@ removed, fit for logs and results files."""
    return re.sub(r"//[^/@]*@", "//", uri)


def error_kind(error: BaseException | None) -> str:
    """The name of what went wrong, never its message (a message could quote data): Ray's wrapped
    task errors are unwrapped to the exception the trial raised."""
    if error is None:
        return "unknown"
    return type(getattr(error, "cause", None) or error).__name__


def _trial_error(trial: Any) -> BaseException | None:
    """The exception a failed trial raised. Tune pickles it next to the trial's driver-side files
    before calling `on_trial_error`; the copy in storage only appears after the next sync."""
    path = Path(getattr(trial, "pickled_error_file", "") or "")
    if path.is_file():
        import cloudpickle

        with path.open("rb") as f:
            return cloudpickle.load(f)
    return trial.get_pickled_error()


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """Creates the study's runs and logs to them by id."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_dir: Path | None = None):
        """`artifact_dir`: where a new experiment keeps its artifacts when the store is a local
        database (MLflow's default, ./mlruns, would land in whatever folder the user ran from); a
        tracking server decides that itself."""
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.open: list[str] = []  # runs started and not yet ended, oldest first
        found = self.client.get_experiment_by_name(experiment)
        if found:
            self.experiment_id = found.experiment_id
        else:
            local = artifact_dir is not None and not tracking_uri.startswith(("http://", "https://", "databricks"))
            location = Path(artifact_dir).resolve().as_uri() if local else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    def start(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
        """Create a run (nested under `parent` when given) and return its id."""
        all_tags = dict(tags or {})
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.open.append(run.info.run_id)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Continue a run of an interrupted study: RUNNING again, and ended with the rest."""
        self.client.update_run(run_id, status="RUNNING")
        if run_id not in self.open:
            self.open.append(run_id)

    def children(self, parent: str) -> list[Any]:
        return self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=5000)

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        for k, v in params.items():
            self.client.log_param(run_id, k, v)

    def metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        """One batch, so a row is in MLflow whole or not at all (a resumed sweep relies on it)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        if run_id in self.open:
            self.open.remove(run_id)

    def end_open(self, status: str) -> None:
        """End every run still open (innermost first), so none is left RUNNING after a failure."""
        for run_id in reversed(list(self.open)):
            self.end(run_id, status)

    def artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=folder)


def device_hours(resources: dict[str, float], seconds: float, prices: CostConfig) -> dict[str, float]:
    """Device-hours of a piece of work: devices allocated x wall time, and their price.
    2 GPUs + 8 CPUs for 90 min at $2.50 per GPU-hour -> 3.0 gpu_hours, 12.0 cpu_hours, $7.50."""
    gpu = resources.get("GPU", 0.0) * seconds / 3600.0
    cpu = resources.get("CPU", 0.0) * seconds / 3600.0
    return {"gpu_hours": gpu, "cpu_hours": cpu, "cost_usd": gpu * prices.gpu_hour_usd + cpu * prices.cpu_hour_usd}


class TrialRuns(Callback):
    """A Ray Tune callback that mirrors every trial of one stage into an MLflow run.

    `fixed_params` (schedule, seed, model) are logged on every trial beside its swept config;
    `tags` (task, stage, init_from) likewise. `run_ids` maps Tune trial ids to MLflow run ids and
    `hours` to each trial's GPU/CPU-hours and cost once it has ended.

    When a stage resumes, the trial runs it already has in MLflow are picked up (one run per trial,
    whatever the number of attempts), with the wall time their earlier attempts held the devices.
    """

    def __init__(self, tracker: Tracker, stage_run: str, resources: dict[str, float], prices: CostConfig,
                 fixed_params: dict[str, Any], tags: dict[str, str]):
        self.tracker = tracker
        self.stage_run = stage_run
        self.resources = resources
        self.prices = prices
        self.started: dict[str, float] = {}  # trial id -> when this attempt's resources were granted (monotonic)
        self.before: dict[str, float] = {}  # trial id -> seconds its attempts before this process held the devices
        self.fixed_params = fixed_params
        self.tags = tags
        self.run_ids: dict[str, str] = {}
        self.hours: dict[str, dict[str, float]] = {}
        self.steps: dict[str, int] = {}  # trial id -> last step reported: totals are logged there, as the latest
        for run in tracker.children(stage_run):
            trial_id = run.data.tags.get("clinft.trial_id")
            if trial_id is None:
                continue
            self.run_ids[trial_id] = run.info.run_id
            self.before[trial_id] = run.data.metrics.get("wall_s", 0.0)
            # Rows up to here are in MLflow already; a trial resumed from an older checkpoint
            # reports some of them again, and they are not logged twice.
            self.steps[trial_id] = max((m.step for m in tracker.client.get_metric_history(run.info.run_id, "wall_s")),
                                       default=-1)
            if run.info.status != "RUNNING":  # ended before the interruption: Tune will not run it again
                self.hours[trial_id] = {k: run.data.metrics.get(k, 0.0) for k in ("gpu_hours", "cpu_hours", "cost_usd")}

    def _seconds(self, trial: Any) -> float:
        """Wall time the trial has held its devices: earlier attempts plus this one so far."""
        return self.before.get(trial.trial_id, 0.0) + time.monotonic() - self.started.get(trial.trial_id, time.monotonic())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())
        if trial.trial_id in self.run_ids:
            self.tracker.reopen(self.run_ids[trial.trial_id])
            self.hours.pop(trial.trial_id, None)
            return
        run = self.tracker.start(str(trial), parent=self.stage_run,
                                 tags={**self.tags, "clinft.trial": str(trial), "clinft.trial_id": trial.trial_id})
        self.tracker.params(run, {**trial.config, **self.fixed_params})
        self.run_ids[trial.trial_id] = run

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run = self.run_ids.get(trial.trial_id)
        if run is None:
            return
        curves = {k: v for k, v in result.items() if k.startswith(METRIC_PREFIXES) and isinstance(v, int | float)}
        if int(result.get("step", 0)) <= self.steps.get(trial.trial_id, -1):
            return
        self.steps[trial.trial_id] = int(result.get("step", 0))
        self.tracker.metrics(run, {**curves, "wall_s": self._seconds(trial)}, step=self.steps[trial.trial_id])
        if result.get("stopped"):
            self.tracker.tag(run, "clinft.stopped", f"{result['stopped']} at step {int(result.get('step', 0))}")

    def _finish(self, trial: Any, status: str) -> None:
        run = self.run_ids.get(trial.trial_id)
        if run is None:
            return
        # Wall time from the grant of the trial's resources to its end, failed and retried attempts
        # included: the devices were held all that time, whatever the trial reported.
        seconds = self._seconds(trial)
        self.hours[trial.trial_id] = device_hours(self.resources, seconds, self.prices)
        self.tracker.metrics(run, {**self.hours[trial.trial_id], "wall_s": seconds}, step=self.steps.get(trial.trial_id))
        self.tracker.end(run, status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self.run_ids.get(trial.trial_id)
        if run is not None:
            # The exception's type only: a message could quote data. The full traceback stays in
            # Tune's error file inside the output directory.
            self.tracker.tag(run, "clinft.failure", error_kind(_trial_error(trial)))
        self._finish(trial, "FAILED")
