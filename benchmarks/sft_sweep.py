"""What the sweep benchmarks share: one SFT sweep of a study, timed, through clinft-ray's own
trainable and `run_sweep` (no MLflow callbacks, no retries), on the Ray the benchmark started."""

from __future__ import annotations

import time
from functools import partial
from typing import Any


def timed_sft_sweep(study: Any, name: str) -> tuple[Any, float]:
    """Sweep the study's SFT space on its first task; returns (Tune's ResultGrid, wall seconds)."""
    import ray

    from clinft_ray.preflight import trial_resources
    from clinft_ray.sft import sft_train
    from clinft_ray.sweep import run_sweep, trainable

    cfg, task = study.config, study.config.tasks[0]
    resources = trial_resources(cfg.resources, ray.cluster_resources())
    start = time.perf_counter()
    grid = run_sweep(trainable(partial(sft_train, study=study, task=task), resources, cfg.storage_path, task.metric),
                     name=name, space=study.sft_space, storage_path=cfg.storage_path, callbacks=[], retries=0,
                     resume=False, metric=task.metric)
    return grid, time.perf_counter() - start
