"""DPO stage: trials over learning rate x beta, each a `PackedDPOTrainer` run from the selected SFT model.

Every trial starts from the SFT checkpoint selected on dev (`init_from`). With LoRA, the SFT adapter
stays unmerged and frozen on the base and a fresh DPO adapter is trained on top of it
(`modeling.with_trainable_adapter`); the checkpoint holds the DPO adapter, with the SFT checkpoint as
its parent. Preference rows are prompt /
chosen (gold) / rejected. Trials report dev scores with checkpoints like the SFT stage
(`trial.DevReport`). Only what DPO adds to the shared engine is here: `dpo_train` (in the
trial's worker: its rows with the shared reference log-probs, TRL config and trainer, through
`trial.run_trial`) and `run_dpo` (on the driver: the reference pass, then the sweep through
`sweep.run_stage`).

DPO is kept nearly as cheap as SFT: `PackedDPOTrainer` (TRL's `DPOTrainer` with each pair's prompt
computed once) trains, and the reference log-probs, which depend on neither learning rate nor beta,
are computed once per sweep, before the trials, by a Ray task with one trial worker's resources, and
cached under `output_dir/reference_logps` (`clinft_ray.reference`). Every trial reads them as TRL's
precomputed columns, so no trial runs or loads a reference model.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from clinft_ray.config import Study, TaskConfig
from clinft_ray.data import dpo_rows
from clinft_ray.modeling import load_model, load_stacked, with_trainable_adapter
from clinft_ray.preflight import TrialResources
from clinft_ray.progress import Progress
from clinft_ray.reference import RefLogps, sweep_reference, with_reference
from clinft_ray.sweep import StageResult, run_stage
from clinft_ray.tracking import DataSplit, Tracker
from clinft_ray.trial import Reporter, run_trial


def dpo_train(hp: dict[str, Any], reporter: Reporter, *, study: Study, task: TaskConfig, init_from: str,
              reference: RefLogps) -> None:
    """Trial worker: train one DPO configuration; `hp` holds learning_rate and beta. `reference`: the
    sweep's shared reference log-probs (the SFT model's), so the trial holds no reference model."""
    from trl import DPOConfig

    from clinft_ray.packed_dpo import PackedDPOTrainer

    cfg, space = study.config, study.dpo_space
    lora = cfg.model.finetune == "lora"

    def rows(split: str, examples: list, chat: bool) -> list[dict[str, Any]]:
        return with_reference(dpo_rows(examples, chat), reference[split])

    def trainer(peft_config: Any, **kwargs: Any) -> Any:
        model = with_trainable_adapter(load_stacked(cfg.model, init_from), cfg.model) if lora \
            else load_model(cfg.model, init_from)
        return PackedDPOTrainer(model=model, ref_model=None, peft_config=None, **kwargs)

    run_trial(hp, reporter, study=study, task=task, space=space, rows=rows, make_trainer=trainer,
              make_args=lambda common: DPOConfig(**common, beta=float(hp["beta"]), loss_type=[space.loss_type],
                                                 max_length=cfg.model.max_length, precompute_ref_log_probs=True),
              # A LoRA DPO adapter only makes sense on top of its SFT model: record it as the parent.
              parent=init_from if lora else None, init_from=init_from)


def run_dpo(study: Study, task: TaskConfig, tracker: Tracker, task_run: str, resources: TrialResources,
            sft: StageResult, progress: Progress, datasets: list[DataSplit] | None = None) -> StageResult:
    """Driver: compute the reference log-probs once, sweep DPO from the selected SFT checkpoint, log every
    trial under a `dpo` stage run (tagged with the SFT trial's run id), select the best on dev."""
    reference, reference_hours = sweep_reference(study, task, sft.checkpoint, resources.worker(),
                                                 study.config.output_dir / "reference_logps")
    train = partial(dpo_train, study=study, task=task, init_from=sft.checkpoint, reference=reference)
    result = run_stage("dpo", study, task, tracker, task_run, resources, progress, train,
                       tags={"clinft.init_from": sft.selected_run_id},
                       fixed={"loss_type": study.dpo_space.loss_type, "init_from_step": sft.selected.step},
                       datasets=datasets)
    return dataclasses.replace(result, hours_by={**result.hours_by, "reference": reference_hours})
