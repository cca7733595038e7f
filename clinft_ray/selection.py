"""Choosing the best (trial, step) of a sweep on the dev split, by the task's metric.

Every trial reports its dev score at each eval interval; the candidate kept is the one with the
highest dev score. Ties break toward fewer training steps (cheaper, and closer to the plateau the
paper read off by hand), then toward the trial listed first (the search-space order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Candidate:
    trial: str
    step: int
    dev: float
    order: int = 0
    payload: Any = None
    checkpoint: str = ""


def select_best(candidates: list[Candidate]) -> Candidate:
    """The best candidate: max dev, then min step, then min order. Raises on an empty list."""
    if not candidates:
        raise ValueError("no trial reported a dev score: every trial failed before its first eval")
    return min(candidates, key=lambda c: (-c.dev, c.step, c.order))
