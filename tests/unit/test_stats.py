"""Paired statistics against hand-worked values (arithmetic in each docstring)."""

import json
import math

import numpy as np
import pytest

from clinft_ray.stats import (
    EXACT_BELOW,
    accuracy_codes,
    adjust,
    bonferroni_threshold,
    clinical_metrics,
    f1_codes,
    mcnemar,
    paired_bootstrap,
    paired_t,
    proportion,
    wilson,
)


def pairs(b: int, c: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """Outcomes with b pairs (A right, B wrong), c pairs (A wrong, B right) and concordant padding."""
    a = [True] * b + [False] * c + [True] * both + [False] * neither
    bb = [False] * b + [True] * c + [True] * both + [False] * neither
    return a, bb


def test_mcnemar_exact_small_discordant_count():
    """b=1, c=9: n = 10 < 25, exact two-sided binomial B(10, 1/2).

    p = 2 * sum_{k<=1} C(10, k) / 2^10 = 2 * (1 + 10) / 1024 = 22 / 1024 = 0.021484375.
    """
    res = mcnemar(*pairs(1, 9))
    assert res.test == "mcnemar_exact"
    assert res.statistic == 1.0  # min(b, c)
    assert res.p_value == pytest.approx(0.021484375, abs=1e-12)


def test_mcnemar_ignores_concordant_pairs_and_is_symmetric():
    """Concordant pairs (both right, both wrong) carry no information; swapping A and B keeps p."""
    a, b = pairs(1, 9, both=50, neither=7)
    assert mcnemar(a, b).p_value == pytest.approx(0.021484375, abs=1e-12)
    assert mcnemar(b, a).p_value == pytest.approx(0.021484375, abs=1e-12)


def test_mcnemar_balanced_discordant_gives_p_one():
    """b = c = 5: the observed count sits at the binomial mean, so the two-sided p is 1."""
    assert mcnemar(*pairs(5, 5)).p_value == pytest.approx(1.0)


def test_mcnemar_chi2_with_continuity_correction():
    """b=10, c=30: n = 40 >= 25, chi-square with continuity correction on 1 df.

    stat = (|10 - 30| - 1)^2 / 40 = 19^2 / 40 = 361 / 40 = 9.025.
    With 1 df, p = P(Z^2 > x) = erfc(sqrt(x / 2)) = erfc(sqrt(4.5125)) = 0.0026631192591...
    """
    res = mcnemar(*pairs(10, 30))
    assert res.test == "mcnemar_chi2"
    assert res.statistic == pytest.approx(9.025)
    assert res.p_value == pytest.approx(math.erfc(math.sqrt(9.025 / 2)), rel=1e-9)
    assert res.p_value == pytest.approx(0.0026631192591, rel=1e-9)


def test_mcnemar_switches_to_chi2_at_25_discordant_pairs():
    """n = 24 is exact; n = 25 (b=5, c=20) is chi-square: (|5 - 20| - 1)^2 / 25 = 196 / 25 = 7.84."""
    assert EXACT_BELOW == 25
    assert mcnemar(*pairs(4, 20)).test == "mcnemar_exact"
    res = mcnemar(*pairs(5, 20))
    assert res.test == "mcnemar_chi2"
    assert res.statistic == pytest.approx(7.84)


def test_mcnemar_no_discordant_pairs_gives_p_one():
    assert mcnemar([True, False, True], [True, False, True]).p_value == 1.0


def test_mcnemar_length_mismatch_raises():
    with pytest.raises(ValueError, match="3 vs 2"):
        mcnemar([True, True, False], [True, False])


def test_paired_t_hand_worked():
    """a = [3, 5, 4], b = [1, 2, 3]: differences d = [2, 3, 1], n = 3.

    mean d = 2; sd = sqrt(((0)^2 + 1^2 + (-1)^2) / (3 - 1)) = 1; t = 2 / (1 / sqrt 3) = 2 sqrt 3 = 3.4641.
    With 2 df the t distribution has a closed form: P(|T| > t) = 1 - t / sqrt(t^2 + 2)
    = 1 - sqrt(12 / 14) = 1 - sqrt(6 / 7) = 0.0741799...
    """
    res = paired_t([3, 5, 4], [1, 2, 3])
    assert res.test == "paired_t"
    assert res.statistic == pytest.approx(2 * math.sqrt(3))
    assert res.p_value == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-9)


def test_paired_t_sign_follows_a_minus_b():
    """Swapping the lists negates t and keeps the two-tailed p."""
    res = paired_t([1, 2, 3], [3, 5, 4])
    assert res.statistic == pytest.approx(-2 * math.sqrt(3))
    assert res.p_value == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-9)


def test_paired_t_identical_lists_give_p_one():
    res = paired_t([4.0, 2.0, 5.0], [4.0, 2.0, 5.0])
    assert (res.statistic, res.p_value) == (0.0, 1.0)


def test_paired_t_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 vs 3"):
        paired_t([1.0, 2.0], [1.0, 2.0, 3.0])


def test_bonferroni_threshold():
    """The paper's threshold: alpha / m = 0.05 / 5 = 0.01."""
    assert bonferroni_threshold(0.05, 5) == pytest.approx(0.01)
    assert bonferroni_threshold(0.05, 1) == 0.05
    with pytest.raises(ValueError, match="m >= 1"):
        bonferroni_threshold(0.05, 0)


# -- effect sizes ---------------------------------------------------------------------------------

def test_mcnemar_reports_discordant_counts_and_odds_ratio_with_wald_ci():
    """b=10, c=30: OR = b/c = 1/3; SE(log OR) = sqrt(1/10 + 1/30) = sqrt(0.133333) = 0.365148;
    95% CI = exp(log(1/3) +- 1.959964 * 0.365148) = exp(-1.098612 +- 0.715676) = exp(-1.814288), exp(-0.382936)
    = [0.162954, 0.681857]."""
    e = mcnemar(*pairs(10, 30, both=5)).effect
    assert (e["discordant_b"], e["discordant_c"], e["odds_ratio_method"]) == (10, 30, "wald_log")
    assert e["odds_ratio"] == pytest.approx(1 / 3)
    assert e["odds_ratio_ci"] == pytest.approx([math.exp(-1.098612 - 0.715676), math.exp(-1.098612 + 0.715676)],
                                               rel=1e-5)
    assert e["odds_ratio_ci"] == pytest.approx([0.162954, 0.681857], rel=1e-5)


def test_mcnemar_odds_ratio_with_a_zero_cell_uses_haldane():
    """b=0, c=4: 0.5 added to both: OR = 0.5 / 4.5 = 1/9; SE = sqrt(1/0.5 + 1/4.5) = sqrt(2.222222)
    = 1.490712; CI = (1/9) exp(+-1.959964 * 1.490712) = (1/9) exp(+-2.921741) = [0.0059821, 2.063747].
    No discordant pair at all: OR = 0.5/0.5 = 1, CI exp(+-1.959964 * 2) = [0.019841, 50.40044]."""
    e = mcnemar(*pairs(0, 4)).effect
    assert e["odds_ratio_method"] == "wald_log_haldane"
    assert e["odds_ratio"] == pytest.approx(1 / 9)
    assert e["odds_ratio_ci"] == pytest.approx([0.0059821, 2.063747], rel=1e-4)
    none = mcnemar([True, False], [True, False]).effect
    assert none["odds_ratio"] == 1.0 and none["odds_ratio_ci"] == pytest.approx([0.019841, 50.40044], rel=1e-4)


def test_paired_t_mean_difference_ci_and_d_z_hand_worked():
    """a = [3, 5, 4], b = [1, 2, 3]: d = [2, 3, 1], mean 2, sd 1, SE = 1 / sqrt 3 = 0.577350.
    t_{0.975, 2} = 4.302653, so CI = 2 +- 4.302653 * 0.577350 = 2 +- 2.484138 = [-0.484138, 4.484138];
    d_z = mean / sd = 2 / 1 = 2."""
    e = paired_t([3, 5, 4], [1, 2, 3]).effect
    assert e["mean_diff"] == pytest.approx(2.0)
    assert e["mean_diff_ci"] == pytest.approx([-0.484138, 4.484138], rel=1e-5)
    assert e["d_z"] == pytest.approx(2.0)


def test_paired_t_edge_cases_are_defined_never_nan():
    """Identical lists: 0 / p 1; constant difference 1 (sd 0): p 0, CI [1, 1], t and d_z undefined
    (None); one example: p 1 and no CI."""
    same = paired_t([4.0, 2.0], [4.0, 2.0])
    assert same.effect == {"mean_diff": 0.0, "mean_diff_ci": [0.0, 0.0], "d_z": 0.0}
    const = paired_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert (const.statistic, const.p_value) == (None, 0.0)
    assert const.effect == {"mean_diff": 1.0, "mean_diff_ci": [1.0, 1.0], "d_z": None}
    one = paired_t([5.0], [3.0])
    assert (one.statistic, one.p_value, one.effect["mean_diff"], one.effect["mean_diff_ci"]) == (None, 1.0, 2.0, None)
    for res in (same, const, one):
        json.dumps(res.effect, allow_nan=False)
        assert res.statistic is None or math.isfinite(res.statistic)


def test_against_statsmodels():
    """An independent computation: statsmodels' McNemar (exact and chi-square with continuity
    correction) and its t interval of the mean paired difference."""
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
    from statsmodels.stats.weightstats import DescrStatsW

    for b, c in ((1, 9), (10, 30), (7, 3), (20, 20)):
        ours = mcnemar(*pairs(b, c, both=11, neither=4))
        theirs = sm_mcnemar([[11, b], [c, 4]], exact=b + c < EXACT_BELOW, correction=True)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)
        assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-9)
    a = [4.0, 3.0, 5.0, 2.0, 4.0, 5.0]
    bb = [3.0, 3.0, 4.0, 3.0, 2.0, 4.0]
    ci = DescrStatsW(np.subtract(a, bb)).tconfint_mean(alpha=0.05)
    assert paired_t(a, bb).effect["mean_diff_ci"] == pytest.approx(list(ci), rel=1e-9)


# -- bootstrap -------------------------------------------------------------------------------------

def _diff_of_means(u, v, axis):
    return np.mean(u, axis=axis) - np.mean(v, axis=axis)


def test_paired_bootstrap_of_accuracy_difference():
    """A right on 8 of 10 examples, B on 5 of 10: observed difference 0.8 - 0.5 = 0.3; the 95% CI
    holds it, is reproducible with the seed, and stays within the possible range [-1, 1]."""
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], float)
    b = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], float)
    res = paired_bootstrap(_diff_of_means, (a, b), 2000, seed=0)
    assert res["diff"] == pytest.approx(0.3) and res["method"] == "bca" and res["n_resamples"] == 2000
    lo, hi = res["ci"]
    assert -1 <= lo < 0.3 < hi <= 1
    assert paired_bootstrap(_diff_of_means, (a, b), 2000, seed=0) == res
    # resampled jointly: a paired difference that never changes sign gives a CI that never does
    assert paired_bootstrap(_diff_of_means, (a, a - 0.5), 500, seed=1)["ci"] == pytest.approx([0.5, 0.5])


def test_paired_bootstrap_edge_cases():
    """Identical outcomes: 0 with CI [0, 0] (BCa is undefined there; the percentile interval is used);
    one example: [d, d], d = 1 - 0 = 1."""
    x = np.array([1.0, 0.0, 1.0, 1.0])
    same = paired_bootstrap(_diff_of_means, (x, x), 500, seed=0)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and same["method"] == "percentile"
    one = paired_bootstrap(_diff_of_means, (np.array([1.0]), np.array([0.0])), 500, seed=0)
    assert one == {"diff": 1.0, "ci": [1.0, 1.0], "method": "single_example", "n_resamples": 0}


def test_f1_codes_matches_scikit_learn():
    """The vectorized F1 equals scikit-learn's f1_score (binary of one label, and macro), with -1
    (an unparseable answer) among the predictions; and is 0 when a class is absent (0 / 0)."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 50)
    pred = rng.integers(-1, 3, 50)
    assert f1_codes(gold, pred, [1]) == pytest.approx(f1_score(gold, pred, labels=[1], average="macro", zero_division=0))
    assert f1_codes(gold, pred, [0, 1, 2]) == pytest.approx(
        f1_score(gold, pred, labels=[0, 1, 2], average="macro", zero_division=0))
    assert f1_codes(np.array([0, 0]), np.array([0, 0]), [1]) == 0.0
    # hand-worked: gold [1, 1, 0, 0], pred [1, 0, 1, 0]: TP 1, FP 1, FN 1, F1 = 2 / (2 + 1 + 1) = 0.5
    assert f1_codes(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]), [1]) == pytest.approx(0.5)
    assert accuracy_codes(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)


# -- multiple comparisons -------------------------------------------------------------------------

def test_bonferroni_adjust_with_m_beyond_the_family():
    """m = 5 outcomes (pairs not counted): threshold 0.05 / 5 = 0.01; adjusted p = min(1, 5 p):
    0.004 -> 0.02 (significant), 0.02 -> 0.1, 0.3 -> 1."""
    assert adjust([0.004, 0.02, 0.3], 0.05, "bonferroni", 5) == [(pytest.approx(0.02), True),
                                                                 (pytest.approx(0.1), False), (1.0, False)]


def test_holm_step_down_hand_worked():
    """p = [0.01, 0.04, 0.03], alpha 0.05. Sorted 0.01, 0.03, 0.04 against 0.05/3 = 0.0167, 0.05/2 =
    0.025, 0.05/1: 0.01 is rejected, 0.03 > 0.025 stops. Adjusted: 3 x 0.01 = 0.03,
    max(0.03, 2 x 0.03) = 0.06, max(0.06, 1 x 0.04) = 0.06."""
    out = adjust([0.01, 0.04, 0.03], 0.05, "holm", 3)
    assert [q for q, _ in out] == pytest.approx([0.03, 0.06, 0.06])
    assert [s for _, s in out] == [True, False, False]


# -- clinical metrics -----------------------------------------------------------------------------

def test_wilson_interval_hand_worked():
    """k = 8, n = 10, z = 1.959964, z^2 = 3.841459: centre (8 + z^2/2) / (10 + z^2) = 9.920729 / 13.841459
    = 0.716737; half-width z sqrt(0.8 * 0.2 / 10 + z^2 / 400) / (1 + z^2 / 10) = 1.959964 * 0.160011 /
    1.384146 = 0.226578: [0.490159, 0.943315]. n = 0: undefined, None."""
    assert wilson(8, 10) == pytest.approx([0.490159, 0.943315], abs=1e-5)
    assert wilson(0, 0) is None
    assert proportion(0, 0) == {"value": None, "ci": None, "k": 0, "n": 0}


def test_clinical_metrics_of_the_positive_label_hand_worked():
    """gold U U U P P, predicted U U (none) U P: TP 2 (rows 1-2), FN 1 (row 3, unparseable: negative),
    FP 1 (row 4), TN 1 (row 5). Sensitivity 2/3, specificity 1/2, PPV 2/3, NPV 1/2.
    Confusion (rows gold U, P; columns U, P, none): [[2, 0, 1], [1, 1, 0]]."""
    cm = clinical_metrics(["U", "P"], "U", list("UUUPP"), ["U", "U", "none", "U", "P"], "none")
    assert cm["confusion"] == {"gold": ["U", "P"], "predicted": ["U", "P", "none"], "counts": [[2, 0, 1], [1, 1, 0]]}
    u = cm["per_label"]["U"]
    assert (u["tp"], u["fp"], u["fn"], u["tn"]) == (2, 1, 1, 1)
    assert [u[k]["value"] for k in ("sensitivity", "specificity", "ppv", "npv")] == pytest.approx([2 / 3, 0.5, 2 / 3, 0.5])
    assert u["sensitivity"]["ci"] == pytest.approx(wilson(2, 3))
    assert "macro" not in cm


def test_clinical_metrics_macro_and_undefined_values():
    """No positive label: per label and macro means. Nothing predicted U: PPV of U is 0/0, None (and
    left out of the macro mean: PPV of P = 2/4, macro 0.5)."""
    cm = clinical_metrics(["U", "P"], None, list("UUPP"), list("PPPP"), "none")
    assert cm["per_label"]["U"]["ppv"] == {"value": None, "ci": None, "k": 0, "n": 0}
    assert cm["per_label"]["P"]["ppv"]["value"] == pytest.approx(0.5)
    assert cm["macro"]["ppv"] == pytest.approx(0.5)
    assert cm["macro"]["sensitivity"] == pytest.approx((0 + 1) / 2)
    json.dumps(cm, allow_nan=False)
