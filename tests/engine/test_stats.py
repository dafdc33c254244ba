"""msff.engine.stats against values computed independently with mpmath (30 digits), once by hand
below and live for a grid of arguments: t-distribution tails and quantiles, Welch and paired
t-tests, confidence intervals, power."""
import math

import pytest

from msff.engine.stats import (
    betainc,
    mean_std,
    minimum_detectable_difference,
    paired_test,
    seeds_for_power,
    t_quantile,
    t_two_sided_p,
    welch_test,
)

# (t, df, two-sided p) from mpmath: betainc(df/2, 1/2, 0, df/(df+t²), regularized=True)
T_TAILS = [(2.0, 3, 0.1393259685588432), (4.47213595499958, 4, 0.011056493393450072), (1.0, 1, 0.5),
           (0.5, 30, 0.6207230048851273), (3.5, 7.3, 0.009343138528485558), (10.0, 2, 0.00985245702332569)]
# (q, df, t_q) from mpmath.findroot on the same CDF
T_QUANTILES = [(0.975, 4, 2.7764451051977934), (0.975, 9, 2.262157162798205), (0.8, 10, 0.8790578285505889),
               (0.95, 1, 6.313751514675038), (0.975, 200, 1.971896223633909), (0.995, 3, 5.840909309733355)]


@pytest.mark.parametrize("t,df,p", T_TAILS)
def test_two_sided_p_matches_mpmath(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-10)
    assert t_two_sided_p(-t, df) == pytest.approx(p, rel=1e-10)


@pytest.mark.parametrize("q,df,want", T_QUANTILES)
def test_t_quantile_matches_mpmath(q, df, want):
    assert t_quantile(q, df) == pytest.approx(want, rel=1e-9)
    assert t_quantile(1 - q, df) == pytest.approx(-want, rel=1e-9)


def test_t_quantile_undefined_arguments():
    assert math.isnan(t_quantile(0.0, 4)) and math.isnan(t_quantile(1.0, 4)) and math.isnan(t_quantile(0.9, 0))


def test_betainc_closed_forms():
    # I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(2, 3) = 1 - (1-x)^4 - 4x(1-x)^3 (binomial sum); symmetry.
    for x in (0.01, 0.3, 0.5, 0.77, 0.99):
        assert betainc(1, 1, x) == pytest.approx(x, rel=1e-12)
        assert betainc(3.5, 1, x) == pytest.approx(x**3.5, rel=1e-11)
        assert betainc(2, 3, x) == pytest.approx(1 - (1 - x) ** 4 - 4 * x * (1 - x) ** 3, rel=1e-11)
        assert betainc(2.5, 0.5, x) + betainc(0.5, 2.5, 1 - x) == pytest.approx(1.0, abs=1e-13)
    assert betainc(2, 3, 0.0) == 0.0 and betainc(2, 3, 1.0) == 1.0 and betainc(2, 3, -1) == 0.0


def test_betainc_against_live_mpmath():
    mp = pytest.importorskip("mpmath")
    for a in (0.5, 1.5, 4.0, 25.0, 100.0):
        for b in (0.5, 2.0, 7.0):
            for x in (0.05, 0.4, 0.93):
                want = float(mp.betainc(a, b, 0, x, regularized=True))
                assert betainc(a, b, x) == pytest.approx(want, rel=1e-9, abs=1e-300), (a, b, x)


def test_paired_test_t_p_and_ci_against_mpmath():
    # differences 0.02, 0.03, 0.01, 0.03, 0.01: mean 0.02, sd 0.01, t = 2√5, df 4
    a = {0: 0.50, 1: 0.62, 2: 0.41, 3: 0.55, 4: 0.47}
    b = {0: 0.48, 1: 0.59, 2: 0.40, 3: 0.52, 4: 0.46, 9: 0.99}  # seed 9 has no partner: ignored
    r = paired_test(a, b)
    assert r["n"] == 5 and r["seeds"] == [0, 1, 2, 3, 4] and r["df"] == 4
    assert r["diff"] == pytest.approx(0.02, rel=1e-12) and r["sd"] == pytest.approx(0.01, rel=1e-9)
    assert r["t"] == pytest.approx(2 * math.sqrt(5), rel=1e-9) and r["dz"] == pytest.approx(2.0, rel=1e-9)
    assert r["p"] == pytest.approx(0.011056493393450072, rel=1e-8)
    # 95 % CI = 0.02 ± t_{0.975,4} · 0.01/√5 (mpmath: 0.00758336001796236, 0.03241663998203764)
    assert r["ci_low"] == pytest.approx(0.00758336001796236, rel=1e-8)
    assert r["ci_high"] == pytest.approx(0.03241663998203764, rel=1e-8)
    wide = paired_test(a, b, confidence=0.99)
    assert wide["ci_low"] < r["ci_low"] and wide["ci_high"] > r["ci_high"]


def test_paired_test_degenerate_inputs():
    one = paired_test({0: 1.0}, {0: 0.5})
    assert one["n"] == 1 and one["diff"] == 0.5 and math.isnan(one["p"]) and math.isnan(one["ci_low"])
    flat = paired_test({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6})  # identical differences: no spread
    assert flat["sd"] == pytest.approx(0.0, abs=1e-15) and math.isnan(flat["dz"])
    none = paired_test({0: None, 1: float("nan"), 2: 0.3}, {0: 0.1, 1: 0.2, 2: 0.1})
    assert none["n"] == 1 and none["seeds"] == [2]


def test_welch_against_mpmath_and_the_cauchy_case():
    # mpmath: t = 1.0444659357341870, df = 7.658227848101266, p = 0.3281142375687233
    w = welch_test({"mean": 0.30, "std": 0.05, "n": 4}, {"mean": 0.25, "std": 0.10, "n": 6})
    assert w["diff"] == pytest.approx(0.05) and w["t"] == pytest.approx(1.044465935734187, rel=1e-9)
    assert w["df"] == pytest.approx(7.658227848101266, rel=1e-9)
    assert w["p"] == pytest.approx(0.3281142375687233, rel=1e-8)
    # df = 1 is the Cauchy distribution: p = 1 - 2 atan(|t|) / pi.
    w = welch_test({"mean": 3.0, "std": 1.0, "n": 2}, {"mean": 0.0, "std": 1e-12, "n": 10**12})
    assert w["df"] == pytest.approx(1.0) and w["p"] == pytest.approx(1 - 2 * math.atan(w["t"]) / math.pi, rel=1e-6)
    assert math.isnan(welch_test({"mean": 1, "std": 0, "n": 1}, {"mean": 0, "std": 0, "n": 3})["p"])
    assert math.isnan(welch_test({"mean": 1, "std": 0, "n": 3}, {"mean": 0, "std": 0, "n": 3})["t"])


def test_seeds_for_power_matches_gpower():
    # G*Power, paired t-test (matched pairs), two-sided α = 0.05, power 0.8: d_z 0.4 → 52, 0.5 → 34, 0.8 → 15.
    for dz, exact in [(0.4, 52), (0.5, 34), (0.8, 15)]:
        assert abs(seeds_for_power(0.02 / dz, 0.02) - exact) <= 1
    assert seeds_for_power(0.0) == 2 and seeds_for_power(float("nan")) == 2
    assert seeds_for_power(10.0, 0.02, max_n=50) == 50
    n = seeds_for_power(0.05, 0.02)
    assert minimum_detectable_difference(0.05, n) <= 0.02 < minimum_detectable_difference(0.05, n - 1)
    assert math.isnan(minimum_detectable_difference(0.05, 1))


def test_mean_std_is_the_sample_std_of_finite_values():
    assert mean_std([0.2, 0.4, 0.6]) == {"mean": pytest.approx(0.4), "std": pytest.approx(0.2), "n": 3}
    assert mean_std([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1}
    e = mean_std([None, float("inf")])
    assert e["n"] == 0 and math.isnan(e["mean"]) and math.isnan(e["std"])
