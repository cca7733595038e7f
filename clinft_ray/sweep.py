"""Ray Tune glue shared by the SFT and DPO stages: run a sweep, report dev scores, gather candidates.

A trial is a Tune function trainable that trains with a TRL trainer. `DevReport` is the
`TrainerCallback` it installs: at every eval interval it scores the dev split by the task's metric,
reports one namespaced metric row to Tune (`train/loss`, `eval/loss`, `dev/f1`, ...) and, when the dev
score beats the trial's best so far, a checkpoint with it. Tune keeps that one best checkpoint per
trial, so a trial's checkpoint is its best (step) on dev; `candidates()` lists them for selection.

A trial with several workers (`gpus_per_trial: 4`, or `workers_per_trial` on CPU) runs the same
training function in a Ray Train `TorchTrainer` started inside the Tune trial, the Ray Train V2 way:
the workers report with `ray.train.report`, rank 0 writes the checkpoint, and Ray's
`TuneReportCallback` forwards each row, with the checkpoint's path, to the trial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from clinft_ray.evaluate import Scored
from clinft_ray.modeling import checkpoint_ref, incomplete
from clinft_ray.preflight import DRIVER_CPUS, TrialResources
from clinft_ray.selection import Candidate, select_best
from clinft_ray.spaces import SearchSpace
from clinft_ray.tracking import error_kind

log = logging.getLogger("clinft")


def quiet_libraries() -> None:
    """No progress bars and no deprecation chatter from the HF stack: the Tune status table is the
    progress a user watches."""
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_worker(threads: float) -> None:
    """Inside a trial or scoring task: one torch thread per allocated CPU, and quiet libraries."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    quiet_libraries()
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def without_printer(trainer: Any) -> Any:
    """Drop the Trainer's stdout printer (on when tqdm is off): Tune and MLflow carry the metrics."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _namespaced(logs: dict[str, Any]) -> dict[str, float]:
    """TRL log keys -> stable metric names: loss -> train/loss, eval_loss -> eval/loss,
    eval_rewards/margins -> eval/rewards/margins, rewards/margins stays."""
    out = {}
    for k, v in logs.items():
        if not isinstance(v, int | float):
            continue
        if k == "loss":
            out["train/loss"] = float(v)
        elif k.startswith("eval_") and not k.endswith(("_runtime", "_per_second")):
            out["eval/" + k[len("eval_") :]] = float(v)
        elif k.startswith(("rewards/", "logps/")):
            out[k] = float(v)
    return out


class GpuStats:
    """Peak memory and mean utilization of a trial's GPUs between two reads (NVIDIA only): peak
    memory from torch, utilization sampled every `every_s` by nvidia-ml-py when it is installed
    (`pip install 'clinft-ray[gpu]'`). Empty on a machine without a GPU."""

    def __init__(self, every_s: float = 2.0):
        import torch

        self.cuda = torch.cuda.is_available()
        self.samples: list[float] = []
        self.handles: list[Any] = []
        if not self.cuda:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # Ray sets it to the trial's GPUs
            ids = [int(x) for x in visible.split(",") if x.strip().isdigit()] or range(pynvml.nvmlDeviceGetCount())
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in ids]
        except Exception:  # no nvidia-ml-py or no NVML: peak memory only
            self.handles = []
        if self.handles:
            threading.Thread(target=self._sample, args=(every_s,), daemon=True).start()

    def _sample(self, every_s: float) -> None:
        import pynvml

        while True:
            time.sleep(every_s)
            rates = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
            self.samples.append(sum(rates) / len(rates))

    def read(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        import torch

        out = {"system/gpu_peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
        samples, self.samples = self.samples, []
        if samples:
            out["system/gpu_utilization_pct"] = sum(samples) / len(samples)
        return out


class TuneReporter:
    """Reports from a trial that trains in its own process."""

    world_size = 1
    is_chief = True

    def report(self, row: dict[str, Any], folder: str | None = None) -> None:
        from ray import tune

        tune.report(row, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    def checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()


class TrainReporter:
    """Reports from one worker of a multi-worker trial: every worker reports each row (Ray Train
    waits for all of them), and only rank 0 writes and uploads the checkpoint."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.world_size = context.get_world_size()
        self.is_chief = context.get_world_rank() == 0

    def report(self, row: dict[str, Any], folder: str | None = None) -> None:
        import ray.train

        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()


Reporter = TuneReporter | TrainReporter


class DevReport(TrainerCallback):
    """Score dev at each evaluation, report it, and hand the trainer's checkpoint to Tune.

    The trainer saves its whole state at every eval (weights, optimizer, scheduler, RNG, step: the
    `checkpoint-N` folder of transformers); `on_save` adds clinft's manifest (`manifest(folder, step)`)
    and reports it with the eval's row. Ray keeps two per trial: the latest, which a retried or
    resumed trial continues from, and the best on dev: `keep/dev` is the dev score where it improved
    on the trial's best and -inf elsewhere, so among equal scores the earliest step is kept.

    A non-finite train or eval loss stops the trial at once, with the reason in the row; nothing is
    checkpointed after it, so nothing after it can be selected. With `patience` (the space's), a trial
    stops at its dev plateau: after that many evals in a row without a better dev score; its best
    checkpoint is already saved, so stopping there loses nothing that was selectable.
    """

    def __init__(self, score: Callable[[Any], Scored], manifest: Callable[[str, int], None], metric: str,
                 reporter: Reporter, best: tuple[float, int] = (-math.inf, 0), patience: int | None = None):
        self.score, self.manifest, self.metric, self.reporter = score, manifest, metric, reporter
        # the trial's best dev so far and the evals since it (restored when a trial resumes)
        self.best, self.since_best = best
        self.patience = patience
        self.last_train: dict[str, float] = {}
        self.pending: dict[str, Any] | None = None
        self.gpu = GpuStats()

    def _halt(self, control: Any, row: dict[str, Any], reason: str) -> None:
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False
        self.pending = None
        self.reporter.report({**row, "stopped": reason})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_train = {k: v for k, v in _namespaced(logs).items() if not k.startswith("eval/")}
            if not math.isfinite(logs["loss"]):
                self._halt(control, {**self.last_train, "step": state.global_step}, "non-finite train loss")

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        row = {**self.last_train, **_namespaced(metrics or {}), **self.gpu.read(), "step": state.global_step,
               "system/workers": self.reporter.world_size}
        if not math.isfinite(row.get("eval/loss", 0.0)):
            self._halt(control, row, "non-finite eval loss")
            return
        scored = self.score(model)  # every worker holds the whole model (DDP) and scores the same dev rows
        dev = scored.metrics[self.metric]
        row.update({f"dev/{k}": v for k, v in scored.metrics.items()})
        row["keep/dev"] = dev if dev > self.best else -math.inf
        self.since_best = 0 if dev > self.best else self.since_best + 1
        self.best = max(self.best, dev)
        if self.patience is not None and self.since_best >= self.patience:
            row["stopped"] = f"dev plateau ({self.patience} evals without a better {self.metric})"
            control.should_training_stop = True
        self.pending = row
        control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if self.pending is None:  # a save without an eval (the end of training): nothing to report
            return
        row, self.pending = self.pending, None
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not self.reporter.is_chief:
            self.reporter.report(row)
            return
        with open(os.path.join(folder, DEV_STATE), "w") as f:
            json.dump({"best": self.best, "since_best": self.since_best}, f)
        self.manifest(folder, state.global_step)  # last: it lists the files above
        self.reporter.report(row, folder)
        shutil.rmtree(folder, ignore_errors=True)  # Tune has its copy in storage


DEV_STATE = "clinft_dev.json"


def resume_point(reporter: Reporter) -> tuple[str | None, tuple[float, int]]:
    """Where a trial continues from: (its newest whole checkpoint as a local folder, (the best dev so
    far, evals since it)), or (None, (-inf, 0)) for a fresh trial. The folder lives until the trial's
    process ends."""
    import pyarrow.fs as pafs

    checkpoint = newest_whole(reporter.checkpoint())
    if checkpoint is None:
        return None, (-math.inf, 0)
    local = isinstance(checkpoint.filesystem, pafs.LocalFileSystem)
    folder = checkpoint.path if local else checkpoint.to_directory()
    state = Path(folder) / DEV_STATE
    kept = json.loads(state.read_text()) if state.is_file() else {}
    return str(folder), (kept.get("best", -math.inf), kept.get("since_best", 0))


def newest_whole(checkpoint: Any) -> Any:
    """`checkpoint` if it is whole, else the newest whole one beside it in the trial's folder (a
    kill can leave the latest one cut short), else None."""
    import pyarrow.fs as pafs
    from ray.tune import Checkpoint

    why = None if checkpoint is None else incomplete(checkpoint.path, checkpoint.filesystem)
    if why is None:
        return checkpoint
    fs, broken = checkpoint.filesystem, checkpoint.path.rstrip("/")
    siblings = fs.get_file_info(pafs.FileSelector(broken.rsplit("/", 1)[0]))
    for path in sorted((i.path for i in siblings if i.type == pafs.FileType.Directory
                        and i.base_name.startswith("checkpoint_") and i.path != broken), reverse=True):
        if incomplete(path, fs) is None:
            log.warning("checkpoint %s is incomplete (%s): going on from %s", broken, why, path)
            return Checkpoint(path, filesystem=fs)
    log.warning("checkpoint %s is incomplete and no whole one is left: the trial starts over", broken)
    return None


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

    experiment = f"{storage_path.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        # Tune restores the callbacks pickled when the sweep began, with the MLflow state of the
        # process that was interrupted; this process's callbacks carry the state as it is now.
        tuner._local_tuner._run_config.callbacks = callbacks
        return tuner.fit()
    names = trial_name(name)
    tuner = tune.Tuner(
        trainable,
        param_space=space.to_param_space(),
        tune_config=tune.TuneConfig(
            num_samples=space.num_samples,
            scheduler=space.to_scheduler(metric),
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
            checkpoint_config=tune.CheckpointConfig(  # the best on dev, and Ray keeps the latest too
                num_to_keep=1, checkpoint_score_attribute="keep/dev", checkpoint_score_order="max"
            ),
            verbose=1,
        ),
    )
    return tuner.fit()


def candidates(grid: Any, metric: str) -> list[Candidate]:
    """Each trial's best dev (step) with its checkpoint, in search-space order; trials without a
    checkpoint (failed before their first eval) are left out. A multi-worker trial's checkpoint is the
    one its Train run reported with that row (`checkpoint_path`); a single-worker trial's is the one
    Tune kept as its best."""
    out = []
    for result in grid:
        df = result.metrics_dataframe
        col = f"dev/{metric}"
        if df is None or col not in df:
            continue
        path = None
        # The trial's best row whose checkpoint is whole (one cut short by a kill is never loaded).
        for _, best in df.dropna(subset=[col]).sort_values([col, "step"], ascending=[False, True]).iterrows():
            step = int(best["step"])
            path = best.get("checkpoint_path") if "checkpoint_path" in df else None
            if isinstance(path, str):
                if not os.path.isdir(path) or incomplete(path) is None:  # checked where it is a local folder
                    break
                path = None
            kept = [c for c, m in (result.best_checkpoints or []) if int(m.get("step", -1)) == step
                    and incomplete(c.path, c.filesystem) is None]
            if kept:
                path = kept[0].path
                break
        if path is None:
            continue
        trial = result.metrics["trial_id"]
        # Ties go to the trial listed first in the search space: Tune's trial index, which stays the
        # same when a sweep is restored (the order of the result grid does not).
        out.append(Candidate(trial=trial, step=step, dev=float(best[col]), order=int(trial.rsplit("_", 1)[-1]),
                             payload=result, checkpoint=path))
    return out


def trainer_kwargs(space: SearchSpace, hp: dict[str, float], seed: int, dtype: Any, output_dir: str,
                   world_size: int = 1, strategy: str = "ddp") -> dict[str, Any]:
    """The `TrainingArguments` both stages share: schedule from the space, swept lr, no HF saving
    (checkpoints go through Tune), eval every `eval_steps`. With several workers the space's batch
    size stays the global batch (split across them), so a sweep means the same on 1 or 8 GPUs."""
    import torch

    cuda = torch.cuda.is_available()
    if space.batch_size % world_size:
        raise ValueError(f"batch_size {space.batch_size} does not split over {world_size} workers; make it a multiple")
    per_device = space.batch_size // world_size
    fsdp = {"fsdp": "full_shard auto_wrap"} if strategy == "fsdp" and world_size > 1 else {}
    return {
        "output_dir": output_dir,
        "max_steps": space.max_steps,
        "learning_rate": float(hp["learning_rate"]),
        "per_device_train_batch_size": per_device,
        "per_device_eval_batch_size": per_device,
        "gradient_accumulation_steps": space.gradient_accumulation_steps,
        "warmup_steps": space.warmup_steps,
        "lr_scheduler_type": space.lr_scheduler,
        "weight_decay": space.weight_decay,
        "eval_strategy": "steps",
        "eval_steps": space.eval_steps,
        "logging_steps": 1,  # a non-finite loss stops the trial at the step it appears (DevReport)
        "logging_nan_inf_filter": False,
        "save_strategy": "no",  # DevReport asks for a save at each eval; Tune keeps it
        "report_to": [],
        "seed": seed,
        "use_cpu": not cuda,
        "bf16": cuda and dtype == torch.bfloat16,
        "fp16": cuda and dtype == torch.float16,
        "disable_tqdm": True,
        **fsdp,
    }


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
    gpu_hours: float
    cpu_hours: float
    cost_usd: float
    curves: dict[str, list[tuple[int, float]]]  # trial name -> (step, eval loss) points
    selected_trial: str
    # Device-hours of the Ray task that computed DPO's reference log-probs (not in the totals above,
    # which are the trials'); empty for SFT.
    reference_hours: dict[str, float] = field(default_factory=dict)


class StudyError(RuntimeError):
    """The study cannot go on (every trial of a sweep failed, ...); the message says where to look."""


def summarize(stage: str, stage_run: str, grid: Any, runs: Any, metric: str, task: str, storage: str) -> StageResult:
    """Select the best candidate of a finished sweep and total the stage's device-hours."""
    found = candidates(grid, metric)
    if not found:
        kinds = sorted({error_kind(r.error) for r in grid if r.error is not None}) or ["no error recorded"]
        raise StudyError(f"every {stage} trial of task {task} failed before its first eval ({', '.join(kinds)}); "
                         f"the tracebacks are in {grid.experiment_path}/*/error.txt")
    best = select_best(found)
    curves = {}
    for result in grid:
        df = result.metrics_dataframe
        if df is not None and "eval/loss" in df:
            rows = df.dropna(subset=["eval/loss"])
            curves[Path(result.path).name] = list(zip(rows["step"].astype(int), rows["eval/loss"].astype(float), strict=True))
    return StageResult(
        stage=stage,
        run_id=stage_run,
        selected=best,
        selected_run_id=runs.run_id(best.trial),
        checkpoint=checkpoint_ref(best.checkpoint, storage),
        hparams=dict(best.payload.config),
        trials=len(grid),
        gpu_hours=sum(h["gpu_hours"] for h in runs.hours.values()),
        cpu_hours=sum(h["cpu_hours"] for h in runs.hours.values()),
        cost_usd=sum(h["cost_usd"] for h in runs.hours.values()),
        curves=curves,
        selected_trial=Path(best.payload.path).name,
    )
