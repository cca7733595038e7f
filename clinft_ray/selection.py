"""Runs on the driver: choosing the best (trial, step) of a finished sweep on the dev split, by the
task's metric (F1, accuracy, the judge's score; never the loss). The whole rule is here:

- each trial reports its dev score at every eval interval; its candidate (`candidates`) is its best
  dev score among the steps whose checkpoint is whole (one cut short by a kill is passed over), the
  fewest steps among equal scores;
- across trials (`select_best`) the highest dev score wins; ties break toward fewer training steps
  (cheaper, and closer to the plateau the paper read off by hand), then toward the trial listed first
  in the search space (Tune's trial index, which a restored sweep keeps; under Optuna, the trial it
  suggested first, `trial_order`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from clinft_ray.modeling import incomplete


@dataclass(frozen=True)
class Candidate:
    trial: str
    step: int
    dev: float
    order: int = 0
    payload: Any = None
    checkpoint: str = ""


def select_best(candidates: list[Candidate]) -> Candidate:
    """The best candidate: max dev, then min step, then min order. Raises on an empty list."""
    if not candidates:
        raise ValueError("no trial reported a dev score: every trial failed before its first eval")
    return min(candidates, key=lambda c: (-c.dev, c.step, c.order))


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
        out.append(Candidate(trial=trial, step=step, dev=float(best[col]), order=trial_order(trial, df),
                             payload=result, checkpoint=path))
    return out


def trial_order(trial_id: str, df: Any) -> int:
    """Where a trial stands in its sweep: Tune's trial index (`<run>_00003`) for a grid or random sweep;
    under a searcher (Optuna), whose trial ids carry no index, the time of its first report, which is
    the order the searcher suggested it in."""
    run, _, index = trial_id.rpartition("_")
    if run and index.isdigit():
        return int(index)
    return int(df["timestamp"].min()) if "timestamp" in df else 0
