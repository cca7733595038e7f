"""Paired statistics between two models scored on the same test examples (driver; scipy, statsmodels).

Every effect is A minus B for a pair (A, B) such as (base, SFT): a negative difference means B scored
higher. Every interval is 95% (`CONFIDENCE`). No function returns NaN or inf: where a number is
undefined (a t statistic with zero variance, a CI from one example) it is None.

- McNemar's test of per-example correctness (so of accuracy, not F1). Only discordant pairs count:
  b = examples A got right and B wrong, c = the reverse. With fewer than `EXACT_BELOW` discordant pairs
  the exact binomial test is used (two-sided, B(b + c, 1/2)); otherwise the chi-square statistic with
  continuity correction, (|b - c| - 1)^2 / (b + c), on 1 degree of freedom (statsmodels'
  `mcnemar(exact=...)` chosen automatically). Effect (`discordant_b`, `discordant_c` and): the conditional odds ratio b / c (> 1: A right
  more often) with a Wald CI on the log scale, exp(log(b / c) +- 1.96 sqrt(1/b + 1/c)); when b or c is
  0, 0.5 is added to both (Haldane-Anscombe), so the ratio and its CI stay finite.
- The two-tailed paired t-test (`scipy.stats.ttest_rel`) for scores such as Likert ratings. Effect:
  the mean difference with its t-based CI and Cohen's d_z = mean difference / SD of the differences.
- `paired_bootstrap`: a CI of the difference of any metric (F1, accuracy, judge mean) between A and B,
  resampling test examples jointly (`scipy.stats.bootstrap(paired=True)`, BCa; percentile where BCa
  is undefined, e.g. every resample equal).
- Multiple comparisons over a family of p-values: Bonferroni (p < alpha / m) or Holm's step-down
  (statsmodels' `multipletests`); see `study_statistics` in `analysis` for what m counts.
- `wilson`: the Wilson score CI of a proportion (statsmodels' `proportion_confint`), for the clinical
  metrics (sensitivity, specificity, PPV, NPV).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

EXACT_BELOW = 25
CONFIDENCE = 0.95
Z = float(sps.norm.ppf(0.5 + CONFIDENCE / 2))  # 1.959964...


@dataclass(frozen=True)
class TestResult:
    """A test's name, statistic (None where undefined), two-sided p-value, and effect sizes."""

    test: str
    statistic: float | None
    p_value: float
    effect: dict[str, Any] = field(default_factory=dict)


def discordant(a_correct: list[bool], b_correct: list[bool]) -> tuple[int, int]:
    """(b, c): examples A got right and B wrong, and the reverse."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired outcomes differ in length: {len(a_correct)} vs {len(b_correct)}")
    b = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if x and not y)
    c = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if y and not x)
    return b, c


def odds_ratio(b: int, c: int) -> dict[str, Any]:
    """McNemar's conditional odds ratio b / c with its 95% Wald CI on the log scale; 0.5 is added
    to b and c when either is 0 (Haldane-Anscombe), so every value is finite."""
    method = "wald_log"
    if b == 0 or c == 0:
        b, c, method = b + 0.5, c + 0.5, "wald_log_haldane"
    ratio = b / c
    half = Z * math.sqrt(1 / b + 1 / c)
    return {"odds_ratio": ratio, "odds_ratio_ci": [ratio * math.exp(-half), ratio * math.exp(half)],
            "odds_ratio_method": method}


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> TestResult:
    """McNemar's test on paired binary outcomes (same examples, same order), with b, c and the odds ratio."""
    b, c = discordant(a_correct, b_correct)
    n = b + c
    effect = {"discordant_b": b, "discordant_c": c, **odds_ratio(b, c)}
    if n == 0:
        return TestResult("mcnemar_exact", 0.0, 1.0, effect)
    if n < EXACT_BELOW:
        return TestResult("mcnemar_exact", float(min(b, c)), float(sps.binomtest(min(b, c), n, 0.5).pvalue), effect)
    stat = (abs(b - c) - 1) ** 2 / n
    return TestResult("mcnemar_chi2", float(stat), float(sps.chi2.sf(stat, df=1)), effect)


def paired_t(a_scores: list[float], b_scores: list[float]) -> TestResult:
    """Two-tailed paired t-test of A - B, with the mean difference, its 95% CI and Cohen's d_z.

    Edge cases: identical lists give t = 0, p = 1, difference 0, CI [0, 0], d_z 0. A constant nonzero
    difference (zero variance) gives p = 0 with t and d_z None (infinite) and CI [d, d]. One example
    gives p = 1 (nothing to test) with t, d_z and the CI None."""
    if len(a_scores) != len(b_scores):
        raise ValueError(f"paired scores differ in length: {len(a_scores)} vs {len(b_scores)}")
    if not a_scores:
        raise ValueError("paired scores are empty; score at least one test example")
    d = np.asarray(a_scores, dtype=float) - np.asarray(b_scores, dtype=float)
    mean = float(d.mean())
    if not d.any():
        return TestResult("paired_t", 0.0, 1.0, {"mean_diff": 0.0, "mean_diff_ci": [0.0, 0.0], "d_z": 0.0})
    if len(d) == 1:
        return TestResult("paired_t", None, 1.0, {"mean_diff": mean, "mean_diff_ci": None, "d_z": None})
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return TestResult("paired_t", None, 0.0, {"mean_diff": mean, "mean_diff_ci": [mean, mean], "d_z": None})
    res = sps.ttest_rel(a_scores, b_scores)
    ci = res.confidence_interval(CONFIDENCE)
    return TestResult("paired_t", float(res.statistic), float(res.pvalue),
                      {"mean_diff": mean, "mean_diff_ci": [float(ci.low), float(ci.high)], "d_z": mean / sd})


def bootstrap_ci(statistic: Callable[..., Any], data: tuple[Any, ...], n_resamples: int, seed: int) -> dict[str, Any]:
    """95% bootstrap CI of `statistic(*data, axis=-1)`, resampling the examples of all of `data` jointly.

    `data` holds equal-length 1-D arrays, one value per test example (e.g. gold labels and one
    stage's predictions, or those and a second stage's); `statistic` must be vectorized along `axis`.
    BCa where defined, else the percentile interval of the resamples; one example gives
    [observed, observed] (every resample is that example). Returns `value`, `ci`, `method`, `n_resamples`."""
    arrays = tuple(np.asarray(x) for x in data)
    observed = float(statistic(*arrays, axis=-1))
    if len(arrays[0]) < 2:
        return {"value": observed, "ci": [observed, observed], "method": "single_example", "n_resamples": 0}
    with warnings.catch_warnings():  # degenerate resamples (all equal) are handled below
        warnings.simplefilter("ignore")
        res = sps.bootstrap(arrays, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                            confidence_level=CONFIDENCE, method="BCa", rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    method = "bca"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        dist = res.bootstrap_distribution
        tail = (1 - CONFIDENCE) / 2 * 100
        lo, hi = (float(v) for v in np.percentile(dist, [tail, 100 - tail]))
        method = "percentile"
    return {"value": observed, "ci": [lo, hi], "method": method, "n_resamples": n_resamples}


def paired_bootstrap(statistic: Callable[..., Any], data: tuple[Any, ...], n_resamples: int,
                     seed: int) -> dict[str, Any]:
    """`bootstrap_ci` of a difference between two stages on the same examples (`statistic` returns
    metric(A) - metric(B)), as `results.json` keeps it: `diff`, `ci`, `method`, `n_resamples`."""
    res = bootstrap_ci(statistic, data, n_resamples, seed)
    return {"diff": res.pop("value"), **res}


# -- metrics of coded labels, vectorized for the bootstrap -------------------------------------------

def f1_codes(gold: np.ndarray, pred: np.ndarray, positives: list[int], axis: int = -1) -> np.ndarray:
    """Mean over `positives` of each class's F1 = 2 TP / (2 TP + FP + FN), 0 where that is 0 / 0
    (scikit-learn's `zero_division=0`). Labels are integer codes; a code outside `positives` (an
    unparseable answer) is never a true positive."""
    scores = []
    for k in positives:
        tp = np.sum((gold == k) & (pred == k), axis=axis)
        fp = np.sum((gold != k) & (pred == k), axis=axis)
        fn = np.sum((gold == k) & (pred != k), axis=axis)
        denom = 2 * tp + fp + fn
        scores.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(scores, axis=0)


def accuracy_codes(gold: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(gold == pred, axis=axis)


# -- multiple comparisons ------------------------------------------------------------------------

def bonferroni_threshold(alpha: float, m: int) -> float:
    """The per-comparison threshold: alpha / m."""
    if m < 1:
        raise ValueError(f"Bonferroni needs m >= 1 comparisons, got {m}")
    return alpha / m


def adjust(p_values: list[float], alpha: float, method: str, m: int) -> list[tuple[float, bool]]:
    """(adjusted p, significant) per p-value of one family.

    bonferroni: adjusted p = min(1, p m), significant when p < alpha / m (`m` may exceed the family,
    as when the paper's m counts outcomes and not the three pairs). holm: statsmodels' step-down over
    this family, adjusted p compared with alpha (its m is the family size)."""
    if method == "bonferroni":
        cut = bonferroni_threshold(alpha, m)
        return [(min(1.0, p * m), p < cut) for p in p_values]
    if method == "holm":
        from statsmodels.stats.multitest import multipletests

        reject, adjusted, _, _ = multipletests(p_values, alpha=alpha, method="holm")
        return [(float(q), bool(r)) for q, r in zip(adjusted, reject, strict=True)]
    raise ValueError(f"correction {method!r} is not bonferroni or holm")


# -- clinical metrics -----------------------------------------------------------------------------

def wilson(k: int, n: int) -> list[float] | None:
    """The 95% Wilson score interval of k / n; None when n is 0 (the proportion is undefined)."""
    if n == 0:
        return None
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(k, n, alpha=1 - CONFIDENCE, method="wilson")
    return [float(lo), float(hi)]


def proportion(k: int, n: int) -> dict[str, Any]:
    """k / n with its Wilson CI; value and CI None when n is 0."""
    return {"value": k / n if n else None, "ci": wilson(k, n), "k": k, "n": n}


def one_vs_rest(gold: list[str], pred: list[str], label: str) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV of `label` (any other prediction, unparseable answers
    included, counts as negative), each a `proportion`."""
    tp = sum(1 for g, p in zip(gold, pred, strict=True) if g == label and p == label)
    fn = sum(1 for g, p in zip(gold, pred, strict=True) if g == label and p != label)
    fp = sum(1 for g, p in zip(gold, pred, strict=True) if g != label and p == label)
    tn = len(gold) - tp - fn - fp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": proportion(tp, tp + fn),
            "specificity": proportion(tn, tn + fp), "ppv": proportion(tp, tp + fp), "npv": proportion(tn, tn + fn)}


CLINICAL = ("sensitivity", "specificity", "ppv", "npv")


def clinical_metrics(labels: list[str], positive: str | None, gold: list[str], pred: list[str],
                     no_label: str) -> dict[str, Any]:
    """Confusion matrix (rows gold, columns predicted, `no_label` last) and the clinical metrics: of
    the positive label, or per label with their macro averages (means of the defined values, no CI)."""
    from sklearn.metrics import confusion_matrix

    columns = [*labels, no_label]
    counts = confusion_matrix(gold, pred, labels=columns).tolist()[: len(labels)]
    out: dict[str, Any] = {"confusion": {"gold": labels, "predicted": columns, "counts": counts}}
    chosen = [positive] if positive is not None else labels
    out["per_label"] = {lab: one_vs_rest(gold, pred, lab) for lab in chosen}
    out["positive_label"] = positive
    if positive is None:
        macro = {}
        for m in CLINICAL:
            vals = [v[m]["value"] for v in out["per_label"].values() if v[m]["value"] is not None]
            macro[m] = sum(vals) / len(vals) if vals else None
        out["macro"] = macro
    return out
