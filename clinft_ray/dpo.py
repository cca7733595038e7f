"""DPO stage: trials over learning rate x beta, each a `PackedDPOTrainer` run from the selected SFT model.

Every trial starts from the SFT checkpoint selected on dev (`init_from`). With LoRA, the SFT adapter
is merged into the base and a fresh DPO adapter is trained on top. Preference rows are prompt /
chosen (gold) / rejected. Trials report dev scores with checkpoints like the SFT stage
(`sweep.DevReport`).

DPO is kept nearly as cheap as SFT: `PackedDPOTrainer` (TRL's `DPOTrainer` with each pair's prompt
computed once) trains, and the reference log-probs, which depend on neither learning rate nor beta,
are computed once per sweep, before the trials, by a Ray task with one trial worker's resources, and
cached under `output_dir/reference_logps` (`clinft_ray.reference`). Every trial reads them as TRL's
precomputed columns, so no trial runs or loads a reference model.
"""

from __future__ import annotations

import dataclasses
import tempfile
from functools import partial
from typing import Any

from clinft_ray.config import Study, TaskConfig
from clinft_ray.data import dpo_rows
from clinft_ray.evaluate import score_split
from clinft_ray.judge import judge_for
from clinft_ray.modeling import has_chat_template, load_model, load_tokenizer, peft_config, torch_dtype, write_manifest
from clinft_ray.preflight import TrialResources
from clinft_ray.progress import Progress
from clinft_ray.reference import RefLogps, sweep_reference, with_reference
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


def dpo_train(hp: dict[str, Any], reporter: Reporter, *, study: Study, task: TaskConfig, init_from: str,
              reference: RefLogps | None = None) -> None:
    """Train one DPO configuration (a trial, or one worker of it); `hp` holds learning_rate and beta.
    `reference`: the sweep's shared reference log-probs; without them the trial runs its reference
    live (the adapter disabled with LoRA, else a second load of `init_from`)."""
    from datasets import Dataset
    from trl import DPOConfig

    from clinft_ray.packed_dpo import PackedDPOTrainer

    cfg, space = study.config, study.dpo_space
    quiet_worker(cfg.resources.cpus_per_trial)
    tok = load_tokenizer(cfg.model)
    chat = has_chat_template(tok)
    train, evl, dev = (load_task_split(task, s) for s in ("train", "eval", "dev"))
    train_rows, eval_rows = dpo_rows(train, chat), dpo_rows(evl, chat)
    if reference is not None:
        train_rows, eval_rows = with_reference(train_rows, reference["train"]), with_reference(eval_rows, reference["eval"])
    lora = cfg.model.finetune == "lora"

    judge = judge_for(study)

    def score(model: Any):
        return score_split(model, tok, task, dev, cfg.model.max_length, judge)

    def manifest(folder: str, step: int) -> None:
        # A LoRA DPO adapter only makes sense on top of its SFT model: record it as the parent.
        write_manifest(folder, cfg.model, parent=init_from if lora else None, init_from=init_from, step=step)

    resume, best = resume_point(reporter)  # a retried or resumed trial goes on from its latest checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(
            **trainer_kwargs(space, hp, cfg.seed, torch_dtype(cfg.model), scratch, reporter.world_size,
                             cfg.resources.strategy),
            beta=float(hp["beta"]),
            loss_type=[space.loss_type],
            max_length=cfg.model.max_length,
            precompute_ref_log_probs=reference is not None,
        )
        trainer = PackedDPOTrainer(
            model=load_model(cfg.model, init_from),
            ref_model=None if lora or reference is not None else load_model(cfg.model, init_from),
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows),
            processing_class=tok,
            peft_config=peft_config(cfg.model),
            callbacks=[DevReport(score, manifest, task.metric, reporter, best, space.patience)],
        )
        without_printer(trainer).train(resume_from_checkpoint=resume)


def run_dpo(study: Study, task: TaskConfig, tracker: Tracker, task_run: str, resources: TrialResources,
            sft: StageResult, progress: Progress) -> StageResult:
    """Sweep DPO from the selected SFT checkpoint, log every trial under a `dpo` stage run (tagged
    with the SFT trial's run id), select the best on dev."""
    cfg, space = study.config, study.dpo_space
    tags = {"clinft.task": task.name, "clinft.stage": "dpo", "clinft.init_from": sft.selected_run_id}
    resume = progress.started(f"{task.name}/dpo")
    stage_run = progress.run(f"{task.name}/dpo", tracker, lambda: tracker.start("dpo", parent=task_run, tags=tags))
    fixed = {"max_steps": space.max_steps, "eval_steps": space.eval_steps, "batch_size": space.batch_size,
             "seed": cfg.seed, "model": cfg.model.name_or_path, "finetune": cfg.model.finetune,
             "loss_type": space.loss_type, "init_from_step": sft.selected.step}
    runs = TrialRuns(tracker, stage_run, resources.total(), cfg.cost, fixed_params=fixed, tags=tags)
    reference, reference_hours = sweep_reference(study, task, sft.checkpoint, resources.worker(),
                                                 cfg.output_dir / "reference_logps")
    grid = run_sweep(
        trainable(partial(dpo_train, study=study, task=task, init_from=sft.checkpoint, reference=reference),
                  resources, cfg.storage_path, task.metric),
        name=f"{task.name}-dpo",
        space=space,
        storage_path=cfg.storage_path,
        callbacks=[runs],
        retries=cfg.trial_retries,
        resume=resume,
        metric=task.metric,
    )
    result = summarize("dpo", stage_run, grid, runs, task.metric, task.name, cfg.storage_path)
    return dataclasses.replace(result, reference_hours=reference_hours)
