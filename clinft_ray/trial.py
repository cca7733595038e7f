"""Runs inside a Tune trial's worker process (and, for `quiet_worker`, inside the scoring and reference
Ray tasks): the training loop both stages share, and what it needs around a TRL trainer.

`run_trial` is the loop: it quiets the libraries, loads the tokenizer and the task's splits, builds the
stage's trainer from its recipe (`sft.sft_train`, `dpo.dpo_train` say what differs: rows, TRL config,
trainer, checkpoint lineage), installs `DevReport` and trains, going on from the trial's latest whole
checkpoint when Tune retries or resumes it. `DevReport` is the `TrainerCallback` that, at every eval
interval, scores the dev split by the task's metric, reports one namespaced metric row to Tune
(`train/loss`, `eval/loss`, `dev/f1`, ...) with the trainer's checkpoint, and times its own dev scoring
(`dev_eval_s`, billed apart by `tracking.TrialRuns`).

A trial with several workers runs the same loop on each worker of a Ray Train `TorchTrainer`
(`TrainReporter`); a single-worker trial reports to Tune directly (`TuneReporter`). What runs on the
driver (the sweep, candidates, the stage's result) is in `sweep.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from clinft_ray.config import Study, TaskConfig
from clinft_ray.data import Example
from clinft_ray.evaluate import Scored, score_split
from clinft_ray.judge import judge_for
from clinft_ray.modeling import has_chat_template, incomplete, load_tokenizer, peft_config, torch_dtype, write_manifest
from clinft_ray.spaces import SearchSpace
from clinft_ray.tasks import load_task_split

log = logging.getLogger("clinft")


def quiet_libraries() -> None:
    """No progress bars and no deprecation chatter from the HF stack: the trial events of
    `console.TrialConsole` are the progress a user watches."""
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's own bars (the reference pass) read it
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads of `clinft export models:/`


def quiet_worker(threads: float) -> None:
    """Inside a trial or scoring task: no GPU it does not hold, one torch thread per allocated CPU, and
    quiet libraries."""
    hide_unheld_gpus()
    import torch

    torch.set_num_threads(max(1, int(threads)))
    quiet_libraries()
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def hide_unheld_gpus() -> None:
    """In a Ray worker that holds no GPU, CUDA sees none. Since Ray 2.49 a worker given zero GPUs keeps
    the node's `CUDA_VISIBLE_DEVICES` (unset: every GPU), so a `gpus_per_trial: 0` trial on a GPU node
    would train on GPUs other trials hold (and TRL's DPO refuses `n_gpu > 1`). Set before CUDA starts
    (the driver also sets Ray's RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO, `study.ray_environment`, which
    does the same where the workers inherit the driver's environment)."""
    import ray

    if ray.is_initialized() and not ray.get_runtime_context().get_accelerator_ids().get("GPU"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


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
    memory from torch (reset at each read, so each row has its interval's peak), utilization sampled
    every `every_s` by nvidia-ml-py when it is installed (`pip install 'clinft-ray[gpu]'`) and NVML
    reports it (not for MIG instances). Empty on a machine without a GPU."""

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
            self.handles = nvml_handles(pynvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except Exception:  # no nvidia-ml-py or no NVML: peak memory only
            self.handles = []
        if self.handles:
            threading.Thread(target=self._sample, args=(every_s,), daemon=True).start()

    def _sample(self, every_s: float) -> None:
        import pynvml

        while True:
            time.sleep(every_s)
            try:
                rates = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
            except pynvml.NVMLError:  # MIG instances have no utilization counter
                return
            self.samples.append(sum(rates) / len(rates))

    def read(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        import torch

        out = {"system/gpu_peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
        torch.cuda.reset_peak_memory_stats()
        samples, self.samples = self.samples, []
        if samples:
            out["system/gpu_utilization_pct"] = sum(samples) / len(samples)
        return out


def nvml_handles(pynvml: Any, visible: str | None) -> list[Any]:
    """NVML handles of the GPUs `CUDA_VISIBLE_DEVICES` names (what Ray gives the worker): indices, or
    UUIDs (`GPU-...`, `MIG-...`, as on MIG nodes and some Kubernetes device plugins); every GPU when
    it is unset."""
    if visible is None:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    names = [x.strip() for x in visible.split(",") if x.strip()]
    return [pynvml.nvmlDeviceGetHandleByIndex(int(x)) if x.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(x)
            for x in names]


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
    on the trial's best and `NOT_BEST` elsewhere, so among equal scores the earliest step is kept.

    Each row carries `dev_eval_s`, the seconds this attempt has spent scoring dev so far, which
    `tracking.TrialRuns` bills as the trial's `dev_eval` device time.

    A non-finite train or eval loss stops the trial at once, with the reason in the row; nothing is
    checkpointed after it, so nothing after it can be selected. With `patience` (the space's), a trial
    stops at its dev plateau: after that many evals in a row without a better dev score; its best
    checkpoint is already saved, so stopping there loses nothing that was selectable.
    """

    def __init__(self, score: Callable[[Any], Scored], manifest: Callable[[str, int], None], metric: str,
                 reporter: Reporter, best: tuple[float, int] = (-math.inf, 0), patience: int | None = None,
                 every_rank_scores: bool = False):
        self.score, self.manifest, self.metric, self.reporter = score, manifest, metric, reporter
        self.every_rank_scores = every_rank_scores
        # the trial's best dev so far and the evals since it (restored when a trial resumes)
        self.best, self.since_best = best
        self.patience = patience
        self.last_train: dict[str, float] = {}
        self.pending: dict[str, Any] | None = None
        self.gpu = GpuStats()
        self.dev_eval_s = 0.0  # seconds this attempt spent scoring dev (the trial's `dev_eval` device time)

    def _halt(self, control: Any, row: dict[str, Any], reason: str) -> None:
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False
        self.pending = None
        if math.isfinite(self.best):  # what a searcher learns from a trial that stopped here
            row = {**row, f"dev_best/{self.metric}": self.best}
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
        start = time.monotonic()
        metrics = self.dev_metrics(model)
        self.dev_eval_s += time.monotonic() - start
        dev = metrics[self.metric]
        row.update({f"dev/{k}": v for k, v in metrics.items()}, dev_eval_s=self.dev_eval_s)
        row["keep/dev"] = dev if dev > self.best else NOT_BEST
        self.since_best = 0 if dev > self.best else self.since_best + 1
        self.best = max(self.best, dev)
        row[f"dev_best/{self.metric}"] = self.best  # the trial's best so far: what a searcher learns from
        if self.patience is not None and self.since_best >= self.patience:
            row["stopped"] = f"dev plateau ({self.patience} evals without a better {self.metric})"
            control.should_training_stop = True
        self.pending = row
        control.should_save = True

    def dev_metrics(self, model: Any) -> dict[str, float]:
        """The dev metrics, the same on every worker of a trial. Under DDP each worker holds the whole
        model, so rank 0 scores alone (the others would repeat its forwards and its judge calls) and
        sends the metrics to the others; under FSDP (`every_rank_scores`) a forward needs every rank's
        shard, so all score, and rank 0's metrics are still the ones every rank acts on: a judge that
        grades two ranks differently would otherwise make one stop at its plateau while the other
        trains on, and the collective it waits in would hang."""
        if self.reporter.world_size == 1:
            return self.score(model).metrics
        import torch.distributed as dist

        mine = self.score(model).metrics if self.every_rank_scores or self.reporter.is_chief else None
        shared = [mine]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

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
# `keep/dev` of an eval that did not improve on the trial's best: below any dev score, and finite, since
# Ray Train's checkpoint manager writes its scores as JSON (-inf becomes null) and fails to restore a run
# from them ("unsupported operand type(s) for *: 'float' and 'NoneType'").
NOT_BEST = -1.0e9


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


def trainer_kwargs(space: SearchSpace, hp: dict[str, float], seed: int, dtype: Any, output_dir: str,
                   world_size: int = 1, strategy: str = "ddp",
                   activation_checkpointing: bool | str = "auto") -> dict[str, Any]:
    """The `TrainingArguments` both stages share: schedule from the space, swept lr, no HF saving
    (checkpoints go through Tune), eval every `eval_steps`. With several workers the space's batch
    size stays the global batch (split across them), so a sweep means the same on 1 or 8 GPUs.

    Activation checkpointing (`model.activation_checkpointing`; TRL turns it on by default) is on
    where a GPU trains and off on CPU with `auto`; under FSDP it is FSDP's own, which recomputes
    inside each sharded block instead of gathering the block's weights once more for the recompute."""
    import torch

    cuda = torch.cuda.is_available()
    if space.batch_size % world_size:
        raise ValueError(f"batch_size {space.batch_size} does not split over {world_size} workers; make it a multiple")
    per_device = space.batch_size // world_size
    recompute = cuda if activation_checkpointing == "auto" else bool(activation_checkpointing)
    fsdp = {"fsdp": "full_shard auto_wrap"} if strategy == "fsdp" and world_size > 1 else {}
    if fsdp:
        fsdp["fsdp_config"] = {"activation_checkpointing": recompute}
        recompute = False
    # DDP looks for unused parameters after every backward when told to, which transformers does for
    # any model that is not a PreTrainedModel (a PeftModel is not): every trainable parameter (the
    # adapter, or all weights) is used in every forward here, so the search is pure cost.
    ddp = {"ddp_find_unused_parameters": False} if strategy == "ddp" and world_size > 1 else {}
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
        "activation_checkpointing": recompute,
        **fsdp,
        **ddp,
    }


Rows = Callable[[str, list[Example], bool], list[dict[str, Any]]]  # (split, its examples, chat?) -> TRL rows


def run_trial(hp: dict[str, Any], reporter: Reporter, *, study: Study, task: TaskConfig, space: SearchSpace,
              rows: Rows, make_args: Callable[[dict[str, Any]], Any], make_trainer: Callable[..., Any],
              parent: str | None = None, init_from: str | None = None) -> None:
    """Train one configuration `hp` of a stage (a trial, or one worker of it) with the stage's recipe:
    `rows(split, examples, chat)` makes the TRL rows of "train" and "eval", `make_args(common)` its TRL config from the arguments
    both stages share (`trainer_kwargs`), `make_trainer(**kwargs)` its trainer (loading its model);
    `parent` and `init_from` go into every checkpoint's manifest."""
    from datasets import Dataset

    cfg = study.config
    quiet_worker(cfg.resources.cpus_per_trial)
    tok = load_tokenizer(cfg.model)
    chat = has_chat_template(tok)
    train, evl, dev = (load_task_split(task, s) for s in ("train", "eval", "dev"))
    judge = judge_for(study)

    def score(model: Any) -> Scored:
        return score_split(model, tok, task, dev, cfg.model.max_length, judge)

    def manifest(folder: str, step: int) -> None:
        write_manifest(folder, cfg.model, parent=parent, init_from=init_from, step=step)

    resume, best = resume_point(reporter)  # a retried or resumed trial goes on from its latest checkpoint
    with tempfile.TemporaryDirectory() as scratch:
        common = trainer_kwargs(space, hp, cfg.seed, torch_dtype(cfg.model), scratch, reporter.world_size,
                                cfg.resources.strategy, cfg.model.activation_checkpointing)
        trainer = make_trainer(
            args=make_args(common),
            train_dataset=Dataset.from_list(rows("train", train, chat)),
            eval_dataset=Dataset.from_list(rows("eval", evl, chat)),
            processing_class=tok,
            peft_config=peft_config(cfg.model),
            callbacks=[DevReport(score, manifest, task.metric, reporter, best, space.patience,
                                 every_rank_scores=cfg.resources.strategy == "fsdp")],
        )
        without_printer(trainer).train(resume_from_checkpoint=resume)
