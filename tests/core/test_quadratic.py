"""The quadratic interval (`ntps_nb.core.quadratic`, ``ntps_estimate(interval="quadratic")``): its
exact factors against brute-force simulation, its estimate of T without bias, the jackknife variance
of that estimate and the Satterthwaite degrees of freedom, its coverage on a purely quadratic error,
on a linear-plus-quadratic one and on a population at the bound of [0, 1], and its errors."""

import types
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from ntps_nb.core.estimators import ntps_estimate, split_halves
from ntps_nb.core.quadratic import (INTERACTION_HALF, contrast_counts, interaction_halves, interaction_T,
                                    interaction_T_variance, interactions,
                                    local_jackknife_variance, local_poolings, local_richardson, quadratic_factors,
                                    quadratic_interval, satterthwaite_df)
from ntps_nb.core.simulate import lds_model, sample_shards

S = 10


@pytest.mark.parametrize("n_shards", [6, 10, 16])
def test_with_equal_halves_richardsons_quadratic_part_has_variance_T_over_S_squared(n_shards):
    # richardson = 2 F(mean) - (F(mean A) + F(mean B)) / 2 keeps only the cross term 2 / S^2 sum_{A x B}
    # z_i'H z_j, whose variance is 4 |A| |B| T / S^4 = T / S^2: a second formula for the factor
    for seed in range(3):
        variance, jackknife = quadratic_factors(n_shards, seed)
        assert variance * n_shards**2 == pytest.approx(1.0, rel=1e-12)
        assert jackknife > variance


@pytest.mark.parametrize("n_shards", [10, 9, 5])
def test_the_factors_match_a_brute_force_simulation_of_a_quadratic_statistic(n_shards):
    # F(x) = x'Hx / 2 of Gaussian shard means (Omega = I, so T = tr(H^2)): the variance of richardson and
    # the mean of its jackknife variance over 20,000 draws against the exact coefficients. An odd number of
    # shards splits into unequal halves, where richardson's coefficients keep a (traceless) diagonal: the
    # factors are exact there for Gaussian shard means (ntps_estimate raised on odd shard counts before)
    H = np.diag([1.0, -2.0, 0.5])
    T = np.trace(H @ H)
    rng = np.random.default_rng(30)
    z = rng.standard_normal((20_000, n_shards, 3))

    def F(x):
        return 0.5 * np.einsum("ni,ij,nj->n", x, H, x)

    a, b = split_halves(n_shards, 4)
    estimate = local_richardson(z, F, a, b)
    assert abs(estimate.mean()) < 3 * estimate.std() / np.sqrt(len(z))    # no 1 / N bias, halves equal or not
    J = local_jackknife_variance(z, F, a, b)
    variance, jackknife = quadratic_factors(n_shards, 4)
    # Monte Carlo SEs of a variance and of a mean of the draws
    var_se = np.std((estimate - estimate.mean()) ** 2) / np.sqrt(len(z))
    assert abs(estimate.var() - variance * T) < 3 * var_se
    assert abs(J.mean() - jackknife * T) < 3 * J.std() / np.sqrt(len(z))
    if n_shards == 10:
        assert jackknife / variance == pytest.approx(2.670, abs=5e-4)  # the docs' value


def _toy_F(mu, g, H):
    def F(x):
        x = x + mu  # the population mean is not 0: the contrasts must not need it
        return x @ g + 0.5 * np.einsum("...i,ij,...j->...", x, H, x)
    return F


def test_the_interaction_contrasts_estimate_T_without_bias():
    # a linear part and a population mean far from 0: T is still recovered on average
    p, draws = 5, 4000
    rng = np.random.default_rng(31)
    H = rng.standard_normal((p, p))
    H = (H + H.T) / 2
    g, mu = rng.standard_normal(p), 3 * rng.standard_normal(p)
    F = _toy_F(mu, g, H)
    Omega_half = np.diag(np.linspace(0.5, 1.5, p))
    T = np.trace(H @ Omega_half @ Omega_half @ H @ Omega_half @ Omega_half)
    z = rng.standard_normal((draws, S, p)) @ Omega_half
    n_texts = np.full(S, 50)
    counts, _, _ = contrast_counts(n_texts, seed=2)
    assert (counts > 0).all()
    base = local_poolings(z, F, np.vstack([np.ones(S), 1.0 - np.eye(S)]), n_texts)
    contrasts = local_poolings(z, F, counts, n_texts)
    T_hat = interaction_T(interactions(base[0], base[1:], contrasts, S, seed=2))
    assert abs(T_hat.mean() - T) < 3 * T_hat.std() / np.sqrt(draws)
    # the same through interaction_T on interactions built by hand
    a, b = split_halves(S, 2)
    zbar = z.mean(axis=1, keepdims=True)
    G = np.einsum("nip,pq,njq->ijn", (z - zbar)[:, a], H, (z - zbar)[:, b])
    np.testing.assert_allclose(interaction_T(G), T_hat, rtol=1e-8)


def test_at_20_shards_T_is_estimated_without_bias_from_five_shards_of_each_half():
    # the interactions take the first INTERACTION_HALF shards of each half of the split: 25 contrasts instead
    # of 100, and T-hat is still unbiased (the double differences of any shards of the two halves are)
    p, draws, shards, seed = 4, 3000, 20, 3
    rng = np.random.default_rng(33)
    H = rng.standard_normal((p, p))
    H = (H + H.T) / 2
    F = _toy_F(rng.standard_normal(p), rng.standard_normal(p), H)
    z = rng.standard_normal((draws, shards, p))
    T = np.trace(H @ H)
    n_texts = np.full(shards, 40)
    counts, a, b = contrast_counts(n_texts, seed)
    every, a_all, b_all = contrast_counts(n_texts, seed, half=None)
    assert INTERACTION_HALF == 5 and counts.shape == (25, shards) and every.shape == (100, shards)
    np.testing.assert_array_equal(a, a_all[:5])
    np.testing.assert_array_equal(b, b_all[:5])
    np.testing.assert_array_equal(counts, every.reshape(10, 10, shards)[:5, :5].reshape(25, shards))
    base = local_poolings(z, F, np.vstack([np.ones(shards), 1.0 - np.eye(shards)]), n_texts)
    G = interactions(base[0], base[1:], local_poolings(z, F, counts, n_texts), shards, seed)
    assert G.shape == (5, 5, draws)
    T_hat = interaction_T(G)
    assert abs(T_hat.mean() - T) < 3 * T_hat.std() / np.sqrt(draws)
    # by hand, from the same five shards of each half
    zbar = z.mean(axis=1, keepdims=True)
    by_hand = np.einsum("nip,pq,njq->ijn", (z - zbar)[:, a], H, (z - zbar)[:, b])
    np.testing.assert_allclose(G, by_hand, rtol=1e-6, atol=1e-9)
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="at least 2 shards of each half"):
            interaction_halves(shards, seed, half=bad)


def test_with_at_most_five_shards_a_half_the_cap_changes_nothing_and_above_it_only_the_quadratic_part():
    model = lds_model(d=6, n_classes=2, n_tokens=4, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ten = sample_shards(model, 600, 10, np.random.default_rng(1))
        pd.testing.assert_frame_equal(ntps_estimate(ten, [1, 2]), ntps_estimate(ten, [1, 2], interaction_half=None))
        twenty = sample_shards(model, 1200, 20, np.random.default_rng(2))
        five, every = ntps_estimate(twenty, [1, 2]), ntps_estimate(twenty, [1, 2], interaction_half=None)
    same = ["estimate", "se_jackknife", "lower_jackknife", "upper_jackknife", "subspace_noise", "gap_ratio"]
    pd.testing.assert_frame_equal(five[same], every[same])
    assert not np.allclose(five["quadratic_excess"], every["quadratic_excess"])


def test_the_quadratic_interval_covers_a_purely_quadratic_error_where_the_jackknife_over_covers():
    # truth F(mu) with no linear part: the error is quadratic over 20 directions. The draws are the rows
    # of one frame (quadratic_interval treats each row as a k). 2,000 draws: binomial SE 0.007 at 0.9.
    p, draws, level = 20, 2000, 0.90
    rng = np.random.default_rng(32)
    F = _toy_F(np.zeros(p), np.zeros(p), -np.eye(p))
    z = rng.standard_normal((draws, S, p))
    a, b = split_halves(S, 0)
    estimate = local_richardson(z, F, a, b)
    se = np.sqrt(local_jackknife_variance(z, F, a, b))
    t = scipy.stats.t.ppf((1 + level) / 2, S - 1)
    frame = pd.DataFrame({"k": np.arange(draws), "estimator": "richardson", "estimate": estimate, "se": se,
                          "lower": estimate - t * se, "upper": estimate + t * se,
                          "subspace_noise": 0.0, "gap_ratio": np.inf})
    shards = [types.SimpleNamespace(n_texts=50)] * S
    n_texts = np.full(S, 50)
    out = quadratic_interval(shards, frame, level=level, seed=0, noise_max=0.05, gap_min=5.0,
                             solve=lambda counts: local_poolings(z, F, counts, n_texts))
    assert (np.abs(estimate) <= t * se).mean() >= 0.97                      # the jackknife-t interval
    covered = (out["lower"] <= 0) & (0 <= out["upper"])
    assert 0.85 <= covered.mean() <= 0.95, covered.mean()
    assert (out["se"] <= out["se_jackknife"]).all() and (out["interval"] == "quadratic").all()
    np.testing.assert_allclose(out["se"] ** 2, out["se_jackknife"] ** 2 - out["quadratic_excess"], atol=1e-15)


def test_at_a_population_ntps_of_1_the_quadratic_flag_keeps_the_bound_rows_and_is_unbiased():
    # The population of the bound condition's test (LDS, C = 2, nearly tied, k = 2, N / d = 32, truth
    # 0.9986; test_estimators.py): there the jackknife-t interval over-covers (about 0.99) and the bound
    # condition keeps the draws biased inward. The quadratic interval's flag has no bound condition: it
    # keeps most draws, at_bound ones included, and they cover in [0.85, 0.95] without bias (200 draws:
    # 0.91 of 173 here, mean error -0.0005 with Monte Carlo SE 0.0007 against a quarter-width of 0.010).
    # This is an edge population where the construction works; on others it stays conservative
    # (docs/estimator.md, "The quadratic interval as the default"), which is why the default flag's stationary
    # condition calls such rows unreliable: it is off here, as this is the quadratic interval's own test.
    model = lds_model(d=16, n_classes=2, n_tokens=8, signal=0.5, gap="tied", seed=17)
    truth = model.population_ntps([2])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = pd.concat([ntps_estimate(sample_shards(model, 32 * model.d, S, np.random.default_rng([13, i])), [2],
                                        interval="quadratic", stationary_flag=False) for i in range(200)],
                         ignore_index=True)
    kept = rows[rows["reliable"]]
    assert len(kept) >= 150 and kept["at_bound"].mean() >= 0.5
    covered = (kept["lower"] <= truth) & (truth <= kept["upper"])
    assert 0.85 <= covered.mean() <= 0.95, covered.mean()
    assert ((kept["lower_jackknife"] <= truth) & (truth <= kept["upper_jackknife"])).mean() >= 0.97
    error = kept["estimate"] - truth
    assert abs(error.mean()) + 3 * error.std() / np.sqrt(len(kept)) < (kept["upper"] - kept["lower"]).mean() / 4


@pytest.mark.parametrize("n_shards", [5, 7, 9])
def test_the_default_row_runs_on_an_odd_number_of_shards(n_shards):
    model = lds_model(d=6, n_classes=2, n_tokens=4, seed=1)
    shards = sample_shards(model, 60 * n_shards, n_shards, np.random.default_rng(0))
    frame = ntps_estimate(shards, [1, 2])
    assert (frame["interval"] == "quadratic").all() and np.isfinite(frame[["lower", "upper", "df"]]).all().all()
    # the variance removed is the jackknife's excess, never more than the jackknife's own
    assert ((frame["se"] <= frame["se_jackknife"] + 1e-15) & (frame["quadratic_excess"] >= 0)).all()


def test_the_quadratic_interval_refuses_what_it_is_not_derived_for():
    model = lds_model(d=6, n_classes=2, n_tokens=4, seed=1)
    shards = sample_shards(model, 400, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="derived for estimator='richardson'"):
        ntps_estimate(shards, [1], estimator="plugin", interval="quadratic")
    with pytest.raises(ValueError, match="at least 2 shards in each half"):
        ntps_estimate(shards[:3], [1], interval="quadratic")
    with pytest.raises(ValueError, match="interval must be None or one of"):
        ntps_estimate(shards, [1], interval="narrow")
    with pytest.raises(ValueError, match="at least 2 shards in each half"):
        interaction_T(np.zeros((1, 5)))


def _toy_interactions(z: np.ndarray, F, seed: int) -> np.ndarray:
    n_texts = np.full(S, 50)
    counts, _, _ = contrast_counts(n_texts, seed)
    base = local_poolings(z, F, np.vstack([np.ones(S), 1.0 - np.eye(S)]), n_texts)
    return interactions(base[0], base[1:], local_poolings(z, F, counts, n_texts), S, seed)


def test_the_jackknife_variance_of_T_hat_is_conservative():
    # A purely quadratic error over 5 directions (T = 5): over 4,000 draws the mean of T-hat's
    # delete-one-shard jackknife variance lies above T-hat's variance across draws (Efron-Stein; T-hat
    # is itself a quadratic in the shards' products, whose part the jackknife counts over, as it does
    # richardson's), and below 3 times it: the degrees of freedom built on it err on the low side.
    p, draws = 5, 4000
    z = np.random.default_rng(40).standard_normal((draws, S, p))
    G = _toy_interactions(z, _toy_F(np.zeros(p), np.zeros(p), -np.eye(p)), seed=0)
    T_hat, V = interaction_T(G), interaction_T_variance(G)
    assert abs(T_hat.mean() - p) < 3 * T_hat.std() / np.sqrt(draws)
    # Monte Carlo SE of the variance across draws: that of the mean of the squared deviations
    var_se = np.std((T_hat - T_hat.mean()) ** 2) / np.sqrt(draws)
    assert V.mean() - 3 * V.std() / np.sqrt(draws) > T_hat.var() + 3 * var_se
    assert V.mean() < 3 * T_hat.var()
    # with two shards in a half no shard can be left out: unknown, and the caller keeps S - 1
    assert np.isnan(interaction_T_variance(np.ones((2, 5, 3)))).all()


def test_satterthwaite_df_against_the_variance_of_a_simulated_difference():
    # J a scaled chi-square on S - 1 degrees of freedom, the excess normal and independent of it: the
    # variance of J - excess over 400,000 draws against 2 (J - excess)^2 / df at the means
    rng = np.random.default_rng(42)
    sigma2, mean_excess, excess_sd = 1.0, 0.4, 0.15
    J = sigma2 * rng.chisquare(S - 1, 400_000) / (S - 1)
    excess = mean_excess + excess_sd * rng.standard_normal(J.size)
    df = satterthwaite_df(np.array([sigma2]), np.array([mean_excess]), np.array([excess_sd ** 2]), np.array([False]), S)
    assert np.var(J - excess) == pytest.approx(2 * (sigma2 - mean_excess) ** 2 / df[0], rel=0.01)
    # the floor, an unknown excess variance and a NaN J; never above S - 1 or below 1
    got = satterthwaite_df(np.array([1.0, 1.0, np.nan, 1.0, 1.0]), np.array([0.5, 0.5, 0.5, 0.0, 0.99]),
                           np.array([0.1, np.nan, 0.1, 0.0, 10.0]), np.array([True, False, False, False, False]), S)
    np.testing.assert_array_equal(got[[0, 1, 3]], [S - 1, S - 1, S - 1])
    assert np.isnan(got[2]) and got[4] == 1.0
    # an estimate the shards do not move (J and the excess at rounding level, e.g. NTPS = 1 at k >= r):
    # S - 1 whatever the ratio of the two rounding errors, where the formula would give anything in [1, S - 1]
    rounding = np.array([1e-30, 1e-30, 6.6e-31])
    got = satterthwaite_df(rounding, np.array([0.99e-30, 0.5e-30, 4.5e-31]), np.array([1e-58, 1e-62, 1e-60]),
                           np.array([False, False, False]), S)
    np.testing.assert_array_equal(got, [S - 1] * 3)
    assert satterthwaite_df(np.array([1e-20]), np.array([0.99e-20]), np.array([1e-40]), np.array([False]), S)[0] == 1.0


@pytest.mark.parametrize("p, scale, seed", [(2, 0.6, 41), (3, 0.5, 41)])
def test_the_quadratic_interval_covers_a_linear_plus_quadratic_error(p, scale, seed):
    # Truth F(0) = 0 with a linear part about as large as the quadratic one: the excess removed is a
    # sizeable and noisy part of J. 2,000 draws: binomial SE 0.007 at 0.9. With S - 1 degrees of freedom
    # throughout (session 30's interval) the same SEs cover less.
    rng = np.random.default_rng(seed)
    F = _toy_F(np.zeros(p), scale * rng.standard_normal(p), -np.eye(p))
    z = rng.standard_normal((2000, S, p))
    a, b = split_halves(S, 0)
    estimate = local_richardson(z, F, a, b)
    se = np.sqrt(local_jackknife_variance(z, F, a, b))
    t = scipy.stats.t.ppf(0.95, S - 1)
    frame = pd.DataFrame({"k": np.arange(len(z)), "estimator": "richardson", "estimate": estimate, "se": se,
                          "lower": estimate - t * se, "upper": estimate + t * se,
                          "subspace_noise": 0.0, "gap_ratio": np.inf})
    n_texts = np.full(S, 50)
    out = quadratic_interval([types.SimpleNamespace(n_texts=50)] * S, frame, level=0.90, seed=0, noise_max=0.05,
                             gap_min=5.0, solve=lambda counts: local_poolings(z, F, counts, n_texts))
    covered = (out["lower"] <= 0) & (0 <= out["upper"])
    assert 0.85 <= covered.mean() <= 0.95, covered.mean()
    assert covered.mean() > (np.abs(estimate) <= t * out["se"]).mean()
    assert ((out["df"] >= 1) & (out["df"] <= S - 1)).all() and (out["df"] < S - 1).mean() > 0.5
