"""Runs on the driver: one stage's Ray Tune sweep and its result (the selection rule is `selection.py`).

`run_stage` is the engine both stages go through: it opens the stage's MLflow run (or picks it up on a
resume), mirrors every trial into MLflow (`tracking.TrialRuns`), runs the sweep with Tune and returns
the `StageResult` (the checkpoint selected on dev, its run, the stage's device-hours). The trials
themselves run `trial.run_trial` in their worker processes (`trainable` is the boundary: the function
it returns is what Tune ships to each trial).

A trial with several workers (`gpus_per_trial: 4`, or `workers_per_trial` on CPU) runs the same
training function in a Ray Train `TorchTrainer` started inside the Tune trial, the Ray Train V2 way:
the workers report with `ray.train.report`, rank 0 writes the checkpoint, and Ray's
`TuneReportCallback` forwards each row, with the checkpoint's path, to the trial.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinft_ray.config import Study, TaskConfig
from clinft_ray.console import TrialConsole
from clinft_ray.errors import StudyError
from clinft_ray.modeling import checkpoint_ref
from clinft_ray.preflight import DRIVER_CPUS, TrialResources
from clinft_ray.selection import Candidate, candidates, select_best
from clinft_ray.spaces import SearchSpace
from clinft_ray.tracking import HOUR_UNITS, TRIAL_PARTS, DataSplit, Tracker, TrialRuns, error_kind
from clinft_ray.trial import Reporter, TrainReporter, TuneReporter

if TYPE_CHECKING:
    from clinft_ray.progress import Progress  # progress.py reads and writes StageResult

log = logging.getLogger("clinft")


def trial_name(prefix: str) -> Callable[[Any], str]:
    """Trial names from the hyperparameters and Tune's stable trial index: no timestamps."""

    def name(trial: Any) -> str:
        hp = "-".join(f"lr{v:.0e}" if k == "learning_rate" else f"{k}{v:g}" for k, v in sorted(trial.config.items()))
        return f"{prefix}-{hp}-{trial.trial_id.rsplit('_', 1)[-1]}"

    return name


def trainable(train: Callable[[dict[str, Any], Reporter], None], resources: TrialResources, storage_path: str,
              metric: str) -> Any:
    """The Tune trainable that runs `train(hp, reporter)`: in the trial's own process, or, with several
    workers, on each worker of a `TorchTrainer` that the trial starts and waits for."""
    from ray import tune

    if resources.workers == 1:
        def trial(hp: dict[str, Any]) -> None:
            train(hp, TuneReporter())

        return tune.with_resources(trial, resources.worker())

    def driver(hp: dict[str, Any]) -> None:
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        TorchTrainer(
            lambda config: train(config, TrainReporter()),
            train_loop_config=hp,
            scaling_config=ray.train.ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpus > 0,
                                                   resources_per_worker=resources.worker()),
            run_config=ray.train.RunConfig(
                name=f"{tune.get_context().get_experiment_name()}-{tune.get_context().get_trial_id()}",
                storage_path=storage_path,
                callbacks=[TuneReportCallback()],
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="keep/dev",
                                                             checkpoint_score_order="max"),
            ),
        ).fit()

    return tune.with_resources(driver, {"CPU": DRIVER_CPUS})


SYNC_PERIOD_S = 2  # see `run_sweep`
STOP = threading.Event()  # a stop asked for by a signal (`request_stop`)
_fitting = threading.Event()  # a sweep is in `Tuner.fit`


def request_stop() -> bool:
    """Called by the driver's signal handler (`cli.stop_on_signals`) for Ctrl-C or SIGTERM. During a
    sweep, Tune is asked to end it the way Ray documents for a manual stop: it ends the trials and
    writes its experiment state and every trial's rows to storage one last time (SIGUSR1, the signal
    Tune's handler takes besides SIGINT), then `fit` raises KeyboardInterrupt. Returns False outside a
    sweep: the caller raises KeyboardInterrupt itself."""
    STOP.set()
    if not _fitting.is_set():
        return False
    # Tune's two warnings about it ("Press CTRL+C ... to skip", "Resume experiment with:
    # Tuner.restore(...)") would contradict clinft's own line, which says how to go on.
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
    signal.raise_signal(signal.SIGUSR1)
    return True


# The AWS key variables Ray Tune copies from the driver's environment into every trial's runtime
# environment, which Ray writes in plain text to runtime_env_agent.log on each node.
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def object_store(storage_path: str) -> bool:
    """Whether Ray needs the AWS keys to reach the storage (s3://, MinIO and other S3 endpoints included)."""
    return storage_path.startswith(("s3://", "s3a://"))


@contextmanager
def keys_withheld(storage_path: str) -> Iterator[None]:
    """Around what hands the driver's environment to Ray (`ray.init` of a local Ray, whose processes
    inherit it; `Tuner.fit`, which copies the AWS keys into each trial's runtime environment): with
    storage that is not on S3 the AWS keys are taken out of the environment, so that they reach no
    Ray process and no Ray log, and put back after (MLflow's client on the driver may need them for an
    S3 artifact store). With S3 storage the trials need them; `study.start_ray` warns on a cluster."""
    if object_store(storage_path):
        yield
        return
    held = {k: os.environ.pop(k) for k in AWS_KEYS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(held)


def fit(tuner: Any, storage_path: str) -> Any:
    """`tuner.fit()`, raising KeyboardInterrupt when a stop was asked for: the study then marks its runs
    KILLED and selects nothing from a half-run sweep."""
    _fitting.set()
    try:
        with keys_withheld(storage_path):
            grid = tuner.fit()
    finally:
        _fitting.clear()
    if STOP.is_set():
        raise KeyboardInterrupt
    return grid


def run_sweep(trainable: Any, *, name: str, space: SearchSpace, storage_path: str, callbacks: list,
              retries: int, resume: bool, metric: str) -> Any:
    """Run one stage's trials with Ray Tune; returns the `ResultGrid`. `storage_path` is an absolute
    folder or a URI (the study resolves it); `trainable` comes from `trainable()`.

    With the space's `scheduler: {asha: ...}`, Ray's ASHA stops trials early on `dev/<metric>`; a
    stopped trial ends TERMINATED like a finished one (its MLflow run FINISHED) and its best
    checkpoint stays a candidate.

    A trial that fails is retried `retries` times from its latest checkpoint. With `resume` (the
    study is continuing after an interruption) a sweep Tune had started is restored: finished trials
    stay finished, the others go on from their latest checkpoints, failed ones get their retries again.
    """
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from clinft_ray.console import tune_verbosity

    # Tune's CSV and JSON results (what `ResultGrid` reads back), not its TensorBoard files: MLflow holds
    # the curves (the study sets TUNE_DISABLE_AUTO_CALLBACK_LOGGERS, `study.ray_environment`).
    callbacks = [*callbacks, CSVLoggerCallback(), JsonLoggerCallback()]
    experiment = f"{storage_path.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        # Tune restores the callbacks pickled when the sweep began, with the MLflow state of the
        # process that was interrupted; this process's callbacks carry the state as it is now.
        tuner._local_tuner._run_config.callbacks = callbacks
        return fit(tuner, storage_path)
    names = trial_name(name)
    tuner = tune.Tuner(
        trainable,
        param_space=space.to_param_space(),
        tune_config=tune.TuneConfig(
            num_samples=space.num_samples,
            scheduler=space.to_scheduler(metric),
            search_alg=space.to_searcher(metric),
            # A finished trial's worker process runs the next trial of the sweep (same resources):
            # torch, transformers and TRL stay imported, which is most of a short trial's start-up.
            # Each trial still loads its model, data and seed afresh, so results do not depend on it.
            reuse_actors=True,
            trial_name_creator=names,
            trial_dirname_creator=names,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=retries),
            # Tune's record of the trials (their result rows, the experiment state) goes from the
            # driver's local staging folder to storage at most every `sync_period` (Ray's default:
            # 300 s) and at each Tune checkpoint. A multi-worker trial checkpoints through Ray Train, not
            # Tune, so without this a driver stopped or lost (`ray job stop`, a head restart) would
            # lose minutes of its rows, and a resumed study could not select what it had seen.
            # With `TUNE_GLOBAL_CHECKPOINT_S` (`study.ray_environment`) the record is in storage
            # within seconds.
            sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
            checkpoint_config=tune.CheckpointConfig(  # the best on dev, and Ray keeps the latest too
                num_to_keep=1, checkpoint_score_attribute="keep/dev", checkpoint_score_order="max"
            ),
            verbose=tune_verbosity(),  # Tune's status tables with --verbose; `console.TrialConsole` otherwise
        ),
    )
    return fit(tuner, storage_path)


@dataclass(frozen=True)
class StageResult:
    """What a finished sweep hands on: the selected (trial, step), its checkpoint and MLflow run, and
    the stage's size and cost."""

    stage: str
    run_id: str
    selected: Candidate
    selected_run_id: str
    checkpoint: str
    hparams: dict[str, float]
    trials: int
    # The trials' device-hours by what they paid for (`train`, `dev_eval`; see `tracking.TrialRuns`),
    # and for DPO the Ray task that computed the reference log-probs (`reference`).
    hours_by: dict[str, dict[str, float]]
    curves: dict[str, dict[str, Any]]  # trial name -> its `trial_curves`
    selected_trial: str




def trial_curves(result: Any, metric: str) -> dict[str, Any]:
    """What the sweep figure draws of one trial: its hyperparameters, and its dev score (`dev`, what
    selection reads) and eval loss (`eval_loss`) as [step, value] points."""
    df = result.metrics_dataframe
    out: dict[str, Any] = {"hparams": dict(result.config or {}), "dev": [], "eval_loss": []}
    for key, col in (("dev", f"dev/{metric}"), ("eval_loss", "eval/loss")):
        if df is not None and col in df:
            rows = df.dropna(subset=[col])
            out[key] = [[int(st), float(v)] for st, v in zip(rows["step"], rows[col], strict=True)]
    return out


def summarize(stage: str, stage_run: str, grid: Any, runs: Any, metric: str, task: str, storage: str) -> StageResult:
    """Select the best candidate of a finished sweep and total the stage's device-hours."""
    found = candidates(grid, metric)
    if not found:
        kinds = sorted({error_kind(r.error) for r in grid if r.error is not None}) or ["no error recorded"]
        raise StudyError(f"every {stage} trial of task {task} failed before its first eval ({', '.join(kinds)}); "
                         f"the tracebacks are in {grid.experiment_path}/*/error.txt")
    best = select_best(found)
    curves = {Path(result.path).name: trial_curves(result, metric) for result in grid}
    return StageResult(
        stage=stage,
        run_id=stage_run,
        selected=best,
        selected_run_id=runs.run_id(best.trial),
        checkpoint=checkpoint_ref(best.checkpoint, storage),
        hparams=dict(best.payload.config),
        trials=len(grid),
        hours_by={part: {u: sum(h[part][u] for h in runs.hours.values()) for u in HOUR_UNITS} for part in TRIAL_PARTS},
        curves=curves,
        selected_trial=Path(best.payload.path).name,
    )


def run_stage(stage: str, study: Study, task: TaskConfig, tracker: Tracker, task_run: str, resources: TrialResources,
              progress: Progress, train: Callable[[dict[str, Any], Reporter], None], *,
              tags: dict[str, str] | None = None, fixed: dict[str, Any] | None = None,
              datasets: list[DataSplit] | None = None) -> StageResult:
    """Sweep one stage of one task: its MLflow stage run under `task_run` (`tags` and the fixed params
    `fixed` added to the ones every stage logs), one trial per point of the stage's search space, each
    running `train(hp, reporter)`, and the best candidate on dev."""
    cfg = study.config
    space = study.sft_space if stage == "sft" else study.dpo_space
    tags = {"clinft.task": task.name, "clinft.stage": stage, **(tags or {})}
    key = f"{task.name}/{stage}"
    resume = progress.started(key)
    stage_run = progress.run(key, tracker, lambda: tracker.start(stage, parent=task_run,
                                                                  tags={**tags, "clinft.level": "stage"}))
    fixed = {"max_steps": space.max_steps, "eval_steps": space.eval_steps, "batch_size": space.batch_size,
             "seed": cfg.seed, "model": cfg.model.name_or_path, "finetune": cfg.model.finetune, **(fixed or {})}
    datasets = datasets or []
    if not resume:  # a stage run picked up on a resume has them already
        tracker.datasets(stage_run, datasets)
    trained = [d for d in datasets if d.context in ("train", "eval", "dev")]  # a trial never sees test
    runs = TrialRuns(tracker, stage_run, resources.total(), cfg.cost, fixed_params=fixed, tags=tags, datasets=trained)
    name = f"{task.name}-{stage}"
    console = TrialConsole(key, name, task.metric, space.max_steps, space.num_trials())
    grid = run_sweep(
        trainable(train, resources, cfg.storage_path, task.metric),
        name=name,
        space=space,
        storage_path=cfg.storage_path,
        callbacks=[runs, console],
        retries=cfg.trial_retries,
        resume=resume,
        metric=task.metric,
    )
    return summarize(stage, stage_run, grid, runs, task.metric, task.name, cfg.storage_path)


def device_task(fn: Callable[..., Any], worker: dict[str, float], *args: Any) -> tuple[Any, float]:
    """Run `fn(*args)` as a Ray task holding one trial worker's resources (`worker`, a Ray resource
    request); returns its result and the seconds from submission to result, timed here: the devices
    are held from the grant of the task's lease, through its worker's start and imports, to its end,
    which a clock inside the task would miss (the study submits these one at a time, between sweeps).

    A task that holds a GPU runs in a worker process that exits when it ends (`max_calls=1`): a Ray
    worker otherwise lives on for the next task, holding its CUDA context and PyTorch's cached memory
    (the model's weights and the scoring peak, 30-60 GB for an 8B model), and the next trial on that
    GPU would start with that much less. `max_calls` is a decorator argument (`.options()` refuses
    it), so the resources go there too. A CPU-only task keeps its warm worker."""
    import ray

    gpus = worker.get("GPU", 0)
    remote = ray.remote(num_cpus=worker.get("CPU", 1), num_gpus=gpus, max_calls=1 if gpus else 0)(fn)
    start = time.monotonic()
    result = ray.get(remote.remote(*args))
    return result, time.monotonic() - start
