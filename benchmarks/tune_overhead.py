"""What Ray Tune's orchestration costs: the same trials through Tune and as plain sequential loops.

    python benchmarks/tune_overhead.py       # the demo's 4 SFT trials, twice each way: about 3 minutes on 2 idle cores

Both ways run clinft-ray's own `sft_train` on the demo's UTI task and tiny model
(`clinft_ray.demo.prepare_demo`) over the demo's SFT grid (`tune_spaces/demo_sft.yaml`: 4 learning
rates, 60 steps, dev scored and checkpointed every 20), one trial at a time with 2 torch threads:

- **tune**: `run_sweep` (a Ray Tune `Tuner`, `cpus_per_trial: 2` on a 2-CPU Ray, so trials run one
  at a time): each trial in its own Ray worker process, its rows and checkpoints reported to Tune and
  copied into Tune's storage, Tune's experiment state written as it goes;
- **plain**: `sft_train` called in a loop in this process with a reporter that keeps the rows in a
  list and copies each checkpoint into a folder (what Tune's storage does for a local path).

The two ways take turns (`--rounds`, tune first in odd rounds, plain first in even ones) so that
load from other processes falls on both alike. `ray.init` is timed on its own (`ray_init_s`), once:
a study pays it once for all its sweeps. Prints one JSON object with each way's per-round wall
times, their medians, and `overhead_fraction` = (tune - plain) / plain from the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from sft_sweep import timed_sft_sweep


class ListReporter:
    """The reporter `sft_train` gets outside Tune: rows into a list, checkpoints copied to `keep`."""

    world_size = 1
    is_chief = True

    def __init__(self, keep: Path):
        self.keep, self.rows = keep, []

    def report(self, row: dict[str, Any], folder: str | None = None) -> None:
        self.rows.append(row)
        if folder:
            shutil.copytree(folder, self.keep / f"checkpoint-{row['step']}")

    def checkpoint(self) -> None:
        return None


def load(demo: Path, out: Path) -> Any:
    from clinft_ray.config import load_study

    return load_study(demo / "study.yaml", ["resources.cpus_per_trial=2", "sft.space=tune_spaces/bench_sft.yaml"],
                      output_dir=str(out))


def through_tune(demo: Path, out: Path, name: str) -> tuple[float, int]:
    grid, seconds = timed_sft_sweep(load(demo, out), name)
    assert all(r.error is None for r in grid), "a Tune trial failed"
    return seconds, sum(len(r.metrics_dataframe) for r in grid)


def plain(demo: Path, out: Path) -> tuple[float, int]:
    from clinft_ray.sft import sft_train

    study = load(demo, out)
    task = study.config.tasks[0]
    rows = 0
    start = time.perf_counter()
    for i, lr in enumerate(study.sft_space.learning_rate.grid):
        reporter = ListReporter(out / f"trial-{i}")
        reporter.keep.mkdir(parents=True)
        sft_train({"learning_rate": lr}, reporter, study=study, task=task)
        rows += len(reporter.rows)
    return time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="default: the demo space's (60)")
    opts = parser.parse_args(argv)

    import ray
    import trl  # noqa: F401  (imported before timing: the Tune driver holds it too)

    from clinft_ray.demo import prepare_demo
    from clinft_ray.study import ray_environment

    ray_environment()  # as `clinft run` sets it
    times: dict[str, list[float]] = {"tune": [], "plain": []}
    rows: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        demo = work / "demo"
        prepare_demo(demo)
        space = yaml.safe_load((demo / "tune_spaces" / "demo_sft.yaml").read_text())
        if opts.max_steps:
            space = {**space, "max_steps": opts.max_steps, "eval_steps": min(space["eval_steps"], opts.max_steps)}
        (demo / "tune_spaces" / "bench_sft.yaml").write_text(yaml.safe_dump(space))
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        ray_init_s = time.perf_counter() - start
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Tune's status tables; stdout is for the JSON
                for r in range(opts.rounds):
                    for way in (("tune", "plain") if r % 2 == 0 else ("plain", "tune")):
                        out = work / f"{way}-{r}"
                        s, n = through_tune(demo, out, f"sft-{r}") if way == "tune" else plain(demo, out)
                        times[way].append(round(s, 1))
                        rows[way] = n
        finally:
            ray.shutdown()
    tune_s, plain_s = statistics.median(times["tune"]), statistics.median(times["plain"])
    result = {
        "trials": len(space["learning_rate"]["grid"]),
        "max_steps": space["max_steps"],
        "eval_steps": space["eval_steps"],
        "rows_reported": rows,
        "ray_init_s": round(ray_init_s, 1),
        "tune_wall_s": times["tune"],
        "plain_wall_s": times["plain"],
        "tune_median_s": tune_s,
        "plain_median_s": plain_s,
        "overhead_s_per_trial": round((tune_s - plain_s) / len(space["learning_rate"]["grid"]), 1),
        "overhead_fraction": round((tune_s - plain_s) / plain_s, 3),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    main()
