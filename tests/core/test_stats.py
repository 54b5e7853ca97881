"""Across-dataset statistics against scipy, brute-force loops and hand-built selection traps."""

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from ntps_nb.core.stats import (
    TIE_ATOL,
    DegenerateSampleWarning,
    bootstrap_ci,
    config_correlations,
    correlate,
    partial_correlation,
    partial_correlation_ci,
    permutation_pvalue,
    select_in_sample,
    select_leave_one_dataset_out,
    selection_null,
    stratified_concordance,
    winning_configs,
)

SCIPY = {
    "spearman": lambda a, b: scipy.stats.spearmanr(a, b)[0],
    "kendall": lambda a, b: scipy.stats.kendalltau(a, b)[0],  # tau-b
    "pearson": lambda a, b: scipy.stats.pearsonr(a, b)[0],
}


@pytest.mark.parametrize("method", ["spearman", "kendall", "pearson"])
def test_correlate_matches_scipy_with_and_without_ties(rng, method):
    for n in (3, 7, 12):
        x, y = rng.standard_normal(n), rng.standard_normal(n)
        assert correlate(x, y, method) == pytest.approx(SCIPY[method](x, y), abs=1e-12)
        xt, yt = np.round(x), np.round(y * 2)  # ties
        if np.ptp(xt) and np.ptp(yt):
            assert correlate(xt, yt, method) == pytest.approx(SCIPY[method](xt, yt), abs=1e-12)


def test_correlate_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="at least 3 datasets"):
        correlate([1, 2], [2, 1])
    with pytest.raises(ValueError, match="x has 1 NaN"):
        correlate([1, np.nan, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="y is constant"):
        correlate([1, 2, 3], [5, 5, 5])
    with pytest.raises(ValueError, match="one value per dataset each"):
        correlate([1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match="method must be one of"):
        correlate([1, 2, 3], [1, 2, 3], method="spearmann")


def test_bootstrap_ci_equals_a_plain_loop_over_the_same_resamples(rng):
    x, y = rng.standard_normal(10), rng.standard_normal(10)
    x = x + y
    out = bootstrap_ci(x, y, "kendall", n_boot=300, level=0.9, seed=4)
    idx = np.random.default_rng(4).integers(0, 10, size=(300, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop = np.array([SCIPY["kendall"](x[i], y[i]) for i in idx])
    loop = loop[np.isfinite(loop)]
    assert out["n_valid"] == loop.size
    assert out["lower"] == pytest.approx(np.quantile(loop, 0.05), abs=1e-12)
    assert out["upper"] == pytest.approx(np.quantile(loop, 0.95), abs=1e-12)
    assert out["lower"] <= out["estimate"] <= out["upper"]
    assert out["se"] == pytest.approx(np.std(loop, ddof=1), abs=1e-12)
    assert bootstrap_ci(x, y, "kendall", n_boot=300, level=0.9, seed=4) == out  # seeded


def test_bootstrap_counts_and_warns_about_constant_resamples():
    with pytest.warns(DegenerateSampleWarning, match="constant sample"):
        out = bootstrap_ci([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], n_boot=500, seed=0)
    assert 0 < out["n_valid"] < 500


def test_exact_permutation_pvalue_by_hand_and_against_scipy(rng):
    # n = 4, perfectly monotone: only the identity and the reversal reach |rho| = 1 among 24 orderings
    out = permutation_pvalue([1, 2, 3, 4], [10, 20, 30, 40])
    assert out["exact"] and out["n_perm"] == 24
    assert out["p_value"] == pytest.approx(2 / 24) and out["p_side"] == "two-sided"
    greater = permutation_pvalue([1, 2, 3, 4], [10, 20, 30, 40], alternative="greater")
    assert greater["p_value"] == pytest.approx(1 / 24) and greater["p_side"] == "one-sided greater"
    less = permutation_pvalue([1, 2, 3, 4], [10, 20, 30, 40], alternative="less")
    assert less["p_value"] == pytest.approx(1.0) and less["p_side"] == "one-sided less"
    x, y = rng.standard_normal(6), rng.standard_normal(6)
    ours = permutation_pvalue(x, y, "spearman")
    observed = SCIPY["spearman"](x, y)
    null = np.array([SCIPY["spearman"](x, y[list(p)]) for p in itertools.permutations(range(6))])
    assert ours["exact"] and ours["estimate"] == pytest.approx(observed, abs=1e-12)
    assert ours["p_value"] == pytest.approx(np.mean(np.abs(null) >= abs(observed) - 1e-12), abs=1e-12)


def test_monte_carlo_permutation_pvalue_is_calibrated_and_never_zero(rng):
    x = np.arange(12.0)
    strong = permutation_pvalue(x, x + 0.01 * rng.standard_normal(12), n_perm=999, seed=1)
    assert not strong["exact"] and strong["p_value"] == pytest.approx(1 / 1000)
    pvalues = [permutation_pvalue(rng.standard_normal(12), rng.standard_normal(12), n_perm=199, seed=s)["p_value"]
               for s in range(60)]
    assert 0.3 < np.mean(pvalues) < 0.7  # uniform under the null


def test_partial_correlation_matches_the_textbook_formula_on_ranks(rng):
    n = 12
    z = rng.standard_normal(n)
    x, y = z + 0.7 * rng.standard_normal(n), z + 0.7 * rng.standard_normal(n)
    r = lambda a, b: scipy.stats.spearmanr(a, b)[0]
    expected = (r(x, y) - r(x, z) * r(y, z)) / np.sqrt((1 - r(x, z) ** 2) * (1 - r(y, z) ** 2))
    assert partial_correlation(x, y, z) == pytest.approx(expected, abs=1e-12)
    assert partial_correlation(x, y, {"minus_C": z}) == pytest.approx(expected, abs=1e-12)
    # Pearson with two controls: the residual correlation from an explicit regression
    Z = np.column_stack([z, rng.standard_normal(n)])
    D = np.column_stack([np.ones(n), Z])
    res = lambda v: v - D @ np.linalg.lstsq(D, v, rcond=None)[0]
    assert partial_correlation(x, y, Z, method="pearson") == pytest.approx(np.corrcoef(res(x), res(y))[0, 1], abs=1e-12)


def test_partial_correlation_ci_brackets_the_estimate_and_degrades_to_nan(rng):
    n = 15
    z = rng.standard_normal(n)
    x, y = z + 0.5 * rng.standard_normal(n), z + 0.5 * rng.standard_normal(n)
    out = partial_correlation_ci(x, y, z, n_boot=300, seed=1)
    assert out["estimate"] == partial_correlation(x, y, z)
    assert -1 <= out["lower"] < out["upper"] <= 1 and out["n_valid"] > 250
    assert partial_correlation_ci(x, y, z, n_boot=300, seed=1) == out  # seeded
    flat = partial_correlation_ci(x, y, np.ones(n), n_boot=50)  # a constant control: undefined, not an error
    assert 0 < out["se"] < out["upper"] - out["lower"]  # a 95% interval spans about 4 standard errors
    assert np.isnan(flat["estimate"]) and np.isnan(flat["lower"]) and np.isnan(flat["se"]) and flat["n_valid"] == 0
    alone = partial_correlation_ci(x, y, z, n_boot=0)  # the estimate without an interval (`study summary --n-boot 0`)
    assert alone["estimate"] == out["estimate"] and np.isnan(alone["lower"]) and alone["n_valid"] == 0
    with pytest.raises(ValueError, match="n_boot must be a positive integer, got 0"):
        bootstrap_ci(x, y, n_boot=0)
    for n_boot in (-1, 2.5):  # a count that is not one: refused, not a silent NaN interval or 2 resamples
        with pytest.raises(ValueError, match=f"n_boot must be an integer >= 0, got {n_boot}"):
            partial_correlation_ci(x, y, z, n_boot=n_boot)
        with pytest.raises(ValueError, match=f"n_boot must be a positive integer, got {n_boot}"):
            bootstrap_ci(x, y, n_boot=n_boot)


def test_stratified_concordance_counts_pairs_within_groups_only(rng):
    groups = np.repeat(np.arange(6), 3)  # 6 datasets x 3 models
    x = rng.standard_normal(18)
    y = rng.standard_normal(18) + 100 * groups  # between-group differences are huge and must not count
    brute, pairs = 0.0, 0
    for g in range(6):
        idx = np.flatnonzero(groups == g)
        for i, j in itertools.combinations(idx, 2):
            brute += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
            pairs += 1
    out = stratified_concordance(x, y, groups, n_perm=500)
    assert out["n_pairs"] == pairs == 18 and out["n_groups"] == 6
    assert out["estimate"] == pytest.approx(brute / pairs, abs=1e-12)
    agree = stratified_concordance(x, 3 * x + groups, groups, n_perm=500)
    assert agree["estimate"] == 1.0 and agree["p_value"] < 0.01
    assert 0 < out["p_value"] <= 1
    with pytest.warns(DegenerateSampleWarning, match="no group has two members"):
        single = stratified_concordance([1.0, 2.0], [1.0, 2.0], ["a", "b"])
    assert single["n_pairs"] == 0 and np.isnan(single["estimate"])
    with pytest.raises(ValueError, match="finite"):
        stratified_concordance([1.0, np.nan], [1.0, 2.0], ["a", "a"])


def test_partial_correlation_of_a_score_that_only_tracks_the_controls_is_nan_with_warning():
    n_classes = np.array([2, 2, 6, 20, 8, 50, 3, 5])
    score = -np.log(n_classes)  # monotone in -C: nothing left once -C is controlled for
    accuracy = np.array([0.9, 0.85, 0.7, 0.5, 0.6, 0.4, 0.8, 0.75])
    with pytest.warns(DegenerateSampleWarning, match="linear function of the controls"):
        assert np.isnan(partial_correlation(score, accuracy, -n_classes))
    with pytest.raises(ValueError, match="is constant"):
        partial_correlation(score, accuracy, np.ones(8))
    with pytest.raises(ValueError, match="need at least 5 datasets"):
        partial_correlation(score[:4], accuracy[:4], np.column_stack([n_classes[:4], score[:4] ** 2]))


def grid_frame(scores: dict, target: np.ndarray) -> pd.DataFrame:
    """Tidy frame from {(layer, k): per-dataset scores}."""
    rows = []
    for (layer, k), values in scores.items():
        for i, v in enumerate(values):
            rows.append({"dataset": f"d{i}", "layer": layer, "k": k, "ntps": v, "accuracy": target[i]})
    return pd.DataFrame(rows)


def overfitting_trap(n=6):
    """Config (layer j, k=1) ranks every dataset perfectly EXCEPT dataset j, which it puts at the
    top (j < n/2) or the bottom (j >= n/2). With dataset j held out, (j, 1) is the unique perfect
    config; a selection that peeks at dataset j never picks it, because there it is wrong."""
    target = np.arange(n, dtype=float)
    scores = {}
    for j in range(n):
        s = target.copy()
        s[j] = 100.0 - j if j < n / 2 else -100.0 - j
        scores[(j, 1)] = s
    return grid_frame(scores, target), target


def test_leave_one_dataset_out_never_looks_at_the_held_out_dataset():
    frame, target = overfitting_trap()
    lodo = select_leave_one_dataset_out(frame)
    chosen = lodo["chosen"].set_index("dataset")
    # fold j can only pick (j, 1) if dataset j is invisible to it: with j visible (j, 1) is not perfect
    assert list(chosen["layer"]) == list(range(6))
    assert np.allclose(chosen["rho_others"], 1.0)
    held = [100.0, 99.0, 98.0, -103.0, -104.0, -105.0]
    np.testing.assert_allclose(chosen["held_out_score"], held)
    assert lodo["rho"] == pytest.approx(-1.0)
    assert lodo["n_distinct_configs"] == 6
    # the in-sample protocol (which sees every dataset) picks differently and reports a high rho
    best = select_in_sample(frame)
    assert best["config"] == {"layer": 2, "k": 1}  # tie with layer 3 goes to the first in sorted order
    assert best["rho"] == pytest.approx(1 - 6 * 12 / (6 * 35))
    assert best["rho"] > 0.6 > lodo["rho"]


def brute_force_lodo(frame, method="spearman"):
    datasets = sorted(frame.dataset.unique())
    held, targets = [], []
    for d in datasets:
        others = frame[frame.dataset != d]
        rhos = {cfg: SCIPY[method](g.sort_values("dataset").ntps, g.sort_values("dataset").accuracy)
                for cfg, g in others.groupby(["layer", "k"])}
        # the first configuration in sorted order among those tied (within TIE_ATOL) for the maximum:
        # tied rank correlations can differ in the last bit, differently on different CPUs
        top = max(rhos.values())
        cfg = next(c for c in sorted(rhos) if rhos[c] >= top - TIE_ATOL)
        row = frame[(frame.dataset == d) & (frame.layer == cfg[0]) & (frame.k == cfg[1])]
        held.append(float(row.ntps.iloc[0]))
        targets.append(float(row.accuracy.iloc[0]))
    return SCIPY[method](held, targets)


@pytest.mark.parametrize("method", ["spearman", "kendall", "pearson"])
def test_leave_one_dataset_out_equals_a_brute_force_loop(rng, method):
    target = rng.uniform(0.4, 0.95, 9)
    scores = {(layer, k): target * rng.uniform(0, 1) + rng.standard_normal(9) * rng.uniform(0.05, 0.5)
              for layer in range(4) for k in (1, 2, 4)}
    frame = grid_frame(scores, target)
    ours = select_leave_one_dataset_out(frame, method=method)["rho"]
    assert ours == pytest.approx(brute_force_lodo(frame, method), abs=1e-12)
    table = config_correlations(frame, method=method)
    for row in table.itertuples():
        assert row.rho == pytest.approx(SCIPY[method](scores[(row.layer, row.k)], target), abs=1e-12)


def test_rho_tied_to_the_last_bit_goes_to_the_first_configuration(monkeypatch):
    """Tied rank correlations can come out one bit apart, in either order depending on the CPU's BLAS
    kernel; the selection must still take the first tied configuration, and only true ties count."""
    import ntps_nb.core.stats as stats

    target = np.arange(5.0)
    frame = grid_frame({(layer, 1): target + layer for layer in range(3)}, target)
    half = np.nextafter(0.5, 0.0)  # 0.5 one bit low: a tie
    for rho, first, last in [([half, 0.5, 0.1], 0, 2), ([0.5 - 1e-9, 0.5, 0.1], 1, 2)]:
        monkeypatch.setattr(stats, "_correlate_configs", lambda *_, rho=np.array(rho): rho)
        assert select_in_sample(frame)["config"]["layer"] == first
        assert set(select_leave_one_dataset_out(frame)["chosen"]["layer"]) == {first}
        negative = select_in_sample(frame, direction="negative")
        assert negative["config"]["layer"] == last
        monkeypatch.setattr(stats, "_correlate_configs", lambda *_, rho=-np.array(rho): rho)
        assert select_in_sample(frame, direction="negative")["config"]["layer"] == first


def test_negative_direction_selects_the_most_negative_rho(rng):
    target = np.arange(7.0)
    frame = grid_frame({(0, 1): -target, (1, 1): target, (2, 1): rng.standard_normal(7)}, target)
    assert select_in_sample(frame, direction="negative")["config"] == {"layer": 0, "k": 1}
    assert select_in_sample(frame)["config"] == {"layer": 1, "k": 1}


def test_selection_null_equals_exhaustive_enumeration():
    rng = np.random.default_rng(0)
    target = rng.standard_normal(5)
    scores = {(layer, 1): rng.standard_normal(5) for layer in range(6)}
    frame = grid_frame(scores, target)
    out = selection_null(frame, n_perm=1000)
    assert out["exact"] and out["n_perm"] == 120
    maxima = np.array([max(SCIPY["spearman"](s, target[list(p)]) for s in scores.values())
                       for p in itertools.permutations(range(5))])
    assert out["observed"] == pytest.approx(select_in_sample(frame)["rho"])
    assert out["p_value"] == pytest.approx(np.mean(maxima >= out["observed"] - 1e-12)) and out["p_side"] == "one-sided greater"
    np.testing.assert_allclose(np.sort(out["null"]), np.sort(maxima), atol=1e-12)


def test_selection_null_separates_a_planted_config_from_noise():
    rng = np.random.default_rng(1)
    target = rng.uniform(size=10)
    noise = {(layer, k): rng.standard_normal(10) for layer in range(5) for k in range(8)}
    out_noise = selection_null(grid_frame(noise, target), n_perm=300, seed=2)
    assert out_noise["observed"] > 0.5  # in-sample search finds "high rho" in pure noise...
    assert out_noise["p_value"] > 0.05  # ...which the null of the max shows to be unremarkable
    planted = dict(noise)
    planted[(9, 9)] = target + 0.01 * rng.standard_normal(10)
    out = selection_null(grid_frame(planted, target), n_perm=300, seed=2)
    assert out["config"] == {"layer": 9, "k": 9}
    assert out["p_value"] == pytest.approx(1 / 301)


def test_selection_rejects_or_flags_bad_grids(rng):
    target = np.arange(5.0)
    scores = {(0, 1): rng.standard_normal(5), (1, 1): np.ones(5), (2, 1): np.r_[np.nan, rng.standard_normal(4)]}
    frame = grid_frame(scores, target)
    with pytest.warns(DegenerateSampleWarning) as record:
        best = select_in_sample(frame)
    messages = " ".join(str(w.message) for w in record)
    assert "lack a finite 'ntps'" in messages and "constant scores" in messages
    assert best["config"] == {"layer": 0, "k": 1} and best["n_configs"] == 2
    with pytest.raises(ValueError, match="at least 3 datasets"):
        select_in_sample(grid_frame({(0, 1): [1.0, 2.0]}, np.array([1.0, 2.0])))
    with pytest.raises(ValueError, match="target 'accuracy' is constant"):
        select_in_sample(grid_frame({(0, 1): [1.0, 2.0, 3.0]}, np.ones(3)))
    with pytest.raises(ValueError, match="every configuration has constant scores"), \
            pytest.warns(DegenerateSampleWarning):
        select_in_sample(grid_frame({(0, 1): [1.0, 1.0, 1.0]}, target[:3]))
    with pytest.raises(ValueError, match="repeat a"):
        select_in_sample(pd.concat([frame, frame]))
    bad = frame.copy()
    bad.loc[0, "accuracy"] = 99.0
    with pytest.raises(ValueError, match="varies within dataset"):
        select_in_sample(bad)
    with pytest.raises(ValueError, match="at least 4 datasets"):
        select_leave_one_dataset_out(grid_frame({(0, 1): [1.0, 3.0, 2.0]}, target[:3]))


def test_winning_configs_reports_in_sample_rank_and_fold_counts():
    frame, _ = overfitting_trap()
    table = winning_configs(frame, top=1)
    assert set(table.layer) == set(range(6))  # every config won one fold
    assert (table.n_folds_chosen == 1).all()
    top = table[table["rank"] == 1]
    assert set(top.layer) == {2, 3}
    assert winning_configs(frame, top=0).equals(table)  # every config here was chosen in a fold anyway
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=f"top must be an integer >= 0, got {bad}"):
            winning_configs(frame, top=bad)
