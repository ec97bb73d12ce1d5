import numpy as np
import pytest
from scipy.stats import binomtest

from reports import accuracy_interval, mcnemar, verdict


def test_the_interval_covers_a_known_accuracy_about_95_percent_of_the_time():
    """A synthetic classifier of known accuracy, tested on 1,000 images, 400 seeded times."""
    rng = np.random.default_rng(0)
    for true_acc in (0.55, 0.8, 0.97):
        hits = 0
        for _ in range(400):
            correct = int((rng.random(1000) < true_acc).sum())
            low, high = accuracy_interval(correct, 1000)
            hits += low <= true_acc <= high
        # Clopper-Pearson is exact-conservative: at least 95 % in theory; 400 draws scatter by about 1 %.
        assert 0.93 <= hits / 400 <= 0.995, (true_acc, hits)


def test_the_interval_is_exact_at_the_edges_and_narrows_with_more_images():
    assert accuracy_interval(0, 10)[0] == 0.0 and accuracy_interval(10, 10)[1] == 1.0
    assert accuracy_interval(10, 10)[0] == pytest.approx(0.025 ** (1 / 10))  # (lower)^n = 2.5 %, by hand
    small, big = accuracy_interval(80, 100), accuracy_interval(8000, 10000)
    assert small[0] < big[0] < 0.8 < big[1] < small[1]
    with pytest.raises(ValueError):
        accuracy_interval(11, 10)


def test_mcnemar_equals_an_exact_binomial_test_on_the_disagreements():
    rng = np.random.default_rng(1)
    a = rng.random(10000) < 0.80
    b = np.where(rng.random(10000) < 0.9, a, rng.random(10000) < 0.7)  # correlated, as two models are
    t = mcnemar(a, b)
    assert t["a_only"] == int((a & ~b).sum()) and t["b_only"] == int((~a & b).sum())
    assert t["p_value"] == pytest.approx(binomtest(t["a_only"], t["a_only"] + t["b_only"], 0.5).pvalue)
    # by hand on a tiny case: 5 disagreements all one way, p = 2 * (1/2)^5
    assert mcnemar([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0])["p_value"] == pytest.approx(2 / 32)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0  # no disagreement, no evidence


def test_the_verdict_says_whether_the_difference_is_significant():
    assert "beats b at the 5% level" in verdict("a", "b", {"a_only": 60, "b_only": 20, "p_value": 1e-5})
    assert "does not beat" in verdict("a", "b", {"a_only": 25, "b_only": 20, "p_value": 0.55})


def test_the_gap_interval_matches_the_normal_formula_by_hand():
    from reports import difference_interval

    low, high = difference_interval(0.8, 5000, 0.78, 10000)
    se = (0.8 * 0.2 / 5000 + 0.78 * 0.22 / 10000) ** 0.5
    assert low == pytest.approx(0.02 - 1.959964 * se, abs=1e-6) and high == pytest.approx(0.02 + 1.959964 * se, abs=1e-6)
