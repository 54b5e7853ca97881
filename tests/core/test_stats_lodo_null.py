"""The permutation null of the leave-one-dataset-out rho against a brute-force recomputation."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from ntps_nb.core.stats import TIE_ATOL, leave_one_dataset_out_null


def _frame(rng, n_datasets=5, n_configs=3):
    datasets = [f"d{i}" for i in range(n_datasets)]
    target = dict(zip(datasets, rng.uniform(size=n_datasets)))
    rows = [{"dataset": d, "k": k, "ntps": rng.uniform(), "accuracy": target[d]}
            for d in datasets for k in range(1, n_configs + 1)]
    return pd.DataFrame(rows)


def _lodo_rho_by_hand(scores: np.ndarray, target: np.ndarray) -> float:
    """scores: (configs, datasets). Choose each held-out dataset's configuration by Pearson on the
    others, then correlate the held-out scores with the targets."""
    n = target.size
    held = np.empty(n)
    for i in range(n):
        others = np.arange(n) != i
        rho = [scipy.stats.pearsonr(row[others], target[others])[0] for row in scores]
        held[i] = scores[int(np.argmax(rho)), i]
    return scipy.stats.pearsonr(held, target)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_null_redoes_the_selection_under_every_ordering(seed):
    frame = _frame(np.random.default_rng(seed))
    wide = frame.pivot(index="k", columns="dataset", values="ntps")
    target = frame.groupby("dataset")["accuracy"].first()
    scores, y = wide.to_numpy(), target.reindex(wide.columns).to_numpy()
    observed = _lodo_rho_by_hand(scores, y)
    null = [_lodo_rho_by_hand(scores, y[list(p)]) for p in itertools.permutations(range(y.size))]
    expected = np.mean([rho >= observed - TIE_ATOL for rho in null])
    out = leave_one_dataset_out_null(frame, configs=["k"], method="pearson", n_perm=math.factorial(5))
    assert out["exact"] and out["n_perm"] == 120
    assert out["observed"] == pytest.approx(observed, abs=1e-12)
    assert out["p_value"] == pytest.approx(expected, abs=1e-12) and out["p_value"] >= 1 / 120  # the identity counts
    negative = leave_one_dataset_out_null(frame, configs=["k"], method="pearson", direction="negative", n_perm=120)
    assert 0 < negative["p_value"] <= 1
    assert (out["p_side"], negative["p_side"]) == ("one-sided greater", "one-sided less")


def test_single_configuration_is_the_plain_permutation_test():
    """With one configuration there is nothing to select: the null is Spearman's permutation null."""
    frame = _frame(np.random.default_rng(3), n_configs=1)
    x = frame.groupby("dataset")["ntps"].first().to_numpy()
    y = frame.groupby("dataset")["accuracy"].first().to_numpy()
    observed = scipy.stats.spearmanr(x, y)[0]
    null = [scipy.stats.spearmanr(x, y[list(p)])[0] for p in itertools.permutations(range(y.size))]
    out = leave_one_dataset_out_null(frame, configs=["k"], n_perm=500)
    assert out["p_value"] == pytest.approx(np.mean([r >= observed - TIE_ATOL for r in null]), abs=1e-12)


def test_sampled_null_and_bad_input():
    frame = _frame(np.random.default_rng(4), n_datasets=6)  # 720 orderings > n_perm: sampled
    out = leave_one_dataset_out_null(frame, configs=["k"], n_perm=40, seed=7)
    assert not out["exact"] and out["n_perm"] == 40
    hits = out["p_value"] * 41 - 1
    assert hits == pytest.approx(round(hits), abs=1e-9) and 0 <= round(hits) <= 40
    assert leave_one_dataset_out_null(frame, configs=["k"], n_perm=40, seed=7) == out
    assert np.isnan(leave_one_dataset_out_null(frame, configs=["k"], observed=float("nan"))["p_value"])
    with pytest.raises(ValueError, match="n_perm must be a positive integer, got 0"):
        leave_one_dataset_out_null(frame, configs=["k"], n_perm=0)
