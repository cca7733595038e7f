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
                # On the sweep's storage, as the Train run wrote it; gone if Train has since deleted it
                # (it keeps the trial's best on dev and its latest), or cut short by a kill.
                if incomplete(path, result.filesystem) is None:
                    break
                path = None
            kept = [c for c, m in (result.best_checkpoints or []) if int(m.get("step", -1)) == step
                    and incomplete(c.path, c.filesystem) is None]
            if kept:
                path = kept[0].path
                break
        if "checkpoint_path" in df:  # a multi-worker trial: what its Train run kept, whatever Tune still has
            for kept_step, kept_dev, kept_path in train_kept_bests(result, df["checkpoint_path"]):
                if path is None or (-kept_dev, kept_step) < (-float(best[col]), step):
                    path, step, best = kept_path, kept_step, {col: kept_dev}
        if path is None:
            continue
        trial = result.metrics["trial_id"]
        # Ties go to the trial listed first in the search space: Tune's trial index, which stays the
        # same when a sweep is restored (the order of the result grid does not).
        out.append(Candidate(trial=trial, step=step, dev=float(best[col]), order=trial_order(trial, df),
                             payload=result, checkpoint=path))
    return out


def train_kept_bests(result: Any, reported: Any) -> list[tuple[int, float, str]]:
    """(step, dev, path) of each whole checkpoint that a multi-worker trial's Ray Train run holds in
    storage and that was a new best on dev when it was saved. A Tune trial whose training runs in Ray
    Train holds no Tune checkpoint, so when a sweep is restored (a driver stopped or lost) Tune starts
    its record of that trial afresh while Train resumes from its own checkpoints: the rows before the
    stop are gone from `metrics_dataframe`, but the best checkpoint among them is still in the Train
    run's folder, with the dev score it was saved at (`trial.DEV_STATE`)."""
    import json

    import pyarrow.fs as pafs

    from clinft_ray.modeling import MANIFEST
    from clinft_ray.trial import DEV_STATE

    fs = result.filesystem
    folders = {p.rstrip("/").rsplit("/", 1)[0] for p in reported.dropna() if isinstance(p, str)}
    found = []
    for folder in folders:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        for info in infos:
            if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_") \
                    or incomplete(info.path, fs) is not None:
                continue
            try:
                with fs.open_input_stream(f"{info.path}/{DEV_STATE}") as f:
                    dev = json.loads(f.read())
                with fs.open_input_stream(f"{info.path}/{MANIFEST}") as f:
                    step = int(json.loads(f.read())["step"])
            except (OSError, ValueError, KeyError):
                continue
            if dev.get("since_best") == 0:
                found.append((step, float(dev["best"]), info.path))
    return found


def trial_order(trial_id: str, df: Any) -> int:
    """Where a trial stands in its sweep: Tune's trial index (`<run>_00003`) for a grid or random sweep;
    under a searcher (Optuna), whose trial ids carry no index, the time of its first report, which is
    the order the searcher suggested it in."""
    run, _, index = trial_id.rpartition("_")
    if run and index.isdigit():
        return int(index)
    return int(df["timestamp"].min()) if "timestamp" in df else 0
