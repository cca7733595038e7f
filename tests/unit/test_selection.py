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
