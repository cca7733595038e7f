"""What runs inside a trial's worker (`clinft_ray.trial`): DevReport's dev plateau and kept-checkpoint
marks against hand-worked eval sequences, and the newest whole checkpoint a retried trial goes on from."""

from __future__ import annotations

from ray.tune import Checkpoint

from clinft_ray.modeling import MANIFEST, read_manifest
from clinft_ray.trial import NOT_BEST, newest_whole

from helpers import whole_checkpoint


class _Rows:
    """The `Reporter` side of a trial, keeping the rows it is given (a trial reports through Tune)."""

    world_size, is_chief = 1, True

    def __init__(self):
        self.rows = []

    def report(self, row, folder=None):
        self.rows.append(row)

    def checkpoint(self):
        return None


def _evals(devs, patience, best=(float("-inf"), 0)):
    """Drive DevReport through evals with these dev F1s; (rows pending at each eval, eval it stopped at)."""
    import math

    from transformers import TrainerControl, TrainerState

    from clinft_ray.evaluate import Scored
    from clinft_ray.trial import DevReport

    scores = iter(devs)
    report = DevReport(lambda model: Scored({"f1": next(scores)}, [], {}, []), lambda f, s: None, "f1", _Rows(),
                       best, patience)
    rows = []
    for i in range(len(devs)):
        control = TrainerControl()
        report.on_evaluate(None, TrainerState(global_step=20 * (i + 1)), control, metrics={"eval_loss": 1.0})
        rows.append(report.pending)
        if control.should_training_stop:
            return rows, i + 1
    assert all(math.isfinite(r["dev/f1"]) for r in rows)
    return rows, None


def test_a_trial_stops_at_its_dev_plateau_after_patience_evals():
    # dev F1 by eval: 0.67, 0, 0.67, 1.0 (an equal score is no better)
    rows, stopped = _evals([0.67, 0.0, 0.67, 1.0], patience=2)
    assert stopped == 3 and "dev plateau" in rows[-1]["stopped"]
    assert [r["keep/dev"] for r in rows] == [0.67, NOT_BEST, NOT_BEST]
    assert _evals([0.67, 0.0, 0.67, 1.0], patience=1)[1] == 2
    assert _evals([0.0, 1.0, 1.0, 1.0], patience=1)[1] == 3
    assert _evals([0.67, 0.0, 0.67, 1.0], patience=None)[1] is None  # no patience: every eval
    # a resumed trial keeps its count: one eval without improvement before the interruption
    assert _evals([0.5], patience=2, best=(0.67, 1))[1] == 1


def test_the_newest_whole_checkpoint_beside_a_broken_one_is_used(tmp_path):
    trial = tmp_path / "trial"
    whole_checkpoint(trial / "checkpoint_000000", 10)
    whole_checkpoint(trial / "checkpoint_000001", 20)
    latest = whole_checkpoint(trial / "checkpoint_000002", 30)
    (trial / "checkpoint_000003").mkdir()  # a later copy that never got its manifest
    assert newest_whole(Checkpoint.from_directory(str(latest))).path == str(latest)

    (latest / "adapter_model.safetensors").write_bytes(b"w" * 10)
    found = newest_whole(Checkpoint.from_directory(str(latest)))
    assert found.path == str(trial / "checkpoint_000001") and read_manifest(trial / "checkpoint_000001")["step"] == 20

    for name in ("checkpoint_000000", "checkpoint_000001"):
        (trial / name / MANIFEST).unlink()
    assert newest_whole(Checkpoint.from_directory(str(latest))) is None  # nothing whole: the trial starts over
    assert newest_whole(None) is None


def _ranks_score(rank: int, world: int, port: int, out: dict) -> None:
    """One worker of a two-worker trial (gloo): DevReport's dev metrics under DDP, then FSDP, with a
    grader that would grade each rank differently, as a sampling judge can."""
    import torch.distributed as dist

    from clinft_ray.evaluate import Scored
    from clinft_ray.trial import DevReport

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class Reporter(_Rows):
        world_size, is_chief = world, rank == 0

    for every_rank in (False, True):
        calls = []

        def score(model, calls=calls):
            calls.append(rank)
            return Scored({"f1": 0.5 + rank / 10}, [], {}, [])

        report = DevReport(score, lambda f, s: None, "f1", Reporter(), every_rank_scores=every_rank)
        out[rank, every_rank] = (report.dev_metrics(None)["f1"], len(calls))
    dist.destroy_process_group()


def test_one_rank_scores_under_ddp_and_every_rank_acts_on_rank_0s_score():
    import torch.multiprocessing as mp

    from helpers import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ranks_score, args=(2, free_port(), out), nprocs=2)
        for every_rank, calls in ((False, [1, 0]), (True, [1, 1])):  # DDP: rank 0 alone; FSDP: every rank
            assert [out[r, every_rank][0] for r in (0, 1)] == [0.5, 0.5], "both ranks act on rank 0's score"
            assert [out[r, every_rank][1] for r in (0, 1)] == calls


def test_gpu_peak_memory_is_per_interval_and_gpus_named_by_uuid_are_found(monkeypatch):
    """Without a GPU here, torch's CUDA memory counters and NVML stand in: what is checked is that the
    peak is reset at each read and which NVML lookups CUDA_VISIBLE_DEVICES leads to."""
    import torch

    from clinft_ray.trial import GpuStats, nvml_handles

    peaks, resets = iter([5 * 2**30, 2 * 2**30]), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    stats = GpuStats()
    assert [stats.read()["system/gpu_peak_memory_gb"] for _ in range(2)] == [5.0, 2.0] and len(resets) == 2

    class Nvml:
        def nvmlDeviceGetCount(self):
            return 2

        def nvmlDeviceGetHandleByIndex(self, i):
            return f"index {i}"

        def nvmlDeviceGetHandleByUUID(self, uuid):
            return f"uuid {uuid}"

    nvml = Nvml()
    assert nvml_handles(nvml, "3,1") == ["index 3", "index 1"]
    assert nvml_handles(nvml, "MIG-4f1c, GPU-9a2b") == ["uuid MIG-4f1c", "uuid GPU-9a2b"]
    assert nvml_handles(nvml, None) == ["index 0", "index 1"] and nvml_handles(nvml, "") == []


def test_multi_worker_ddp_does_not_search_for_unused_parameters():
    from clinft_ray.spaces import SearchSpace
    from clinft_ray.trial import trainer_kwargs

    space = SearchSpace(stage="sft", learning_rate=1e-5, max_steps=10, eval_steps=5, batch_size=4)
    assert trainer_kwargs(space, {"learning_rate": 1e-5}, 0, None, "o", 2)["ddp_find_unused_parameters"] is False
    assert "ddp_find_unused_parameters" not in trainer_kwargs(space, {"learning_rate": 1e-5}, 0, None, "o", 1)


def test_activation_checkpointing_is_off_on_cpu_by_default_and_fsdps_own_under_fsdp():
    from clinft_ray.spaces import SearchSpace
    from clinft_ray.trial import trainer_kwargs

    space = SearchSpace(stage="sft", learning_rate=1e-5, max_steps=10, eval_steps=5, batch_size=4)

    def kwargs(*args):
        return trainer_kwargs(space, {"learning_rate": 1e-5}, 0, None, "o", *args)

    assert kwargs()["activation_checkpointing"] is False  # auto, and no GPU here
    assert kwargs(1, "ddp", True)["activation_checkpointing"] is True
    fsdp = kwargs(2, "fsdp", True)
    assert fsdp["activation_checkpointing"] is False and fsdp["fsdp_config"] == {"activation_checkpointing": True}
