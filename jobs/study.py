"""Run a clinft-ray study as a Ray job on a cluster: the same arguments as `clinft run`.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/study.py study.yaml --out /mnt/shared/studies/my-study
    ray job submit ... -- python jobs/study.py demo --out /mnt/shared/clinft-demo   # the built-in demo

    ray job list --address http://HEAD:8265
    ray job logs --address http://HEAD:8265 --follow <submission id>   # the trial events, live (--verbose: Tune's tables)
    ray job stop --address http://HEAD:8265 <submission id>            # stops every trial; runs -> KILLED
                                                                       # (SIGTERM: see cli.stop_on_signals)

The job's driver runs on the head node and joins the cluster (Ray sets RAY_ADDRESS for it), so the
config needs no `ray.address`. Give `--out` (or `output_dir`, and `storage_path`) on storage every
node sees: the job's working directory is a temporary copy. Resubmitting a study that already
finished in that output directory trains nothing and prints its results again.
With token authentication on the cluster (RAY_AUTH_MODE=token), set RAY_AUTH_MODE and RAY_AUTH_TOKEN
where you run `ray job submit` too.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from clinft_ray.cli import main
except ImportError:  # the package is not installed on the cluster: use the uploaded working directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clinft_ray.cli import main


def command(argv: list[str]) -> list[str]:
    """`study.yaml [--out DIR] [--set k=v ...]` -> `clinft run ...`; `demo [...]` -> `clinft demo ...`."""
    if argv and argv[0] == "demo":
        return ["demo", *argv[1:]]
    return ["run", *argv]


if __name__ == "__main__":
    raise SystemExit(main(command(sys.argv[1:])))
