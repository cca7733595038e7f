"""The one module that talks to MLflow.

Layout of a study in MLflow (one experiment per study):

    study run                      clinft.level=study      (and clinft.kind=study)
      task run (one per task)      clinft.level=task       clinft.task=<task>; sums of GPU/CPU-hours, dpo_sft_cost_ratio
        stage run base|sft|dpo     clinft.level=stage      clinft.stage=<stage>; selected hyperparameters, dev/test metrics
          trial run (sft, dpo)     clinft.level=trial      clinft.stage too; params, curves train/loss eval/loss
                                                           dev/<metric>, gpu_hours, cpu_hours (dpo trials:
                                                           clinft.init_from = run id of the selected SFT trial)

The experiment has the tag mlflow.experimentKind=custom_model_development, which MLflow 3's UI reads
to open it on its runs; the UI of MLflow 3.17 picks its view globally instead (the GenAI / Model
training switch, remembered by the browser), so the link clinft prints (`MODEL_VIEW`) asks for the
model-training view itself.

Runs are created and written from the driver only, through explicit run ids (`MlflowClient`), so a
sqlite store never sees concurrent writers and no global "active run" is involved. Only numbers,
hyperparameters, ids, paths and dataset fingerprints are logged: never prompts, answers or rows.
Ray's own `MLflowLoggerCallback` is not used because it logs every result key against Tune's
iteration counter; here curves are keyed by optimizer step so SFT and DPO line up, and each trial run
gets its stage's tags and its cost when it ends.

A tracking server that goes away mid-study does not stop training. Every write goes through an
ordered outbox: sent at once while MLflow answers; while it does not, held in memory (metrics keep
the timestamp of the moment they were logged) and replayed in order by a background thread every few
seconds until it answers again, so each value lands once. Trial runs started during an outage are
created when it ends. Only the study's own boundaries wait for MLflow (a stage run it must know the
id of, a read, the end of the study), saying so in the log once a minute. If it is still down when
the study ends (after `mlflow.outage_wait_s`), or the study is stopped, the held writes are saved to
OUTPUT_DIR/mlflow-outbox.pkl and the next `clinft run` of the study sends them first. MLflow's own HTTP retries
(minutes of blocking per call) are turned off for the process unless the user set
MLFLOW_HTTP_REQUEST_MAX_RETRIES; the outbox retries instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ray.tune import Callback

from clinft_ray.config import CostConfig
from clinft_ray.errors import PreflightError

METRIC_PREFIXES = ("train/", "eval/", "dev/", "rewards/", "logps/", "system/")
RETRY_S = 3.0  # how often the outbox tries an unreachable tracking server again
OUTBOX_FILE = "mlflow-outbox.pkl"  # in the output directory: writes a stopped study could not send
log = logging.getLogger("clinft")
T = TypeVar("T")


def redact_uri(uri: str) -> str:
    """A URI with any user:password@ removed, fit for logs and results files."""
    return re.sub(r"//[^/@]*@", "//", uri)


def error_kind(error: BaseException | None) -> str:
    """The name of what went wrong, never its message (a message could quote data): Ray's wrapped
    task errors are unwrapped to the exception the trial raised."""
    if error is None:
        return "unknown"
    return type(getattr(error, "cause", None) or error).__name__


def trial_error(trial: Any) -> BaseException | None:
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


def study_tracking_uri(mlflow_uri: str | None, output_dir: Path) -> str:
    """Where a study tracks: `mlflow.tracking_uri`, else MLFLOW_TRACKING_URI, else the output folder's sqlite."""
    return mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(output_dir)


class PendingRun:
    """A trial run asked for while MLflow was unreachable: it is created, and `id` set, when the
    outbox gets to it. Tracker methods take it wherever they take a run id."""

    def __init__(self) -> None:
        self.id: str | None = None


RunRef = str | PendingRun


def unreachable(error: BaseException) -> bool:
    """True when a call failed because MLflow did not answer (refused, timed out, 5xx after
    retries), as opposed to answering with an error. MLflow wraps transport failures as
    `MlflowException("API request to ... failed ...")`; answers with an error are `RestException`."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, requests.exceptions.RequestException):
        return True
    return (isinstance(error, MlflowException) and not isinstance(error, RestException)
            and str(error.message).startswith("API request to "))


EXPERIMENT_KIND = "mlflow.experimentKind"
# The experiment's runs in the MLflow UI's model-training view (the README's walkthrough starts here).
MODEL_VIEW = "#/experiments/{id}?workflowType=machine_learning"


@dataclass(frozen=True)
class DataSplit:
    """A split as MLflow records it: fingerprints, never rows."""

    name: str  # <task>/<split>
    context: str  # train | eval | dev | test
    path: str
    sha256: str
    rows: int


class Tracker:
    """Creates the study's runs and logs to them by id, through an outbox that rides out outages."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_dir: Path | None = None):
        """`artifact_dir`: where a new experiment keeps its artifacts when the store is a local
        database (MLflow's default, ./mlruns, would land in whatever folder the user ran from); a
        tracking server decides that itself."""
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the outbox retries, without blocking
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.open: list[RunRef] = []  # runs started and not yet ended, oldest first
        self._ops: deque[tuple[str, tuple, dict]] = deque()  # writes not yet in MLflow, in order
        self._lock = threading.RLock()
        self._flusher: threading.Thread | None = None  # running while _ops holds writes MLflow refused
        self._down_since: float | None = None
        self._said = 0.0
        self.refused: list[str] = []  # writes MLflow answered with an error during a replay (their error names)
        found = self._wait(lambda: self.client.get_experiment_by_name(experiment))
        if found:
            self.experiment_id = found.experiment_id
        else:
            local = artifact_dir is not None and not tracking_uri.startswith(("http://", "https://", "databricks"))
            location = Path(artifact_dir).resolve().as_uri() if local else None
            self.experiment_id = self._wait(lambda: self.client.create_experiment(experiment, artifact_location=location))
        # MLflow 3 opens an experiment by its kind: model training (runs, model metrics), not the GenAI
        # overview it otherwise shows an experiment without traces as ("No data").
        self._wait(lambda: self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, "custom_model_development"))

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks (and this with them) into the experiment state; a restored
        # sweep gets a fresh TrialRuns, so the copy needs no lock, thread or held writes.
        state = dict(self.__dict__)
        state.update(_lock=None, _flusher=None, _ops=deque())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.RLock())

    # -- the outbox ---------------------------------------------------------------------------

    def _apply(self, op: tuple[str, tuple, dict]) -> None:
        method, args, kwargs = op
        if method == "create_run":
            pending, *rest = args
            pending.id = self.client.create_run(*rest, **kwargs).info.run_id
            return
        getattr(self.client, method)(*(a.id if isinstance(a, PendingRun) else a for a in args), **kwargs)

    def _drain(self) -> bool:
        """Send the queued writes in order while MLflow answers (no replay running); False, the rest
        kept, at the first one it does not answer. A write it answers with an error is raised."""
        while self._ops:
            try:
                self._apply(self._ops[0])
            except Exception as e:
                if unreachable(e):
                    return False
                self._ops.popleft()
                raise
            self._ops.popleft()
        return True

    def _send(self, method: str, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self._ops.append((method, args, kwargs))
            self._drain_or_replay()

    def _drain_or_replay(self) -> None:
        """With the lock held: send what is queued now, or, if MLflow does not answer, leave it to the
        replay thread (started here unless it runs already)."""
        if self._flusher is None and not self._drain():
            self._outage()
            self._flusher = threading.Thread(target=self._replay, name="clinft-mlflow-outbox", daemon=True)
            self._flusher.start()

    def _replay(self) -> None:
        """The outbox thread: every RETRY_S, the held writes in order, until none is left. Each is
        sent outside the lock, so a server that hangs does not hold up the study; a write MLflow
        answers with an error is recorded in `refused` and skipped (raising would only stop this)."""
        while True:
            time.sleep(RETRY_S)
            while True:
                with self._lock:
                    if not self._ops:
                        self._flusher = None
                        self._back()
                        return
                    op = self._ops[0]
                try:
                    self._apply(op)
                except Exception as e:
                    if unreachable(e):
                        with self._lock:
                            self._outage()
                        break
                    self.refused.append(type(e).__name__)
                with self._lock:
                    if self._ops and self._ops[0] is op:  # not moved to a file meanwhile (save_held)
                        self._ops.popleft()

    def _outage(self) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._said >= 60:
            self._said = now
            log.warning("MLflow at %s is not answering (for %.0f s): training goes on, %d writes held "
                        "and sent when it answers", redact_uri(self.tracking_uri), now - self._down_since,
                        len(self._ops))

    def _back(self) -> None:
        if self._down_since is not None:
            log.warning("MLflow at %s answers again after %.0f s: held writes sent", redact_uri(self.tracking_uri),
                        time.monotonic() - self._down_since)
        self._down_since, self._said = None, 0.0

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write is in MLflow (a line a minute while it is down); False if some are
        still held after `timeout` seconds (None: however long an outage lasts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._ops:
                    return True
                self._outage()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(RETRY_S / 3)

    def save_held(self, path: Path) -> int:
        """Move the writes still held to `path` (whole or not at all) for `send_saved` in a later
        process; returns how many. This tracker sends them no more, so none lands twice. Ids, names,
        numbers and paths only, like everything sent."""
        import pickle

        with self._lock:
            ops = list(self._ops)
            part = path.with_name(f"{path.name}.part")
            part.write_bytes(pickle.dumps(ops))
            part.replace(path)
            self._ops.clear()
        return len(ops)

    def send_saved(self, path: Path) -> None:
        """Send, before anything new, the writes an earlier process saved with `save_held` (a file in
        the study's own output directory); the file goes once they are all in MLflow."""
        import pickle

        if not path.is_file():
            return
        ops = pickle.loads(path.read_bytes())  # noqa: S301 - written by save_held into this study's folder
        log.info("sending %d MLflow writes held by the last run of this study", len(ops))
        with self._lock:
            self._ops.extendleft(reversed(ops))
            self._drain_or_replay()
        self.flush()
        path.unlink()

    def _wait(self, call: Callable[[], T]) -> T:
        """A call whose answer the study needs (a read, a run id): after every held write, and
        waiting out an outage."""
        self.flush()
        while True:
            try:
                with self._lock:
                    result = call()
                self._back()
                return result
            except Exception as e:
                if not unreachable(e):
                    raise
                with self._lock:
                    self._outage()
            time.sleep(RETRY_S)

    def resolve(self, run: RunRef) -> str:
        """The MLflow id of a run, waiting for the outbox to create it if MLflow was down."""
        if isinstance(run, PendingRun):
            self.flush()
            assert run.id is not None
            return run.id
        return run

    # -- runs and what goes in them -----------------------------------------------------------

    def start(self, name: str, parent: RunRef | None = None, tags: dict[str, str] | None = None) -> str:
        """Create a run (nested under `parent` when given) and return its id, waiting for MLflow."""
        all_tags = dict(tags or {})
        if parent:
            all_tags["mlflow.parentRunId"] = self.resolve(parent)
        run_id = self._wait(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)).info.run_id
        self.open.append(run_id)
        return run_id

    def start_later(self, name: str, parent: str, tags: dict[str, str]) -> RunRef:
        """Create a run without waiting: its id now if MLflow answers, else a `PendingRun`."""
        pending = PendingRun()
        self._send("create_run", pending, self.experiment_id, run_name=name,
                   tags={**tags, "mlflow.parentRunId": parent})
        run: RunRef = pending.id or pending
        self.open.append(run)
        return run

    def reopen(self, run_id: str) -> None:
        """Continue a run of an interrupted study: RUNNING again, and ended with the rest."""
        self._send("update_run", run_id, status="RUNNING")
        if run_id not in self.open:
            self.open.append(run_id)

    def children(self, parent: str) -> list[Any]:
        return self._wait(lambda: self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=5000))

    def history(self, run_id: str, key: str) -> list[Any]:
        return self._wait(lambda: self.client.get_metric_history(run_id, key))

    def params(self, run_id: RunRef, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._send("log_batch", run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def datasets(self, run_id: RunRef, splits: list[DataSplit]) -> None:
        """The splits a run used, as MLflow dataset inputs (the run page's Datasets panel): name
        `<task>/<split>`, the file's sha256 (its first 32 characters as MLflow's digest, the whole in
        the profile), row count and path; the split as the input's context. No content."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=d.name, digest=d.sha256[:32], source_type="local",
                                       source=json.dumps({"uri": d.path}),
                                       profile=json.dumps({"num_rows": d.rows, "sha256": d.sha256})),
                               [InputTag("mlflow.data.context", d.context)]) for d in splits]
        self._send("log_inputs", run_id, datasets=inputs)

    def metrics(self, run_id: RunRef, metrics: dict[str, float], step: int | None = None) -> None:
        """One batch, so a row is in MLflow whole or not at all (a resumed sweep relies on it),
        stamped now: a replay after an outage sends the same row, which MLflow keeps once."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self._send("log_batch", run_id, metrics=batch)

    def tag(self, run_id: RunRef, key: str, value: str) -> None:
        self._send("set_tag", run_id, key, value)

    def end(self, run_id: RunRef, status: str = "FINISHED") -> None:
        self._send("set_terminated", run_id, status=status, end_time=int(time.time() * 1000))
        if run_id in self.open:
            self.open.remove(run_id)

    def end_open(self, status: str) -> None:
        """End every run still open (innermost first), so none is left RUNNING after a failure."""
        for run_id in reversed(list(self.open)):
            self.end(run_id, status)

    def artifact(self, run_id: RunRef, path: Path, folder: str | None = None) -> None:
        self._send("log_artifact", run_id, str(path), artifact_path=folder)

    # -- the Model Registry -------------------------------------------------------------------

    def register_model(self, name: str, alias: str, run_id: str, folder: Path, *, params: dict[str, Any],
                       metrics: dict[str, float], tags: dict[str, str], description: str = "") -> str:
        """A stage's selected model as an MLflow 3 LoggedModel of `run_id` (the files in `folder` as its
        artifacts, `params`, `metrics` linked to it, `tags`), registered as a new version of `name`
        with the alias `alias`; returns the version. Waits for MLflow (the study's end does).

        Idempotent for a study: when `alias` already points at a version with the same
        `clinft.fingerprint` tag (a resumed study that had registered it), that version is kept."""
        from mlflow.entities import LoggedModelStatus, Metric
        from mlflow.exceptions import MlflowException

        try:
            kept = self._wait(lambda: self.client.get_model_version_by_alias(name, alias))
        except MlflowException:  # no such model or alias yet
            kept = None
        if kept is not None and kept.tags.get("clinft.fingerprint") == tags.get("clinft.fingerprint"):
            return kept.version
        model = self._wait(lambda: self.client.create_logged_model(
            self.experiment_id, name=f"{tags.get('clinft.task', name)}-{alias}", source_run_id=run_id,
            tags=tags, params={k: str(v) for k, v in params.items()}, model_type="clinft-ray"))
        self._wait(lambda: self.client.log_model_artifacts(model.model_id, str(folder)))
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0, model_id=model.model_id, run_id=run_id) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        self._wait(lambda: self.client.log_batch(run_id, metrics=batch))
        self._wait(lambda: self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY))
        try:
            self._wait(lambda: self.client.create_registered_model(
                name, description="clinft-ray: the selected models of one task of a study, by stage (aliases "
                "sft and dpo)"))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        # A local (sqlite) registry looks the LoggedModel up through the process's global tracking URI,
        # not this client's (MLflow 3.17); a server looks it up itself.
        with _use_tracking_uri(self.tracking_uri):
            version = self._wait(lambda: self.client.create_model_version(
                name, source=f"models:/{model.model_id}", run_id=run_id, model_id=model.model_id, tags=tags,
                description=description, await_creation_for=0))
        self._wait(lambda: self.client.set_registered_model_alias(name, alias, version.version))
        return version.version


def registered_files(tracking_uri: str, uri: str, dest: Path) -> tuple[Any, Path]:
    """A registered model (`models:/NAME@ALIAS` or `models:/NAME/VERSION`): its version, and its
    LoggedModel's artifacts downloaded into `dest`. A read: no outbox, an unreachable server is an error."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    name, _, alias = uri.removeprefix("models:/").partition("@")
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
        # A local (sqlite) registry keeps the LoggedModel in the version's source only (MLflow 3.17).
        model = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    except MlflowException as exc:
        if unreachable(exc):
            raise
        raise PreflightError(f"{uri}: no such registered model version at {redact_uri(tracking_uri)} "
                         f"({exc.error_code}); the study registers models:/<study>-<task>@sft and @dpo") from None
    path = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(dest),
                                               tracking_uri=tracking_uri)
    return version, Path(path)


HOUR_UNITS = ("gpu_hours", "cpu_hours", "cost_usd")
TRIAL_PARTS = ("train", "dev_eval")  # what a trial's device time paid for


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
    `hours` to each trial's device-hours once it has ended, by what they paid for: `dev_eval` (the
    dev scoring inside the trial, as the trial timed it: `dev_eval_s` in its rows) and `train`
    (the rest of the time it held its devices: training steps, eval loss, checkpoints).

    A trial's time is that of its attempts, each from the grant of its resources to its end: the wait
    of a failed attempt for its retry holds no device and is not counted. When a stage resumes, the
    trial runs it already has in MLflow are picked up (one run per trial, whatever the number of
    attempts), with the time their earlier attempts held the devices (`wall_s`, `dev_eval_s` as last
    logged; the driver's time down is not counted).
    """

    def __init__(self, tracker: Tracker, stage_run: str, resources: dict[str, float], prices: CostConfig,
                 fixed_params: dict[str, Any], tags: dict[str, str], datasets: list[DataSplit] | None = None):
        self.tracker = tracker
        self.datasets = datasets or []  # what each trial trains, evaluates and is scored on
        self.stage_run = stage_run
        self.resources = resources
        self.prices = prices
        self.started: dict[str, float] = {}  # trial id -> when this attempt's resources were granted (monotonic)
        self.before: dict[str, float] = {}  # trial id -> seconds its ended attempts held the devices
        self.dev_before: dict[str, float] = {}  # trial id -> seconds of dev scoring in its ended attempts
        self.dev_now: dict[str, float] = {}  # trial id -> seconds of dev scoring its running attempt reported
        self.fixed_params = fixed_params
        self.tags = tags
        self.run_ids: dict[str, RunRef] = {}  # a PendingRun for a trial started while MLflow was down
        self.hours: dict[str, dict[str, float]] = {}
        self.steps: dict[str, int] = {}  # trial id -> last step reported: totals are logged there, as the latest
        for run in tracker.children(stage_run):
            trial_id = run.data.tags.get("clinft.trial_id")
            if trial_id is None:
                continue
            self.run_ids[trial_id] = run.info.run_id
            self.before[trial_id] = run.data.metrics.get("wall_s", 0.0)
            self.dev_before[trial_id] = run.data.metrics.get("dev_eval_s", 0.0)
            # Rows up to here are in MLflow already; a trial resumed from an older checkpoint
            # reports some of them again, and they are not logged twice.
            self.steps[trial_id] = max((m.step for m in tracker.history(run.info.run_id, "wall_s")), default=-1)
            if run.info.status != "RUNNING":  # ended before the interruption: Tune will not run it again
                self.hours[trial_id] = self._split(self.before[trial_id], self.dev_before[trial_id])

    def _seconds(self, trial: Any) -> float:
        """Wall time the trial has held its devices: its ended attempts plus the running one so far."""
        started = self.started.get(trial.trial_id)
        return self.before.get(trial.trial_id, 0.0) + (0.0 if started is None else time.monotonic() - started)

    def _dev_seconds(self, trial: Any) -> float:
        return self.dev_before.get(trial.trial_id, 0.0) + self.dev_now.get(trial.trial_id, 0.0)

    def _split(self, seconds: float, dev: float) -> dict[str, dict[str, float]]:
        """A trial's device-hours by part (`TRIAL_PARTS`) from its held and dev-scoring seconds."""
        return {"train": device_hours(self.resources, seconds - dev, self.prices),
                "dev_eval": device_hours(self.resources, dev, self.prices)}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())
        if trial.trial_id in self.run_ids:
            self.tracker.reopen(self.run_ids[trial.trial_id])
            self.hours.pop(trial.trial_id, None)
            return
        # Not waiting for MLflow: a trial starting during an outage trains, its run comes later.
        run = self.tracker.start_later(str(trial), parent=self.stage_run,
                                       tags={**self.tags, "clinft.level": "trial", "clinft.trial": str(trial),
                                             "clinft.trial_id": trial.trial_id})
        self.tracker.params(run, {**trial.config, **self.fixed_params})
        if self.datasets:
            self.tracker.datasets(run, self.datasets)
        self.run_ids[trial.trial_id] = run

    def run_id(self, trial_id: str) -> str:
        """The MLflow run id of a trial (waiting for MLflow if the run was started during an outage)."""
        return self.tracker.resolve(self.run_ids[trial_id])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run = self.run_ids.get(trial.trial_id)
        if run is None:
            return
        curves = {k: v for k, v in result.items() if k.startswith(METRIC_PREFIXES) and isinstance(v, int | float)}
        self.dev_now[trial.trial_id] = float(result.get("dev_eval_s", 0.0))  # this attempt's, repeated rows too
        if int(result.get("step", 0)) <= self.steps.get(trial.trial_id, -1):
            return
        self.steps[trial.trial_id] = int(result.get("step", 0))
        self.tracker.metrics(run, {**curves, "wall_s": self._seconds(trial), "dev_eval_s": self._dev_seconds(trial)},
                             step=self.steps[trial.trial_id])
        if result.get("stopped"):
            self.tracker.tag(run, "clinft.stopped", f"{result['stopped']} at step {int(result.get('step', 0))}")

    def _finish(self, trial: Any, status: str) -> None:
        run = self.run_ids.get(trial.trial_id)
        if run is None:
            return
        # Every attempt from the grant of its resources to its end, failed ones included: the devices
        # were held all that time, whatever the trial reported.
        seconds = self._seconds(trial)
        dev = min(self._dev_seconds(trial), seconds)
        self.hours[trial.trial_id] = self._split(seconds, dev)
        totals = device_hours(self.resources, seconds, self.prices)
        split = {f"{u}/{part}": h[u] for part, h in self.hours[trial.trial_id].items() for u in HOUR_UNITS}
        self.tracker.metrics(run, {**totals, **split, "wall_s": seconds, "dev_eval_s": dev},
                             step=self.steps.get(trial.trial_id))
        self.tracker.end(run, status)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed attempt that Tune retries: its time is banked, and the retry's clock starts when
        its resources are granted again (not now: the wait holds no device)."""
        started = self.started.pop(trial.trial_id, None)
        if started is not None:
            self.before[trial.trial_id] = self.before.get(trial.trial_id, 0.0) + time.monotonic() - started
        self.dev_before[trial.trial_id] = self._dev_seconds(trial)
        self.dev_now.pop(trial.trial_id, None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self.run_ids.get(trial.trial_id)
        if run is not None:
            # The exception's type only: a message could quote data. The full traceback stays in
            # Tune's error file inside the output directory.
            self.tracker.tag(run, "clinft.failure", error_kind(trial_error(trial)))
        self._finish(trial, "FAILED")
