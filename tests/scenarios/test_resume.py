"""Scenario: nothing lost. One copy of the shared small study is run by `clinft run` and interrupted
twice: Ctrl-C while its SFT sweep trains, then, run again, killed without warning in the middle of
its DPO sweep; the third run of the same command ends as if never interrupted: the same selections and
test scores as the small study run uninterrupted (`small_run`), every MLflow run continued (not
duplicated) and FINISHED. The two interruptions share the runs; each test checks one of them.

The three runs are started as from a shell that holds AWS keys (as many machines that reach S3 do), with
Ray's files in a folder of their own: none of the keys may reach Ray's logs (the study's storage is
local, so clinft-ray does not hand them to Ray)."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import clinft_popen, copy_demo

pytestmark = pytest.mark.slow


AWS_CANARY = {"AWS_ACCESS_KEY_ID": "AKIACLINFTCANARY0001", "AWS_SECRET_ACCESS_KEY": "clinft-canary-secret-5521",
              "AWS_SESSION_TOKEN": "clinft-canary-session-5521"}


def _run(config: Path, ray_tmp: str):  # noqa: ANN202
    return clinft_popen("run", str(config), "--set", "ray.num_cpus=2", env={**AWS_CANARY, "RAY_TMPDIR": ray_tmp})


def _wait(proc, done, what: str, timeout: float = 600) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"clinft ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.2)


def _statuses(client: MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("uti-demo").experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def interrupted(small_dir, small_run, tmp_path_factory):  # noqa: ANN201
    """The three runs, and what each interruption left behind."""
    out = tmp_path_factory.mktemp("interrupted")
    config = copy_demo(small_dir, out)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    ray_tmp = tempfile.mkdtemp(prefix="clinft-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    seen: dict = {"out": out, "client": client, "ray_tmp": Path(ray_tmp)}

    # 1. Ctrl-C once Tune has taken an SFT trial's first checkpoint (its row is in the trial's result.json)
    proc = _run(config, ray_tmp)
    _wait(proc, lambda: any(f.stat().st_size for f in (out / "ray" / "uti-sft").glob("*/result.json")),
          "SFT checkpoint", 240)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    runs = _statuses(client)
    seen["ctrl_c"] = {"code": proc.returncode, "stderr": err, "results": (out / "results.json").exists(),
                      "status": {r.info.run_name: r.info.status for r in runs},
                      "killed": {r.info.run_id for r in runs if r.info.status == "KILLED"}}

    # 2. the same command again; SIGKILL once the DPO sweep has checkpointed some trials
    proc = _run(config, ray_tmp)
    _wait(proc, lambda: len(list((out / "ray" / "uti-dpo").glob("*/checkpoint_*"))) >= 3, "DPO checkpoints")
    proc.kill()
    _, err = proc.communicate()
    seen["sigkill"] = {"stderr": err, "results": (out / "results.json").exists(),
                       "progress": json.loads((out / "progress.json").read_text())}

    # 3. the same command once more, to the end
    proc = _run(config, ray_tmp)
    _, err = proc.communicate(timeout=900)
    seen["last"] = {"code": proc.returncode, "stderr": err}
    yield seen
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _same_as_uninterrupted(results: dict, uninterrupted: dict) -> None:
    """The selections, test scores and p-values of a resumed study are those of the run never stopped."""
    for stage in ("base", "sft", "dpo"):
        got, want = results["tasks"]["uti"]["stages"][stage], uninterrupted["tasks"]["uti"]["stages"][stage]
        assert got["test"] == want["test"], stage
        if stage != "base":
            assert {k: v for k, v in got["selected"].items() if k in ("learning_rate", "beta", "step")} == \
                   {k: v for k, v in want["selected"].items() if k in ("learning_rate", "beta", "step")}, stage
    assert [c["p_value"] for c in results["tasks"]["uti"]["comparisons"]] == pytest.approx(
        [c["p_value"] for c in uninterrupted["tasks"]["uti"]["comparisons"]])


def test_ctrl_c_stops_the_study_marks_runs_killed_and_a_rerun_resumes(interrupted, small_run):
    """SIGINT while the SFT sweep runs: exit 130, no selection from a half-run sweep, no results.json,
    and every MLflow run ended (the interrupted trials and the stages above them KILLED). The same
    command again goes on where it stopped: the trials continue from their checkpoints in the same
    MLflow runs, which end FINISHED, and the study ends with the uninterrupted run's results."""
    ctrl_c, out, client = interrupted["ctrl_c"], interrupted["out"], interrupted["client"]
    assert ctrl_c["code"] == 130, ctrl_c["stderr"][-2000:]
    assert not ctrl_c["results"]
    status = ctrl_c["status"]
    assert "RUNNING" not in status.values()
    assert status["uti-demo"] == status["uti"] == status["sft"] == "KILLED"
    assert "dpo" not in status
    assert "going on where it stopped" in interrupted["sigkill"]["stderr"]

    assert interrupted["last"]["code"] == 0, interrupted["last"]["stderr"][-3000:]
    assert "Token authentication" not in interrupted["last"]["stderr"]  # Ray's routine notice, not news
    _same_as_uninterrupted(json.loads((out / "results.json").read_text()), small_run[1])
    runs = _statuses(client)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert ctrl_c["killed"] <= {r.info.run_id for r in runs}  # the interrupted runs were continued, not duplicated
    rows = [json.loads(line) for f in (out / "ray" / "uti-sft").glob("*/result.json")
            for line in f.read_text().splitlines()]
    assert max(r["step"] for r in rows) == 60
    resumed = [r for r in rows if r.get("iterations_since_restore") == 1 and r["step"] > 10]
    assert resumed, "the interrupted trials started over instead of going on from their checkpoints"


def test_sigkill_during_dpo_then_rerun_gives_the_uninterrupted_result(interrupted, small_run):
    sigkill, out, client = interrupted["sigkill"], interrupted["out"], interrupted["client"]
    assert not sigkill["results"]
    progress = sigkill["progress"]
    assert "uti/sft" in progress["done"] and "uti/dpo" not in progress["done"]
    sft_checkpoint = progress["done"]["uti/sft"]["entry"]["checkpoint"]

    last = interrupted["last"]
    assert last["code"] == 0, last["stderr"][-3000:]
    assert "going on where it stopped" in last["stderr"]
    results = json.loads((out / "results.json").read_text())
    # SFT was not trained again, and the selections and test scores are those of the run never stopped
    assert results["tasks"]["uti"]["stages"]["sft"]["checkpoint"] == sft_checkpoint
    _same_as_uninterrupted(results, small_run[1])

    # MLflow: one run per trial (no duplicates from the later processes), none left RUNNING, each
    # curve point logged once
    runs = _statuses(client)
    assert {r.info.status for r in runs} == {"FINISHED"}
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2 + 3 and len({r.data.tags["clinft.trial_id"] for r in trials}) == 5
    assert len([r for r in runs if r.data.tags.get("clinft.kind") == "study"]) == 1
    assert len([r for r in runs if r.data.tags.get("clinft.stage") == "base"]) == 1
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")]
        assert len(steps) == len(set(steps)), run.info.run_name
        assert run.data.metrics["cpu_hours"] > 0


def test_aws_keys_in_the_shell_reach_no_ray_log_when_storage_is_local(interrupted):
    """Ray Tune copies the driver's AWS variables into every trial's runtime environment and Ray logs
    runtime environments in plain text (runtime_env_agent.log); with storage that is not on S3,
    clinft-ray withholds them from Ray. Nothing of the three runs' Ray folder holds them."""
    logs = list(interrupted["ray_tmp"].rglob("*.log"))
    assert any(p.name == "runtime_env_agent.log" for p in logs), "the runs' Ray logs are not where the test looks"
    leaked = [str(p) for p in interrupted["ray_tmp"].rglob("*") if p.is_file()
              and any(v.encode() in p.read_bytes() for v in AWS_CANARY.values())]
    assert not leaked
