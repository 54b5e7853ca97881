"""The rotation interval (`ntps_nb.core.rotation`, `ntps_estimate(interval="rotation")`).

Known truth: an exact two-dimensional model, the leading eigenvector of a mean of S shards' 2 x 2
symmetric matrices diag(g, 0) + noise (the population eigenvector is e_1), scored (u . v)^2; and
the closed-form NTPS over rotations against the rotated subspaces' NTPS computed by QR.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from ntps_nb.core.estimators import GAP_MIN, FlagNotCalibratedWarning, ntps_estimate
from ntps_nb.core.moments import Moments
from ntps_nb.core.rotation import (INTERVAL_DESCRIPTIONS, PLANE_RTOL, SET_ANGLES, STABLE_ATOL, STATIONARY_DESCRIPTION,
                                   WIDENED_DESCRIPTION, interval_description, ntps_over_rotations, plane_replicates,
                                   rotation_interval, rotation_sets, rotation_widening, widened_rows)
from ntps_nb.core.score import theory_geometry
from ntps_nb.core.simulate import factor_model, lds_model, markov_model, pair_shards, sample_shards
from ntps_nb.core.subspaces import RANGE_RTOL, next_token_subspace, perception_subspace

SHARDS = 10
LEVEL = 0.90
#: Tolerance of the closed form against the QR computation.
CLOSED_FORM_ATOL = 1e-10
#: Tolerance of a replicate's plane matrix formed from the shards against the same from its pool combined outright
#: (relative; the two sum the same terms in a different order).
PLANE_FROM_SHARDS_RTOL = 1e-10
#: Slack of the widened intervals' nesting across levels (the same sums, rounding only).
NEST_ATOL = 1e-12


def exact_model(delta: float, draws: int, rng: np.random.Generator):
    """The pooled gap, its jackknife SE (from the replicates' own eigengaps), the replicates'
    matrices in the pooled eigenbasis and that basis, for ``draws`` draws at population gap ratio
    ``delta`` (the gap over the SD of its diagonal noise)."""
    S = SHARDS
    m = pair_shards(delta, draws, S, rng)
    total = m.sum(axis=1)
    replicates = (total[:, None] - m) / (S - 1)
    w, basis = np.linalg.eigh(total / S)
    basis = basis[..., ::-1]
    w_r = np.linalg.eigvalsh(replicates)
    gaps_r = w_r[..., 1] - w_r[..., 0]
    se_gap = np.sqrt((S - 1) / S * np.sum((gaps_r - gaps_r.mean(axis=1, keepdims=True)) ** 2, axis=1))
    local = np.einsum("dji,dsjk,dkl->dsil", basis, replicates, basis)
    return w[:, 1] - w[:, 0], se_gap, local, basis, replicates


def population_index(basis: np.ndarray) -> np.ndarray:
    """The candidate rotation nearest the population direction e_1, per draw."""
    phi0 = (np.arctan2(basis[:, 0, 1], basis[:, 0, 0]) + np.pi / 2) % np.pi - np.pi / 2
    return np.round((phi0 + np.pi / 2) / np.pi * SET_ANGLES).astype(int) % SET_ANGLES


def exact_scores(delta: float, alpha2: float, beta2: float, draws: int, rng: np.random.Generator) -> dict:
    """The exact model's score (u . v)^2, v = (alpha, beta), per draw: its jackknife-t interval
    (``lower``, ``upper``) and whether it covers the truth alpha^2 (``covered``), the draws the eigengap
    condition accepts, the rotation sets and the score at each of their candidate rotations."""
    v = np.array([np.sqrt(alpha2), np.sqrt(beta2)])
    gap, se_gap, local, basis, replicates = exact_model(delta, draws, rng)
    t = scipy.stats.t.ppf((1 + LEVEL) / 2, SHARDS - 1)
    score = (basis[..., 0] @ v) ** 2
    scores_r = (np.linalg.eigh(replicates)[1][..., 1] @ v) ** 2
    se = np.sqrt((SHARDS - 1) / SHARDS * np.sum((scores_r - scores_r.mean(axis=1, keepdims=True)) ** 2, axis=1))
    lower, upper = score - t * se, score + t * se
    sets = rotation_sets(gap, se_gap, local, level=LEVEL, gap_min=GAP_MIN)
    rotated = (np.cos(sets.phis)[None, :, None] * basis[:, None, :, 0]
               + np.sin(sets.phis)[None, :, None] * basis[:, None, :, 1])
    return {"lower": lower, "upper": upper, "covered": (lower <= alpha2) & (alpha2 <= upper),
            "accepted": gap / se_gap >= GAP_MIN, "sets": sets, "scores": (rotated @ v) ** 2}


def test_fieller_set_covers_the_population_direction_at_its_level():
    # Fieller's test at the population basis is an exact t test here: coverage 0.90 over all draws
    draws = 6000
    gap, se_gap, local, basis, _ = exact_model(3.0, draws, np.random.default_rng(0))
    sets = rotation_sets(gap, se_gap, local, level=LEVEL, gap_min=GAP_MIN)
    coverage = sets.fieller[np.arange(draws), population_index(basis)].mean()
    se = np.sqrt(LEVEL * (1 - LEVEL) / draws)      # 0.0039
    assert abs(coverage - LEVEL) < 3 * se + np.pi / SET_ANGLES


def test_selective_widening_makes_the_accepted_draws_cover_where_the_jackknife_does_not():
    # population gap ratio 3: the draws the eigengap condition accepts are the rotated ones; the
    # jackknife-t interval of the score covers them far below 0.85, the score's range over the
    # selective set joined with it covers at least 0.90 (docs/estimator.md)
    alpha2 = 0.1513
    x = exact_scores(3.0, alpha2, 0.6087, 6000, np.random.default_rng(1))
    accepted, sets, scores = x["accepted"], x["sets"], x["scores"]
    n = int(accepted.sum())
    assert n > 500
    jackknife = x["covered"][accepted]
    lo = np.minimum(np.where(sets.selective, scores, np.inf).min(axis=1), x["lower"])
    hi = np.maximum(np.where(sets.selective, scores, -np.inf).max(axis=1), x["upper"])
    selective = ((lo <= alpha2) & (alpha2 <= hi))[accepted]
    # exact binomial tests: the jackknife below 0.85, the selective interval not below 0.90
    assert scipy.stats.binom.cdf(jackknife.sum(), n, 0.85) < 1e-3
    assert scipy.stats.binom.cdf(selective.sum(), n, 0.90) > 0.05
    assert selective.mean() > jackknife.mean() + 0.05


def test_selective_set_is_fieller_far_from_the_eigengap_threshold():
    gap, se_gap, local, _, _ = exact_model(40.0, 200, np.random.default_rng(2))
    sets = rotation_sets(gap, se_gap, local, level=LEVEL, gap_min=GAP_MIN)
    np.testing.assert_array_equal(sets.selective, sets.fieller)
    assert sets.fieller[:, SET_ANGLES // 2].all()            # the sample direction, phi = 0


def test_rotation_sets_reject_bad_input():
    with pytest.raises(ValueError, match="S >= 3"):
        rotation_sets(1.0, 0.1, np.zeros((2, 2, 2)), gap_min=GAP_MIN)
    with pytest.raises(ValueError, match="level"):
        rotation_sets(1.0, 0.1, np.zeros((5, 2, 2)), level=1.5, gap_min=GAP_MIN)


def rotated_ntps(pooled: Moments, U, V, k: int, phi: float, psi: float) -> float:
    """NTPS_theory(k) of the rotated subspaces, by QR (independent of the closed form)."""
    m = U.rank_A
    kU = min(k, m)
    Q_r, s_r = U.range_basis, U.range_eigenvalues
    u = Q_r.T @ U.whitened[:, :kU]
    if phi:
        u[:, kU - 1] = np.cos(phi) * u[:, kU - 1] + np.sin(phi) * (Q_r.T @ U.whitened[:, kU])
    v = np.sqrt(s_r)[:, None] * (Q_r.T @ V.vectors[:, :k])
    if psi:
        v[:, k - 1] = np.cos(psi) * v[:, k - 1] + np.sin(psi) * np.sqrt(s_r) * (Q_r.T @ V.vectors[:, k])
    q, _ = np.linalg.qr(v)
    return float(np.sum((q.T @ u) ** 2) / kU)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_closed_form_ntps_over_rotations_matches_qr(k):
    model = factor_model(d=12, n_classes=4, n_tokens=8, gap="moderate", seed=3)
    pooled = Moments.combine(sample_shards(model, 400, 4, np.random.default_rng(3)))
    U, V = perception_subspace(pooled), next_token_subspace(pooled)
    assert k < U.rank_A and k < V.rank_B
    phis, psis = np.array([-1.2, -0.3, 0.0, 0.7]), np.array([-0.9, 0.0, 0.2, 1.4])
    values = ntps_over_rotations(U, V, k, phis, psis)
    assert values.shape == (4, 4)
    expected = np.array([[rotated_ntps(pooled, U, V, k, phi, psi) for psi in psis] for phi in phis])
    np.testing.assert_allclose(values, expected, atol=CLOSED_FORM_ATOL, rtol=0)
    assert values[2, 1] == pytest.approx(theory_geometry(pooled).ntps(k), abs=CLOSED_FORM_ATOL)
    with pytest.raises(ValueError, match="next direction"):
        ntps_over_rotations(U, V, V.rank_B, np.zeros(1), np.array([0.1]))


def test_ntps_estimate_rotation_interval_contains_the_jackknife_one_and_keeps_the_flag():
    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="moderate", seed=5)
    shards = sample_shards(model, 16 * 32, SHARDS, np.random.default_rng(5))
    ks = [1, 2, 4]
    plain = ntps_estimate(shards, ks, interval="jackknife")
    widened = ntps_estimate(shards, ks, interval="rotation")
    assert (widened["interval"] == "rotation").all() and "interval" not in plain.columns
    np.testing.assert_array_equal(widened["lower_jackknife"], plain["lower"])
    np.testing.assert_array_equal(widened["upper_jackknife"], plain["upper"])
    assert (widened["lower"] <= plain["lower"]).all() and (widened["upper"] >= plain["upper"]).all()
    np.testing.assert_array_equal(widened["reliable"], plain["reliable"])
    np.testing.assert_array_equal(widened["estimate"], plain["estimate"])
    assert (widened["rotation_U"] >= 0).all() and (widened["rotation_V"] >= 0).all()
    with pytest.raises(ValueError, match="interval must be None or one of"):
        ntps_estimate(shards, ks, interval="bootstrap")


def test_rotation_condition_makes_the_accepted_draws_of_a_near_tie_cover():
    # known truth, the exact model at population gap ratio 3: the draws the eigengap condition
    # accepts cover far below 0.85 with the jackknife-t interval; those of them where the score's
    # range over the Fieller set stays inside that interval (the flag's rotation condition) do not
    # (docs/estimator.md, gap_selection/toy_stable_report.txt)
    x = exact_scores(3.0, 0.2892, 0.4787, 6000, np.random.default_rng(3))
    covered, accepted, sets, scores = x["covered"], x["accepted"], x["sets"], x["scores"]
    stable = ((np.where(sets.fieller, scores, np.inf).min(axis=1) >= x["lower"] - STABLE_ATOL)
              & (np.where(sets.fieller, scores, -np.inf).max(axis=1) <= x["upper"] + STABLE_ATOL))
    kept = accepted & stable
    n, n_kept = int(accepted.sum()), int(kept.sum())
    assert n > 500 and n_kept > 200
    # exact one-sided binomial tests at 0.025 (the map's): the accepted draws below 0.85 (0.82 of 774
    # here); the stable ones not below 0.85, not above 0.95 (0.876 of 314; binomial SE 0.019)
    assert scipy.stats.binom.cdf(covered[accepted].sum(), n, 0.85) < 0.025
    assert scipy.stats.binom.cdf(covered[kept].sum(), n_kept, 0.85) > 0.05
    assert scipy.stats.binom.sf(covered[kept].sum() - 1, n_kept, 0.95) > 0.05


@pytest.mark.parametrize("gap, seed", [("separated", 3), ("tied", 0)])
def test_ntps_estimate_rotation_condition_narrows_the_flag_and_nothing_else(gap, seed):
    # LDS, d = 16, C = 2, N/d = 32: two rows the other conditions accept (separated), or one that the
    # rotation condition takes out (tied)
    model = lds_model(d=16, n_classes=2, n_tokens=8, gap=gap, seed=seed)
    shards = sample_shards(model, 16 * 32, SHARDS, np.random.default_rng(seed))
    ks = [1, 2, 3, 4, 5, 6, 8]
    # (the stationary condition and the widening off on both: the rotation condition's own test)
    plain = ntps_estimate(shards, ks, rotation_flag=False, interval="jackknife", stationary_flag=False,
                          rotation_widening=False)
    flagged = ntps_estimate(shards, ks, interval="jackknife", stationary_flag=False, rotation_widening=False)
    assert "rotation_stable" not in plain.columns
    for column in ("estimate", "se", "lower", "upper", "subspace_noise", "gap_ratio", "at_bound"):
        np.testing.assert_array_equal(flagged[column], plain[column])
    np.testing.assert_array_equal(flagged["reliable"], plain["reliable"] & flagged["rotation_stable"])
    # the ranges are computed where the other conditions accept (and only there)
    assert plain["reliable"].sum() == {"separated": 2, "tied": 1}[gap]
    assert flagged["reliable"].sum() == {"separated": 2, "tied": 0}[gap]
    np.testing.assert_array_equal(flagged["rotation_lower"].notna(), plain["reliable"])
    # with the rotation interval the ranges are on every row: each holds the estimate (the sample's
    # own rotation, shifted by the estimator's correction), and the condition is exactly the range
    # inside the jackknife-t interval on the rows the other conditions accept
    widened = ntps_estimate(shards, ks, interval="rotation")
    assert widened["rotation_lower"].notna().all()
    assert (widened["rotation_lower"] <= widened["estimate"] + 1e-12).all()
    assert (widened["rotation_upper"] >= widened["estimate"] - 1e-12).all()
    width = plain["upper"] - plain["lower"]
    inside = ((widened["rotation_lower"] >= plain["lower"] - 1e-6 * width)
              & (widened["rotation_upper"] <= plain["upper"] + 1e-6 * width))
    assert inside.any()
    np.testing.assert_array_equal(widened["rotation_stable"], inside & plain["reliable"])
    np.testing.assert_array_equal(widened["reliable"], flagged["reliable"])
    reliable = plain["reliable"].to_numpy()
    np.testing.assert_allclose(widened.loc[reliable, "rotation_lower"], flagged.loc[reliable, "rotation_lower"],
                               rtol=0, atol=1e-12)
    # where the eigengap condition failed on both sides, the rotation interval is the Fieller range joined
    failed_gap = widened["gap_ratio_U"].lt(GAP_MIN) & widened["gap_ratio_V"].lt(GAP_MIN)
    np.testing.assert_allclose(widened.loc[failed_gap, "lower"],
                               np.minimum(plain.loc[failed_gap, "lower"], widened.loc[failed_gap, "rotation_lower"]))


def _nearly_tied_draw() -> list[Moments]:
    """Draw 465 (of `benchmarks/rotation_union_check.py`'s run, key 35) of the nearly tied population LDS, d = 16,
    C = 2, "separated", population seed 341, at N/d = 32: the flag accepts its row at k = 1 and the default interval
    misses the population NTPS there."""
    model = lds_model(d=16, n_classes=2, gap="separated", seed=341)
    return sample_shards(model, 16 * 32, SHARDS, np.random.default_rng([35, 32000, 465]))


def test_the_widening_joins_the_reliable_rows_interval_with_the_rotation_intervals_sets_and_leaves_the_rest():
    # the default interval (quadratic) widened on the reliable rows over the sets `rotation_interval` joins with an
    # interval, computed here through it from the frame without the widening; on the nearly tied draw of the next
    # test, whose reliable row at k = 1 the widening moves (and whose row at k = 2 it leaves)
    shards = _nearly_tied_draw()
    ks = [1, 2, 3, 4]
    # the rotation widening alone (the stationary widening, after it by default, is tests/core/test_estimators.py's)
    plain = ntps_estimate(shards, ks, seed=465, rotation_widening=False, stationary_widening=False)
    # the default since session 63, its sets here at the interval's level (the default's until session 64)
    widened = ntps_estimate(shards, ks, seed=465, widening_level=LEVEL, stationary_widening=False)
    assert {"lower_unwidened", "upper_unwidened", "rotation_U", "rotation_V"} <= set(widened.columns)
    assert not {"lower_unwidened", "rotation_U"} & set(plain.columns)
    np.testing.assert_array_equal(widened["lower_unwidened"], plain["lower"])
    np.testing.assert_array_equal(widened["upper_unwidened"], plain["upper"])
    for column in ("estimate", "se", "reliable", "rotation_stable", "rotation_lower", "stationary_distance"):
        np.testing.assert_array_equal(widened[column], plain[column])
    reliable = plain["reliable"].to_numpy()
    assert reliable.sum() == 2 and widened.loc[0, "lower"] < plain.loc[0, "lower"] - 0.1
    joined = rotation_interval(shards, plain, level=LEVEL, gap_min=GAP_MIN, rtol=RANGE_RTOL)
    np.testing.assert_allclose(widened.loc[reliable, ["lower", "upper"]], joined.loc[reliable, ["lower", "upper"]],
                               rtol=0, atol=1e-12)
    np.testing.assert_array_equal(widened.loc[~reliable, ["lower", "upper"]], plain.loc[~reliable, ["lower", "upper"]])
    assert widened.loc[~reliable, "rotation_V"].isna().all() and (widened.loc[reliable, "rotation_V"] >= 0).all()
    # the public function on the unwidened frame, its own sets computed (the pooled problem solved again), agrees
    alone = rotation_widening(shards, plain, level=LEVEL, gap_min=GAP_MIN, rtol=RANGE_RTOL)
    np.testing.assert_allclose(alone[["lower", "upper", "lower_unwidened", "upper_unwidened"]],
                               widened[["lower", "upper", "lower_unwidened", "upper_unwidened"]], rtol=0, atol=1e-12)
    # how the report and the layer profiles name the rows: widened where the flag accepted, as before elsewhere
    np.testing.assert_array_equal(widened_rows(widened), reliable)
    assert not widened_rows(plain).any()
    assert [interval_description(kind, flag) for kind, flag in zip(widened["interval"], widened_rows(widened))] == [
        f"{INTERVAL_DESCRIPTIONS['quadratic']}, {WIDENED_DESCRIPTION}" if flag else INTERVAL_DESCRIPTIONS["quadratic"]
        for flag in reliable]
    # the rotation interval widens every row already: the option changes nothing there
    rotation = ntps_estimate(shards, ks, seed=465, interval="rotation", stationary_widening=False)
    np.testing.assert_array_equal(rotation["lower"], ntps_estimate(shards, ks, seed=465, interval="rotation",
                                                                   rotation_widening=True,
                                                                   stationary_widening=False)["lower"])
    assert "lower_unwidened" not in rotation.columns and not widened_rows(rotation).any()
    assert interval_description("rotation", True) == INTERVAL_DESCRIPTIONS["rotation"]


def test_the_widening_leaves_an_uncalibrated_estimators_rows_as_they_are_unless_its_flag_is_asked_for():
    # the plug-in's rows are never reliable (its flag is not calibrated), so none is widened and no column is added;
    # with flag_any_estimator, the research setting of the estimator map, its rows meeting the conditions are
    shards = _nearly_tied_draw()
    with pytest.warns(FlagNotCalibratedWarning):
        plugin = ntps_estimate(shards, [1, 2, 3, 4], seed=465, estimator="plugin")
    assert "lower_unwidened" not in plugin.columns and not widened_rows(plugin).any()
    research = ntps_estimate(shards, [1, 2, 3, 4], seed=465, estimator="plugin", flag_any_estimator=True)
    assert research["reliable"].any()
    assert (widened_rows(research) >= research["reliable"]).all()
    np.testing.assert_array_equal(research["lower_unwidened"], plugin["lower"])
    np.testing.assert_array_equal(research["upper_unwidened"], plugin["upper"])


def test_the_widening_holds_the_population_value_on_a_nearly_tied_draw_the_flag_accepts():
    # LDS, d = 16, C = 2, "separated", population seed 341: the eigenvalues at k = 1 are nearly tied, the flag accepts
    # about 2% of the draws at N/d = 32 and the default interval holds the population NTPS (0.547) on 51 of the 67 it
    # accepts in 3,200 draws, the widened one on 64 (docs/estimator.md, "The default interval widened over the
    # rotation sets"; this draw is the first of that run's where the interval misses and the widened one holds it)
    truth = lds_model(d=16, n_classes=2, gap="separated", seed=341).population_ntps(np.array([1]))[0]
    row = ntps_estimate(_nearly_tied_draw(), [1], seed=465, rotation_widening=True).iloc[0]
    assert row["reliable"] and abs(truth - 0.5474) < 1e-3
    assert not row["lower_unwidened"] <= truth <= row["upper_unwidened"]
    assert row["lower"] <= truth <= row["upper"] and row["rotation_U"] + row["rotation_V"] > 0


def test_the_widenings_level_sets_only_how_far_a_reliable_rows_interval_is_widened():
    # `ntps_estimate(widening_level=L)`: the rotation sets at L, the interval and the flag at ``level``. A set at a
    # lower level is a subset (each tail must be at least (1 - L) / 2), so the widened intervals nest: the interval
    # before the widening inside L = 0.5 inside 0.75 inside 0.9; everything but lower / upper and the angles the
    # same at every level. The nearly tied draw's reliable row at k = 1 is widened at 0.9 and at 0.5 less.
    shards, ks = _nearly_tied_draw(), [1, 2, 3, 4]
    frames = {level: ntps_estimate(shards, ks, seed=465, widening_level=level) for level in (0.5, 0.75, 0.9)}
    same = [c for c in frames[0.9].columns if c not in ("lower", "upper", "rotation_U", "rotation_V", "widening_level")]
    for level, frame in frames.items():
        assert list(frame.columns) == list(frames[0.9].columns)
        pd.testing.assert_frame_equal(frame[same], frames[0.9][same])
        assert (frame["widening_level"] == level).all()     # each row says which sets widened it
    reliable = frames[0.9]["reliable"].to_numpy()
    narrower = frames[0.9].assign(lower=frames[0.9]["lower_unwidened"], upper=frames[0.9]["upper_unwidened"])
    for inner, outer in ((narrower, frames[0.5]), (frames[0.5], frames[0.75]), (frames[0.75], frames[0.9])):
        assert (outer["lower"] <= inner["lower"] + NEST_ATOL).all()
        assert (outer["upper"] >= inner["upper"] - NEST_ATOL).all()
    assert frames[0.5].loc[0, "lower"] > frames[0.9].loc[0, "lower"] + 0.01 and reliable[0]
    np.testing.assert_array_equal(frames[0.5].loc[~reliable, ["lower", "upper"]],
                                  frames[0.9].loc[~reliable, ["lower", "upper"]])
    # the public function at the same level agrees with ntps_estimate's row
    plain = ntps_estimate(shards, ks, seed=465, rotation_widening=False)
    alone = rotation_widening(shards, plain, level=LEVEL, gap_min=GAP_MIN, rtol=RANGE_RTOL, widening_level=0.5)
    np.testing.assert_allclose(alone[["lower", "upper"]], frames[0.5][["lower", "upper"]], rtol=0, atol=1e-12)
    assert (alone["widening_level"] == 0.5).all()
    # the report and the layer profiles name the sets' level of a widened row, where the row carries it
    described = [interval_description(kind, flag, sets)
                 for kind, flag, sets in zip(frames[0.75]["interval"], widened_rows(frames[0.75]),
                                             frames[0.75]["widening_level"])]
    assert described == [f"{INTERVAL_DESCRIPTIONS['quadratic']}, {WIDENED_DESCRIPTION} (rotation sets at 75%)" if flag
                         else INTERVAL_DESCRIPTIONS["quadratic"] for flag in reliable]
    unnamed = f"{INTERVAL_DESCRIPTIONS['quadratic']}, {WIDENED_DESCRIPTION}"
    assert interval_description("quadratic", True, np.nan) == interval_description("quadratic", True) == unnamed
    # a row the stationary widening moved says so after the rotation sets; NaN (a table before the column) does not
    assert interval_description("quadratic", True, 0.6, True) == (f"{unnamed} (rotation sets at 60%), "
                                                                  f"{STATIONARY_DESCRIPTION}")
    assert interval_description("quadratic", False, np.nan, np.True_) == (f"{INTERVAL_DESCRIPTIONS['quadratic']}, "
                                                                          f"{STATIONARY_DESCRIPTION}")
    assert interval_description("quadratic", False, 0.6, np.nan) == INTERVAL_DESCRIPTIONS["quadratic"]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="widening_level must be in"):
            ntps_estimate(shards, ks, seed=465, widening_level=bad)


def test_rotation_condition_solves_nothing_where_no_row_is_otherwise_reliable(monkeypatch):
    # the torch path computes the sets on the host: with no row left to check it must not solve the
    # pooled problem there (a generalized eigensolve of d x d at a large d)
    import ntps_nb.core.rotation as rotation

    model = lds_model(d=16, n_classes=2, n_tokens=8, gap="tied", seed=1)
    shards = sample_shards(model, 16, SHARDS, np.random.default_rng(1))   # N/d = 1: nothing reliable
    frame = ntps_estimate(shards, [1, 2, 4], rotation_flag=False)
    assert not frame["reliable"].any()

    def no_solve(*args, **kwargs):
        raise AssertionError("the pooled problem was solved")

    monkeypatch.setattr(rotation, "perception_subspace", no_solve)
    out = rotation.rotation_stability(shards, frame, level=LEVEL, gap_min=GAP_MIN, rtol=1e-10)
    assert not out["rotation_stable"].any() and out["rotation_lower"].isna().all()


def _plane_problem(condition: float, d: int = 6):
    """A pair that diagonalises (F F', B) exactly, B of the given condition number: pair = B^{-1/2} W with W
    orthonormal and F = B^{1/2} W diag(sqrt(lambda)), so pair' B pair = I and pair' F F' pair = diag(lambda)."""
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    s = np.logspace(0, -np.log10(condition), d)
    B = Q @ np.diag(s) @ Q.T
    root, inv_root = Q @ np.diag(np.sqrt(s)) @ Q.T, Q @ np.diag(1 / np.sqrt(s)) @ Q.T
    W = np.linalg.qr(rng.normal(size=(d, 2)))[0]
    F = root @ W @ np.diag(np.sqrt([2.0, 1.0]))
    shards = [Moments(Sxx=B, Sxy=F, Syy=np.eye(2) / 2, C0=B, C1=B, n_texts=10, n_tokens=10) for _ in range(3)]
    return inv_root @ W, F, B, shards


def test_the_pair_check_allows_the_rounding_an_ill_conditioned_metric_gives_and_nothing_more():
    # eigenvectors that come through a whitening of condition number kappa are B-orthonormal to about
    # eps * kappa only (1e-8 for states whose scales span ten decades), which the check once took for a
    # programming error: ntps_estimate raised on such data
    kappa = 1e10
    pair, F, B, shards = _plane_problem(kappa)
    rounded = pair * (1 + 5e-8)          # pair' B pair - I = 1e-7: above PLANE_RTOL, below eps * kappa
    assert np.abs(rounded.T @ B @ rounded - np.eye(2)).max() > PLANE_RTOL
    planes = plane_replicates(rounded, F, B, shards, "U", condition=kappa)
    # each replicate is the pooled problem itself: its plane matrix is diag(lambda), to the rounding allowed
    assert np.allclose(planes, np.diag([2.0, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="does not diagonalise"):
        plane_replicates(rounded, F, B, shards, "U")                       # a well-conditioned metric: 1e-7 is wrong
    with pytest.raises(ValueError, match="does not diagonalise"):
        plane_replicates(pair * (1 + 1e-3), F, B, shards, "U", condition=kappa)   # a real error is still caught


def test_the_replicates_plane_matrices_from_the_shards_equal_those_of_the_pools_they_combine():
    # each replicate's plane matrix is formed from the shards' own projections, weighted as Moments.combine
    # weighs them; here against the pools combined outright, on shards of unequal sizes
    model = lds_model(d=10, n_classes=3, n_tokens=5, seed=2)
    rng = np.random.default_rng(4)
    shards = [sample_shards(model, n, 1, rng)[0] for n in (40, 55, 70, 90, 130, 200)]
    pooled = Moments.combine(shards)
    for side, space in (("U", perception_subspace(pooled)), ("V", next_token_subspace(pooled))):
        pair = space.vectors[:, 1:3]
        F, B = (pooled.Sxy, pooled.Sxx) if side == "U" else (pooled.C1, pooled.C0)
        got = plane_replicates(pair, F, B, shards, side)
        for i in range(len(shards)):
            pool = Moments.combine([s for j, s in enumerate(shards) if j != i])
            F_i, B_i = (pool.Sxy, pool.Sxx) if side == "U" else (pool.C1, pool.C0)
            w, q = np.linalg.eigh(pair.T @ B_i @ pair)
            inv_root = (q / np.sqrt(w)) @ q.T
            want = inv_root @ (pair.T @ F_i) @ (pair.T @ F_i).T @ inv_root
            np.testing.assert_allclose(got[i], want, rtol=PLANE_FROM_SHARDS_RTOL,
                                       atol=PLANE_FROM_SHARDS_RTOL * np.abs(want).max())


def test_ntps_estimate_runs_where_sxx_spans_ten_decades():
    # a draw of the Markov family at d = 64 whose embeddings' scales span ten decades (Sxx retains 29
    # directions, condition number ~9e9): the rotation condition raised here before its check allowed for
    # the metric's conditioning, on 37 of the 3,600 draws of session 35's Markov frame at d = 64 (all "separated")
    # (docs/estimator.md, session 36)
    # (the stationary condition off: its truth, 0.061, is within 2 SEs of 0 here, and this row is the rotation
    # condition's case)
    model = markov_model(d=64, n_classes=2, n_tokens=8, gap="separated", seed=602, memory=0.7)
    shards = sample_shards(model, 2048, SHARDS, np.random.default_rng([602, 32000, 2]))
    frame = ntps_estimate(shards, [1], stationary_flag=False)
    assert frame["reliable"].item() and frame["rotation_stable"].item()
    assert frame["rotation_lower"].item() <= frame["estimate"].item() <= frame["rotation_upper"].item()
