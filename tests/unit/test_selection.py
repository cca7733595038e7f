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
