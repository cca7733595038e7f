"""What a sweep costs: the paper's protocol against clinft-ray's default, on the demo task, measured.

    python benchmarks/sweep_cost.py          # SFT stage on CPU: about 3 minutes on 2 idle cores

Both arms sweep the demo's SFT grid (learning rates 1e-2 ... 1e-5, `tune_spaces/demo_sft.yaml`) on the
demo's UTI-vs-pyuria task and tiny model (`clinft_ray.demo.prepare_demo`), with clinft-ray's own
`sft_train` trials under Ray Tune (`run_sweep`), one trial at a time on the 2 CPUs (`cpus_per_trial:
2`, so both arms get the same machine and ASHA's decisions do not depend on timing):

- **protocol** (Savage et al. 2025): every trial trains the full `--max-steps`; the (learning rate,
  step) with the lowest eval loss over all trials' curves is the plateau; that configuration is then
  trained again from scratch to that step (a second one-trial sweep), and its dev score is the
  protocol's. Compute: the grid's trial-steps plus the retraining's.
- **ours** (clinft-ray's demo default): the same grid with `patience: 1` (each trial stops at the
  first eval that does not beat its best dev F1), and with `--grace-steps N` also
  `scheduler: {asha: {grace_steps: N, reduction_factor}}` (Ray Tune's ASHA on dev F1, step as time);
  the best (trial, step) on dev among the saved checkpoints of every trial, stopped ones included, is
  selected; nothing is retrained. `--patience 0` turns the plateau stop off.

The schedule is the paper's shape scaled to the tiny model: a fixed horizon several evals long (the
paper: 1000 steps scored every 50; here `--max-steps 120` scored every `--eval-steps 20`). Both arms
score dev at every eval (clinft-ray's trial does), so the protocol's wall time includes dev scoring it
would not strictly need; trial-steps, the figure the target is on, do not depend on that.

Prints one JSON object: per arm `trial_steps`, `wall_s` and `dev` (dev F1 of what it selects), and
`compute_fraction` (ours / protocol, by trial-steps), `compute_fraction_wall` (by wall time) and
`dev_delta` (ours minus protocol). Only the SFT stage is covered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from sft_sweep import timed_sft_sweep

GRID = [1.0e-2, 1.0e-3, 1.0e-4, 1.0e-5]  # tune_spaces/demo_sft.yaml


def sweep(demo: Path, out: Path, name: str, space: dict[str, Any]) -> tuple[Any, float]:
    """One SFT sweep of `space` on the demo study through clinft-ray's own trainable and `run_sweep`;
    returns (Tune's ResultGrid, wall seconds of the sweep)."""
    from clinft_ray.config import load_study

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.yaml").write_text(yaml.safe_dump(space))
    study = load_study(demo / "study.yaml", [f"sft.space={out / f'{name}.yaml'}", "resources.cpus_per_trial=2"],
                       output_dir=str(out))
    return timed_sft_sweep(study, name)


def trial_steps(grid: Any) -> dict[str, int]:
    """Trial name -> the last step it trained (optimizer steps it cost)."""
    return {Path(r.path).name: int(r.metrics_dataframe["step"].max()) for r in grid}


def plateau(grid: Any) -> tuple[float, int, float]:
    """The protocol's pick: (learning rate, step, eval loss) of the lowest eval loss over every trial's
    curve; ties go to the fewer steps."""
    best = (math.inf, 0, 0.0)
    for r in grid:
        df = r.metrics_dataframe.dropna(subset=["eval/loss"])
        for loss, step in zip(df["eval/loss"], df["step"], strict=True):
            if (loss, step) < (best[0], best[1]):
                best = (float(loss), int(step), float(r.config["learning_rate"]))
    return best[2], best[1], best[0]


def curves(grid: Any) -> dict[str, list[list[float]]]:
    """Trial name -> [step, eval loss, dev F1] at each eval: what each arm's choice was made from."""
    return {Path(r.path).name: [[int(s), round(float(loss), 4), round(float(f1), 4)] for s, loss, f1 in
                                zip(r.metrics_dataframe["step"], r.metrics_dataframe["eval/loss"],
                                    r.metrics_dataframe["dev/f1"], strict=True)] for r in grid}


def protocol(demo: Path, out: Path, base: dict[str, Any]) -> dict[str, Any]:
    grid, sweep_s = sweep(demo, out, "protocol-grid", base)
    lr, step, loss = plateau(grid)
    retrain, retrain_s = sweep(demo, out, "protocol-retrain",
                               {**base, "learning_rate": lr, "max_steps": step, "eval_steps": step})
    (result,) = list(retrain)
    steps = trial_steps(grid)
    return {
        "trial_steps": sum(steps.values()) + step,
        "sweep_trial_steps": sum(steps.values()),
        "retrain_steps": step,
        "wall_s": round(sweep_s + retrain_s, 1),
        "sweep_wall_s": round(sweep_s, 1),
        "retrain_wall_s": round(retrain_s, 1),
        "plateau": {"learning_rate": lr, "step": step, "eval_loss": round(loss, 4)},
        "dev": float(result.metrics_dataframe["dev/f1"].iloc[-1]),
        "curves": curves(grid),
    }


def ours(demo: Path, out: Path, base: dict[str, Any], grace: int, factor: float, patience: int | None) -> dict[str, Any]:
    from clinft_ray.selection import candidates, select_best

    space = dict(base)
    if grace:
        space["scheduler"] = {"asha": {"grace_steps": grace, "reduction_factor": factor}}
    if patience:
        space["patience"] = patience
    grid, wall = sweep(demo, out, "ours", space)
    steps = trial_steps(grid)
    best = select_best(candidates(grid, "f1"))
    return {
        "trial_steps": sum(steps.values()),
        "wall_s": round(wall, 1),
        "last_step": steps,
        "stopped_early": sum(s < base["max_steps"] for s in steps.values()),
        "selected": {"learning_rate": best.payload.config["learning_rate"], "step": best.step},
        "dev": best.dev,
        "curves": curves(grid),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--grace-steps", type=int, default=0, help="ASHA's grace period; 0 (default): no ASHA")
    parser.add_argument("--reduction-factor", type=float, default=3.0)
    parser.add_argument("--patience", type=int, default=1,
                        help="space key patience: stop a trial after N evals without a better dev score; 0: off")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    opts = parser.parse_args(argv)

    import ray

    from clinft_ray.demo import prepare_demo

    for key in ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "RAY_TRAIN_ENABLE_PRINT_PATCH"):
        os.environ.setdefault(key, "0")  # as `clinft run` sets them (study.start_ray)
    base = {"stage": "sft", "learning_rate": {"grid": GRID}, "max_steps": opts.max_steps,
            "eval_steps": opts.eval_steps, "batch_size": 8, "lr_scheduler": "constant"}
    with tempfile.TemporaryDirectory() as scratch:
        work = (opts.out or Path(scratch)).resolve()
        prepare_demo(work / "demo")
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Tune's status tables; stdout is for the JSON
                paper = protocol(work / "demo", work / "protocol", base)
                mine = ours(work / "demo", work / "ours", base, opts.grace_steps, opts.reduction_factor,
                            opts.patience)
        finally:
            ray.shutdown()
    result = {
        "task": "demo uti (classification), dev F1; SFT stage",
        "grid": GRID,
        "max_steps": opts.max_steps,
        "eval_steps": opts.eval_steps,
        "asha": {"grace_steps": opts.grace_steps, "reduction_factor": opts.reduction_factor} if opts.grace_steps else None,
        "patience": opts.patience,
        "protocol": paper,
        "ours": mine,
        "compute_fraction": round(mine["trial_steps"] / paper["trial_steps"], 3),
        "compute_fraction_wall": round(mine["wall_s"] / paper["wall_s"], 3),
        "dev_delta": round(mine["dev"] - paper["dev"], 4),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    main()
