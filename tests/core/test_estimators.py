"""Estimators of the population NTPS: consistency at large N, intervals, errors."""

import warnings

import numpy as np
import pytest

import pandas as pd
import scipy.linalg

from ntps_nb.core.estimators import (BOUND_SE, CALIBRATED_ESTIMATORS, CROSSFIT_SPLITS, DEFAULT_ESTIMATOR,
                                     ESTIMATORS, GAP_MIN, NOISE_MAX, FlagNotCalibratedWarning,
                                     PCA_TEXTS_PER_DIM, SPLIT_ESTIMATORS, STATIONARY_SE,
                                     eigengap_ratios, estimate_by_n, estimate_ntps, flag_at_bound, ntps_estimate,
                                     split_halves, stationary_reach_se, stationary_widening,
                                     subspace_noise)
from ntps_nb.core.moments import Moments
from ntps_nb.core.score import (BeyondRankError, BeyondRankWarning, InterpolationWarning, ntps, ntps_sweep,
                                theory_geometry)
from ntps_nb.core.simulate import (factor_model, lds_model, markov_model, moments_of_array, reflection_model,
                                   sample_shards)
from tests.core.fresh import run_fresh
from tests.core.torch_device import DEVICE

KS = np.array([1, 2, 4])
#: "debiased" is not confined to [0, 1], but where defined it stays of NTPS's order (its largest here: 1.07).
DEBIASED_BOUND = 2.0


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
    table = ntps_estimate(shards, [1, 2], estimator="plugin", level=0.9, flag_any_estimator=True)
    assert list(table.columns[:6]) == ["k", "estimator", "estimate", "se", "lower", "upper"]
    # the jackknife standard error, recomputed by hand at k = 1
    loo = np.array([ntps(Moments.combine(shards[:i] + shards[i + 1:]), k=1) for i in range(6)])
    se = np.sqrt(5 / 6 * np.sum((loo - loo.mean()) ** 2))
    assert table["se"].iloc[0] == pytest.approx(se, rel=1e-10)
    assert (table["lower"] < table["estimate"]).all() and (table["estimate"] < table["upper"]).all()
    # the flag is the subspace-noise, eigengap, [0, 1] and bound rule, the same for every estimator
    inside = (table["estimate"] - BOUND_SE * table["se"] >= 0) & (table["estimate"] + BOUND_SE * table["se"] <= 1)
    rule = ((table["subspace_noise"] <= NOISE_MAX) & (table["gap_ratio"] >= GAP_MIN) & np.isfinite(table["lower"])
            & np.isfinite(table["upper"]) & (table["lower"] <= 1) & (table["upper"] >= 0) & inside)
    np.testing.assert_array_equal(table["reliable"].to_numpy(), rule.to_numpy())
    assert rule.any() and not rule.all()  # this case exercises both outcomes
    # by default only the calibrated estimators' rows can be reliable; the plug-in's rows say why they are not
    with pytest.warns(FlagNotCalibratedWarning, match="1 of 2 rows of the 'plugin' estimator meet"):
        plain = ntps_estimate(shards, [1, 2], estimator="plugin", level=0.9)
    assert not plain["reliable"].any()
    # the same frame otherwise, but for the widenings of the rows the flag accepts (`rotation_widening`,
    # `stationary_widening`), made only where the flag is asked of this estimator: the interval before them is the
    # plain frame's
    widening = ["lower_unwidened", "upper_unwidened", "rotation_U", "rotation_V", "widening_level",
                "stationary_widened"]
    assert not set(widening) & set(plain.columns)
    pd.testing.assert_frame_equal(plain.drop(columns="reliable"), table.drop(columns=["reliable", *widening]).assign(
        lower=table["lower_unwidened"], upper=table["upper_unwidened"]))
    other = ntps_estimate(shards, [1, 2], estimator="richardson", level=0.9)
    np.testing.assert_array_equal(other["reliable"].to_numpy(), table["reliable"].to_numpy())
    assert table["subspace_noise"].iloc[0] == pytest.approx(max(table["noise_U"].iloc[0] / table["k_U"].iloc[0],
                                                                table["noise_V"].iloc[0] / 1))


#: Coverage at nominal 0.90 below which the plug-in's flagged rows count as failing the flag's promise: with 20 or
#: more rows, a calibrated interval falls this low with probability below 1e-7 (binomial).
PLUGIN_FLAGGED_BELOW = 0.5
#: ... and the least coverage the default's rows meeting the flag's other conditions must reach on the same draws
#: (3 binomial SEs below 0.90 at 20 rows is 0.70; the population is at an edge, where they are conservative).
DEFAULT_RELIABLE_AT_LEAST = 0.75


def test_the_flag_is_the_default_estimators_the_plugins_flagged_rows_under_cover():
    """Known truth: a population whose NTPS is 0.998 (LDS, 2 classes, tied gaps, k = 2, N/d = 32). The plug-in is
    biased toward chance by more than its jackknife interval there, so its rows that meet the flag's conditions
    cover far below 0.90; its cos^2 are biased away from the bound as well, so the stationary condition does not
    see the stationary point. The default's rows meeting the other conditions cover (conservatively: a stationary
    point), and the stationary condition calls nearly all of them unreliable. `ntps_estimate` therefore marks only
    `CALIBRATED_ESTIMATORS`' rows reliable; `estimator_map` marks every estimator's by the conditions unless told
    to give what a user gets."""
    from ntps_nb.core.simulate import estimator_map

    assert CALIBRATED_ESTIMATORS == (DEFAULT_ESTIMATOR,)
    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="tied", seed=60)
    # the plug-in's interval as the flag was calibrated without it: the stationary widening (session 67) lifts these
    # rows at this edge (24 of 29 on these draws), its bias stays
    plug = estimator_map([model], [32], [2], estimators=["plugin"], n_draws=40, seed=60, interval="jackknife",
                         stationary_widening=False)
    flagged = plug[plug["reliable"]]
    assert len(flagged) >= 20 and flagged["covered"].mean() < PLUGIN_FLAGGED_BELOW
    before = estimator_map([model], [32], [2], estimators=[DEFAULT_ESTIMATOR], n_draws=40, seed=60,
                           stationary_flag=False)
    conditions = before[before["reliable"]]
    assert len(conditions) >= 20 and conditions["covered"].mean() >= DEFAULT_RELIABLE_AT_LEAST
    default = estimator_map([model], [32], [2], estimators=[DEFAULT_ESTIMATOR], n_draws=40, seed=60)
    assert "stationary_distance" not in before and default["reliable"].sum() <= 2  # 40 draws at a stationary truth
    as_users_get = estimator_map([model], [32], [2], estimators=["plugin"], n_draws=5, seed=60, interval="jackknife",
                                 flag_any_estimator=False)
    assert not as_users_get["reliable"].any()


def _whitened_span(X, Sxx):
    """span(Sxx^{1/2} X), orthonormal (an independent route: scipy's sqrtm)."""
    root = np.real(scipy.linalg.sqrtm(Sxx))
    return scipy.linalg.orth(root @ X)


def test_subspace_noise_equals_principal_angles_computed_by_hand():
    model = lds_model(d=6, n_classes=2, n_tokens=4, gap="separated", seed=2)
    shards = sample_shards(model, 600, 5, np.random.default_rng(4))
    ks = np.array([1, 2, 3])
    table = subspace_noise(shards, ks)
    full = Moments.combine(shards)
    S = len(shards)

    def spans(m, k):
        # U for k >= m = 2: the whole label span, span(Sxx^-1 Sxy); V: top-k of (C1 C1^T, C0) by scipy
        u = np.linalg.solve(m.Sxx, m.Sxy)
        w, vecs = scipy.linalg.eigh(m.C1 @ m.C1.T, m.C0)
        v = vecs[:, np.argsort(w)[::-1][:k]]
        return _whitened_span(u, full.Sxx), _whitened_span(v, full.Sxx)

    for i, k in enumerate(ks):
        u_full, v_full = spans(full, k)
        nu = nv = 0.0
        for g in range(S):
            u_g, v_g = spans(Moments.combine(shards[:g] + shards[g + 1:]), k)
            nu += np.sum(np.sin(scipy.linalg.subspace_angles(u_g, u_full)) ** 2)
            nv += np.sum(np.sin(scipy.linalg.subspace_angles(v_g, v_full)) ** 2)
        if k >= 2:  # k_U = m = 2: U is the whole label span
            assert table["noise_U"].iloc[i] == pytest.approx((S - 1) / S * nu, rel=1e-6, abs=1e-12)
        assert table["noise_V"].iloc[i] == pytest.approx((S - 1) / S * nv, rel=1e-6, abs=1e-12)
    assert (table["k_U"] == np.minimum(ks, 2)).all()


def test_richardson_is_twice_the_plugin_minus_the_mean_of_its_halves():
    model = lds_model(d=8, n_classes=3, n_tokens=4, seed=6)
    shards = sample_shards(model, 800, 10, np.random.default_rng(1))
    a, b = split_halves(10, seed=0)
    halves = [Moments.combine([shards[i] for i in idx]) for idx in (a, b)]
    assert halves[0].n_texts == halves[1].n_texts == 400
    for k in (1, 2, 4):
        want = 2 * ntps(Moments.combine(shards), k=k) - (ntps(halves[0], k=k) + ntps(halves[1], k=k)) / 2
        assert estimate_ntps(shards, [k], estimator="richardson").estimate[0] == pytest.approx(want, rel=1e-10)


# Coverage of the default estimator where the flag says reliable, on two cells of the d = 16 map
# (N / d = 32, 10 shards, nominal 90%). With 200 draws the binomial SE of a coverage near 0.9 is
# 0.021, so an interval covering at the plug-in's 0.77 (its median over the d = 16 map) cannot
# land in [0.85, 0.95]; on the map this cell's coverage was 0.90 (100 draws). Since session 63 the default
# interval is widened over the rotation sets on the reliable rows (`rotation_widening`): on these draws it widens
# 5% and 25% of them and no row's coverage changes (0.920 and 0.934 either way;
# benchmarks/results/estimator_map/quadratic_map/session62/runs.txt).
COVERAGE_DRAWS = 200


def _default_rows(model, k, draws, seed, interval=None, **options):
    return pd.concat([ntps_estimate(sample_shards(model, 32 * model.d, 10, np.random.default_rng([seed, i])), [k],
                                    level=0.90, interval=interval, **options)
                      for i in range(draws)], ignore_index=True).assign(truth=model.population_ntps([k])[0])


def test_default_intervals_cover_where_the_flag_says_reliable():
    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="separated", seed=0)
    rows = _default_rows(model, 2, COVERAGE_DRAWS, seed=11)
    assert (rows["estimator"] == DEFAULT_ESTIMATOR).all()
    reliable = rows[rows["reliable"]]
    assert len(reliable) >= 0.9 * COVERAGE_DRAWS  # a well separated cell at N / d = 32: accepted
    covered = ((reliable["lower"] <= reliable["truth"]) & (reliable["truth"] <= reliable["upper"])).mean()
    assert 0.85 <= covered <= 0.95, covered
    # and its bias is well inside the interval: below a quarter of the mean width
    assert abs((reliable["estimate"] - reliable["truth"]).mean()) < (reliable["upper"] - reliable["lower"]).mean() / 4


def test_default_intervals_cover_on_a_family_their_calibration_never_saw():
    # Discrete tokens from class-dependent Markov chains, classes imbalanced 2 : 1: every threshold of the flag
    # and the interval was chosen on Gaussian, equal-prior families. This population (k = 1, N / d = 32) covered
    # 0.912 on 193 reliable rows of 200 in benchmarks/unseen_family_check.py; here 200 other draws (binomial SE
    # 0.021 near 0.9).
    model = markov_model(d=16, n_classes=2, gap="separated", memory=0.7, seed=500)
    rows = _default_rows(model, 1, COVERAGE_DRAWS, seed=14)
    reliable = rows[rows["reliable"]]
    assert len(reliable) >= 0.9 * COVERAGE_DRAWS
    covered = ((reliable["lower"] <= reliable["truth"]) & (reliable["truth"] <= reliable["upper"])).mean()
    assert 0.85 <= covered <= 0.95, covered
    assert abs((reliable["estimate"] - reliable["truth"]).mean()) < (reliable["upper"] - reliable["lower"]).mean() / 4


def test_the_flag_says_unreliable_at_a_nearly_tied_k():
    # Two nearly tied label directions (within 2%): the top one (k = 1) is not identified at N / d = 32;
    # on the map the flag accepted 4% of 100 draws in this cell.
    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="tied", seed=0)
    rows = _default_rows(model, 1, 100, seed=12)
    assert rows["reliable"].mean() <= 0.10


def _cos2_by_hand(moments, ks):
    """(K, max k) descending cos^2 of the principal angles between U_k and V_k, solved directly: Sxx^{-1/2} from
    scipy's eigh, U the top eigenvectors of Sxx^{-1/2} Sxy Sxy^T Sxx^{-1/2}, V from the generalized problem
    (C1 C1^T, C0), whitened by Sxx^{1/2} and orthonormalised (full-rank Sxx and C0 only)."""
    s, Q = scipy.linalg.eigh(moments.Sxx)
    root, inverse_root = (Q * np.sqrt(s)) @ Q.T, (Q / np.sqrt(s)) @ Q.T
    w, Y = scipy.linalg.eigh(inverse_root @ moments.Sxy @ moments.Sxy.T @ inverse_root)
    m = int(np.sum(w > 1e-9 * w.max()))
    u = Y[:, ::-1][:, :m]
    _, V = scipy.linalg.eigh(moments.C1 @ moments.C1.T, moments.C0)
    V = V[:, ::-1]
    out = np.full((len(ks), max(ks)), np.nan)
    for row, k in enumerate(ks):
        basis = np.linalg.qr(root @ V[:, :k])[0]
        cos = np.linalg.svd(basis.T @ u[:, : min(k, m)], compute_uv=False)
        out[row, : cos.size] = np.sort(cos**2)[::-1]
    return out


def test_the_geometrys_principal_angles_are_those_of_the_whitened_subspaces_solved_by_hand():
    model = lds_model(d=12, n_classes=6, n_tokens=8, gap="moderate", seed=4)
    moments = Moments.combine(sample_shards(model, 2000, 4, np.random.default_rng(0)))
    ks = np.array([1, 2, 3, 5, 8])
    geometry = theory_geometry(moments)
    cos2 = geometry.principal_cos2(ks)
    by_hand = _cos2_by_hand(moments, ks)
    np.testing.assert_allclose(cos2, by_hand[:, : cos2.shape[1]], atol=1e-9)
    assert np.isnan(by_hand[:, cos2.shape[1]:]).all() and np.isnan(cos2[0, 1:]).all()  # k = 1: one angle
    # NTPS_theory(k) is their mean over the k_U directions of U
    np.testing.assert_allclose(np.nansum(cos2, axis=1) / np.minimum(ks, geometry.m), [geometry.ntps(k) for k in ks],
                               atol=1e-12)


def _angles_by_hand(shards, ks, estimator, seed):
    """Each angle's cos^2 as the estimator combines NTPS, every sample solved by hand (`_cos2_by_hand`): the pooled
    shards and, for richardson, the two halves, extrapolated; (point (K, A), replicates (S, K, A) without shard i)."""
    S = len(shards)

    def combined(drop):
        kept = [i for i in range(S) if i != drop]
        pooled = _cos2_by_hand(Moments.combine([shards[i] for i in kept]), ks)
        if estimator == "plugin":
            return pooled
        halves = [[int(i) for i in half if i != drop] for half in split_halves(S, seed)]
        sizes = [sum(shards[i].n_texts for i in half) for half in halves]
        h, n = np.mean(1.0 / np.array(sizes)), sum(shards[i].n_texts for i in kept)
        w = h / (h - 1.0 / n)
        return w * pooled + (1 - w) * np.mean([_cos2_by_hand(Moments.combine([shards[i] for i in half]), ks)
                                               for half in halves], axis=0)

    return combined(None), np.array([combined(i) for i in range(S)])


def _se_by_hand(replicates):
    S = len(replicates)
    return np.sqrt((S - 1) / S * ((replicates - replicates.mean(axis=0)) ** 2).sum(axis=0))


def test_stationary_distance_is_each_angles_extrapolated_cos2_over_its_jackknife_se():
    """Recomputed from every sample the estimator solves, each solved by hand: the pooled shards and the two halves
    combined as richardson combines NTPS, the same for each shard left out, the jackknife SE of each angle, and the
    largest distance from 0 or 1 in SEs; and for the plug-in, the pooled cos^2 alone."""
    model = factor_model(d=10, n_classes=3, n_tokens=8, gap="separated", seed=2)
    shards = sample_shards(model, 1200, 6, np.random.default_rng(1))
    ks, seed = np.array([1, 2, 4]), 3
    for estimator in ("richardson", "plugin"):
        point, replicates = _angles_by_hand(shards, ks, estimator, seed)
        distance = np.where(np.isnan(point), 0.0, np.minimum(point, 1 - point) / _se_by_hand(replicates))
        frame = ntps_estimate(shards, ks, estimator=estimator, seed=seed, flag_any_estimator=True)
        np.testing.assert_allclose(frame["stationary_distance"], np.nanmax(distance, axis=1), rtol=1e-7)
        assert (frame["stationary_distance"] > 0.5).all()  # distances away from 0: the comparison is not vacuous


def test_the_stationary_reach_moves_each_angle_near_a_bound_to_it():
    """stationary_lower / stationary_upper recomputed by hand: every angle whose cos^2 (extrapolated, solved by hand)
    lies within stationary_reach_se jackknife SEs of 0 (of 1) is set to 0 (to 1) in the mean over the k_U angles.
    An LDS whose angles at k = 2 are near 1 (population NTPS 0.998) and near 0 at k = 1: both sides move, and the
    reach is not the whole way to 0 or 1 on every row (the comparison is not vacuous)."""
    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="tied", seed=660)
    ks, seed = np.array([1, 2, 4]), 200
    moved_down = moved_up = False
    for draw in range(3):
        shards = sample_shards(model, 512, 10, np.random.default_rng([660, draw]))
        point, replicates = _angles_by_hand(shards, ks, "richardson", seed)
        se, within = _se_by_hand(replicates), stationary_reach_se(0.90, STATIONARY_SE, 10)
        angles = ~np.isnan(point)
        up = np.where(angles & ((1 - point) / se < within), np.clip(1 - point, 0, None), 0).sum(axis=1)
        down = np.where(angles & (point / se < within), np.clip(point, 0, None), 0).sum(axis=1)
        frame = ntps_estimate(shards, ks, seed=seed)
        k_u = angles.sum(axis=1)
        np.testing.assert_allclose(frame["estimate"], np.nanmean(point, axis=1), rtol=1e-7)
        np.testing.assert_allclose(frame["stationary_upper"], frame["estimate"] + up / k_u, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(frame["stationary_lower"], frame["estimate"] - down / k_u, rtol=1e-7, atol=1e-12)
        moved_down |= bool((down > 1e-3).any())
        moved_up |= bool((up > 1e-3).any())
    assert moved_down and moved_up


def test_the_reach_is_the_selective_tests_critical_value():
    """stationary_reach_se against a simulation: of Student t draws (S - 1 degrees of freedom) past the stationary
    condition's 2, the share past the reach is 1 - level (2,000,000 draws: about 76,000 past 2 at 9 degrees of
    freedom, so the share's binomial SE is about 0.0011)."""
    rng = np.random.default_rng(0)
    for level, shards in ((0.90, 10), (0.80, 20)):
        reach = stationary_reach_se(level, STATIONARY_SE, shards)
        t = rng.standard_t(shards - 1, 2_000_000)
        kept = t[t >= STATIONARY_SE]
        share, se = np.mean(kept >= reach), np.sqrt(level * (1 - level) / kept.size)
        assert abs(share - (1 - level)) < 4 * se, (level, shards, share)
    assert stationary_reach_se(0.90, STATIONARY_SE, 10) == pytest.approx(3.418, abs=1e-3)


def test_the_stationary_widening_joins_the_reach_on_the_reliable_rows_only():
    """`stationary_widening`: on reliable rows lower / upper become min(lower, stationary_lower) / max(upper,
    stationary_upper); unreliable rows keep theirs; the interval before is kept and ``stationary_widened`` says which
    rows moved; the rotation widening's interval-before is not overwritten."""
    frame = pd.DataFrame({"estimate": [0.5, 0.5, 0.9, 0.1], "lower": [0.4, 0.4, 0.85, 0.05],
                          "upper": [0.6, 0.6, 0.95, 0.15], "reliable": [True, False, True, True],
                          "stationary_lower": [0.5, 0.2, 0.9, 0.0], "stationary_upper": [0.5, 0.9, 0.99, 0.1]})
    out = stationary_widening(frame)
    np.testing.assert_allclose(out["lower"], [0.4, 0.4, 0.85, 0.0])
    np.testing.assert_allclose(out["upper"], [0.6, 0.6, 0.99, 0.15])
    assert out["stationary_widened"].tolist() == [False, False, True, True]
    np.testing.assert_allclose(out["lower_unwidened"], frame["lower"])
    rotated = stationary_widening(frame.assign(lower_unwidened=0.3, upper_unwidened=0.7))
    np.testing.assert_allclose(rotated["lower_unwidened"], 0.3)
    np.testing.assert_allclose(rotated["lower"], out["lower"])


@pytest.mark.parametrize("device", [None, DEVICE])
def test_ntps_estimate_widens_the_reliable_rows_to_their_reach(device):
    """``stationary_widening=True`` (the default) is the frame without it with `stationary_widening` applied, on
    numpy and on the torch backend; it is conditioned on the stationary condition, so without that it is off."""
    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="separated", seed=3)
    shards = sample_shards(model, 512, 10, np.random.default_rng(8))
    plain = ntps_estimate(shards, [1, 2, 4], device=device, stationary_widening=False)
    widened = ntps_estimate(shards, [1, 2, 4], device=device)
    assert "stationary_widened" not in plain
    pd.testing.assert_frame_equal(widened, stationary_widening(plain))
    # on this draw both reliable rows move: k = 2 up to 1, k = 1 (its one angle's SE large) to all of [0, 1]
    assert widened["stationary_widened"].tolist() == [True, True, False]
    assert widened.loc[0, "lower"] == pytest.approx(0.0, abs=1e-9) and widened.loc[1, "upper"] > plain.loc[1, "upper"]
    unconditioned = ntps_estimate(shards, [1, 2, 4], device=device, stationary_flag=False)
    pd.testing.assert_frame_equal(unconditioned, ntps_estimate(shards, [1, 2, 4], device=device, stationary_flag=False,
                                                               stationary_widening=False))
    assert "stationary_widened" not in unconditioned


def test_the_flag_says_unreliable_at_a_stationary_point_where_the_interval_over_covers():
    """Known truth at a stationary point: the reflection family at angle 0, k = 1, population NTPS exactly 1 (every
    principal angle at 0). The default's rows meeting the flag's other conditions cover above 0.95 there (on the
    map 0.96-1.00; 200 draws, binomial SE 0.015 at 0.95): the interval is not calibrated. The stationary condition
    calls them unreliable: it keeps at most 2% of the draws (docs/estimator.md: 0.2-0.5% of such rows)."""
    model = reflection_model(d=16, n_classes=3, gap="separated", angle=0, seed=7)
    assert model.population_ntps([1])[0] == pytest.approx(1.0, abs=1e-9)

    def rows(stationary_flag):
        return pd.concat([ntps_estimate(sample_shards(model, 32 * model.d, 10, np.random.default_rng([16, i])), [1],
                                        stationary_flag=stationary_flag, stationary_widening=False)
                          for i in range(COVERAGE_DRAWS)],
                         ignore_index=True)

    before, after = rows(False), rows(True)
    accepted = before[before["reliable"]]
    assert len(accepted) >= COVERAGE_DRAWS / 4
    assert ((accepted["lower"] <= 1.0) & (1.0 <= accepted["upper"])).mean() > 0.95
    assert after["reliable"].sum() <= 0.02 * COVERAGE_DRAWS
    # the condition is the only difference: the other columns are the same numbers
    pd.testing.assert_frame_equal(before, after.drop(columns=["stationary_distance", "stationary_lower",
                                                              "stationary_upper"]).assign(reliable=before["reliable"]))


@pytest.mark.parametrize("device", [None, DEVICE])
def test_without_the_stationary_condition_no_angle_is_computed(monkeypatch, device):
    """``stationary_flag=False`` (the committed studies' estimates stage) gives the frame without the column and
    computes no principal angle for it, on numpy and on the torch backend."""
    from ntps_nb.core.score import TheoryGeometry

    def refuse(self, ks):
        raise AssertionError("principal angles computed for a condition that is off")

    model = lds_model(d=8, n_classes=3, n_tokens=6, gap="separated", seed=1)
    shards = sample_shards(model, 400, 6, np.random.default_rng(0))
    monkeypatch.setattr(TheoryGeometry, "principal_cos2", refuse)
    frame = ntps_estimate(shards, [1, 2], stationary_flag=False, device=device)
    assert "stationary_distance" not in frame
    with pytest.raises(AssertionError, match="condition that is off"):
        ntps_estimate(shards, [1, 2], device=device)


def _own_gaps(moments, ks):
    """The eigengaps at k from the two generalized eigenproblems solved directly (scipy, not the geometry)."""
    lam_u = np.sort(scipy.linalg.eigh(moments.Sxy @ moments.Sxy.T, moments.Sxx, eigvals_only=True))[::-1]
    lam_v = np.sort(scipy.linalg.eigh(moments.C1 @ moments.C1.T, moments.C0, eigvals_only=True))[::-1]
    m = int(np.sum(lam_u > 1e-9 * lam_u[0]))
    lam_u = np.append(lam_u[:m], 0.0)
    k_u = np.minimum(ks, m)
    return lam_u[k_u - 1] - lam_u[k_u], lam_v[ks - 1] - lam_v[ks]


def test_eigengap_ratios_against_a_direct_computation():
    # full-rank Sxx and C0 (N >> d), so the generalized problems can be solved directly
    model = lds_model(d=6, n_classes=3, n_tokens=4, seed=2)
    shards = sample_shards(model, 2400, 5, np.random.default_rng(3))
    ks = np.array([1, 2, 3, 4])
    got = eigengap_ratios(shards, ks)
    full_u, full_v = _own_gaps(Moments.combine(shards), ks)
    np.testing.assert_allclose(got["gap_U"], full_u, rtol=1e-8)
    np.testing.assert_allclose(got["gap_V"], full_v, rtol=1e-8)
    reps = [_own_gaps(Moments.combine(shards[:i] + shards[i + 1:]), ks) for i in range(5)]
    for column, full in ((0, full_u), (1, full_v)):
        values = np.array([r[column] for r in reps])
        se = np.sqrt(4 / 5 * ((values - values.mean(axis=0)) ** 2).sum(axis=0))
        np.testing.assert_allclose(got[f"gap_ratio_{'UV'[column]}"], full / se, rtol=1e-6)
    np.testing.assert_allclose(got["gap_ratio"], np.minimum(got["gap_ratio_U"], got["gap_ratio_V"]))
    # the estimate's frame carries the same numbers
    table = ntps_estimate(shards, ks, estimator="plugin", flag_any_estimator=True)
    np.testing.assert_allclose(table["gap_ratio"], got["gap_ratio"], rtol=1e-12)


def test_the_gap_condition_refuses_a_stable_tie_break():
    # Two label directions tied exactly in the population (C = 3, equal class means' norms and
    # isotropic noise): at k = 1 U_1 is one arbitrary direction of a 2-dimensional eigenspace. Every
    # draw's gap at k_U = 1 is pure sampling noise, so its ratio to its jackknife SE stays small
    # and the flag says unreliable whatever the subspace noise says; at k = 2 both directions are in
    # and the gap to the third is large.
    rng = np.random.default_rng(8)  # a draw whose shards happen to agree on U_1 (small subspace noise)
    d, n = 8, 4000
    centres = np.zeros((3, d))
    centres[0, 0] = centres[1, 1] = 3.0  # two label directions of equal strength, class 2 at the origin
    shards = []
    for _ in range(6):
        labels = rng.integers(0, 3, size=n)
        states = centres[labels][:, None, :] + rng.standard_normal((n, 3, d))
        shards.append(moments_of_array(states, labels, n_classes=3))
    table = ntps_estimate(shards, [1, 2], estimator="plugin")
    assert table["subspace_noise"].iloc[0] <= NOISE_MAX  # the noise rule alone would accept this tie-break
    assert table["gap_ratio_U"].iloc[0] < GAP_MIN and not table["reliable"].iloc[0]
    assert table["gap_ratio_U"].iloc[1] > GAP_MIN


def test_an_interval_wholly_outside_0_1_is_not_reliable():
    # NTPS lies in [0, 1]; with quiet subspaces and resolved gaps, an estimate whose interval misses
    # [0, 1] altogether (seen once on real data: 1.34 with [1.16, 1.51]) is still flagged
    from ntps_nb.core.estimators import _estimate_frame

    ks = np.array([1, 2, 3])
    estimate = np.array([0.5, 1.4, -0.3])
    loo = estimate + 0.01 * np.array([[1.0], [-1.0], [0.5], [-0.5]])  # jackknife SE ~0.03
    noise = pd.DataFrame({"k": ks, "k_U": ks, "noise_U": 0.001 * ks, "noise_V": 0.001 * ks, "bias_bound": 0.0})
    gaps = pd.DataFrame({"k": ks, "gap_U": 1.0, "gap_V": 1.0, "gap_ratio_U": 50.0, "gap_ratio_V": 50.0,
                         "gap_ratio": 50.0})
    table = _estimate_frame(ks, "richardson", estimate, np.full(3, np.nan), loo, noise, gaps, level=0.9,
                            noise_max=NOISE_MAX, gap_min=GAP_MIN, n_texts=400)
    assert table["upper"].iloc[2] < 0 < 1 < table["lower"].iloc[1]
    assert table["reliable"].tolist() == [True, False, False]


def test_an_estimate_at_the_bounds_of_0_1_is_not_reliable():
    # quiet subspaces, resolved gaps, intervals meeting [0, 1]: the rows whose estimate lies within
    # BOUND_SE jackknife standard errors of 0 or 1, or past either, are at_bound and not reliable
    from ntps_nb.core.estimators import _estimate_frame

    ks = np.arange(1, 7)
    estimate = np.array([0.5, 0.995, 0.004, 0.95, 1.003, 1.0])
    loo = estimate + 0.01 * np.array([[1.0], [-1.0], [0.5], [-0.5]])
    se = np.sqrt(3 / 4 * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))  # 0.0137 in every column
    loo[:, 5] = 1.0  # an NTPS of exactly 1 (k beyond a rank): SE 0, still at the bound
    noise = pd.DataFrame({"k": ks, "k_U": ks, "noise_U": 0.001 * ks, "noise_V": 0.001 * ks, "bias_bound": 0.0})
    gaps = pd.DataFrame({"k": ks, "gap_U": 1.0, "gap_V": 1.0, "gap_ratio_U": 50.0, "gap_ratio_V": 50.0,
                         "gap_ratio": 50.0})
    table = _estimate_frame(ks, "richardson", estimate, np.full(6, np.nan), loo, noise, gaps, level=0.9,
                            noise_max=NOISE_MAX, gap_min=GAP_MIN, n_texts=400)
    assert np.all((table["lower"] <= 1) & (table["upper"] >= 0))  # the [0, 1] condition passes every row
    np.testing.assert_allclose(table["se"].iloc[:5], se[:5])
    distance = np.minimum(estimate, 1 - estimate)
    assert distance[1] < BOUND_SE * se[1] and distance[3] > BOUND_SE * se[3]  # 0.005 against 0.0137 * BOUND_SE
    assert table["at_bound"].tolist() == [False, True, True, False, True, True]
    assert table["reliable"].tolist() == [True, False, False, True, False, False]
    # bound_se = 0 keeps only the rows past 0 or 1 (or on them) out
    loose = _estimate_frame(ks, "richardson", estimate, np.full(6, np.nan), loo, noise, gaps, level=0.9,
                            noise_max=NOISE_MAX, gap_min=GAP_MIN, n_texts=400, bound_se=0.0)
    assert loose["at_bound"].tolist() == [False, False, False, False, True, True]


def test_flag_at_bound_reads_a_table_and_refuses_a_bad_bound():
    frame = pd.DataFrame({"estimate": [0.999, 0.5, np.nan, 0.9999], "se": [0.01, 0.01, 0.01, np.nan],
                          "reliable": [1.0, 1.0, 0.0, 0.0]})  # a table's flags read back as floats
    out = flag_at_bound(frame)
    assert out["at_bound"].tolist() == [True, False, False, False]  # no estimate or SE: not at the bound
    assert out["reliable"].tolist() == [False, True, False, False]
    assert list(out.columns) == ["estimate", "se", "reliable", "at_bound"]
    pd.testing.assert_frame_equal(flag_at_bound(out), out)  # applying it twice changes nothing
    with pytest.raises(ValueError, match="bound_se"):
        flag_at_bound(frame, bound_se=-1.0)
    with pytest.raises(ValueError, match="bound_se"):
        flag_at_bound(frame, bound_se=np.nan)


def test_the_bound_condition_removes_the_over_covering_rows_at_a_population_ntps_of_1():
    # The "jackknife" interval's flag (the default interval, "quadratic", has no bound condition:
    # test_quadratic.py). LDS, C = 2, nearly tied, k = 2, N / d = 32: the population NTPS is 0.9986,
    # an extremum, where the estimate's error is quadratic and the jackknife SE ~1.5x too large. Of 200 draws, the rows
    # meeting the flag's other conditions cover about 0.99 (binomial SE ~0.007): the bound condition
    # takes most of them out of `reliable` (at_bound), and those it takes out are the over-covering ones.
    # (The stationary condition, which also takes these rows, is off: this is the bound condition's own test.)
    model = lds_model(d=16, n_classes=2, n_tokens=8, signal=0.5, gap="tied", seed=17)
    rows = _default_rows(model, 2, COVERAGE_DRAWS, seed=13, interval="jackknife", stationary_flag=False)
    assert 1 - rows["truth"].iloc[0] < 0.005
    covered = (rows["lower"] <= rows["truth"]) & (rows["truth"] <= rows["upper"])
    other = rows["reliable"] | rows["at_bound"]  # the noise, eigengap and [0, 1] conditions
    assert other.sum() >= 0.9 * COVERAGE_DRAWS and covered[other].mean() >= 0.97
    assert rows["at_bound"].sum() >= 0.75 * COVERAGE_DRAWS and covered[rows["at_bound"]].mean() >= 0.97
    # The price (docs/estimator.md, "The bias at the edges of [0, 1]"): the rows meeting the other
    # conditions are unbiased (mean error -0.0004, Monte Carlo SE 0.0007, against a quarter-width of
    # 0.013), while the few the bound condition keeps are those whose estimate fell furthest inside,
    # biased inward by about 0.014 (SE 0.0006): the selection, not the estimator, makes that bias.
    error, width = rows["estimate"] - rows["truth"], rows["upper"] - rows["lower"]

    def mean_and_se(mask):
        return error[mask].mean(), error[mask].std() / np.sqrt(mask.sum())

    bias_other, se_other = mean_and_se(other)
    bias_kept, se_kept = mean_and_se(rows["reliable"])
    assert abs(bias_other) + 3 * se_other < width[other].mean() / 4
    assert bias_kept + 3 * np.hypot(se_kept, se_other) < bias_other


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
    with pytest.raises(ValueError, match="ks is empty"):
        ntps_estimate(shards, [])
    with pytest.raises(ValueError, match="at least 3 shards"):
        ntps_estimate(shards[:2], [1], estimator="plugin")
    # the estimators that split into halves: with 3 shards one half holds a single shard and every replicate that
    # leaves it out fails, so the interval would be NaN on every row; 3 shards suffice for the others
    for estimator in SPLIT_ESTIMATORS:
        with pytest.raises(ValueError, match=f"at least 4 shards for estimator='{estimator}'"):
            ntps_estimate(shards[:3], [1], estimator=estimator)
    assert DEFAULT_ESTIMATOR in SPLIT_ESTIMATORS and np.isfinite(ntps_estimate(shards, [1])["se"]).all()
    assert np.isfinite(ntps_estimate(shards[:3], [1], estimator="plugin")["se"]).all()


@pytest.mark.parametrize("family", ["lds", "factor"])
def test_debiased_is_undefined_where_the_labels_are_fitted_exactly(family):
    """At N <= r the shards' spread removes all of G^T G and the debiased eigenvalues are rounding: the
    estimator says NaN (as "adjusted" does), where it divided by rounding and gave values orders of magnitude
    outside [0, 1]. Above the rank it is defined and of NTPS's order."""
    from ntps_nb.core.simulate import factor_model

    model = (lds_model if family == "lds" else factor_model)(d=16, n_classes=6, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InterpolationWarning)
        for n_texts in (12, 16):  # N below and at d = 16
            shards = sample_shards(model, n_texts, 4, np.random.default_rng(n_texts))
            swept = ntps_sweep(shards, estimator="debiased")
            assert swept["ntps"].isna().all(), (family, n_texts)
        above = ntps_sweep(sample_shards(model, 64, 4, np.random.default_rng(64)), estimator="debiased")
    assert np.isfinite(above["ntps"]).sum() >= 3 and np.nanmax(np.abs(above["ntps"])) < DEBIASED_BOUND


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


def counted_solves(monkeypatch, *modules) -> dict:
    """The perception and next-token subspace solves made through ``modules`` from now on (every place the
    code under test can solve them from), counted in the returned dict as they happen."""
    calls = {"perception": 0, "next_token": 0}
    for module in modules:
        for name in calls:
            solve = getattr(module, f"{name}_subspace")

            def call(*args, _name=name, _solve=solve, **kwargs):
                calls[_name] += 1
                return _solve(*args, **kwargs)

            monkeypatch.setattr(module, f"{name}_subspace", call)
    return calls


def test_ntps_estimate_solves_each_pool_once_for_its_plugins_gaps_and_noise(monkeypatch):
    """The plug-in's `ntps_estimate` solves the perception and next-token subspaces once for the
    full sample and once per leave-one-shard-out pool (S + 1 each), shared by the jackknife, the
    eigengaps and the subspace noise; its noise and gap columns equal `subspace_noise` and
    `eigengap_ratios` computed on their own, exactly."""
    import ntps_nb.core.estimators as estimators
    import ntps_nb.core.score as score_module

    model = lds_model(d=6, n_classes=3, n_tokens=4, gap="separated", seed=2)
    shards = sample_shards(model, 600, 5, np.random.default_rng(4))
    ks = np.array([1, 2, 4])
    alone_noise, alone_gaps = subspace_noise(shards, ks), eigengap_ratios(shards, ks)
    calls = counted_solves(monkeypatch, estimators, score_module)
    frame = ntps_estimate(shards, ks, estimator="plugin")
    assert calls == {"perception": len(shards) + 1, "next_token": len(shards) + 1}
    for column in ("noise_U", "noise_V", "bias_bound"):
        np.testing.assert_array_equal(frame[column].to_numpy(), alone_noise[column].to_numpy())
    for column in ("gap_U", "gap_V", "gap_ratio_U", "gap_ratio_V", "gap_ratio"):
        np.testing.assert_array_equal(frame[column].to_numpy(), alone_gaps[column].to_numpy())


@pytest.mark.parametrize("estimator", ["richardson", "extrapolate"])
def test_a_jackknife_replicate_solves_only_the_half_it_leaves_a_shard_out_of(monkeypatch, estimator):
    """Each replicate of the split-half estimators leaves one shard out of one half; the other half is as
    the estimate had it, and its plug-in is read, not solved again: S + 1 pools and, for each split, its
    2 halves and S halves less one shard (richardson's one split: 2 S + 3 solves, where solving both
    halves per replicate took 3 S + 3; extrapolate's splits share the halves they have in common). The
    frame is the one the halves solved afresh in every replicate give, exactly."""
    import ntps_nb.core.estimators as estimators
    import ntps_nb.core.score as score_module

    model = lds_model(d=6, n_classes=3, n_tokens=4, gap="separated", seed=2)
    shards = sample_shards(model, 600, 6, np.random.default_rng(4))
    S, ks = len(shards), np.array([1, 2, 4])
    on_halves = estimators._plugin_on_halves
    monkeypatch.setattr(estimators, "_plugin_on_halves",
                        lambda *args, memo=None, **kwargs: on_halves(*args, memo=None, **kwargs))
    afresh = ntps_estimate(shards, ks, estimator=estimator, interval="jackknife")
    monkeypatch.setattr(estimators, "_plugin_on_halves", on_halves)
    calls = counted_solves(monkeypatch, estimators, score_module)
    frame = ntps_estimate(shards, ks, estimator=estimator, interval="jackknife")
    halves = set()
    for split in range(1 if estimator == "richardson" else estimators.CROSSFIT_SPLITS):
        for half in split_halves(S, seed=split):
            halves |= {tuple(half)} | {tuple(j for j in half if j != i) for i in half}
    assert calls == {"perception": S + 1 + len(halves), "next_token": S + 1 + len(halves)}
    pd.testing.assert_frame_equal(frame, afresh, check_exact=True)
    assert np.isfinite(frame["se"]).all()


@pytest.mark.parametrize("estimator", ["plugin", "richardson", "extrapolate"])
def test_ntps_and_ntps_sweep_solve_the_pooled_moments_once(monkeypatch, estimator):
    """`ntps` and `ntps_sweep` solve the pooled moments for their k grid and warnings, and the estimator reads
    that solve (`estimate_ntps(geometry=...)`) instead of factorising them again: 1 solve, plus the halves of
    richardson's split (2) or extrapolate's splits; the values are those of `estimate_ntps` solving on its own."""
    import ntps_nb.core.estimators as estimators
    import ntps_nb.core.score as score_module

    model = lds_model(d=6, n_classes=3, n_tokens=4, gap="separated", seed=2)
    shards = sample_shards(model, 600, 6, np.random.default_rng(4))
    halves = set()
    for split in range({"plugin": 0, "richardson": 1}.get(estimator, CROSSFIT_SPLITS)):
        halves |= {tuple(half) for half in split_halves(len(shards), seed=split)}
    alone = estimate_ntps(shards, [1, 2, 3], estimator=estimator).estimate
    calls = counted_solves(monkeypatch, estimators, score_module)
    swept = ntps_sweep(shards, estimator=estimator).set_index("k")["ntps"]
    assert calls == {"perception": 1 + len(halves), "next_token": 1 + len(halves)}
    calls.update(perception=0, next_token=0)
    at_2 = ntps(shards, 2, estimator=estimator)
    assert calls == {"perception": 1 + len(halves), "next_token": 1 + len(halves)}
    np.testing.assert_array_equal(swept.loc[[1, 2, 3]].to_numpy(), alone)
    assert at_2 == alone[1]


def _interpolation_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, InterpolationWarning)]


def test_below_n_equals_d_the_perception_eigenvalues_are_the_class_counts_and_ntps_says_so():
    # 12 texts of 16-dimensional states: Sxx has rank 12, the one-hot labels are fitted exactly, and
    # the perception eigenvalues are those of Y^T Y (the class counts) or, centred, of
    # diag(counts) - counts counts^T / N: fixed by the labels, whatever the states.
    model = lds_model(d=16, n_classes=6, n_tokens=8, seed=0)
    pooled = Moments.combine(sample_shards(model, 12, 4, np.random.default_rng(1)))
    counts = np.diag(pooled.Syy)
    geometry = theory_geometry(pooled)
    assert geometry.r_U == 12
    present = np.sort(counts[counts > 0])[::-1]
    np.testing.assert_allclose(geometry.eigenvalues, present, rtol=1e-8)
    centred = theory_geometry(pooled, centred=True)
    expected = np.linalg.eigvalsh(np.diag(counts) - np.outer(counts, counts) / counts.sum())[::-1]
    np.testing.assert_allclose(centred.eigenvalues, expected[: centred.m], rtol=1e-8)
    [message] = _interpolation_warnings(lambda: ntps(pooled, k=2))
    assert message.startswith("the pooled moments: 12 texts, no more than the rank of Sxx (12)")
    assert _interpolation_warnings(lambda: ntps_sweep(pooled, centred=True))
    # 100 texts of the same states: nothing to say
    more = Moments.combine(sample_shards(model, 100, 4, np.random.default_rng(1)))
    assert theory_geometry(more).r_U == 16 and not _interpolation_warnings(lambda: ntps(more, k=2))


@pytest.mark.parametrize("counts", [(10, 10, 6, 6, 3), (10, 10, 10, 6, 3), (12, 9, 6, 3, 1)])
def test_below_the_rank_tied_ks_are_where_equal_classes_leave_u_to_rounding(counts):
    """No more texts than dimensions: the k `tied_ks` names from Syy alone are exactly where the perception
    eigenvalues of the Sxx, Sxy problem tie (an independent eigensolve), uncentred and centred; there NTPS
    moves under a perturbation of Sxx at rounding size and nowhere else; the warning names them."""
    from ntps_nb.core.score import tied_ks

    rng = np.random.default_rng(sum(counts))
    labels = np.repeat(np.arange(len(counts)), counts)
    n, d = len(labels), 64  # 25-37 texts in 64 dimensions
    states = rng.standard_normal((n, 6, d)) @ np.diag(np.linspace(1, 3, d))
    moments = moments_of_array(states, labels, len(counts))
    for centred in (False, True):
        geometry = theory_geometry(moments, centred=centred)
        assert geometry.r_U == n - centred  # the labels are fitted exactly
        values = geometry.eigenvalues
        by_solve = [k for k in range(1, geometry.m) if values[k - 1] - values[k] <= 1e-9 * values[0]]
        assert tied_ks(moments.Syy, centred) == by_solve, centred
    tied = tied_ks(moments.Syy)
    assert tied == [k for k in range(1, len(counts)) if sorted(counts)[::-1][k - 1] == sorted(counts)[::-1][k]]
    ks = np.arange(1, len(counts))
    spread = []
    for _ in range(8):  # symmetric noise of relative size 1e-12 on Sxx
        noise = rng.standard_normal((d, d)) * 1e-12 * np.abs(moments.Sxx).max()
        nudged = Moments(**{**moments.arrays(), "Sxx": moments.Sxx + (noise + noise.T) / 2},
                         n_texts=moments.n_texts, n_tokens=moments.n_tokens)
        spread.append([theory_geometry(nudged).ntps(int(k)) for k in ks])
    spread = np.ptp(np.array(spread), axis=0)
    for k, moved in zip(ks, spread):
        assert (moved > 1e-3) if k in tied else (moved < 1e-6), (k, moved)
    [message] = _interpolation_warnings(lambda: ntps(moments, k=1))
    if tied:
        assert f"here at k = {', '.join(map(str, tied))}, where U_k is chosen by rounding" in message
    else:
        assert "no two are here" in message


def test_the_interpolation_warning_names_the_tied_k_of_the_half_it_names():
    """120 texts in 8 shards at d = 64: the pooled moments are above the rank, richardson's halves (60 texts)
    are not; each shard has classes of 5, 5, 3 and 2 texts, so a half ties at k = 1 only (20, 20, 12, 8)."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), (5, 5, 3, 2))
    shards = [moments_of_array(rng.standard_normal((15, 6, 64)), labels, 4) for _ in range(8)]
    [message] = _interpolation_warnings(lambda: ntps(shards, k=1, estimator="richardson"))
    assert message.startswith("a half of the richardson estimator's split: 60 texts")
    assert "here at k = 1 in one of the 2 parts of the estimate that fit the labels exactly, where U_k" in message


def _tied_from_counts(counts) -> set[int]:
    """The k < m at which the k-th and (k+1)-th largest nonzero class counts are equal (uncentred moments)."""
    top = sorted((c for c in counts if c > 0), reverse=True)
    return {k for k in range(1, len(top)) if top[k - 1] == top[k]}


def test_the_interpolation_warning_names_the_tied_k_of_every_part_that_fits_the_labels_exactly():
    """56 texts in 8 shards at d = 64: the pooled moments, richardson's halves and every leave-one-shard-out
    replicate (and its halves) fit the labels exactly, each with its own class counts. The warning names the
    union of their ties, checked against the counts of the labels themselves (not the moments); the pooled
    counts alone tie nowhere, so a list of the pooled part's ties alone (as before) names none."""
    rng = np.random.default_rng(6)
    shard_labels = [rng.choice(5, size=7, p=[0.4, 0.25, 0.15, 0.12, 0.08]) for _ in range(8)]
    shards = [moments_of_array(rng.standard_normal((7, 5, 64)), labels, 5) for labels in shard_labels]

    def counts(members):
        return np.bincount(np.concatenate([shard_labels[i] for i in members]), minlength=5)

    assert not _tied_from_counts(counts(range(8)))  # the pooled moments tie nowhere
    halves = [list(side) for side in split_halves(8, 0)]
    value_parts = [list(range(8))] + halves
    interval_parts = value_parts + [[i for i in part if i != drop] for drop in range(8) for part in value_parts]
    for call, members in ((lambda: ntps(shards, k=1, estimator="richardson"), value_parts),
                          (lambda: ntps_estimate(shards, [1, 2], rotation_flag=False), interval_parts)):
        expected = sorted(set().union(*(_tied_from_counts(counts(part)) for part in members)))
        assert expected, "the construction must tie somewhere"
        [message] = _interpolation_warnings(call)
        assert message.startswith("the pooled moments: 56 texts")
        assert (f"here at k = {', '.join(map(str, expected))} in one of the {len(members)} parts of the estimate "
                "that fit the labels exactly") in message


def test_the_interpolation_warning_names_the_largest_part_that_interpolates():
    # 40 texts in 10 shards at d = 16: the pooled moments (40), the jackknife's replicates (36) and
    # richardson's halves (20) are above the rank, the halves less a shard (16), which the interval's
    # replicates of richardson use, are not; at 30 texts the halves (15) are not either; at 100 none is.
    model = lds_model(d=16, n_classes=2, n_tokens=8, seed=0)
    shards = sample_shards(model, 40, 10, np.random.default_rng(2))
    [message] = _interpolation_warnings(lambda: ntps_estimate(shards, [1, 2]))
    assert message.startswith("a half of the richardson estimator's split less a shard: 16 texts")
    assert _interpolation_warnings(lambda: ntps_estimate(shards, [1, 2], device=DEVICE)) == [message]  # torch
    assert not _interpolation_warnings(lambda: ntps(shards, k=1, estimator="richardson"))
    assert not _interpolation_warnings(lambda: ntps_estimate(shards, [1, 2], estimator="plugin"))
    fewer = sample_shards(model, 30, 10, np.random.default_rng(2))
    [message] = _interpolation_warnings(lambda: ntps(fewer, k=1, estimator="richardson"))
    assert message.startswith("a half of the richardson estimator's split: 15 texts")
    more = sample_shards(model, 100, 10, np.random.default_rng(2))
    assert not _interpolation_warnings(lambda: ntps_estimate(more, [1, 2]))


@pytest.mark.parametrize("estimator", ["crossfit", "crossfit_inverse"])
def test_split_half_estimators_are_undefined_where_the_texts_do_not_exceed_the_rank(estimator):
    """With no more pooled texts than the rank of Sxx, whitening by the pooled Sxx makes the texts, and so
    the two halves' spans, orthogonal (checked here on the whitened halves themselves): the cosines the
    split-half ratios divide by are zero, the estimators are NaN with reliability 0 (before, rounding made
    them 1e11-1e16). Above the rank they are finite."""
    from ntps_nb.core.simulate import factor_model

    model = factor_model(d=16, n_classes=3, seed=1)
    rng = np.random.default_rng(4)
    few = sample_shards(model, 14, 4, rng)
    pooled = Moments.combine(few)
    s, Q = scipy.linalg.eigh(pooled.Sxx)
    keep = s > 1e-10 * s.max()
    white = Q[:, keep] / np.sqrt(s[keep])
    a, b = (Moments.combine([few[i] for i in side]) for side in split_halves(4, 0))
    cross = (white.T @ a.Sxy).T @ (white.T @ b.Sxy)  # whitened class sums of one half against the other's
    assert np.abs(cross).max() <= 1e-8 * np.abs(white.T @ a.Sxy).max() * np.abs(white.T @ b.Sxy).max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InterpolationWarning)
        undefined = estimate_ntps(few, [1, 2], estimator=estimator)
        rows = ntps_estimate(few, [1, 2], estimator=estimator)
    assert np.isnan(undefined.estimate).all() and (undefined.reliability == 0).all()
    assert rows["estimate"].isna().all() and not rows["reliable"].any()
    enough = estimate_ntps(sample_shards(model, 400, 4, rng), [1, 2], estimator=estimator)
    assert np.isfinite(enough.estimate).all() and (enough.reliability > 1e-3).all()


def test_estimate_by_n_is_ntps_estimate_on_the_nested_groups_with_the_drift_against_the_smallest_n():
    model = lds_model(d=6, n_classes=2, n_tokens=4, seed=1)
    shards = sample_shards(model, 4000, 20, np.random.default_rng(3))
    table = estimate_by_n(shards, [1, 2], n_groups=5)
    assert table["n_shards_used"].tolist() == [5, 5, 10, 10, 20, 20] and (table["n_groups"] == 5).all()
    assert (table["estimator"] == DEFAULT_ESTIMATOR).all()
    for used in (5, 10, 20):  # the groups by hand: 5 groups of used / 5 consecutive shards
        step = used // 5
        groups = [Moments.combine(shards[g * step:(g + 1) * step]) for g in range(5)]
        expected = ntps_estimate(groups, [1, 2])
        got = table[table["n_shards_used"] == used].reset_index(drop=True)
        for column in ("estimate", "lower", "upper", "reliable", "n_texts"):
            assert got[column].tolist() == expected[column].tolist(), (used, column)
    for k, rows in table.groupby("k"):
        first = rows.iloc[0]  # every estimate and interval is defined here, so the smallest N is the first
        assert np.isfinite(rows[["estimate", "lower", "upper"]].to_numpy()).all()
        np.testing.assert_allclose(rows["drift"], rows["estimate"] - first["estimate"], rtol=0, atol=0)
        assert rows["inside_first"].tolist() == [bool(first["lower"] <= e <= first["upper"]) for e in rows["estimate"]]
        assert (rows["n_first"] == first["n_texts"]).all()
    plugin = estimate_by_n(shards[:8], [1], n_groups=4, estimator="plugin", level=0.5)
    assert plugin["n_shards_used"].tolist() == [4, 8] and (plugin["level"] == 0.5).all()


def test_estimate_by_n_refuses_what_ntps_estimate_cannot_give_an_interval_for():
    model = lds_model(d=6, n_classes=2, n_tokens=4, seed=1)
    shards = sample_shards(model, 800, 6, np.random.default_rng(3))
    with pytest.raises(ValueError, match="estimator must be one of"):
        estimate_by_n(shards, [1], estimator="nope")
    with pytest.raises(ValueError, match=r"n_groups must be an integer >= 4"):  # richardson splits into halves
        estimate_by_n(shards, [1], n_groups=3)
    with pytest.raises(ValueError, match="estimate_by_n needs at least n_groups = 8 shards, got 6"):
        estimate_by_n(shards, [1], n_groups=8)


def test_estimate_by_n_leaves_the_drift_missing_where_the_estimate_is_undefined():
    # "debiased" is NaN at no more texts than the rank of Sxx (16 texts, d = 16): the drift is measured
    # from the smallest N with an estimate and an interval
    model = lds_model(d=16, n_classes=2, n_tokens=8, seed=2)
    shards = sample_shards(model, 64, 16, np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InterpolationWarning)
        table = estimate_by_n(shards, [1], n_groups=4, estimator="debiased")
    assert table["n_texts"].tolist() == [16, 32, 64]
    defined = np.isfinite(table[["estimate", "lower", "upper"]].to_numpy()).all(axis=1)
    assert defined.tolist() == [False, True, True], table[["n_texts", "estimate", "lower", "upper"]]
    first = table.iloc[1]
    assert table["inside_first"].iloc[0] is pd.NA and np.isnan(table["drift"].iloc[0])
    assert table["drift"].iloc[1] == 0 and table["drift"].iloc[2] == table["estimate"].iloc[2] - first["estimate"]
    assert bool(table["inside_first"].iloc[2]) == bool(first["lower"] <= table["estimate"].iloc[2] <= first["upper"])
    assert (table["n_first"] == 32).all()


def test_estimate_by_n_names_the_subsample_of_each_warning_at_the_callers_line():
    """Each warning of a subsample's `ntps_estimate` is said with the subsample, at the line that called
    `estimate_by_n`. Where it points is checked in a fresh interpreter: the test session's shape checker
    wraps the package's functions, which adds frames."""
    import ast


    code = ("import warnings\nimport numpy as np\nfrom ntps_nb.core.estimators import estimate_by_n\n"
            "from ntps_nb.core.simulate import lds_model, sample_shards\n"
            "model = lds_model(d=16, n_classes=2, n_tokens=8, seed=2)\n"
            "shards = sample_shards(model, 64, 16, np.random.default_rng(0))\n"
            "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
            "    estimate_by_n(shards, [1], n_groups=4, estimator='debiased')\n"
            "print(repr([(w.category.__name__, w.filename, w.lineno, str(w.message)) for w in caught]))\n")
    out = run_fresh(code)
    said = [w for w in ast.literal_eval(out) if w[0] == "InterpolationWarning"]
    assert said and {(name, file, line) for name, file, line, _ in said} == {("InterpolationWarning", "<string>", 9)}
    assert all(message.startswith("estimate_by_n, the first ") for *_, message in said)
    assert "the first 4 shards (16 texts): the pooled moments: 16 texts" in said[0][3]


@pytest.mark.parametrize("device", [None, DEVICE])
def test_ntps_estimate_says_which_k_are_beyond_the_rank_of_c0(device):
    """A k beyond C0's retained rank has no NTPS: `ntps` raises, and `ntps_estimate`, which reports a row for
    every k it is given, returns NaN there and says so once, naming those k and r_V (on either backend).
    Before, the rows were NaN without a word."""
    if device is not None:
        pytest.importorskip("torch")
    model = lds_model(d=8, n_classes=3, gap="separated", seed=1)
    shards = sample_shards(model, 640, 10, np.random.default_rng(0))
    r_V = theory_geometry(Moments.combine(shards)).r_V
    assert r_V == 8
    with pytest.raises(BeyondRankError):
        ntps(Moments.combine(shards), k=r_V + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = ntps_estimate(shards, [2, r_V + 1, 40], device=device)
    said = [str(w.message) for w in caught if w.category is BeyondRankWarning]
    assert len(said) == 1 and said[0].startswith("k = 9, 40 is beyond the retained rank of C0 (r_V = 8)")
    assert np.isfinite(frame["estimate"].iloc[0]) and frame["estimate"].iloc[1:].isna().all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ntps_estimate(shards, [2, r_V], device=device)
    assert not [w for w in caught if w.category is BeyondRankWarning]


def test_extrapolate_is_one_where_next_token_subspace_is_the_whole_space():
    """At k = r_V = r_U (V_k the whole whitened space) every plug-in is 1 = chance, and the rational model
    reads 0 / 0: "extrapolate" gives 1 with attenuation 1 on every draw. Before, rounding decided
    between 1 and NaN on these draws."""
    for family in (lds_model, factor_model):
        model = family(d=16, n_classes=3, seed=1)
        for i in range(10):
            shards = sample_shards(model, 640, 10, np.random.default_rng([4, i]))
            geometry = theory_geometry(Moments.combine(shards))
            assert geometry.r_V == geometry.r_U == 16
            row = estimate_ntps(shards, [geometry.r_V], estimator="extrapolate")
            assert row.estimate[0] == 1.0 and row.reliability[0] == 1.0, (family.__name__, i, row)
