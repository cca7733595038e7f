"""What runs inside a trial's worker (`clinft_ray.trial`): DevReport's dev plateau and kept-checkpoint
marks against hand-worked eval sequences, and the newest whole checkpoint a retried trial goes on from."""

from __future__ import annotations

from ray.tune import Checkpoint

from clinft_ray.modeling import MANIFEST, read_manifest
from clinft_ray.trial import newest_whole

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
    assert [r["keep/dev"] for r in rows] == [0.67, float("-inf"), float("-inf")]
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
