"""Paired statistics between two models scored on the same test examples, from scipy.

- McNemar's test for binary outcomes (correct / incorrect). Only discordant pairs count: b = examples
  A got right and B wrong, c = the reverse. With fewer than `EXACT_BELOW` discordant pairs the exact
  binomial test is used (two-sided, B(b + c, 1/2)); otherwise the chi-square statistic with
  continuity correction, (|b - c| - 1)^2 / (b + c), on 1 degree of freedom. This is the same rule as
  statsmodels' `mcnemar(exact=...)` applied automatically.
- The two-tailed paired t-test (`scipy.stats.ttest_rel`) for scores such as Likert ratings.
- Bonferroni: a comparison is significant when p < alpha / m, m the number of tasks by default, as in
  the paper (0.05 / 5 = 0.01).
"""

from __future__ import annotations

from dataclasses import dataclass

from scipy import stats as sps

EXACT_BELOW = 25


@dataclass(frozen=True)
class TestResult:
    test: str
    statistic: float
    p_value: float


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> TestResult:
    """McNemar's test on paired binary outcomes (same examples, same order)."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired outcomes differ in length: {len(a_correct)} vs {len(b_correct)}")
    b = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if x and not y)
    c = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if y and not x)
    n = b + c
    if n == 0:
        return TestResult("mcnemar_exact", 0.0, 1.0)
    if n < EXACT_BELOW:
        return TestResult("mcnemar_exact", float(min(b, c)), float(sps.binomtest(min(b, c), n, 0.5).pvalue))
    stat = (abs(b - c) - 1) ** 2 / n
    return TestResult("mcnemar_chi2", float(stat), float(sps.chi2.sf(stat, df=1)))


def paired_t(a_scores: list[float], b_scores: list[float]) -> TestResult:
    """Two-tailed paired t-test; identical score lists give t = 0, p = 1."""
    if len(a_scores) != len(b_scores):
        raise ValueError(f"paired scores differ in length: {len(a_scores)} vs {len(b_scores)}")
    if all(x == y for x, y in zip(a_scores, b_scores, strict=True)):
        return TestResult("paired_t", 0.0, 1.0)
    res = sps.ttest_rel(a_scores, b_scores)
    return TestResult("paired_t", float(res.statistic), float(res.pvalue))


def bonferroni_threshold(alpha: float, m: int) -> float:
    """The per-comparison threshold: alpha / m."""
    if m < 1:
        raise ValueError(f"Bonferroni needs m >= 1 comparisons, got {m}")
    return alpha / m
