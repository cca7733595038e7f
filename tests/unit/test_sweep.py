"""The driver's Ray tasks (`clinft_ray.sweep.device_task`): a task that held a GPU leaves no process
behind to hold its CUDA memory; a CPU task keeps its warm worker."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import REPO

SCRIPT = textwrap.dedent("""
    import os, time
    import ray
    from clinft_ray.sweep import device_task

    def pid():
        return os.getpid()

    def alive(p):
        try:
            os.kill(p, 0)
            return True
        except ProcessLookupError:
            return False

    # A Ray of its own that believes it has a GPU: the scheduling and worker lifetime are Ray's, the
    # device is not needed for either.
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    held, _ = device_task(pid, {"CPU": 1, "GPU": 1})
    deadline = time.monotonic() + 30
    while alive(held) and time.monotonic() < deadline:
        time.sleep(0.1)
    first, _ = device_task(pid, {"CPU": 1})
    second, _ = device_task(pid, {"CPU": 1})
    print("RESULT", alive(held), first == second and alive(second))
""")


def test_a_task_that_held_a_gpu_leaves_no_worker_and_a_cpu_task_stays_warm():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=180)
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT False True"], out.stdout[-2000:] + out.stderr[-2000:]
