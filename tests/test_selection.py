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
