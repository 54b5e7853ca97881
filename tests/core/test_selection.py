"""Honest selection statistics: scale-free leave-one-dataset-out, its permutation p-value and its
selection-redone bootstrap interval, against brute-force loops, scipy and planted traps."""

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from ntps_nb.core.selection import (
    fixed_rho,
    in_sample_rho,
    leave_one_dataset_out,
    lodo_rho,
    monte_carlo_se,
    weighted_correlation,
)
from ntps_nb.core.selection import _lodo_many
from ntps_nb.core.stats import (
    TIE_ATOL,
    bootstrap_ci,
    config_correlations,
    correlate,
    select_in_sample,
    select_leave_one_dataset_out,
    selection_null,
)

SCIPY = {
    "spearman": lambda a, b: scipy.stats.spearmanr(a, b)[0],
    "kendall": lambda a, b: scipy.stats.kendalltau(a, b)[0],  # tau-b
    "pearson": lambda a, b: scipy.stats.pearsonr(a, b)[0],
}


def tidy(scores, target, names=("layer", "k")):
    """A tidy frame from {config tuple: per-dataset scores} and per-dataset targets."""
    rows = []
    for config, values in scores.items():
        config = config if isinstance(config, tuple) else (config,)
        for i, value in enumerate(values):
            rows.append({"dataset": f"d{i:02d}", **dict(zip(names, config)), "ntps": float(value),
                         "accuracy": float(target[i])})
    return pd.DataFrame(rows)


def random_grid(rng, n=7, layers=(0, 1, 2), ks=(2, 8, 32), digits=None):
    """Configurations on different scales (NTPS grows with k), optionally rounded to make ties."""
    target = rng.standard_normal(n)
    scores = {}
    for layer in layers:
        for k in ks:
            values = rng.standard_normal(n) * 0.3 + np.log(k)
            scores[(layer, k)] = np.round(values, digits) if digits is not None else values
    return tidy(scores, target), scores, target


def brute_force_lodo(scores, target, method, held_out):
    """Independent loop: choose on the others (ties within TIE_ATOL averaged), rank / standardise
    the held-out dataset with scipy among all datasets under each chosen configuration."""
    keys = sorted(scores)
    n = len(target)
    values = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        rho = {}
        for key in keys:
            s = np.asarray(scores[key])
            if np.ptp(s[others]) > 0:
                rho[key] = SCIPY[method](s[others], target[others])
        top = max(rho.values())
        chosen = [key for key in keys if key in rho and rho[key] >= top - TIE_ATOL]
        per = []
        for key in chosen:
            s = np.asarray(scores[key], dtype=float)
            if held_out == "rank":
                per.append(scipy.stats.rankdata(s)[i])
            else:
                per.append((s[i] - s.mean()) / s.std())
        values.append(np.mean(per))
    return SCIPY[method](values, target)


# -- weighted correlations (bootstrap resamples as counts) --------------------------------------

@pytest.mark.parametrize("method", ["spearman", "kendall", "pearson"])
def test_weighted_correlation_equals_scipy_on_the_repeated_sample(rng, method):
    checked = 0
    for _ in range(60):
        x, y = np.round(rng.standard_normal(7)), rng.standard_normal(7)  # ties in x
        w = rng.integers(0, 3, 7)
        xe, ye = np.repeat(x, w), np.repeat(y, w)
        if xe.size < 3 or np.ptp(xe) == 0 or np.ptp(ye) == 0:
            continue
        assert weighted_correlation(x, y, w, method) == pytest.approx(SCIPY[method](xe, ye), abs=1e-12)
        checked += 1
    assert checked > 30
    assert np.isnan(weighted_correlation([1, 2, 3, 4], [1, 3, 2, 4], [0, 2, 0, 0], method))  # one dataset only


# -- leave-one-dataset-out with held-out ranks --------------------------------------------------

def test_pooled_raw_with_first_tie_reproduces_the_earlier_statistic(rng):
    for _ in range(10):  # Pearson on continuous scores: no ties between configurations
        frame, _, _ = random_grid(rng)
        old = select_leave_one_dataset_out(frame, method="pearson")
        new = leave_one_dataset_out(frame, method="pearson", held_out="pooled_raw", ties="first")
        assert new.rho == pytest.approx(old["rho"], abs=1e-12)
        np.testing.assert_allclose(new.folds["held_out_score"], old["chosen"]["held_out_score"])


@pytest.mark.parametrize("method", ["spearman", "kendall", "pearson"])
@pytest.mark.parametrize("held_out", ["rank", "standardised"])
def test_leave_one_dataset_out_equals_a_brute_force_loop_with_ties(rng, method, held_out):
    for digits in (None, 1):  # rounded scores: tied configurations and tied datasets
        frame, scores, target = random_grid(rng, digits=digits)
        out = leave_one_dataset_out(frame, method=method, held_out=held_out)
        assert out.rho == pytest.approx(brute_force_lodo(scores, target, method, held_out), abs=1e-10)
        assert out.n_distinct_configs == len(out.chosen[["layer", "k"]].drop_duplicates())
        np.testing.assert_allclose(out.chosen.groupby("dataset")["weight"].sum(), 1.0)


def test_tied_configurations_share_the_fold():
    target = np.arange(6.0)
    good = np.array([0.0, 1, 2, 3, 5, 4])  # rho 0.94 on every fold
    scores = {(0, 2): good, (0, 8): 2 * good + 10,  # same ranks on another scale: always tied
              (1, 2): np.array([5.0, 4, 3, 2, 1, 0])}
    out = leave_one_dataset_out(tidy(scores, target))
    assert (out.folds["n_tied"] == 2).all()
    assert out.folds["configs"].iloc[0] == "layer=0, k=2; layer=0, k=8"
    assert out.n_distinct_configs == 2
    np.testing.assert_allclose(out.folds["held_out_score"], scipy.stats.rankdata(good))  # same ranks in both


def test_the_held_out_target_never_enters_its_own_prediction(rng):
    frame, _, _ = random_grid(rng, n=8)
    before = leave_one_dataset_out(frame)
    for dataset in ("d00", "d05"):
        moved = frame.assign(accuracy=np.where(frame["dataset"] == dataset, 1e6, frame["accuracy"]))
        after = leave_one_dataset_out(moved)
        row_before = before.folds.set_index("dataset").loc[dataset]
        row_after = after.folds.set_index("dataset").loc[dataset]
        assert row_after["configs"] == row_before["configs"]
        assert row_after["held_out_score"] == row_before["held_out_score"]


def planted_pooling_trap():
    """Configuration c ranks the datasets by a pattern unrelated to the targets, except that it
    puts dataset c at the wrong extreme, and lives on its own scale (offset 100 c). Leaving c out,
    configuration c is the best on the others, so fold c chooses it (alone); raw held-out scores then
    grow with c, i.e. with the target, although no configuration ranks the datasets well."""
    pattern = np.array([5.0, 1, 0, 2, 6, 7, 3, 4])
    n = pattern.size
    target = np.arange(n, dtype=float)
    scores = {}
    for c in range(n):
        s = pattern.copy()
        s[c] = -10.0 if target[c] >= n / 2 else 10.0
        scores[c] = s + 100.0 * c
    return tidy(scores, target, names=("config",))


def test_planted_pooling_trap_fools_the_pooled_statistic_but_not_the_ranks():
    frame = planted_pooling_trap()
    per_config = config_correlations(frame, configs="config")["rho"]
    assert per_config.abs().max() < 0.25  # every single configuration ranks the datasets badly
    old = select_leave_one_dataset_out(frame, configs="config")["rho"]
    pooled = leave_one_dataset_out(frame, configs="config", held_out="pooled_raw")
    assert old > 0.9 and pooled.rho > 0.9  # the earlier statistic is fooled: this test can fail
    for held_out in ("rank", "standardised"):
        honest = leave_one_dataset_out(frame, configs="config", held_out=held_out)
        assert honest.rho < 0.3
        assert list(honest.folds["configs"]) == [f"config={c}" for c in range(8)]  # fold c chose c
    result = lodo_rho(frame, configs="config", n_perm=500, n_boot=0)
    assert result.estimate < 0.3 and result.p_value > 0.5


# -- permutation p-values ------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["positive", "negative"])
def test_exact_lodo_pvalue_equals_a_brute_force_count(rng, direction):
    frame, _, target = random_grid(rng, n=5, layers=(0, 1), ks=(2, 8), digits=1)
    result = lodo_rho(frame, direction=direction, n_perm=2000, n_boot=0)
    assert result.exact and result.n_perm == math.factorial(5) and result.p_mc_se == 0.0
    observed = leave_one_dataset_out(frame, direction=direction).rho
    sign = 1.0 if direction == "positive" else -1.0
    hits = 0
    datasets = sorted(frame["dataset"].unique())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for order in itertools.permutations(range(5)):
            shuffled = dict(zip(datasets, target[list(order)]))
            try:
                rho = leave_one_dataset_out(frame.assign(accuracy=frame["dataset"].map(shuffled)),
                                            direction=direction).rho
            except ValueError:  # a fold with no defined rho counts as not extreme
                continue
            hits += bool(np.isfinite(rho) and sign * rho >= sign * observed - TIE_ATOL)
    assert result.p_value == pytest.approx(hits / 120, abs=1e-15)
    assert result.p_side == ("one-sided greater" if direction == "positive" else "one-sided less")
    assert result.p_redone == "leave-one-dataset-out selection redone"


def test_monte_carlo_pvalue_has_its_standard_error_and_the_default_count(rng):
    frame, _, _ = random_grid(rng, n=8)
    result = lodo_rho(frame, n_boot=0)
    assert result.n_perm == 2000 and not result.exact
    assert 1 / 2001 <= result.p_value <= 1
    assert result.p_mc_se == pytest.approx(np.sqrt(result.p_value * (1 - result.p_value) / 2000))
    assert monte_carlo_se(0.05, 2000, exact=False) == pytest.approx(0.004873, abs=1e-6)


def test_in_sample_rho_has_the_selection_null_pvalue_and_no_interval(rng):
    frame, _, _ = random_grid(rng, n=8)
    result = in_sample_rho(frame)
    null = selection_null(frame, n_perm=2000)
    assert result.estimate == pytest.approx(select_in_sample(frame)["rho"])
    assert result.p_value == null["p_value"] and result.n_perm == 2000
    assert np.isnan(result.lower) and np.isnan(result.upper) and result.interval.startswith("none")
    assert result.p_redone.startswith("in-sample selection")


def test_fixed_rho_reuses_the_plain_bootstrap_and_labels_its_side(rng):
    x = rng.standard_normal(9)
    y = x + rng.standard_normal(9)
    result = fixed_rho(x, y, n_boot=500, seed=3)
    ci = bootstrap_ci(x, y, n_boot=500, seed=3)
    assert (result.lower, result.upper) == pytest.approx((ci["lower"], ci["upper"]), abs=1e-12)
    assert result.estimate == pytest.approx(correlate(x, y))
    assert result.p_side == "two-sided" and result.p_redone == "none (no selection)" and result.se > 0
    assert fixed_rho(x, y, direction="negative", n_boot=0).p_side == "one-sided less"
    assert set(result.row()) >= {"estimate", "lower", "upper", "se", "p_value", "p_side"}


# -- selection-aware intervals -------------------------------------------------------------------

def test_bootstrap_weights_equal_leave_every_copy_out_by_brute_force(rng):
    frame, scores, target = random_grid(rng, n=6, layers=(0, 1), ks=(2, 8), digits=1)
    keys = sorted(scores)
    S = np.array([scores[k] for k in keys])
    W = rng.multinomial(6, np.full(6, 1 / 6), size=40).astype(float)
    fast = _lodo_many(S, np.broadcast_to(target, W.shape), W, method="spearman", held_out="rank", sign=1.0,
                      ties="average", atol=TIE_ATOL)
    for w, value in zip(W, fast):
        present = np.flatnonzero(w)
        values, ok = np.zeros(6), True
        for i in present:
            copies = np.repeat(np.arange(6), w.astype(int))
            others = copies[copies != i]
            rho = [SCIPY["spearman"](S[c, others], target[others]) if np.ptp(S[c, others]) > 0
                   and np.ptp(target[others]) > 0 else np.nan for c in range(len(keys))]
            if not np.any(np.isfinite(rho)):
                ok = False
                break
            top = np.nanmax(rho)
            chosen = [c for c in range(len(keys)) if np.isfinite(rho[c]) and rho[c] >= top - TIE_ATOL]
            values[i] = np.mean([scipy.stats.rankdata(S[c, copies])[list(copies).index(i)] for c in chosen])
        expanded = np.repeat(values, w.astype(int)), np.repeat(target, w.astype(int))
        if not ok or np.ptp(expanded[0]) == 0:
            assert np.isnan(value)
        else:
            assert value == pytest.approx(SCIPY["spearman"](*expanded), abs=1e-10)


def test_selection_aware_interval_keeps_its_level_under_permuted_targets():
    """200 permutations of the targets over a fixed grid of 12 correlated configurations on
    different scales (8 datasets). The true rho is 0, so a 95% interval should exclude it from
    above in about 2.5% of them; we require <= 5% (binomial SE at 5% with 200 draws: 1.5 points).
    The in-sample bootstrap CI of the same permutations (the earlier protocol) must fail, else
    the grid is too easy to show anything: its lower bound is above 0 in about 20-25%.
    Each interval uses 200 resamples (the quantiles' own noise is small beside the binomial SE)."""
    rng = np.random.default_rng(2024)
    n, n_configs = 8, 12
    shared = rng.standard_normal(n)
    S = np.array([0.6 * shared + rng.standard_normal(n) + 3.0 * c for c in range(n_configs)])
    target = rng.standard_normal(n)
    honest = plain = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in range(200):
            permuted = rng.permutation(target)
            frame = tidy(dict(enumerate(S)), permuted, names=("config",))
            honest += lodo_rho(frame, configs="config", n_perm=1, n_boot=200, seed=b).lower > 0
            best = int(np.argmax([correlate(s, permuted) for s in S]))  # the in-sample choice
            plain += bootstrap_ci(S[best], permuted, n_boot=200, seed=b)["lower"] > 0
    assert honest / 200 <= 0.05
    assert plain / 200 >= 0.10


def test_lodo_interval_brackets_a_strong_planted_signal(rng):
    n = 10
    target = rng.standard_normal(n)
    scores = {(layer, k): target * (1 + layer) + np.log(k) + 0.3 * rng.standard_normal(n)
              for layer in range(3) for k in (2, 8)}
    result = lodo_rho(tidy(scores, target), n_boot=300, n_perm=500)
    assert result.estimate > 0.8 and result.lower > 0.3 and result.lower <= result.estimate <= result.upper
    assert result.p_value < 0.01 and result.n_boot_valid > 250 and result.se > 0
    assert "selection redone" in result.interval


def test_bad_options_are_named(rng):
    frame, _, _ = random_grid(rng)
    with pytest.raises(ValueError, match="held_out must be one of"):
        leave_one_dataset_out(frame, held_out="raw")
    with pytest.raises(ValueError, match="ties must be"):
        leave_one_dataset_out(frame, ties="last")
    with pytest.raises(ValueError, match="at least 4 datasets"):
        leave_one_dataset_out(frame[frame["dataset"].isin(["d00", "d01", "d02"])])
    with pytest.raises(ValueError, match="n_boot must be"):
        lodo_rho(frame, n_boot=-1)
    constant_fold = frame.assign(accuracy=np.where(frame["dataset"] == "d00", 1.0, 0.0))
    with pytest.raises(ValueError, match="no configuration has a defined rho"):
        leave_one_dataset_out(constant_fold)
