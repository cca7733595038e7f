"""Cluster mode on one machine: pre-flight checks, storage outside the output folder, checkpoints behind
URIs, finished studies not run again, and a trial trained by two Ray Train workers (gloo) under Tune."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from clinft_ray.config import ConfigError, Resources, load_study
from clinft_ray.preflight import PreflightError, TrialResources, check_storage, check_tracking, trial_resources

ONE_GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


@pytest.mark.parametrize(
    ("resources", "cluster", "expected"),
    [
        ({"gpus_per_trial": "auto"}, ONE_GPU_NODE, TrialResources(gpus=1.0, cpus=1.0)),
        ({"gpus_per_trial": "auto"}, {"CPU": 2.0}, TrialResources(gpus=0.0, cpus=1.0)),
        ({"gpus_per_trial": 0.5}, ONE_GPU_NODE, TrialResources(gpus=0.5, cpus=1.0)),  # two LoRA trials per GPU
        ({"gpus_per_trial": 4, "cpus_per_trial": 2}, {"CPU": 16.0, "GPU": 8.0}, TrialResources(1.0, 2.0, 4)),
        ({"gpus_per_trial": 0, "workers_per_trial": 2, "cpus_per_trial": 0.5}, {"CPU": 2.0}, TrialResources(0, .5, 2)),
    ],
)
def test_trial_resources(resources, cluster, expected):
    found = trial_resources(Resources(**resources), cluster)
    assert found == expected
    # 4 GPUs x 2 CPUs per worker hold 4 GPUs and 8 CPUs: what the trial's device-hours are billed on
    assert found.total() == {"CPU": expected.cpus * expected.workers, "GPU": expected.gpus * expected.workers}


@pytest.mark.parametrize(
    ("resources", "cluster", "message"),
    [
        ({"gpus_per_trial": 4}, ONE_GPU_NODE, "gpus_per_trial is 4 but Ray sees 1 GPUs"),
        ({"gpus_per_trial": 1}, {"CPU": 8.0}, "gpus_per_trial is 1 but Ray sees 0 GPUs"),
        ({"cpus_per_trial": 4}, {"CPU": 2.0}, "a trial needs 4 CPUs"),
        ({"workers_per_trial": 2}, {"CPU": 2.0}, "needs 2.01 CPUs (2 workers x 1 + its driver)"),
    ],
)
def test_a_trial_the_cluster_cannot_hold_is_refused_before_it_waits(resources, cluster, message):
    with pytest.raises(PreflightError, match=re.escape(message)):
        trial_resources(Resources(**resources), cluster)


@pytest.mark.parametrize(
    ("resources", "message"),
    [({"gpus_per_trial": 1.5}, "above 1 it must be a whole number"),
     ({"gpus_per_trial": 4, "workers_per_trial": 2}, "one worker per GPU")],
)
def test_impossible_resource_configs_are_config_errors(demo_dir, resources, message):
    sets = [f"resources.{k}={v}" for k, v in resources.items()]
    with pytest.raises(ConfigError, match=message):
        load_study(demo_dir / "study.yaml", sets)


def test_tracking_server_that_does_not_answer_fails_within_seconds():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PreflightError, match=rf"mlflow.tracking_uri http://127.0.0.1:{port} does not answer"):
        check_tracking(f"http://user:secret@127.0.0.1:{port}")
    try:
        check_tracking(f"http://user:secret@127.0.0.1:{port}")
    except PreflightError as err:
        assert "secret" not in str(err)  # credentials never reach an error message
    check_tracking("sqlite:////tmp/x.db")  # a local store has nothing to ask


def test_storage_must_be_writable(tmp_path):
    check_storage(str(tmp_path / "new" / "folder"))
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())
    check_storage((tmp_path / "uri").as_uri())  # a URI goes through pyarrow's filesystems, as Ray's does
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PreflightError, match="storage_path .*a-file/ray is not writable"):
        check_storage(str(tmp_path / "a-file" / "ray"))


def test_checkpoint_behind_a_uri_is_fetched_once_into_the_node_cache(tmp_path, monkeypatch):
    from clinft_ray.modeling import MANIFEST, checkpoint_ref, local_checkpoint

    monkeypatch.setenv("CLINFT_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "storage" / "trial" / "checkpoint_000"
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text(json.dumps({"finetune": "full"}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    ref = checkpoint_ref(str(ckpt), "file:///somewhere")
    assert ref == f"file://{ckpt}"
    assert checkpoint_ref(str(ckpt), str(tmp_path)) == str(ckpt)  # a shared folder stays a path
    local = local_checkpoint(ref)
    assert local.parent == tmp_path / "cache" / "checkpoints"
    assert (local / "model.safetensors").read_bytes() == b"weights"
    assert not list(local.parent.glob("*.part-*"))
    (ckpt / "model.safetensors").write_bytes(b"changed")
    assert (local_checkpoint(ref) / "model.safetensors").read_bytes() == b"weights"  # cached, not fetched again


def test_storage_path_defaults_to_the_output_folder_and_resolves_like_a_path(demo_dir, tmp_path):
    assert load_study(demo_dir / "study.yaml").config.storage_path == str(demo_dir / "ray")
    shared = load_study(demo_dir / "study.yaml", ["storage_path=shared/ray"]).config.storage_path
    assert shared == str(demo_dir / "shared" / "ray")
    assert load_study(demo_dir / "study.yaml", ["storage_path=s3://bucket/x"]).config.storage_path == "s3://bucket/x"


def test_a_finished_study_is_not_run_again_and_another_one_is_not_overwritten(demo_run):
    from clinft_ray.study import finished, run_study, study_fingerprint

    study, results = demo_run
    stamp = (study.config.output_dir / "results.json").stat().st_mtime_ns
    assert run_study(study) == results
    assert (study.config.output_dir / "results.json").stat().st_mtime_ns == stamp  # not run again
    # where the study runs does not change what it is
    moved = load_study(study.source, ["ray.num_cpus=2", "resources.cpus_per_trial=2"])
    assert study_fingerprint(moved) == results["fingerprint"]
    # nor do the statistics and prices: `clinft report` redoes those
    reported = load_study(study.source, ["stats.alpha=0.01", "stats.correction=holm", "cost.gpu_hour_usd=3.1"])
    assert study_fingerprint(reported) == results["fingerprint"]
    other = load_study(study.source, ["seed=1", "model.max_length=200"])
    with pytest.raises(PreflightError, match=r"holds the finished study 'uti-demo' with another config or data "
                                             r"\(differing: model.max_length, seed\)"):
        finished(other, study_fingerprint(other))


SMALL_SFT = "stage: sft\nlearning_rate: {grid: [1.0e-2]}\nmax_steps: 20\neval_steps: 10\nbatch_size: 8\n"
SMALL_DPO = "stage: dpo\nlearning_rate: {grid: [1.0e-3]}\nbeta: {grid: [0.1]}\nmax_steps: 10\neval_steps: 5\nbatch_size: 8\n"


@pytest.mark.slow
def test_two_worker_trials_train_under_tune_with_storage_outside_the_output(demo_dir, ray_session, tmp_path):
    """gpus_per_trial: 4 on a GPU cluster; here 2 CPU workers on gloo: a TorchTrainer inside each trial."""
    from mlflow.tracking import MlflowClient

    from clinft_ray.modeling import read_manifest
    from clinft_ray.study import run_study

    (tmp_path / "sft.yaml").write_text(SMALL_SFT)
    (tmp_path / "dpo.yaml").write_text(SMALL_DPO)
    storage = tmp_path / "shared"
    study = load_study(demo_dir / "study.yaml", [
        f"sft.space={tmp_path / 'sft.yaml'}", f"dpo.space={tmp_path / 'dpo.yaml'}", f"storage_path={storage}",
        "resources.workers_per_trial=2", "resources.cpus_per_trial=0.5"], output_dir=str(tmp_path / "out"))
    results = run_study(study)

    stages = results["tasks"]["uti"]["stages"]
    sft_ckpt, dpo_ckpt = Path(stages["sft"]["checkpoint"]), Path(stages["dpo"]["checkpoint"])
    assert sft_ckpt.is_relative_to(storage) and dpo_ckpt.is_relative_to(storage)  # the trials' shared storage
    assert not (tmp_path / "out" / "ray").exists()
    assert read_manifest(dpo_ckpt)["init_from"] == str(sft_ckpt)
    assert stages["sft"]["test"]["f1"] > stages["base"]["test"]["f1"]  # the 2-worker SFT trial learned
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("uti-demo").experiment_id])
    trials = [r for r in runs if "clinft.trial" in r.data.tags]
    assert len(trials) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in trials:
        assert run.data.metrics["system/workers"] == 2
        # device-hours bill both workers: 2 x 0.5 CPUs for the trial's wall time
        assert run.data.metrics["cpu_hours"] == pytest.approx(run.data.metrics["wall_s"] / 3600, rel=1e-6)
