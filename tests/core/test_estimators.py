"""Estimators of the population NTPS: consistency at large N, intervals, errors."""

import numpy as np
import pytest

from ntps_nb.core.estimators import ESTIMATORS, PCA_TEXTS_PER_DIM, estimate_ntps, ntps_estimate, split_halves
from ntps_nb.core.moments import Moments
from ntps_nb.core.score import ntps, ntps_sweep
from ntps_nb.core.simulate import lds_model, sample_shards

KS = np.array([1, 2, 4])


@pytest.fixture(scope="module")
def large_draws():
    """20 independent draws of N = 40,000 texts (10 shards each) from one LDS generator."""
    model = lds_model(d=6, n_classes=3, n_tokens=4, signal=1.0, gap="separated", seed=5)
    draws = [sample_shards(model, 40_000, 10, np.random.default_rng([9, i])) for i in range(20)]
    return model, draws


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_estimator_recovers_its_population_value_at_large_n(large_draws, estimator):
    model, draws = large_draws
    truth = model.population_ntps(KS)
    if estimator == "chance":  # the chance-corrected population NTPS, like kappa for accuracy
        truth = (truth - KS / model.d) / (1 - KS / model.d)
    values = np.array([estimate_ntps(d, KS, estimator=estimator).estimate for d in draws])
    mean, mcse = values.mean(axis=0), values.std(axis=0, ddof=1) / np.sqrt(len(draws))
    # within 3 Monte Carlo standard errors (plus round-off), at every k
    assert np.all(np.abs(mean - truth) <= 3 * mcse + 1e-9), (mean, truth, mcse)


def test_plugin_equals_ntps_of_the_pooled_moments(large_draws):
    _, draws = large_draws
    pooled = Moments.combine(draws[0])
    got = estimate_ntps(draws[0], KS, estimator="plugin").estimate
    np.testing.assert_allclose(got, [ntps(pooled, k=int(k)) for k in KS], rtol=1e-12)
    np.testing.assert_allclose(estimate_ntps(pooled, KS).estimate, got, rtol=1e-12)


def test_pca_estimator_is_the_plugin_when_every_dimension_is_kept(large_draws):
    _, draws = large_draws
    assert Moments.combine(draws[0]).n_texts // PCA_TEXTS_PER_DIM >= 6
    np.testing.assert_allclose(estimate_ntps(draws[0], KS, estimator="pca").estimate,
                               estimate_ntps(draws[0], KS, estimator="plugin").estimate, rtol=1e-9)


def test_plugin_is_biased_toward_chance_at_small_n():
    # Well-separated label directions and a high population NTPS (0.78 at k = 2): at N = 4 d the
    # plug-in is pulled down toward chance (k / d = 0.125) by more than 3 Monte Carlo SEs
    # (measured: bias -0.13, SD 0.07 over 30 draws in the d = 16 map).
    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="separated", seed=3)
    truth = model.population_ntps([2])[0]
    plug = np.array([estimate_ntps(sample_shards(model, 4 * 16, 8, np.random.default_rng([1, i])), [2]).estimate[0]
                     for i in range(40)])
    mcse = plug.std(ddof=1) / np.sqrt(plug.size)
    assert truth - plug.mean() > 3 * mcse


def test_interval_table_and_jackknife_on_a_known_case():
    model = lds_model(d=6, n_classes=2, n_tokens=4, seed=1)
    shards = sample_shards(model, 3000, 6, np.random.default_rng(0))
    table = ntps_estimate(shards, [1, 2], estimator="plugin", level=0.9)
    assert list(table.columns[:6]) == ["k", "estimator", "estimate", "se", "lower", "upper"]
    # the jackknife standard error, recomputed by hand at k = 1
    loo = np.array([ntps(Moments.combine(shards[:i] + shards[i + 1:]), k=1) for i in range(6)])
    se = np.sqrt(5 / 6 * np.sum((loo - loo.mean()) ** 2))
    assert table["se"].iloc[0] == pytest.approx(se, rel=1e-10)
    assert (table["lower"] < table["estimate"]).all() and (table["estimate"] < table["upper"]).all()
    assert not table["reliable"].any()  # no calibrated criterion for the plug-in


def test_split_halves_is_a_seeded_partition():
    a, b = split_halves(7, seed=3)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(7))
    np.testing.assert_array_equal(split_halves(7, seed=3)[0], a)


def test_bad_input_is_refused_with_a_clear_error():
    model = lds_model(d=4, n_classes=2, n_tokens=3, seed=0)
    shards = sample_shards(model, 200, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="estimator must be one of"):
        estimate_ntps(shards, [1], estimator="magic")
    with pytest.raises(ValueError, match="at least 2 shards"):
        estimate_ntps(Moments.combine(shards), [1], estimator="crossfit")
    with pytest.raises(ValueError, match="positive integers"):
        estimate_ntps(shards, [0])
    with pytest.raises(ValueError, match="at least 3 shards"):
        ntps_estimate(shards[:2], [1])


def test_ntps_and_ntps_sweep_take_the_estimator_option(large_draws):
    _, draws = large_draws
    shards = draws[0]
    pooled = Moments.combine(shards)
    # plug-in: shards or pooled give the same value, and the sweep names its estimator
    assert ntps(shards, k=2) == pytest.approx(ntps(pooled, k=2), rel=1e-12)
    sweep = ntps_sweep(pooled)
    assert (sweep["estimator"] == "plugin").all()
    # another estimator: the same value through ntps, ntps_sweep and estimate_ntps
    direct = estimate_ntps(shards, [1, 2, 3], estimator="debiased").estimate
    assert ntps(shards, k=2, estimator="debiased") == pytest.approx(direct[1], rel=1e-12)
    swept = ntps_sweep(shards, estimator="debiased")
    np.testing.assert_allclose(swept.set_index("k").loc[[1, 2, 3], "ntps"], direct, rtol=1e-12)
    assert (swept["estimator"] == "debiased").all() and "reliability" in swept
    with pytest.raises(ValueError, match="theory variant only"):
        ntps(pooled, fraction=0.5, variant="reference", estimator="debiased")
    with pytest.raises(ValueError, match="at least 2 shards"):
        ntps(pooled, k=1, estimator="crossfit")


def test_adjusted_removes_the_joint_label_and_whitening_bias():
    # With the next-token moments at their population values and Sxy, Sxx sampled (N = 4 d), the
    # plug-in is biased by more than 3 Monte Carlo SEs (-0.12 at k = 2, -0.10 at k = 8, as in
    # docs/estimator.md) and "adjusted" (the adjusted-R^2 correction of both Gram matrices) is not.
    from ntps_nb.core.simulate import bias_decomposition

    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="separated", seed=3)
    table = bias_decomposition(model, 64, [2, 8], estimators=("plugin", "adjusted"), n_draws=30)
    rows = table[table["sampled"] == "Sxy and Sxx sampled"].set_index(["estimator", "k"])
    for k in (2, 8):
        plug, adj = rows.loc[("plugin", k)], rows.loc[("adjusted", k)]
        assert abs(plug["bias"]) > 3 * plug["bias_mcse"], plug
        assert abs(adj["bias"]) <= 3 * adj["bias_mcse"], adj
