"""SFT stage: one Ray Tune trial per learning rate, each a TRL `SFTTrainer` run. Only what SFT adds to
the shared engine is here: `sft_train` (in the trial's worker: its rows, TRL config and trainer, through
`trial.run_trial`) and `run_sft` (on the driver: the sweep through `sweep.run_stage`).

Rows are prompt/completion pairs (the gold answer as the completion), so the loss is on the answer
only, TRL's default for that format. LoRA or full weights per `model.finetune`. Each trial requests
`resources` from Ray, so trials spread across the GPUs of the machine or cluster, and reports its
dev score with a checkpoint at every eval interval (see `trial.DevReport`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from clinft_ray.config import Study, TaskConfig
from clinft_ray.data import sft_rows
from clinft_ray.modeling import load_base
from clinft_ray.preflight import TrialResources
from clinft_ray.progress import Progress
from clinft_ray.sweep import StageResult, run_stage
from clinft_ray.tracking import DataSplit, Tracker
from clinft_ray.trial import Reporter, run_trial


def sft_train(hp: dict[str, Any], reporter: Reporter, *, study: Study, task: TaskConfig) -> None:
    """Trial worker: train one SFT configuration; `hp` holds the swept values (learning_rate)."""
    from trl import SFTConfig, SFTTrainer

    cfg = study.config
    run_trial(hp, reporter, study=study, task=task, space=study.sft_space,
              rows=lambda split, examples, chat: sft_rows(examples, chat),
              make_args=lambda common: SFTConfig(**common, max_length=cfg.model.max_length),
              make_trainer=lambda **kwargs: SFTTrainer(model=load_base(cfg.model), **kwargs))


def run_sft(study: Study, task: TaskConfig, tracker: Tracker, task_run: str, resources: TrialResources,
            progress: Progress, datasets: list[DataSplit] | None = None) -> StageResult:
    """Driver: sweep SFT for one task, log every trial under an `sft` stage run, select the best on dev."""
    return run_stage("sft", study, task, tracker, task_run, resources, progress,
                     partial(sft_train, study=study, task=task), datasets=datasets)
