"""Paired statistics against hand-worked values (arithmetic in each docstring)."""

import math

import pytest

from clinft_ray.stats import EXACT_BELOW, bonferroni_threshold, mcnemar, paired_t


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
