"""Cluster mode for real: a Ray cluster of two nodes on 127.0.0.1 (`ray start --head` and `ray start
--address`), and the demo study sent with `ray job submit`, its trials each on two Ray Train workers with
their checkpoints in storage outside the output folder.

The second node runs in a mount namespace of its own where the cluster's temp folder is a tmpfs: its
Ray files are apart from the head's, and a folder there (`node_local`) exists on both nodes but each node
has its own, as a node-local disk on a real cluster does.
The cluster has token authentication on (RAY_AUTH_MODE=token), its dashboard and job API bind to
127.0.0.1 only, and it is stopped by this module, without touching the test session's own Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
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


class Head:
    """A real head node with 2 CPUs on loopback (`ray start --head --block`) and a worker node with 2
    CPUs joined to it, which a test can stop and start again as an operator restarts a cluster: same
    temp dir, new ports, the jobs' storage untouched."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="clinft-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.node_local = Path(self.temp) / "node-local"  # the worker node has its own (see `start`)
        self.node_local.mkdir()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[subprocess.Popen] = []
        self.address = ""

    @staticmethod
    def _ports() -> list[str]:
        # Ray's fixed default ports (the job agent's 52365, ...) are taken while the test session's
        # local Ray runs, and two nodes on one machine cannot share them.
        return [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                       "metrics-export-port", "runtime-env-agent-port")]

    def start(self) -> Head:
        dashboard, gcs = free_port(), free_port()
        ray_start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1",
                     "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats"]
        self.processes = [subprocess.Popen(
            [*ray_start, "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--temp-dir={self.temp}", f"--ray-client-server-port={free_port()}", *self._ports()],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
        self.address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while _ray(["job", "list", "--address", self.address], self.env, check=False).returncode != 0:
            assert self.processes[0].poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head node's job API did not come up in 120 s"
            time.sleep(1)
        # The worker node, in a mount namespace where the cluster's temp dir is a tmpfs of its own: its
        # Ray files (sessions, runtime environments, logs) apart from the head's, as on another machine,
        # and `node_local` a folder of the same path that is its own.
        worker = shlex.join([*ray_start, f"--address=127.0.0.1:{gcs}", '--resources={"worker_node": 1}',
                             *self._ports()])
        self.processes.append(subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs tmpfs {shlex.quote(self.temp)} && mkdir {shlex.quote(str(self.node_local))} "
             f"&& exec {worker}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True))
        deadline = time.monotonic() + 120
        while self._alive_nodes() < 2:
            assert self.processes[1].poll() is None, f"the worker node exited: {self.processes[1].stderr.read()}"
            assert time.monotonic() < deadline, "the worker node did not join in 120 s"
            time.sleep(1)
        # The job API answers before the head's job agent takes jobs ("No available agent to submit
        # job"): wait until a trivial job is taken.
        deadline = time.monotonic() + 180
        while _ray(["job", "submit", "--address", self.address, "--no-wait", "--", "true"], self.env,
                   check=False).returncode:
            assert time.monotonic() < deadline, "the head node's job agent took no job in 180 s"
            time.sleep(2)
        return self

    def _alive_nodes(self) -> int:
        listed = _ray(["list", "nodes", "--address", self.address, "--format", "json"], self.env, check=False)
        try:  # just after a start the state API may answer with a notice instead of the list
            return sum(n.get("state") == "ALIVE" for n in json.loads(listed.stdout))
        except ValueError:
            return 0

    def stop(self) -> None:
        """Both nodes and every process they started, gone (as a cluster lost or restarted is)."""
        for process in reversed(self.processes):  # the worker node first
            os.killpg(process.pid, signal.SIGTERM)  # --block: a node stops the processes it started
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # its graceful stop takes ~30 s; nothing of it is kept
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        self.processes = []


@pytest.fixture(scope="module")
def cluster():
    """The two nodes, started; `head.address` and `head.env` for clients."""
    head = Head()
    try:
        yield head.start()
    finally:
        head.stop()
        shutil.rmtree(head.temp, ignore_errors=True)


def _ray(args: list[str], env: dict[str, str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, cwd=REPO, text=True,
                          capture_output=True, check=check, timeout=timeout)


# The smallest demo that still shows the point (a job trains SFT then DPO, is stopped in its DPO sweep
# and goes on when resubmitted, and a resubmission of the finished study trains nothing): 1 SFT trial and
# 1 DPO trial instead of the demo's 4 + 12, on trimmed splits; DPO long enough to be stopped mid-trial.
SMALL_SFT = "stage: sft\nlearning_rate: {grid: [1.0e-2]}\nmax_steps: 20\neval_steps: 10\nbatch_size: 8\n"
SMALL_DPO = "stage: dpo\nlearning_rate: {grid: [1.0e-3]}\nbeta: {grid: [0.1]}\nmax_steps: 30\neval_steps: 5\nbatch_size: 8\n"


def _submit(head: Head, out: Path, submission_id: str, demo_dir: Path, wait: bool = True,
            storage: Path | None = None) -> bool:
    """`ray job submit` as the README gives it for the demo (with the small spaces above and the demo's
    splits trimmed), its checkpoints in `storage` (default: a folder beside `out`); with `wait`, to the
    end: True if the job succeeded."""
    spaces = out.parent / "spaces"
    spaces.mkdir(exist_ok=True)
    (spaces / "sft.yaml").write_text(SMALL_SFT)
    (spaces / "dpo.yaml").write_text(SMALL_DPO)
    splits = trimmed(demo_dir / "data" / "classification", out.parent / "splits", SMALL_ROWS)
    # Each trial on two Ray Train workers (gloo), as `gpus_per_trial: 4` runs on a GPU node, with the
    # trials' checkpoints in storage shared by the cluster's nodes, outside the output folder.
    cluster = ["--set", f"storage_path={storage or out.parent / 'shared'}", "--set", "resources.workers_per_trial=2",
               "--set", "resources.cpus_per_trial=0.5"]
    submitted = _ray(["job", "submit", "--address", head.address, "--submission-id", submission_id,
                      *([] if wait else ["--no-wait"]), "--working-dir", ".",
                      "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/study.py", "demo", "--out",
                      str(out), "--set", f"sft.space={spaces / 'sft.yaml'}", "--set", f"dpo.space={spaces / 'dpo.yaml'}",
                      *(a for split, path in splits.items() for a in ("--set", f"tasks.0.splits.{split}={path}")),
                      *cluster],
                     head.env, check=False, timeout=1200)
    status = _ray(["job", "status", "--address", head.address, submission_id], head.env, check=False)
    assert status.returncode == 0, f"ray job submit was refused: {submitted.stderr[-1500:]}"
    return f"'{submission_id}' succeeded" in status.stdout


def _logs(head: Head, submission_id: str) -> str:
    return _ray(["job", "logs", "--address", head.address, submission_id], head.env, check=False).stdout


def _wait(head: Head, submission_id: str, done, what: str, timeout: float = 300) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"no {what} in {timeout} s: {_logs(head, submission_id)[-3000:]}"
        time.sleep(0.2)


def test_dashboard_and_job_api_bind_to_loopback_only(cluster):
    port = int(cluster.address.rsplit(":", 1)[1])
    outside = [a for a in {socket.gethostbyname(socket.gethostname())} if not a.startswith("127.")]
    for ip in outside:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((ip, port))


def test_job_without_the_token_is_refused(cluster):
    denied = _ray(["job", "list", "--address", cluster.address], {**cluster.env, "RAY_AUTH_TOKEN": "wrong" * 8},
                  check=False)
    assert denied.returncode != 0


def test_storage_on_a_node_local_disk_is_refused_before_training(cluster, tmp_path, demo_dir):
    """`storage_path` a folder that each node has on its own disk: the job fails before anything trains,
    with one line that names the node and the fix; nothing reaches MLflow."""
    out = tmp_path / "demo"
    assert not _submit(cluster, out, "clinft-node-local", demo_dir, storage=cluster.node_local / "ray")
    logs = _logs(cluster, "clinft-node-local")
    [line] = [line for line in logs.splitlines() if line.startswith("clinft: error:")]
    assert "storage_path" in line and "is not shared: node " in line and "NFS" in line, line
    assert "SFT sweep" not in logs and "base model on test" not in logs
    assert not (out / "mlflow.db").exists() and not (out / "progress.json").exists()


def test_demo_study_as_a_ray_job_stopped_resubmitted_after_a_head_restart(cluster, tmp_path, demo_dir):
    """The demo as a job, `ray job stop`ped in its DPO sweep (SIGTERM to the driver, as a preemption or
    `kubectl delete` sends it), the head restarted, and the same job resubmitted: it goes on where it
    stopped (SFT not trained again, the DPO trial from its checkpoint, in the same MLflow runs) and
    ends as a job never stopped does; submitted once more, it trains nothing."""
    from mlflow.tracking import MlflowClient

    from clinft_ray.modeling import read_manifest

    head, out, storage = cluster, tmp_path / "demo", tmp_path / "shared"
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")

    # 1. stopped once the DPO trial's first eval (step 5) is checkpointed and in MLflow
    def first_dpo_eval() -> bool:
        if not any(storage.glob("uti-dpo-*/checkpoint_*")) or client.get_experiment_by_name("uti-demo") is None:
            return False
        runs = client.search_runs([client.get_experiment_by_name("uti-demo").experiment_id],
                                  "tags.`clinft.stage` = 'dpo' and metrics.`dev/f1` >= 0")
        return any("clinft.trial" in r.data.tags for r in runs)

    _submit(head, out, "clinft-demo-1", demo_dir, wait=False)
    _wait(head, "clinft-demo-1", first_dpo_eval, "DPO checkpoint")
    stopped = _ray(["job", "stop", "--address", head.address, "clinft-demo-1"], head.env, timeout=120)
    status = _ray(["job", "status", "--address", head.address, "clinft-demo-1"], head.env).stdout
    assert "was stopped" in status, stopped.stdout + status
    logs = _logs(head, "clinft-demo-1")
    assert "stopped by SIGTERM" in logs, logs[-3000:]  # the driver's own stop, not Ray's SIGKILL after it
    progress = json.loads((out / "progress.json").read_text())
    assert "uti/sft" in progress["done"] and "uti/dpo" not in progress["done"]
    experiment = client.get_experiment_by_name("uti-demo")
    status_of = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert status_of["uti-demo"] == status_of["uti"] == status_of["dpo"] == "KILLED", status_of
    assert status_of["sft"] == status_of["base"] == "FINISHED"
    assert not (out / "results.json").exists()

    # 2. the head restarted (new processes, new ports; the storage and output folder stay)
    head.stop()
    head.start()

    # 3. the same job again: it goes on where it stopped
    assert _submit(head, out, "clinft-demo-2", demo_dir), _logs(head, "clinft-demo-2")[-5000:]
    logs = _logs(head, "clinft-demo-2")
    assert "going on where it stopped" in logs
    results = json.loads((out / "results.json").read_text())
    stages = results["tasks"]["uti"]["stages"]
    assert stages["sft"]["checkpoint"] == progress["done"]["uti/sft"]["entry"]["checkpoint"]  # SFT not retrained
    rows = [json.loads(line) for f in (storage / "uti-dpo").glob("*/result.json") for line in f.read_text().splitlines()]
    assert max(r["step"] for r in rows) == 30
    assert [r for r in rows if r.get("iterations_since_restore") == 1 and r["step"] > 5], \
        "the stopped DPO trial started over instead of going on from its checkpoint"
    assert stages["sft"]["trials"] == 1 and stages["dpo"]["trials"] == 1
    assert stages["sft"]["test"]["f1"] > stages["base"]["test"]["f1"]  # the 2-worker SFT trials learned
    sft_ckpt, dpo_ckpt = Path(stages["sft"]["checkpoint"]), Path(stages["dpo"]["checkpoint"])
    assert sft_ckpt.is_relative_to(storage) and dpo_ckpt.is_relative_to(storage)  # the trials' shared storage
    assert not (out / "ray").exists()
    assert read_manifest(dpo_ckpt)["init_from"] == str(sft_ckpt)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # the stopped runs continued
    assert len([r for r in runs if r.data.tags.get("clinft.kind") == "study"]) == 1
    # The DPO selection is the trial's best dev step as MLflow saw every eval of it, the ones before the
    # stop included (a restored multi-worker trial's Tune record starts afresh: `selection.train_kept_bests`)
    [dpo_run] = [r for r in trials if r.data.tags["clinft.stage"] == "dpo"]
    curve = [(-m.value, m.step) for m in client.get_metric_history(dpo_run.info.run_id, "dev/f1")]
    assert len(curve) == len({step for _, step in curve}) and min(s for _, s in curve) == 5  # each eval once
    assert stages["dpo"]["selected"]["step"] == min(curve)[1]
    for run in trials:
        assert run.data.metrics["system/workers"] == 2
        # device-hours bill both workers: 2 x 0.5 CPUs for the trial's wall time
        assert run.data.metrics["cpu_hours"] == pytest.approx(run.data.metrics["wall_s"] / 3600, rel=1e-6)
    stamp = (out / "results.json").stat().st_mtime_ns
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

    # 4. the finished study once more: nothing trains, nothing new in MLflow, the results stay as they were
    assert _submit(head, out, "clinft-demo-3", demo_dir), _logs(head, "clinft-demo-3")[-5000:]
    again = _logs(head, "clinft-demo-3")
    assert "already finished" in again
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == len(runs)
    assert (out / "results.json").stat().st_mtime_ns == stamp
