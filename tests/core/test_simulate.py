"""The generators' population moments are exact, and the estimator map reports what it sees."""

import warnings

import numpy as np
import pandas as pd
import pytest

from ntps_nb.core.estimators import estimate_ntps
from ntps_nb.core.moments import moments_from_sequences
from ntps_nb.core.score import InterpolationWarning, ntps
from ntps_nb.core.simulate import (
    REFLECTION_RATIOS,
    estimator_map,
    factor_model,
    heavy_tailed,
    lds_model,
    markov_model,
    moments_of_array,
    reflection_model,
    sample_shards,
    summarise_map,
)
from ntps_nb.core.subspaces import next_token_subspace, perception_subspace
from tests.core.torch_device import DEVICE


def heavy_tailed_factor_model(**settings):
    """The factor model with Student t texts (5 degrees of freedom: the sample moments' variance is finite)."""
    return heavy_tailed(factor_model(**settings), df=5)


def offset_lds_model(**settings):
    """The LDS with a common input of length 10 (a "massive activation")."""
    return lds_model(offset=10.0, **settings)


FAMILIES = [factor_model, lds_model, reflection_model, markov_model, heavy_tailed_factor_model, offset_lds_model]


@pytest.mark.parametrize("family", FAMILIES)
def test_vectorised_moments_equal_the_reference_definition(family):
    model = family(d=6, n_classes=3, n_tokens=5, seed=2)
    rng = np.random.default_rng(0)
    labels = model.sample_labels(40, rng)
    X = model.sample_sequences(labels, rng)
    fast, slow = moments_of_array(X, labels, 3), moments_from_sequences(list(X), labels, 3)
    for name in ("Sxx", "Sxy", "Syy", "C0", "C1"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-12, atol=1e-12)
    assert fast.n_tokens == slow.n_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_population_moments_are_the_mean_of_many_sample_moments(family):
    # The closed-form moments against an independent computation: the mean of the sample moments
    # of 20 shards of 5,000 texts, entry by entry in units of its standard error (from the
    # spread of the shards). A t statistic with 19 degrees of freedom exceeds 6 with probability
    # ~1e-5 per entry; a wrong formula (e.g. C1 with sum t^2 instead of sum t) is off by >100 SEs.
    model = family(d=5, n_classes=3, n_tokens=4, seed=1)
    shards = sample_shards(model, 100_000, 20, np.random.default_rng(3))
    population = model.population_moments()
    for name in ("Sxx", "Sxy", "Syy", "C0", "C1"):
        values = np.stack([getattr(s, name) for s in shards])
        se = values.std(axis=0, ddof=1) / np.sqrt(len(shards))
        target = getattr(population, name)
        t = np.abs(values.mean(axis=0) - target)[se > 0] / se[se > 0]
        assert t.max() < 6, (name, t.max())


def test_population_ntps_is_the_theory_ntps_of_the_population_moments():
    # population moments are the limit of infinitely many texts: nothing interpolates, no warning
    model = lds_model(d=8, n_classes=2, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InterpolationWarning)
        expected = [ntps(model.population_moments(), k=k) for k in (1, 2, 3)]
    np.testing.assert_allclose(model.population_ntps([1, 2, 3]), expected, rtol=1e-12)


def test_the_markov_model_has_imbalanced_classes_and_discrete_states():
    # the departures from the Gaussian, equal-prior families it exists for: priors proportional to 1 / (c + 1),
    # and every state one of finitely many (memory 0: h_t is the embedding of token t, a row of E)
    model = markov_model(d=6, n_classes=3, memory=0.0, vocabulary=10, seed=1)
    np.testing.assert_allclose(model.priors, np.array([1, 1 / 2, 1 / 3]) / (11 / 6), rtol=1e-12)
    rng = np.random.default_rng(0)
    states = model.sample_sequences(model.sample_labels(500, rng), rng).reshape(-1, 6)
    assert len(np.unique(states.round(12), axis=0)) <= 10
    assert markov_model(d=6, n_classes=3, imbalance=0.0).priors == pytest.approx(np.full(3, 1 / 3))


def test_heavy_tailed_texts_scale_the_label_moments_by_the_mean_scale():
    # E[s] against the texts themselves: per shard, the least-squares factor between the sampled Sxy and the
    # Gaussian model's; at 3 degrees of freedom E[s] = sqrt(1 / 2) Gamma(1) / Gamma(3 / 2) = 0.798
    gaussian = factor_model(d=5, n_classes=3, n_tokens=4, seed=1)
    model = heavy_tailed(gaussian, df=3)
    mean_scale = np.sqrt(0.5) / (np.sqrt(np.pi) / 2)
    np.testing.assert_allclose(model.population_moments().Sxy, mean_scale * gaussian.population_moments().Sxy)
    shards = sample_shards(model, 100_000, 20, np.random.default_rng(4))
    base = gaussian.population_moments()
    factors = np.array([np.sum(s.Sxy * base.Sxy) / np.sum(base.Sxy**2) for s in shards])
    se = factors.std(ddof=1) / np.sqrt(len(factors))
    assert abs(factors.mean() - mean_scale) < 4 * se and se < 0.02  # (Sxx, C0, C1: the df = 5 model above)


def test_an_offset_shifts_every_state_by_one_vector_and_leaves_the_rest_of_the_model():
    # the factor model's label moments gain c p' and nothing else: c recovered from the difference has the
    # offset's length, and the model's other parameters are those of the model without it (its own stream)
    plain = factor_model(d=8, n_classes=3, seed=2).population_moments()
    shifted = factor_model(d=8, n_classes=3, offset=25.0, seed=2).population_moments()
    priors = np.diag(plain.Syy)
    c = (shifted.Sxy - plain.Sxy) / priors
    np.testing.assert_allclose(c, np.repeat(c[:, :1], 3, axis=1), atol=1e-12)
    assert np.linalg.norm(c[:, 0]) == pytest.approx(25.0)
    m = plain.x_mean
    np.testing.assert_allclose(shifted.Sxx, plain.Sxx + np.outer(m, c[:, 0]) + np.outer(c[:, 0], m)
                               + np.outer(c[:, 0], c[:, 0]), rtol=1e-12, atol=1e-9)


def test_angle_moves_the_population_ntps():
    aligned = factor_model(d=12, n_classes=2, n_predictable=4, angle=0.0, seed=0).population_ntps([2])[0]
    orthogonal = factor_model(d=12, n_classes=2, n_predictable=4, angle=np.pi / 2, seed=0).population_ntps([2])[0]
    assert aligned > 0.9 and orthogonal < 0.2


def test_gap_regimes_set_the_spacing_of_the_perception_eigenvalues():
    from ntps_nb.core.score import theory_geometry

    spacing = {}
    for gap in ("separated", "tied"):
        lam = theory_geometry(factor_model(d=16, n_classes=4, gap=gap, seed=0).population_moments()).eigenvalues
        spacing[gap] = lam[0] / lam[2]
    assert spacing["separated"] > 1.5 and spacing["tied"] < 1.2


def _top_pair_ntps(model, phi: float) -> float:
    """NTPS at k = 1 of U's top direction turned by phi towards its second one (whitened coordinates,
    as the theory geometry measures it): an independent path to the population value at phi = 0."""
    moments = model.population_moments()
    U, V = perception_subspace(moments), next_token_subspace(moments)
    y = U.range_basis.T @ U.whitened[:, :2]
    v = np.sqrt(U.range_eigenvalues) * (U.range_basis.T @ V.vectors[:, 0])
    return float((v @ (np.cos(phi) * y[:, 0] + np.sin(phi) * y[:, 1])) ** 2 / (v @ v))


@pytest.mark.parametrize("gap", sorted(REFLECTION_RATIOS))
def test_the_reflection_model_puts_the_truth_at_a_stationary_point_of_the_rotation(gap):
    # U's two eigenvalues at the stated ratio, the population NTPS(1) interior, and NTPS as a function
    # of the rotation of U's top pair even about the truth: its derivative there is zero, while a
    # generic factor model's is not (the contrast shows the check can fail).
    model = reflection_model(d=12, n_classes=4, gap=gap, seed=3)
    lam = perception_subspace(model.population_moments()).eigenvalues
    assert lam[0] / lam[1] == pytest.approx(REFLECTION_RATIOS[gap], rel=1e-9)
    assert np.count_nonzero(lam > 1e-10 * lam[0]) == 2
    truth = model.population_ntps([1])[0]
    assert _top_pair_ntps(model, 0.0) == pytest.approx(truth, rel=1e-10) and 0.05 < truth < 0.95
    h = 1e-4
    slope = (_top_pair_ntps(model, h) - _top_pair_ntps(model, -h)) / (2 * h)
    curvature = (_top_pair_ntps(model, h) - 2 * truth + _top_pair_ntps(model, -h)) / h**2
    assert abs(slope) < 1e-8 and curvature < -0.1  # a maximum: the odd direction carries none of V
    generic = factor_model(d=12, n_classes=4, gap=gap, seed=3)
    generic_slope = (_top_pair_ntps(generic, h) - _top_pair_ntps(generic, -h)) / (2 * h)
    assert abs(generic_slope) > 1e-3


def test_bad_generator_settings_are_refused():
    with pytest.raises(ValueError, match="gap"):
        factor_model(d=8, gap="wide")
    with pytest.raises(ValueError, match="n_tokens"):
        lds_model(d=8, n_tokens=1)
    with pytest.raises(ValueError, match="n_classes >= 3"):
        reflection_model(d=8, n_classes=2)
    with pytest.raises(ValueError, match="n_predictable"):
        reflection_model(d=8, n_predictable=7)
    with pytest.raises(ValueError, match="vocabulary"):
        markov_model(d=8, vocabulary=7)
    with pytest.raises(ValueError, match="memory"):
        markov_model(d=8, memory=1.0)
    with pytest.raises(ValueError, match="df must be > 2"):
        heavy_tailed(factor_model(d=8), df=2)
    with pytest.raises(ValueError, match="n_shards"):
        sample_shards(factor_model(d=4, n_classes=2), 3, 5, np.random.default_rng(0))


def test_estimator_map_records_truth_and_the_summary_counts_draws():
    model = factor_model(d=6, n_classes=2, n_tokens=4, seed=0)
    frame = estimator_map([model], [8], [1, 2], estimators=("plugin", "crossfit"), n_draws=3, n_shards=4)
    assert len(frame) == 3 * 2 * 2
    np.testing.assert_allclose(frame["truth"].unique(), np.sort(model.population_ntps([1, 2]))[np.argsort(
        np.argsort(frame["truth"].unique()))], rtol=1e-12)
    summary = summarise_map(frame)
    assert set(summary["estimator"]) == {"plugin", "crossfit"}
    assert (summary["draws"] == 3).all()
    # bias is the mean of estimate - truth over the draws, recomputed here
    one = frame[(frame.estimator == "plugin") & (frame.k == 1)]
    got = summary[(summary.estimator == "plugin") & (summary.k == 1)]["bias"].iloc[0]
    assert got == pytest.approx(float((one.estimate - one.truth).mean()), rel=1e-12)


def test_a_draw_the_estimator_raises_on_is_kept_and_said(monkeypatch):
    import ntps_nb.core.estimators as estimators

    real = estimators.ntps_estimate
    calls = []

    def fails_on_the_second_draw(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("the U pair does not diagonalise its pooled problem")
        return real(*args, **kwargs)

    monkeypatch.setattr(estimators, "ntps_estimate", fails_on_the_second_draw)
    model = factor_model(d=6, n_classes=2, n_tokens=4, seed=0)
    frame = estimator_map([model], [8], [1, 2], estimators=("plugin",), n_draws=3, n_shards=4)
    failed = frame[frame["draw"] == 1]
    assert (failed["failure"] == "ValueError: the U pair does not diagonalise its pooled problem").all()
    assert failed["estimate"].isna().all() and not failed["covered"].any()
    assert (frame.loc[frame["draw"] != 1, "failure"] == "").all()
    summary = summarise_map(frame)
    assert (summary["n_failed"] == 1).all() and (summary["n_defined"] == 2).all() and (summary["draws"] == 3).all()


def test_an_estimator_map_on_a_torch_device_gives_the_numpy_map():
    pytest.importorskip("torch")
    model = factor_model(d=6, n_classes=2, n_tokens=4, seed=0)
    numpy_map = estimator_map([model], [16], [1, 2], estimators=("richardson",), n_draws=2, n_shards=5, seed=3)
    torch_map = estimator_map([model], [16], [1, 2], estimators=("richardson",), n_draws=2, n_shards=5, seed=3,
                              device=DEVICE)
    assert (torch_map["failure"] == "").all()
    for column in ("estimate", "se", "lower", "upper"):
        np.testing.assert_allclose(torch_map[column], numpy_map[column], rtol=1e-6, atol=1e-8)
    assert (torch_map["reliable"] == numpy_map["reliable"]).all()


def test_shards_of_unequal_sizes_follow_their_weights():
    model = factor_model(d=6, n_classes=2, n_tokens=4, seed=0)
    shards = sample_shards(model, 512, 10, np.random.default_rng(0), weights=np.arange(1, 11))
    sizes = np.array([s.n_texts for s in shards])
    assert sizes.sum() == 512 and (np.diff(sizes) > 0).all()
    np.testing.assert_allclose(sizes, 1 + 502 * np.arange(1, 11) / 55, atol=1)   # one each, the rest by weight
    equal = [s.n_texts for s in sample_shards(model, 37, 10, np.random.default_rng(0))]
    assert equal == [s.n_texts for s in sample_shards(model, 37, 10, np.random.default_rng(0), weights=[2] * 10)]
    for bad in ([1] * 9, [1] * 9 + [0], [1] * 9 + [np.nan]):
        with pytest.raises(ValueError, match="positive finite"):
            sample_shards(model, 100, 10, np.random.default_rng(0), weights=bad)


def test_an_estimator_map_split_into_ranges_of_draws_is_the_whole_map():
    model = factor_model(d=6, n_classes=2, n_tokens=4, seed=0)
    whole = estimator_map([model], [8], [1, 2], estimators=("plugin",), n_draws=3, n_shards=4, seed=2)
    parts = pd.concat([estimator_map([model], [8], [1, 2], estimators=("plugin",), n_draws=n, n_shards=4, seed=2,
                                     first_draw=first) for first, n in ((0, 1), (1, 2))], ignore_index=True)
    pd.testing.assert_frame_equal(parts, whole)
    assert whole["draw"].tolist() == [0, 0, 1, 1, 2, 2]


def test_bias_decomposition_with_nothing_sampled_has_no_bias():
    # With every moment at its population value the plug-in equals the truth exactly; the
    # decomposition's variants each keep one source noisy, and "all sampled" keeps all of them.
    from dataclasses import replace

    from ntps_nb.core.simulate import SOURCES, bias_decomposition

    model = lds_model(d=6, n_classes=2, n_tokens=4, seed=2)
    pop = model.population_moments()
    shards = sample_shards(model, 60, 3, np.random.default_rng(0))
    exact = [replace(s, Sxx=pop.Sxx, Sxy=pop.Sxy, C0=pop.C0, C1=pop.C1) for s in shards]
    np.testing.assert_allclose(estimate_ntps(exact, [1, 2]).estimate, model.population_ntps([1, 2]), rtol=1e-9)
    table = bias_decomposition(model, 60, [1, 2], n_draws=4, n_shards=3)
    assert set(table["sampled"]) == {"all sampled", "Sxy and Sxx sampled", *(f"only {s} sampled" for s in SOURCES)}
    assert (table["n_defined"] == 4).all()


def test_pair_shards_have_the_stated_population_gap_ratio_and_noise():
    from ntps_nb.core.simulate import pair_shards

    draws, S, delta = 20_000, 10, 3.0
    m = pair_shards(delta, draws, S, np.random.default_rng(0))
    assert m.shape == (draws, S, 2, 2) and np.array_equal(m, np.swapaxes(m, -1, -2))
    mean = m.mean(axis=1)
    diff = mean[:, 0, 0] - mean[:, 1, 1]
    # the mean's diagonal difference: mean sqrt(2) delta, SD sqrt(2); off-diagonal SD 1 / sqrt(2)
    assert abs(diff.mean() / np.sqrt(2) - delta) < 3 / np.sqrt(draws)
    assert abs(diff.std() - np.sqrt(2)) < 3 * np.sqrt(2) / np.sqrt(2 * draws)
    assert abs(mean[:, 0, 1].std() - 1 / np.sqrt(2)) < 3 / np.sqrt(2) / np.sqrt(2 * draws)
