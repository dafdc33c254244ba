"""Small-sample statistics of seeded runs, without scipy: Student's t distribution (through the
regularised incomplete beta function), Welch's and the paired t-test, and the seeds a paired test
needs.

The comparisons of :mod:`msff.engine.experiment` use these; they are checked against values
computed independently with mpmath (``tests/engine/test_stats.py``).

Example:
    >>> round(t_quantile(0.975, 4), 3)
    2.776
    >>> r = paired_test({0: 0.50, 1: 0.55, 2: 0.60}, {0: 0.45, 1: 0.49, 2: 0.56})
    >>> round(r["diff"], 3), round(r["p"], 3)
    (0.05, 0.013)
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "betainc",
    "mean_std",
    "minimum_detectable_difference",
    "paired_test",
    "seeds_for_power",
    "t_quantile",
    "t_two_sided_p",
    "welch_test",
]


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) (continued fraction, Numerical Recipes §6.4).

    Args:
        a, b: shape parameters (> 0).
        x: upper limit of the integral, clipped to [0, 1].

    Returns:
        I_x(a, b) in [0, 1] (relative error ~1e-12 for the t-test's arguments).

    Example:
        >>> round(betainc(2.0, 3.0, 0.4), 6)   # = 0.5248 (polynomial form: 1 - (1-x)^4 - 4x(1-x)^3)
        0.5248
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)  # the fraction converges fast on this side
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * f


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| ≥ |t|) of Student's t with ``df`` degrees of freedom.

    Example:
        >>> round(t_two_sided_p(2.776445, 4), 4)
        0.05
    """
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom (bisection on the CDF).

    Returns:
        t with P(T ≤ t) = q; NaN for q outside (0, 1) or df ≤ 0.

    Example:
        >>> round(t_quantile(0.975, 4), 3)
        2.776
    """
    if not 0 < q < 1 or not df > 0:
        return float("nan")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    target = 2 * (1 - q)  # two-sided tail probability of |T| > t
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_std(values: Sequence[Optional[float]]) -> dict:
    """``{"mean", "std" (sample std, ddof 1; 0 for one value), "n"}`` of the finite values (None and
    NaN are left out; no value: NaN mean and std, n 0).

    Example:
        >>> mean_std([0.25, 0.5, None, float("nan"), 0.75])
        {'mean': 0.5, 'std': 0.25, 'n': 3}
    """
    a = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def welch_test(a: Mapping, b: Mapping) -> dict:
    """Welch's unequal-variance t-test of two ``{"mean", "std", "n"}`` summaries (std: sample std).

    Returns:
        ``{"diff": a − b, "t", "df" (Welch–Satterthwaite), "p" (two-sided)}``; NaN where undefined
        (fewer than 2 runs, or zero spread in both).

    Example:
        >>> round(welch_test({"mean": 1.0, "std": 0.1, "n": 3}, {"mean": 0.8, "std": 0.1, "n": 3})["p"], 3)
        0.07
    """
    diff = a["mean"] - b["mean"]
    nan = float("nan")
    if a["n"] < 2 or b["n"] < 2:
        return {"diff": diff, "t": nan, "df": nan, "p": nan}
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    if va + vb <= 0:
        return {"diff": diff, "t": nan, "df": nan, "p": nan}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1))
    return {"diff": diff, "t": t, "df": df, "p": t_two_sided_p(t, df)}


def paired_test(a: Mapping, b: Mapping, confidence: float = 0.95) -> dict:
    """Paired t-test of per-seed values ``a[seed] − b[seed]`` over the seeds both have.

    Args:
        a, b: ``{seed: value}`` (e.g. test IoU of a model and of the reference per seed); None or
            NaN values drop their seed.
        confidence: level of the confidence interval of the mean difference.

    Returns:
        ``{"n", "seeds", "diff" (mean difference), "sd" (sample std of the differences),
        "ci_low", "ci_high", "t", "df", "p" (two-sided), "dz" (Cohen's d_z = diff / sd)}``;
        NaN where undefined (fewer than 2 pairs; zero spread gives t, p, d_z NaN).

    Example:
        >>> r = paired_test({0: 0.50, 1: 0.55, 2: 0.60}, {0: 0.45, 1: 0.49, 2: 0.56})
        >>> round(r["diff"], 3), round(r["p"], 3)
        (0.05, 0.013)
    """
    nan = float("nan")
    seeds = sorted(k for k in set(a) & set(b)
                   if a[k] is not None and b[k] is not None and math.isfinite(a[k]) and math.isfinite(b[k]))
    d = np.array([a[k] - b[k] for k in seeds], dtype=np.float64)
    n = int(d.size)
    out = {"n": n, "seeds": seeds, "diff": float(d.mean()) if n else nan, "sd": nan, "ci_low": nan, "ci_high": nan,
           "t": nan, "df": nan, "p": nan, "dz": nan}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * se
    out.update(sd=sd, df=n - 1, ci_low=out["diff"] - half, ci_high=out["diff"] + half)
    if sd > 0:
        t = out["diff"] / se
        out.update(t=t, p=t_two_sided_p(t, n - 1), dz=out["diff"] / sd)
    return out


def seeds_for_power(sd: float, delta: float = 0.02, alpha: float = 0.05, power: float = 0.8, max_n: int = 100_000) -> int:
    """Seeds (pairs) a two-sided paired t-test needs to detect a mean difference ``delta`` with
    probability ``power`` at level ``alpha`` when the per-seed differences spread with std ``sd``.

    Uses the usual shifted-central-t approximation n ≥ ((t_{1−α/2, n−1} + t_{power, n−1}) · sd/delta)²
    (within one seed of the exact noncentral-t answer for n ≥ 5). Returns ``max_n`` when even that
    is not enough, and 2 when ``sd`` is 0.

    Example:
        >>> seeds_for_power(0.05, 0.02)   # d_z = 0.4: G*Power's exact answer is 52
        52
    """
    if not (sd > 0) or not math.isfinite(sd):
        return 2
    n = max(2, int((2.8 * sd / abs(delta)) ** 2) - 2)
    while n < max_n:
        need = ((t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / abs(delta)) ** 2
        if n >= need:
            return n
        n += 1
    return max_n


def minimum_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest mean difference a paired t-test over ``n`` seeds detects with ``power`` (the
    approximation of :func:`seeds_for_power`).

    Example:
        >>> round(minimum_detectable_difference(0.05, 52), 4) <= 0.02
        True
    """
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)
