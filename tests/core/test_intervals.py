"""Shard-bootstrap intervals for NTPS: exact shard algebra, reproducibility, validation, paired
differences and (a small version of) coverage on a planted synthetic task."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ortho_group

from ntps_nb import LayerMoments, Moments, excess_loss, ntps, synthetic_linear_task, theory_geometry
from ntps_nb.core.intervals import (
    ShardStack,
    bootstrap_counts,
    bootstrap_pvalue,
    coverage_study,
    excess_loss_interval,
    layer_shards,
    ntps_difference,
    ntps_interval,
    ntps_interval_sweep,
    split_into_shards,
    summarise_coverage,
    theory_values,
    width_by_n,
)

K = 8  # = n_predictable of the synthetic task: V's planted dimension


@pytest.fixture(scope="module")
def task():
    return synthetic_linear_task(n_texts=1000, angle=np.pi / 4, seed=3)


@pytest.fixture(scope="module")
def shards(task):
    return split_into_shards(task, 20, seed=0)


def rotated(m: Moments, Q: np.ndarray) -> Moments:
    """The moments of the hidden states h -> Q h."""
    return Moments(Sxx=Q @ m.Sxx @ Q.T, Sxy=Q @ m.Sxy, Syy=m.Syy, C0=Q @ m.C0 @ Q.T, C1=Q @ m.C1 @ Q.T,
                   n_texts=m.n_texts, n_tokens=m.n_tokens)


# --- shard algebra ---------------------------------------------------------------------------


def test_shards_partition_the_texts_and_combine_to_the_unsharded_moments(task, shards):
    sizes = [s.n_texts for s in shards]
    assert sum(sizes) == task.moments.n_texts and max(sizes) - min(sizes) <= 1
    assert sum(s.n_tokens for s in shards) == task.moments.n_tokens
    combined = Moments.combine(shards)
    for name, value in task.moments.arrays().items():
        np.testing.assert_allclose(combined.arrays()[name], value, rtol=1e-12, atol=1e-12 * np.abs(value).max())
    assert ntps(combined, K) == pytest.approx(ntps(task.moments, K), abs=1e-10)
    assert excess_loss(combined, K) == pytest.approx(excess_loss(task.moments, K), abs=1e-10)
    assert ntps_interval(shards, K, n_boot=5).estimate == pytest.approx(ntps(task.moments, K), abs=1e-10)


def test_shard_assignment_is_seeded_and_accepts_plain_sequences(task):
    again = split_into_shards(list(task.sequences), 7, task.labels, n_classes=4, seed=1)
    same = split_into_shards(task, 7, seed=1)
    other = split_into_shards(task, 7, seed=2)
    np.testing.assert_array_equal(again[0].Sxx, same[0].Sxx)
    assert not np.allclose(other[0].Sxx, same[0].Sxx)
    assert all(s.n_classes == 4 for s in again)


def test_stacked_weighted_combination_equals_moments_combine(shards):
    counts = bootstrap_counts(len(shards), 6, seed=4)
    assert counts.shape == (6, 20) and np.all(counts.sum(axis=1) == 20)
    counts[0, :5] = 0  # shards not drawn at all
    for row, fast in zip(counts, ShardStack(shards).combined(counts)):
        slow = Moments.combine(shards, weights=row)
        assert fast.n_texts == slow.n_texts and fast.n_tokens == slow.n_tokens
        assert set(fast.arrays()) == {"Sxx", "Sxy", "Syy", "C0", "C1", "x_mean"}
        for name, value in fast.arrays().items():
            np.testing.assert_allclose(value, slow.arrays()[name], rtol=1e-12, atol=1e-14)


def test_theory_values_match_the_geometry(task):
    geometry = theory_geometry(task.moments)
    ks = np.arange(1, geometry.r_V + 2)  # one past r_V: NaN
    values = theory_values(geometry, ks, "ntps")
    losses = theory_values(geometry, ks, "excess_loss")
    np.testing.assert_allclose(values[:-1], [geometry.ntps(k) for k in ks[:-1]], rtol=1e-12)
    np.testing.assert_allclose(losses[:-1], [geometry.excess_loss(k) for k in ks[:-1]], rtol=1e-10, atol=1e-14)
    assert np.isnan(values[-1]) and np.isnan(losses[-1])


def test_layer_shards_regroups_per_shard_layer_moments(shards):
    parts = [LayerMoments({0: s, 3: s}) for s in shards[:4]]
    grouped = layer_shards(parts)
    assert list(grouped) == [0, 3] and grouped[3][2] is shards[2]
    with pytest.raises(ValueError, match="layers"):
        layer_shards([parts[0], LayerMoments({0: shards[1]})])
    with pytest.raises(ValueError, match="None"):
        layer_shards([parts[0], None])


# --- intervals -------------------------------------------------------------------------------


def test_interval_is_reproducible_for_a_seed_and_changes_with_it(shards):
    a = ntps_interval(shards, K, n_boot=100, seed=7)
    b = ntps_interval(shards, K, n_boot=100, seed=7)
    c = ntps_interval(shards, K, n_boot=100, seed=8)
    np.testing.assert_array_equal(a.replicates, b.replicates)
    assert (a.lower, a.upper, a.se_bootstrap) == (b.lower, b.upper, b.se_bootstrap)
    assert (a.lower, a.upper) != (c.lower, c.upper)
    assert a.estimate == c.estimate and a.se_jackknife == c.se_jackknife  # neither depends on the seed
    assert a.lower < a.upper and a.n_valid == 100 and a.n_shards == 20 and a.n_texts == 1000
    assert 0 <= a.replicates.min() and a.replicates.max() <= 1


@pytest.mark.parametrize("method", ["percentile", "basic", "bca"])
def test_interval_methods_agree_with_their_definitions(shards, method):
    result = ntps_interval(shards, K, n_boot=200, seed=1, method=method, level=0.9)
    lo, hi = np.quantile(result.replicates, [0.05, 0.95])
    if method == "percentile":
        assert (result.lower, result.upper) == pytest.approx((lo, hi))
    elif method == "basic":
        assert (result.lower, result.upper) == pytest.approx((2 * result.estimate - hi, 2 * result.estimate - lo))
    else:
        assert result.replicates.min() <= result.lower < result.upper <= result.replicates.max()
    assert result.se_bootstrap == pytest.approx(np.std(result.replicates, ddof=1))


def test_jackknife_standard_error_by_hand(shards):
    loo = [ntps(Moments.combine(shards[:i] + shards[i + 1:]), K) for i in range(len(shards))]
    expected = np.sqrt((len(loo) - 1) / len(loo) * np.sum((np.mean(loo) - np.array(loo)) ** 2))
    assert ntps_interval(shards, K, n_boot=2).se_jackknife == pytest.approx(expected, rel=1e-9)


def test_sweep_gives_every_k_and_agrees_with_single_k(shards):
    sweep = ntps_interval_sweep(shards, n_boot=60, seed=3)
    assert list(sweep.k) == list(range(1, sweep.r_V.iloc[0] + 1))
    row = sweep.set_index("k").loc[K]
    single = ntps_interval(shards, K, n_boot=60, seed=3)
    assert (row.ntps, row.lower, row.upper, row.se_jackknife) == pytest.approx(
        (single.estimate, single.lower, single.upper, single.se_jackknife), rel=1e-12)
    losses = ntps_interval_sweep(shards, statistic="excess_loss", n_boot=60, seed=3).set_index("k")
    loss = excess_loss_interval(shards, K, n_boot=60, seed=3)
    assert (losses.loc[K, "excess_loss"], losses.loc[K, "upper"]) == pytest.approx((loss.estimate, loss.upper))
    assert loss.estimate == pytest.approx(excess_loss(Moments.combine(shards), K), rel=1e-10)


def test_fraction_and_reference_variant(shards):
    by_fraction = ntps_interval(shards, fraction=0.25, n_boot=20)
    assert by_fraction.k == 8 and by_fraction.estimate == ntps_interval(shards, 8, n_boot=20).estimate
    reference = ntps_interval(shards, fraction=0.5, variant="reference", n_boot=20)
    assert reference.estimate == pytest.approx(ntps(Moments.combine(shards), fraction=0.5, variant="reference"))
    assert len(ntps_interval_sweep(shards, variant="reference", n_boot=10)) == 19


def test_interval_is_invariant_to_rotating_the_hidden_space(shards):
    Q = ortho_group.rvs(shards[0].d, random_state=0)
    ours = ntps_interval(shards, K, n_boot=50, seed=2)
    turned = ntps_interval([rotated(s, Q) for s in shards], K, n_boot=50, seed=2)
    np.testing.assert_allclose(turned.replicates, ours.replicates, atol=1e-8)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (lambda s: s[:1], "at least 2"),
    (lambda s: [], "at least 2"),
    (lambda s: s[:3] + [None], "empty"),
    (lambda s: s[:3] + [[]], "empty"),
    (lambda s: s[0], "single Moments"),
    (lambda s: LayerMoments({0: s[0]}), "layer_shards"),
    (lambda s: s[:3] + ["shard"], "must be Moments"),
    (lambda s: s[:3] + [Moments(Sxx=np.eye(6), Sxy=np.ones((6, 4)), Syy=np.eye(4) / 4, C0=np.eye(6),
                                C1=np.eye(6), n_texts=5, n_tokens=5)], "d=6"),
    (lambda s: s[:3] + [Moments(Sxx=np.eye(32), Sxy=np.ones((32, 3)), Syy=np.eye(3) / 3, C0=np.eye(32),
                                C1=np.eye(32), n_texts=5, n_tokens=5)], "C=3"),
])
def test_bad_shards_are_rejected(shards, bad, match):
    with pytest.raises(ValueError, match=match):
        ntps_interval(bad(shards), K, n_boot=5)


@pytest.mark.parametrize("options, match", [
    ({"n_boot": 0}, "n_boot must be >= 1"),
    ({"n_boot": 10.0}, "n_boot must be an integer"),
    ({"n_boot": True}, "n_boot must be an integer"),
    ({"level": 1.0}, "level must lie in"),
    ({"level": 0}, "level must lie in"),
    ({"level": 95}, "level must lie in"),
    ({"level": float("nan")}, "level must lie in"),
    ({"method": "studentized"}, "method must be one of"),
    ({"variant": "paper"}, "variant must be one of"),
    ({"seed": None}, "seed must be an integer"),
])
def test_bad_options_are_rejected(shards, options, match):
    with pytest.raises(ValueError, match=match):
        ntps_interval(shards, K, **{"n_boot": 5, **options})


def test_bad_k_and_split_arguments_are_rejected(task, shards):
    with pytest.raises(ValueError, match="beyond the retained rank"):
        ntps_interval(shards, 999, n_boot=5)
    with pytest.raises(ValueError, match="reference variant takes fraction"):
        ntps_interval(shards, K, variant="reference", n_boot=5)
    with pytest.raises(ValueError, match="n_shards must lie"):
        split_into_shards(task, 0)
    with pytest.raises(ValueError, match="n_shards must lie"):
        split_into_shards(task, 1001)
    with pytest.raises(ValueError, match="labels are required"):
        split_into_shards(list(task.sequences), 4)
    with pytest.raises(ValueError, match="paired=True needs"):
        ntps_difference(shards, shards[:-1], K, paired=True, n_boot=5)


# --- differences -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["percentile", "basic", "bca"])
def test_paired_difference_of_a_layer_with_itself_is_exactly_zero(shards, method):
    diff = ntps_difference(shards, shards, K, n_boot=50, method=method)
    assert diff.paired and diff.estimate == 0.0
    assert (diff.lower, diff.upper) == (0.0, 0.0)
    assert diff.p_value == 1.0 and diff.se_bootstrap == 0.0 and diff.se_jackknife == 0.0
    assert np.all(diff.replicates == 0.0)


@pytest.fixture(scope="module")
def second_layer(task):
    """A 'deeper layer' on the same texts and shards: a fixed nonlinear map of every state."""
    W = ortho_group.rvs(task.sequences.shape[2], random_state=1)
    return split_into_shards(list(np.tanh(task.sequences @ W)), 20, task.labels, n_classes=4, seed=0)


def test_pairing_is_detected_and_narrows_the_interval_of_correlated_values(shards, second_layer, task):
    paired = ntps_difference(shards, second_layer, K, n_boot=200)
    independent = ntps_difference(shards, second_layer, K, n_boot=200, paired=False)
    assert paired.paired and not independent.paired
    assert paired.estimate == independent.estimate
    assert paired.se_bootstrap < independent.se_bootstrap
    assert paired.se_jackknife < independent.se_jackknife
    # other texts: same shard sizes, different class frequencies per shard -> not paired by default
    other = split_into_shards(task, 20, seed=9)
    assert not ntps_difference(shards, other, K, n_boot=5).paired


def test_clear_difference_has_small_p_value():
    near = split_into_shards(synthetic_linear_task(n_texts=600, angle=0.0, seed=5), 20)
    far = split_into_shards(synthetic_linear_task(n_texts=600, angle=np.pi / 2, seed=6), 20)
    diff = ntps_difference(near, far, K, n_boot=99)
    assert not diff.paired and diff.estimate > 0.5 and diff.lower > 0
    assert diff.p_value == pytest.approx(2 / 100)  # no replicate at or below 0: the smallest p-value
    assert diff.estimate == pytest.approx(diff.estimate_a - diff.estimate_b)


def test_bootstrap_pvalue_by_hand():
    assert bootstrap_pvalue(0.3, np.array([0.1, 0.2, -0.1, 0.5])) == pytest.approx(2 * 2 / 5)
    assert bootstrap_pvalue(-0.3, np.array([-0.1, -0.2, -0.4, 0.0, -0.5])) == pytest.approx(2 * 2 / 6)
    assert bootstrap_pvalue(0.3, np.array([-1.0, -2.0])) == 1.0
    assert bootstrap_pvalue(0.0, np.array([1.0, 2.0])) == 1.0


# --- coverage --------------------------------------------------------------------------------


def test_small_coverage_study_is_not_badly_wrong():
    """30 repetitions of N = 2000 texts in 20 shards, drawn from a pool of 20,000 texts whose NTPS
    stands in for the population value. The full study (`coverage_study` defaults: 200
    repetitions, 1000 replicates, a pool of 200,000) measured 0.89 for "basic" and 0.47 for
    "percentile": NTPS is biased low at finite N and the percentile interval doubles that bias.
    This small version only guards against intervals that are badly off."""
    study = coverage_study(30, n_texts=2000, n_boot=150, population_n_texts=20_000, truth_shards=0,
                           seed=0, methods=("percentile", "basic"))
    summary = summarise_coverage(study).set_index("method")
    assert len(study) == 60 and study.n_valid.min() == 150
    assert summary.loc["basic", "coverage"] >= 0.75
    # the bootstrap standard error tracks the spread of the estimate across repetitions
    assert 0.5 < summary.loc["basic", "mean_se_bootstrap"] / summary.loc["basic", "sd_estimate"] < 2
    # the finite-N bias: estimates fall below the population value, and the bootstrap sees it
    assert summary.loc["basic", "mean_estimate_minus_truth"] < 0
    assert summary.loc["basic", "mean_bias_bootstrap"] < 0
    assert summary.loc["percentile", "miss_above"] <= summary.loc["percentile", "miss_below"]


def test_width_by_n_merges_prefixes_into_equal_groups(shards):
    table = width_by_n(shards, K, n_groups=5, n_boot=100)
    assert table["n_shards_used"].tolist() == [5, 10, 20]
    sizes = [s.n_texts for s in shards]
    assert table["n_texts"].tolist() == [sum(sizes[:5]), sum(sizes[:10]), sum(sizes[:20])]
    # the largest prefix is every shard: its estimate is the full-data NTPS; the first is the
    # interval of the first five shards themselves (groups of one shard)
    assert np.isclose(table["ntps"].iloc[-1], ntps(Moments.combine(shards), K), rtol=1e-10)
    first = ntps_interval(shards[:5], k=K, n_boot=100)
    assert (table["lower"].iloc[0], table["upper"].iloc[0]) == (first.lower, first.upper)
    assert table["width"].iloc[-1] < table["width"].iloc[0]  # 4x the texts: about half the width
    with pytest.raises(ValueError, match="at least n_groups = 30 shards"):
        width_by_n(shards, K, n_groups=30)
    with pytest.raises(ValueError, match="n_groups must be an integer >= 2"):
        width_by_n(shards, K, n_groups=1)


# --- estimators ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_shards(task):
    return split_into_shards(task, 6, seed=1)


def test_plugin_keeps_its_path_and_names_itself(shards):
    """The plug-in (the default) is what an explicit estimator='plugin' gives, and its replicates
    are the NTPS of the shards drawn: each resample's shard list, combined, scored by the
    estimator code (`estimate_ntps`), gives the fast path's replicate."""
    from ntps_nb.core.estimators import estimate_ntps

    default = ntps_interval_sweep(shards, n_boot=30, seed=4)
    explicit = ntps_interval_sweep(shards, n_boot=30, seed=4, estimator="plugin")
    pd.testing.assert_frame_equal(default, explicit, check_exact=True)
    assert list(default.columns[:4]) == ["statistic", "variant", "estimator", "k"]
    assert (default["estimator"] == "plugin").all()
    single = ntps_interval(shards, K, n_boot=30, seed=4)
    assert single.estimator == "plugin" and single.as_dict()["estimator"] == "plugin"
    resamples = list(ShardStack(shards).resampled(bootstrap_counts(len(shards), 30, 4)))
    assert [len(r) for r in resamples] == [len(shards)] * 30
    by_estimator = [estimate_ntps(r, [K], estimator="plugin").estimate[0] for r in resamples]
    np.testing.assert_allclose(single.replicates, by_estimator, rtol=0, atol=1e-12)


def test_a_pooled_estimator_scores_the_estimate_and_every_replicate(shards):
    """'wishart' (a pooled estimator): the point estimate is estimate_ntps of the pooled shards,
    each replicate estimate_ntps of the resample's weighted pooled moments, and the jackknife
    standard error that of the leave-one-shard-out estimates."""
    from ntps_nb.core.estimators import estimate_ntps

    sweep = ntps_interval_sweep(shards, n_boot=40, seed=2, estimator="wishart")
    pooled = estimate_ntps(Moments.combine(shards), sweep["k"].to_numpy(), estimator="wishart").estimate
    np.testing.assert_allclose(sweep["ntps"], pooled, rtol=1e-12, atol=1e-14)
    assert (sweep["estimator"] == "wishart").all() and (sweep["variant"] == "theory").all()
    plugin = ntps_interval_sweep(shards, n_boot=40, seed=2)
    assert np.abs(sweep["ntps"] - plugin["ntps"]).max() > 1e-3  # another estimator, other numbers
    single = ntps_interval(shards, K, n_boot=40, seed=2, estimator="wishart")
    assert single.estimate == pytest.approx(sweep.loc[sweep["k"] == K, "ntps"].item(), abs=1e-14)
    counts = bootstrap_counts(len(shards), 40, 2)
    by_hand = [estimate_ntps(Moments.combine(shards, weights=c), [K], estimator="wishart").estimate[0] for c in counts]
    np.testing.assert_allclose(single.replicates, by_hand, rtol=1e-10)
    loo = np.array([estimate_ntps(Moments.combine(shards[:i] + shards[i + 1:]), [K], estimator="wishart").estimate[0]
                    for i in range(len(shards))])
    expected = np.sqrt((len(loo) - 1) / len(loo) * np.sum((loo.mean() - loo) ** 2))
    assert single.se_jackknife == pytest.approx(expected, rel=1e-9)


def test_a_shard_estimator_sees_the_shards_of_each_resample(few_shards):
    """'debiased' needs shards: the estimate is on the shards, each replicate on the resample's
    shard list (a shard drawn twice appears twice), each jackknife replicate without one shard."""
    from ntps_nb.core.estimators import estimate_ntps

    result = ntps_interval(few_shards, K, n_boot=12, seed=5, estimator="debiased")
    assert result.estimator == "debiased"
    assert result.estimate == pytest.approx(estimate_ntps(few_shards, [K], estimator="debiased").estimate[0], abs=1e-14)
    counts = bootstrap_counts(len(few_shards), 12, 5)
    drawn = [[few_shards[s] for s in np.repeat(np.arange(len(few_shards)), c)] for c in counts]
    by_hand = [estimate_ntps(d, [K], estimator="debiased").estimate[0] for d in drawn]
    np.testing.assert_allclose(result.replicates, by_hand, rtol=1e-12, atol=1e-14)
    loo = np.array([estimate_ntps(few_shards[:i] + few_shards[i + 1:], [K], estimator="debiased").estimate[0]
                    for i in range(len(few_shards))])
    assert result.se_jackknife == pytest.approx(np.sqrt(5 / 6 * np.sum((loo.mean() - loo) ** 2)), rel=1e-9)


def test_every_interval_function_records_its_estimator(shards, few_shards):
    a, b = few_shards[:3], few_shards[3:]
    difference = ntps_difference(a, b, K, n_boot=10, paired=False, estimator="adjusted")
    direct = [ntps_interval(side, K, n_boot=2, estimator="adjusted").estimate for side in (a, b)]
    assert difference.estimator == "adjusted" and difference.estimate == pytest.approx(direct[0] - direct[1])
    widths = width_by_n(shards, K, n_groups=5, n_boot=10, estimator="adjusted")
    assert (widths["estimator"] == "adjusted").all()
    first = ntps_interval([Moments.combine(shards[g:g + 1]) for g in range(5)], K, n_boot=10, estimator="adjusted")
    assert widths["ntps"].iloc[0] == pytest.approx(first.estimate)
    coverage = coverage_study(2, n_texts=300, n_shards=6, n_boot=10, population_n_texts=3000, truth_shards=0,
                              estimator="adjusted", methods=["basic"])
    plugin = coverage_study(2, n_texts=300, n_shards=6, n_boot=10, population_n_texts=3000, truth_shards=0,
                            methods=["basic"])
    assert (coverage["estimator"] == "adjusted").all() and (coverage["truth"] == plugin["truth"]).all()
    assert not np.allclose(coverage["estimate"], plugin["estimate"])
    assert set(summarise_coverage(pd.concat([coverage, plugin]))["estimator"]) == {"adjusted", "plugin"}


@pytest.mark.parametrize("options, match", [
    ({"estimator": "ridge"}, r"estimator must be one of \('plugin', "),
    ({"estimator": "adjusted", "variant": "reference"}, "theory variant only"),
    ({"estimator": "adjusted", "statistic": "excess_loss"}, "plug-in quantity"),
    ({"estimator": "adjusted", "centred": True}, "options of the plug-in"),
    ({"estimator": "adjusted", "tol": 1e-9}, "options of the plug-in"),
])
def test_an_estimator_that_does_not_apply_is_refused(shards, options, match):
    with pytest.raises(ValueError, match=match):
        ntps_interval_sweep(shards, n_boot=5, **options)
