"""Cluster mode on one machine: pre-flight checks, storage outside the output folder, checkpoints behind
URIs, finished studies not run again, and a trial trained by two Ray Train workers (gloo) under Tune."""

from __future__ import annotations

import re
import socket

import pytest

from clinft_ray.config import ConfigError, Resources, load_study
from clinft_ray.preflight import PreflightError, TrialResources, check_storage, check_tracking, trial_resources

from helpers import REPO

ONE_GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


@pytest.mark.parametrize(
    ("resources", "cluster", "expected"),
    [
        ({"gpus_per_trial": "auto"}, ONE_GPU_NODE, TrialResources(gpus=1.0, cpus=1.0)),
        ({"gpus_per_trial": "auto"}, {"CPU": 2.0}, TrialResources(gpus=0.0, cpus=1.0)),
        ({"gpus_per_trial": 0.5}, ONE_GPU_NODE, TrialResources(gpus=0.5, cpus=1.0)),  # two LoRA trials per GPU
        ({"gpus_per_trial": 4, "cpus_per_trial": 2}, {"CPU": 16.0, "GPU": 8.0}, TrialResources(1.0, 2.0, 4)),
        ({"gpus_per_trial": 0, "workers_per_trial": 2, "cpus_per_trial": 0.5}, {"CPU": 2.0}, TrialResources(0, .5, 2)),
        ({"workers_per_trial": 2}, {"CPU": 8.0, "GPU": 2.0}, TrialResources(1.0, 1.0, 2)),  # auto: a GPU per worker
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
        ({"workers_per_trial": 2}, ONE_GPU_NODE, "gpus_per_trial is 2 (auto: one per worker, workers_per_trial 2) "
                                                 "but Ray sees 1 GPUs"),
        ({"workers_per_trial": 2, "strategy": "fsdp"}, {"CPU": 4.0}, "transformers runs FSDP on GPUs only"),
    ],
)
def test_a_trial_the_cluster_cannot_hold_is_refused_before_it_waits(resources, cluster, message):
    with pytest.raises(PreflightError, match=re.escape(message)):
        trial_resources(Resources(**resources), cluster)


@pytest.mark.parametrize(
    ("resources", "message"),
    [({"gpus_per_trial": 1.5}, "above 1 it must be a whole number"),
     ({"gpus_per_trial": 4, "workers_per_trial": 2}, "one worker per GPU"),
     # validated, these would wait forever for a second GPU, or put two NCCL ranks on one
     ({"gpus_per_trial": 1, "workers_per_trial": 2}, r"1 asks for 2 GPUs\); set gpus_per_trial: 2"),
     ({"gpus_per_trial": 0.5, "workers_per_trial": 2}, "two NCCL ranks on one GPU"),
     ({"gpus_per_trial": 2, "strategy": "fsdp", "finetune": "lora"}, "fsdp with model.finetune lora is not supported")],
)
def test_impossible_resource_configs_are_config_errors(demo_dir, resources, message):
    sets = [f"{'model' if k == 'finetune' else 'resources'}.{k}={v}" for k, v in resources.items()]
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


@pytest.mark.parametrize(("sets", "warned"), [
    (["model.finetune=full", "model.dtype=bfloat16"], "learning rate 1e-06, 1e-07, 1e-08 would train nothing"),
    (["model.finetune=full", "model.dtype=auto"], "in 16 bits on a GPU (model.dtype auto)"),
    (["model.finetune=full", "model.dtype=float32"], None),
    (["model.finetune=lora", "model.dtype=bfloat16"], None),  # the adapter is float32 and unmerged
])
def test_full_fine_tuning_in_16_bits_at_small_learning_rates_is_warned(demo_dir, sets, warned):
    from clinft_ray.preflight import precision_warning

    paper = [f"{stage}.space={REPO / 'tune_spaces' / f'paper_{stage}.yaml'}" for stage in ("sft", "dpo")]
    study = load_study(demo_dir / "study.yaml", [*paper, *sets])
    found = precision_warning(study)
    assert (found is None) if warned is None else (warned in found and "use finetune: lora" in found)


def test_a_worker_that_holds_no_gpu_sees_none(ray_session):
    """Ray 2.49+ leaves a zero-GPU worker the node's CUDA_VISIBLE_DEVICES; clinft's workers clear it."""
    import ray

    from clinft_ray.trial import hide_unheld_gpus

    @ray.remote(num_cpus=0.1)
    def visible() -> str:
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"  # what a GPU node's worker inherits
        hide_unheld_gpus()
        return os.environ["CUDA_VISIBLE_DEVICES"]

    assert ray.get(visible.remote()) == ""
