"""SFT stage: one Ray Tune trial per learning rate, each a TRL `SFTTrainer` run.

Rows are prompt/completion pairs (the gold answer as the completion), so the loss is on the answer
only, TRL's default for that format. LoRA or full weights per `model.finetune`. Each trial requests
`resources` from Ray, so trials spread across the GPUs of the machine or cluster, and reports its
dev score with a checkpoint at every eval interval (see `sweep.DevReport`).
"""

from __future__ import annotations

import tempfile
from functools import partial
from typing import Any

from clinft_ray.config import Study, TaskConfig
from clinft_ray.data import sft_rows
from clinft_ray.evaluate import score_split
from clinft_ray.judge import judge_for
from clinft_ray.modeling import has_chat_template, load_base, load_tokenizer, peft_config, torch_dtype, write_manifest
from clinft_ray.preflight import TrialResources
from clinft_ray.progress import Progress
from clinft_ray.sweep import (
    DevReport,
    Reporter,
    StageResult,
    quiet_worker,
    resume_point,
    run_sweep,
    summarize,
    trainable,
    trainer_kwargs,
    without_printer,
)
from clinft_ray.tasks import load_task_split
from clinft_ray.tracking import Tracker, TrialRuns


def sft_train(hp: dict[str, Any], reporter: Reporter, *, study: Study, task: TaskConfig) -> None:
    """Train one SFT configuration (a trial, or one worker of it); `hp` holds the swept values
    (learning_rate)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = study.config
    quiet_worker(cfg.resources.cpus_per_trial)
    tok = load_tokenizer(cfg.model)
    chat = has_chat_template(tok)
    train, evl, dev = (load_task_split(task, s) for s in ("train", "eval", "dev"))

    judge = judge_for(study)

    def score(model: Any):
        return score_split(model, tok, task, dev, cfg.model.max_length, judge)

    def manifest(folder: str, step: int) -> None:
        write_manifest(folder, cfg.model, parent=None, init_from=None, step=step)

    resume, best = resume_point(reporter)  # a retried or resumed trial goes on from its latest checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            **trainer_kwargs(study.sft_space, hp, cfg.seed, torch_dtype(cfg.model), scratch,
                             reporter.world_size, cfg.resources.strategy),
            max_length=cfg.model.max_length,
        )
        trainer = SFTTrainer(
            model=load_base(cfg.model),
            args=args,
            train_dataset=Dataset.from_list(sft_rows(train, chat)),
            eval_dataset=Dataset.from_list(sft_rows(evl, chat)),
            processing_class=tok,
            peft_config=peft_config(cfg.model),
            callbacks=[DevReport(score, manifest, task.metric, reporter, best, study.sft_space.patience)],
        )
        without_printer(trainer).train(resume_from_checkpoint=resume)


def run_sft(study: Study, task: TaskConfig, tracker: Tracker, task_run: str, resources: TrialResources,
            progress: Progress) -> StageResult:
    """Sweep SFT for one task, log every trial under an `sft` stage run, select the best on dev."""
    cfg, space = study.config, study.sft_space
    tags = {"clinft.task": task.name, "clinft.stage": "sft"}
    resume = progress.started(f"{task.name}/sft")
    stage_run = progress.run(f"{task.name}/sft", tracker, lambda: tracker.start("sft", parent=task_run, tags=tags))
    fixed = {"max_steps": space.max_steps, "eval_steps": space.eval_steps, "batch_size": space.batch_size,
             "seed": cfg.seed, "model": cfg.model.name_or_path, "finetune": cfg.model.finetune}
    runs = TrialRuns(tracker, stage_run, resources.total(), cfg.cost, fixed_params=fixed, tags=tags)
    grid = run_sweep(
        trainable(partial(sft_train, study=study, task=task), resources, cfg.storage_path, task.metric),
        name=f"{task.name}-sft",
        space=space,
        storage_path=cfg.storage_path,
        callbacks=[runs],
        retries=cfg.trial_retries,
        resume=resume,
        metric=task.metric,
    )
    return summarize("sft", stage_run, grid, runs, task.metric, task.name, cfg.storage_path)
