"""Picking the best (trial, step) on dev: max dev, then fewer steps, then search-space order."""

import pytest

from clinft_ray.selection import Candidate, select_best


def test_best_dev_wins_regardless_of_steps_and_order():
    cands = [
        Candidate("t0", step=10, dev=0.70, order=0),
        Candidate("t1", step=900, dev=0.82, order=1),
        Candidate("t2", step=50, dev=0.81, order=2),
    ]
    assert select_best(cands).trial == "t1"


def test_tie_breaks_to_fewer_steps():
    cands = [Candidate("t0", step=200, dev=0.8, order=0), Candidate("t1", step=50, dev=0.8, order=1)]
    assert select_best(cands) == cands[1]


def test_tie_on_dev_and_steps_breaks_to_lower_order():
    cands = [
        Candidate("t2", step=50, dev=0.8, order=2),
        Candidate("t1", step=50, dev=0.8, order=1),
        Candidate("t3", step=50, dev=0.8, order=3),
    ]
    assert select_best(cands).trial == "t1"


def test_payload_comes_back_with_the_winner():
    marker = object()
    assert select_best([Candidate("t0", 10, 0.5, 0, payload=marker)]).payload is marker


def test_empty_list_raises():
    with pytest.raises(ValueError, match="no trial reported a dev score"):
        select_best([])


def test_trial_order_is_tunes_index_or_under_a_searcher_the_first_report():
    import pandas as pd

    from clinft_ray.selection import trial_order

    assert trial_order("5f3a1_00003", pd.DataFrame({"timestamp": [50]})) == 3
    # Optuna's trials have ids without an index: the one suggested (and so reporting) first comes first
    assert trial_order("a0b9266d", pd.DataFrame({"timestamp": [1700000123, 1700000160]})) == 1700000123
    assert trial_order("a0b9266d", pd.DataFrame({"timestamp": [1700000123]})) < \
        trial_order("6e152819", pd.DataFrame({"timestamp": [1700000190]}))


def _train_checkpoint(run, name: str, step: int, best: float, since_best: int) -> str:
    """A whole clinft-ray checkpoint in a Ray Train run's folder, with the dev state rank 0 saves in it."""
    import json

    from clinft_ray.trial import DEV_STATE

    from helpers import whole_checkpoint

    folder = whole_checkpoint(run / name, step)
    (folder / DEV_STATE).write_text(json.dumps({"best": best, "since_best": since_best}))
    return str(folder)


class _Result:
    """What `candidates` reads of a Tune `Result`."""

    def __init__(self, df, trial_id: str):
        import pyarrow.fs as pafs

        self.metrics_dataframe, self.metrics, self.best_checkpoints = df, {"trial_id": trial_id}, []
        self.filesystem = pafs.LocalFileSystem()


def test_a_multi_worker_trial_keeps_its_best_when_a_restored_sweep_lost_its_early_rows(tmp_path):
    """A sweep restored after its driver stopped: Tune starts its record of a multi-worker trial afresh
    (it holds no Tune checkpoint), so the rows before the stop are gone, but the best checkpoint among
    them is in the Train run's folder with the dev score it was saved at, and it is still selected.
    A row whose checkpoint Train has deleted (neither the best nor the latest) is passed over."""
    import pandas as pd

    from clinft_ray.selection import candidates

    run = tmp_path / "uti-dpo-91c2f_00000"
    best5 = _train_checkpoint(run, "checkpoint_a", step=5, best=1.0, since_best=0)  # before the stop
    latest = _train_checkpoint(run, "checkpoint_c", step=30, best=1.0, since_best=5)
    # After the restore Tune has only the rows from step 10 on; step 20 (dev 1.0) was deleted by Train.
    df = pd.DataFrame({"step": [10, 20, 30], "dev/f1": [0.9, 1.0, 1.0], "trial_id": ["91c2f_00000"] * 3,
                       "checkpoint_path": [str(run / "checkpoint_b"), str(run / "checkpoint_gone"), latest]})
    [found] = candidates([_Result(df, "91c2f_00000")], "f1")
    assert (found.step, found.dev, found.checkpoint) == (5, 1.0, best5)

    # Without the checkpoint of step 5 the best whole one Tune still knows wins: step 30, not the
    # deleted step 20.
    import shutil

    shutil.rmtree(best5)
    [found] = candidates([_Result(df, "91c2f_00000")], "f1")
    assert (found.step, found.checkpoint) == (30, latest)
