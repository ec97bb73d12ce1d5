"""How sure a test accuracy is, and whether one model really beats another on the same images.

Exact methods only, so that a small test set or a rare class gets an honest answer:
- an accuracy's 95 % interval is the Clopper-Pearson interval of a binomial proportion (it covers
  the true accuracy at least 95 % of the time, whatever the accuracy and the number of images);
- two models tested on the same images are compared with the exact McNemar test: only the
  images on which exactly one of them is right count, and under "no difference" each of those
  is equally likely to favour either model (a two-sided binomial test with p = 1/2).
"""

import numpy as np


def binomtest(k: int, n: int, p: float = 0.5):
    """scipy's exact binomial test, imported on first use: scipy.stats takes half a second to import, at
    every start of every script that imports this module, and most starts never need it."""
    from scipy.stats import binomtest as scipy_binomtest

    return scipy_binomtest(k, n, p)


def accuracy_interval(correct: int, total: int, level: float = 0.95) -> tuple:
    """Clopper-Pearson interval (low, high) of correct/total, as fractions (0/n and n/n included)."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct}/{total}")
    ci = binomtest(correct, total).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test of two models' per-image correctness on the same images.

    Returns the disagreement counts (a_only: A right and B wrong; b_only: the reverse) and the
    two-sided p-value of "A and B are equally accurate".
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"the two models must be tested on the same images, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def verdict(name_a: str, name_b: str, test: dict, alpha: float = 0.05) -> str:
    """One plain sentence on an exact McNemar result (A is the model with the higher accuracy)."""
    counts = (f"{name_a} alone is right on {test['a_only']} images, {name_b} alone on {test['b_only']}; "
              f"exact McNemar p = {test['p_value']:.3g}")
    if test["p_value"] < alpha:
        return f"{name_a} beats {name_b} at the {alpha:.0%} level ({counts})."
    return f"{name_a} does not beat {name_b} at the {alpha:.0%} level: the difference may be chance ({counts})."


def difference_interval(acc_a: float, n_a: int, acc_b: float, n_b: int, level: float = 0.95) -> tuple:
    """Interval of acc_a - acc_b for two accuracies measured on disjoint image sets (normal approximation).

    For the validation-minus-test gap: the two sets share no image, so their errors are independent.
    The validation accuracy of a kept checkpoint is the best of many epochs, so the gap is biased
    upwards; an interval that excludes 0 says the test images are harder or the choice overfitted.
    """
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    se = (acc_a * (1 - acc_a) / n_a + acc_b * (1 - acc_b) / n_b) ** 0.5
    d = acc_a - acc_b
    return d - z * se, d + z * se
