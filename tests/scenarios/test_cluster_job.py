"""Cluster mode for real: `ray start --head` on 127.0.0.1 and the demo study sent with `ray job submit`,
its trials each on two Ray Train workers with their checkpoints in storage outside the output folder.

The cluster has token authentication on (RAY_AUTH_MODE=token), its dashboard and job API bind to
127.0.0.1 only, and it is stopped by this module, without touching the test session's own Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import REPO, SMALL_ROWS, free_port, trimmed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A real head node with 2 CPUs on loopback; yields (dashboard address, env for clients)."""
    temp = tempfile.mkdtemp(prefix="clinft-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats",
         # Ray's fixed default ports (the job agent's 52365, ...) are taken while the test session's
         # local Ray runs: the head's job agent would fail to bind and no job could be submitted.
         *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port",
                                                   "ray-client-server-port"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while _ray(["job", "list", "--address", address], env, check=False).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head node's job API did not come up in 120 s"
            time.sleep(2)
        # The job API answers before the head's job agent takes jobs ("No available agent to submit
        # job"): wait until a trivial job is taken.
        deadline = time.monotonic() + 180
        while _ray(["job", "submit", "--address", address, "--no-wait", "--", "true"], env, check=False).returncode:
            assert time.monotonic() < deadline, "the head node's job agent took no job in 180 s"
            time.sleep(3)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops the processes it started
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its graceful stop takes ~30 s; nothing of it is kept
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _ray(args: list[str], env: dict[str, str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, cwd=REPO, text=True,
                          capture_output=True, check=check, timeout=timeout)


# The smallest demo that still shows the point (a job trains SFT then DPO and a resubmission trains
# nothing): 1 SFT trial and 1 DPO trial instead of the demo's 4 + 12, on trimmed splits.
SMALL_SFT = "stage: sft\nlearning_rate: {grid: [1.0e-2]}\nmax_steps: 20\neval_steps: 10\nbatch_size: 8\n"
SMALL_DPO = "stage: dpo\nlearning_rate: {grid: [1.0e-3]}\nbeta: {grid: [0.1]}\nmax_steps: 10\neval_steps: 5\nbatch_size: 8\n"


def _submit(address: str, env: dict[str, str], out: Path, submission_id: str, demo_dir: Path) -> bool:
    """`ray job submit` as the README gives it for the demo (with the small spaces above and the demo's
    splits trimmed), waiting for the end; True if the job succeeded."""
    spaces = out.parent / "spaces"
    spaces.mkdir(exist_ok=True)
    (spaces / "sft.yaml").write_text(SMALL_SFT)
    (spaces / "dpo.yaml").write_text(SMALL_DPO)
    splits = trimmed(demo_dir / "data" / "classification", out.parent / "splits", SMALL_ROWS)
    # Each trial on two Ray Train workers (gloo), as `gpus_per_trial: 4` runs on a GPU node, with the
    # trials' checkpoints in storage shared by the cluster's nodes, outside the output folder.
    cluster = ["--set", f"storage_path={out.parent / 'shared'}", "--set", "resources.workers_per_trial=2",
               "--set", "resources.cpus_per_trial=0.5"]
    submitted = _ray(["job", "submit", "--address", address, "--submission-id", submission_id, "--working-dir", ".",
                      "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/study.py", "demo", "--out",
                      str(out), "--set", f"sft.space={spaces / 'sft.yaml'}", "--set", f"dpo.space={spaces / 'dpo.yaml'}",
                      *(a for split, path in splits.items() for a in ("--set", f"tasks.0.splits.{split}={path}")),
                      *cluster],
                     env, check=False, timeout=1200)
    status = _ray(["job", "status", "--address", address, submission_id], env, check=False)
    assert status.returncode == 0, f"ray job submit was refused: {submitted.stderr[-1500:]}"
    return f"'{submission_id}' succeeded" in status.stdout


def test_dashboard_and_job_api_bind_to_loopback_only(cluster):
    address, _ = cluster
    port = int(address.rsplit(":", 1)[1])
    outside = [a for a in {socket.gethostbyname(socket.gethostname())} if not a.startswith("127.")]
    for ip in outside:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((ip, port))


def test_job_without_the_token_is_refused(cluster):
    address, env = cluster
    denied = _ray(["job", "list", "--address", address], {**env, "RAY_AUTH_TOKEN": "wrong" * 8}, check=False)
    assert denied.returncode != 0


def test_demo_study_as_a_ray_job_and_resubmitted(cluster, tmp_path, demo_dir):
    from mlflow.tracking import MlflowClient

    from clinft_ray.modeling import read_manifest

    address, env = cluster
    out = tmp_path / "demo"
    assert _submit(address, env, out, "clinft-demo-1", demo_dir)

    results = json.loads((out / "results.json").read_text())
    stages = results["tasks"]["uti"]["stages"]
    assert stages["sft"]["trials"] == 1 and stages["dpo"]["trials"] == 1
    assert stages["sft"]["test"]["f1"] > stages["base"]["test"]["f1"]  # the 2-worker SFT trials learned
    storage = tmp_path / "shared"
    sft_ckpt, dpo_ckpt = Path(stages["sft"]["checkpoint"]), Path(stages["dpo"]["checkpoint"])
    assert sft_ckpt.is_relative_to(storage) and dpo_ckpt.is_relative_to(storage)  # the trials' shared storage
    assert not (out / "ray").exists()
    assert read_manifest(dpo_ckpt)["init_from"] == str(sft_ckpt)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("uti-demo")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in trials:
        assert run.data.metrics["system/workers"] == 2
        # device-hours bill both workers: 2 x 0.5 CPUs for the trial's wall time
        assert run.data.metrics["cpu_hours"] == pytest.approx(run.data.metrics["wall_s"] / 3600, rel=1e-6)
    stamp = (out / "results.json").stat().st_mtime_ns
    logs = _ray(["job", "logs", "--address", address, "clinft-demo-1"], env).stdout
    # The driver (clinft's own output) prints no traceback. Lines that Ray forwards from trial workers
    # carry a "(trial pid=...)" prefix: a worker Ray shuts down with SIGTERM after its trial may print
    # Ray's own SystemExit there, which is not a failure of the study.
    driver_lines = [line for line in logs.splitlines() if "pid=" not in line]
    assert "results:" in logs and not any("Traceback" in line for line in driver_lines)
    # A console a person can watch: a line per trial event with the sweep's progress, no Tune status
    # tables (those come with --verbose), nothing that looks like a problem when none happened.
    assert "NaN or Inf" not in logs and "Trial status:" not in logs and "== Status ==" not in logs
    assert "tensorboard" not in logs.lower() and "Configuration for experiment" not in logs
    events = [line for line in driver_lines if "trial-steps" in line]
    assert any("started" in e for e in events) and any("dev f1" in e for e in events) \
        and any("finished, best dev f1" in e for e in events), "\n".join(driver_lines[-60:])
    assert len(driver_lines) <= 25 * len(trials) + 60, "\n".join(driver_lines)

    # The same study again: nothing trains, nothing new in MLflow, the results stay as they were.
    assert _submit(address, env, out, "clinft-demo-2", demo_dir)
    again = _ray(["job", "logs", "--address", address, "clinft-demo-2"], env).stdout
    assert "already finished" in again
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == len(runs)
    assert (out / "results.json").stat().st_mtime_ns == stamp
