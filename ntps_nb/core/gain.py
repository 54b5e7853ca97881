"""Predicting the LoRA gain from NTPS across the datasets of one model (pure math).

The paper's claim (SPEC section 7): lower NTPS goes with a larger LoRA gain, where gain = LoRA
test accuracy - probe test accuracy. Two questions, answered with one row per dataset:

- ranking: Spearman(NTPS, gain) across datasets with a bootstrap interval and a permutation
  p-value (`gain_correlation`; the core.stats machinery);
- absolute prediction: gain ~ a + b * NTPS (optionally + c * probe accuracy) by least squares,
  scored by leave-one-dataset-out mean absolute error in accuracy points and compared with the
  trivial predictor, the mean gain of the other datasets (`gain_prediction`). A predictor that
  does not beat the trivial one says nothing about a new dataset, whatever its rho;
- the probe accuracy as a baseline predictor of the gain: measured on one half of the test split
  and the gain on the other (`crossfit_gain`, `crossfit_gain_correlation`), since on the same texts
  gain = LoRA - probe accuracy shares the probe's noise and correlates negatively by construction.

Gains and accuracies are fractions (0.05 = 5 points); errors are reported in points (x 100).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float

from ntps_nb.core.selection import RhoResult, _percentile_interval, _wcorr, monte_carlo_se
from ntps_nb.core.stats import (
    MIN_DATASETS,
    Method,
    _check_method,
    _embed,
    _permuted_indices,
    _pvalue,
    bootstrap_ci,
    correlate,
    permutation_pvalue,
)
from ntps_nb.core.validation import check_labels

__all__ = ["CROSSFIT_CONSTRUCTION", "POINTS", "RankDeficientFitWarning", "crossfit_gain", "crossfit_gain_correlation",
           "fit_gain_predictor", "gain_correlation", "gain_prediction", "per_dataset_table"]

#: Accuracy points per unit of accuracy fraction.
POINTS = 100.0


class RankDeficientFitWarning(UserWarning):
    """A least-squares fit had a design of less than full column rank (e.g. constant NTPS)."""


def per_dataset_table(
    frame: pd.DataFrame, columns: Sequence[str], *, dataset: str = "dataset"
) -> pd.DataFrame:
    """Check a tidy frame has one row per dataset and finite values in ``columns``; sorted by dataset.

    Parameters
    ----------
    frame : DataFrame
        One row per dataset (of one model).
    columns : sequence of str
        The columns that must be present and finite.
    dataset : str
        The column naming the dataset.

    Returns
    -------
    DataFrame
        ``dataset`` and ``columns``, one row per dataset, sorted by dataset.
    """
    missing = [c for c in (dataset, *columns) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame has no column(s) {missing}; it has {list(frame.columns)}")
    repeated = frame[dataset].duplicated()
    if repeated.any():
        raise ValueError(f"dataset(s) {sorted(frame.loc[repeated, dataset].unique())[:5]} appear more than once; "
                         "give one row per dataset (one model, one layer and k)")
    if len(frame) < MIN_DATASETS:
        raise ValueError(f"need at least {MIN_DATASETS} datasets, got {len(frame)}")
    table = frame[[dataset, *columns]].sort_values(dataset).reset_index(drop=True)
    for column in columns:
        values = table[column].to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values)):
            bad = list(table.loc[~np.isfinite(values), dataset])[:5]
            raise ValueError(f"column {column!r} is NaN/inf for dataset(s) {bad}")
    return table


def gain_correlation(
    frame: pd.DataFrame, *, score: str = "ntps", gain: str = "gain", dataset: str = "dataset",
    method: Method = "spearman", n_boot: int = 2000, n_perm: int = 10_000, level: float = 0.95, seed: int = 0,
) -> pd.DataFrame:
    """Correlation of a score (NTPS) with the LoRA gain across datasets, with its uncertainty.

    Parameters
    ----------
    frame : one row per dataset of one model, with columns ``dataset``, ``score``, ``gain``.
    score, gain, dataset : the columns of the score (default "ntps"), the gain and the dataset's name.
    method : "spearman" (the paper's), "kendall" or "pearson".
    n_boot, level, seed : percentile bootstrap over datasets (`core.stats.bootstrap_ci`).
    n_perm : permutation test of rho = 0 (`core.stats.permutation_pvalue`, two-sided).

    Returns
    -------
    One-row frame: ``score``, ``target``, ``method``, ``rho``, ``lower``, ``upper``, ``se``
    (bootstrap standard deviation of rho), ``level``, ``p_value``, ``p_side`` ("two-sided"),
    ``n_datasets``, ``n_boot_valid``. The paper expects rho < 0.
    """
    table = per_dataset_table(frame, [score, gain], dataset=dataset)
    x, y = table[score].to_numpy(np.float64), table[gain].to_numpy(np.float64)
    ci = bootstrap_ci(x, y, method=method, n_boot=n_boot, level=level, seed=seed)
    perm = permutation_pvalue(x, y, method=method, n_perm=n_perm, seed=seed)
    return pd.DataFrame([{
        "score": score, "target": gain, "method": method, "rho": correlate(x, y, method),
        "lower": ci["lower"], "upper": ci["upper"], "se": ci["se"], "level": level, "p_value": perm["p_value"],
        "p_side": perm["p_side"],
        "n_datasets": len(table), "n_boot_valid": ci["n_valid"],
    }])


def _design(columns: Sequence[np.ndarray]) -> Float[np.ndarray, "n p"]:
    n = len(columns[0])
    return np.column_stack([np.ones(n), *columns])


def fit_gain_predictor(
    ntps: Sequence[float], gain: Sequence[float], probe_accuracy: Sequence[float] | None = None
) -> dict[str, float]:
    """Least-squares fit of gain ~ a + b * ntps (+ c * probe_accuracy) on the given datasets.

    Parameters
    ----------
    ntps, gain : sequence of float, shape (n,)
        One value per dataset each.
    probe_accuracy : sequence of float, shape (n,), optional
        A second predictor; None fits gain on NTPS only.

    Returns
    -------
    dict
        ``a``, ``b``, ``c`` (NaN without probe accuracy), ``rank`` of the design,
        ``n_datasets``, ``r2`` (in-sample; NaN when the gains are constant, or when there are no
        more datasets than coefficients: the fit then passes through every point, and 1 would
        say nothing about the predictor).
    """
    x = np.asarray(ntps, dtype=np.float64)
    y = np.asarray(gain, dtype=np.float64)
    columns = [x] if probe_accuracy is None else [x, np.asarray(probe_accuracy, dtype=np.float64)]
    if any(c.shape != y.shape or c.ndim != 1 for c in columns):
        raise ValueError(f"ntps, gain (and probe_accuracy) must be 1-D of equal length, got shapes "
                         f"{[c.shape for c in columns]} and {y.shape}")
    X = _design(columns)
    if y.size < X.shape[1]:
        raise ValueError(f"fitting {X.shape[1]} coefficients needs at least {X.shape[1]} datasets, got {y.size}")
    coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    if rank < X.shape[1]:
        warnings.warn(f"the design has rank {rank} < {X.shape[1]} (a constant or collinear predictor); "
                      "least squares returns the minimum-norm coefficients", RankDeficientFitWarning, stacklevel=2)
    residual = y - X @ coef
    total = np.sum((y - y.mean()) ** 2)
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]) if len(coef) > 2 else float("nan"),
            "rank": int(rank), "n_datasets": int(y.size),
            "r2": float(1 - np.sum(residual ** 2) / total) if total > 0 and y.size > X.shape[1] else float("nan")}


def gain_prediction(
    frame: pd.DataFrame, *, score: str = "ntps", gain: str = "gain", probe: str | None = None,
    dataset: str = "dataset",
) -> dict[str, pd.DataFrame]:
    """Leave-one-dataset-out prediction of the LoRA gain from NTPS, against the trivial predictor.

    For each dataset, gain ~ a + b * score (+ c * probe) is fitted on the OTHER datasets and
    evaluated at the held-out one; the trivial predictor is the other datasets' mean gain.

    Parameters
    ----------
    frame : one row per dataset of one model, with ``dataset``, ``score``, ``gain`` (fractions)
        and, if ``probe`` is given, that column (e.g. the probe accuracy).
    score, gain, dataset : the columns of the score (default "ntps"), the gain and the dataset's name.
    probe : optional second predictor column.

    Returns
    -------
    dict of tidy frames:
    ``folds`` : one row per held-out dataset: ``dataset``, ``gain``, ``predicted``,
        ``trivial``, ``abs_error_points``, ``trivial_abs_error_points``, the fold's ``a``,
        ``b``, ``c``, ``rank``;
    ``summary`` : one row per predictor (``"linear"``, ``"trivial"``): ``predictor``,
        ``formula``, ``mae_points``, ``max_abs_error_points``, ``n_datasets``, and for the
        linear row the in-sample fit on all datasets (``a``, ``b``, ``c``, ``r2_in_sample``) and
        ``beats_trivial``.
    """
    columns = [score] if probe is None else [score, probe]
    table = per_dataset_table(frame, [*columns, gain], dataset=dataset)
    n = len(table)
    n_coef = 1 + len(columns)
    if n - 1 < n_coef:
        raise ValueError(f"leave-one-dataset-out with {n_coef} coefficients needs at least {n_coef + 1} "
                         f"datasets (each fit uses the others), got {n}")
    y = table[gain].to_numpy(np.float64)
    predictors = [table[c].to_numpy(np.float64) for c in columns]
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankDeficientFitWarning)
        for i in range(n):
            others = np.arange(n) != i
            fit = fit_gain_predictor(predictors[0][others], y[others],
                                     predictors[1][others] if probe is not None else None)
            coef = [fit["a"], fit["b"]] + ([fit["c"]] if probe is not None else [])
            predicted = float(_design([p[i:i + 1] for p in predictors])[0] @ coef)
            trivial = float(y[others].mean())
            rows.append({dataset: table[dataset].iloc[i], "gain": float(y[i]), "predicted": predicted,
                         "trivial": trivial, "abs_error_points": POINTS * abs(predicted - y[i]),
                         "trivial_abs_error_points": POINTS * abs(trivial - y[i]),
                         "a": fit["a"], "b": fit["b"], "c": fit["c"], "rank": fit["rank"]})
    deficient = sum(issubclass(w.category, RankDeficientFitWarning) for w in caught)
    if deficient:
        warnings.warn(f"{deficient} of {n} folds had a rank-deficient design (see the 'rank' column)",
                      RankDeficientFitWarning, stacklevel=2)
    folds = pd.DataFrame(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientFitWarning)
        full = fit_gain_predictor(predictors[0], y, predictors[1] if probe is not None else None)
    formula = f"{gain} ~ a + b * {score}" + (f" + c * {probe}" if probe is not None else "")
    mae, trivial_mae = folds["abs_error_points"].mean(), folds["trivial_abs_error_points"].mean()
    summary = pd.DataFrame([
        {"predictor": "linear", "formula": formula, "mae_points": mae,
         "max_abs_error_points": folds["abs_error_points"].max(), "n_datasets": n,
         "a": full["a"], "b": full["b"], "c": full["c"], "r2_in_sample": full["r2"],
         "beats_trivial": bool(mae < trivial_mae)},
        {"predictor": "trivial", "formula": f"{gain} ~ mean of the other datasets", "mae_points": trivial_mae,
         "max_abs_error_points": folds["trivial_abs_error_points"].max(), "n_datasets": n,
         "a": np.nan, "b": np.nan, "c": np.nan, "r2_in_sample": np.nan, "beats_trivial": np.nan},
    ])
    return {"folds": folds, "summary": summary}


# -- a probe baseline independent of the gain (cross-fit over two halves of the test split) ------

#: What `crossfit_gain` does, as recorded in its ``construction`` column.
CROSSFIT_CONSTRUCTION = ("test split halved (stratified by label); baseline probe accuracy on one half, "
                         "gain = LoRA - probe accuracy on the other; both assignments (cross-fit)")


def crossfit_gain(
    test_labels: Sequence[int], probe_predictions: Sequence[int], lora_predictions: Sequence[int], *, seed: int = 0,
) -> pd.DataFrame:
    """The LoRA gain and a probe-accuracy baseline measured on disjoint halves of the test split.

    gain = LoRA accuracy - probe accuracy shares the probe's test noise with the probe accuracy
    itself, so rho(probe accuracy, gain) across datasets is pushed negative even when LoRA and
    the probe are unrelated (regression to the mean). Here the test texts are split into two
    halves, stratified by label (``seed``); in fold f the baseline is the probe accuracy on half
    f and the gain is measured on the other half, so their noises are independent. Both
    assignments are returned (cross-fitting); `crossfit_gain_correlation` averages over them.

    Parameters
    ----------
    test_labels : (M,) true classes of the test texts.
    probe_predictions, lora_predictions : (M,) classes predicted by the probe and by the
        LoRA-tuned model for the same texts, in the same order.
    seed : seed of the stratified split into halves.

    Returns
    -------
    Two rows (``fold`` 0 and 1): ``n_baseline``, ``n_gain`` (texts in each half),
    ``probe_accuracy_baseline`` (half f), ``lora_accuracy``, ``probe_accuracy``, ``gain`` (the
    other half), ``construction`` (`CROSSFIT_CONSTRUCTION`) and ``seed``.
    """
    labels, probe, lora = _prediction_arrays(test_labels, probe_predictions, lora_predictions)
    if labels.size < 4:
        raise ValueError(f"halving the test split needs at least 4 texts, got {labels.size}")
    rng = np.random.default_rng(seed)
    half = np.zeros(labels.size, dtype=int)
    offset = 0
    for label in np.unique(labels):  # stratified: alternate halves within each class, continuing across classes
        members = rng.permutation(np.flatnonzero(labels == label))
        half[members] = (offset + np.arange(members.size)) % 2
        offset += members.size
    probe_correct, lora_correct = probe == labels, lora == labels
    rows = []
    for fold in (0, 1):
        baseline, scored = half == fold, half != fold
        rows.append({"fold": fold, "n_baseline": int(baseline.sum()), "n_gain": int(scored.sum()),
                     "probe_accuracy_baseline": float(probe_correct[baseline].mean()),
                     "lora_accuracy": float(lora_correct[scored].mean()),
                     "probe_accuracy": float(probe_correct[scored].mean()),
                     "gain": float(lora_correct[scored].mean() - probe_correct[scored].mean()),
                     "construction": CROSSFIT_CONSTRUCTION, "seed": int(seed)})
    return pd.DataFrame(rows)


def _prediction_arrays(test_labels, probe_predictions, lora_predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three per-text arrays of a gain, checked to be 1-D of one non-zero length and to hold classes 0..C-1
    (a prediction of another kind, e.g. class names beside integer labels, would never count as correct)."""
    labels, probe, lora = (np.asarray(a) for a in (test_labels, probe_predictions, lora_predictions))
    if not (labels.shape == probe.shape == lora.shape) or labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"test_labels, probe_predictions and lora_predictions must be 1-D of one non-zero length, "
                         f"got shapes {labels.shape}, {probe.shape}, {lora.shape}")
    return (check_labels(labels, name="test_labels"), check_labels(probe, name="probe_predictions"),
            check_labels(lora, name="lora_predictions"))


def whole_split_gain(
    test_labels: Sequence[int], probe_predictions: Sequence[int], lora_predictions: Sequence[int],
) -> tuple[float, float]:
    """The naive baseline and gain of one dataset: probe accuracy and LoRA - probe accuracy, both
    on the whole test split (so they share the probe's test noise; `crossfit_gain` separates them).

    Parameters
    ----------
    test_labels, probe_predictions, lora_predictions : as in `crossfit_gain`.

    Returns
    -------
    (probe_accuracy, gain) : two floats.
    """
    labels, probe, lora = _prediction_arrays(test_labels, probe_predictions, lora_predictions)
    accuracy = float(np.mean(probe == labels))
    return accuracy, float(np.mean(lora == labels)) - accuracy


def crossfit_gain_correlation(
    frame: pd.DataFrame, *, baseline: str = "probe_accuracy_baseline", gain: str = "gain", fold: str = "fold",
    dataset: str = "dataset", method: Method = "spearman", n_perm: int = 2000, n_boot: int = 1000,
    level: float = 0.95, seed: int = 0,
) -> pd.DataFrame:
    """rho(probe-accuracy baseline, LoRA gain) across datasets with the baseline and the gain
    measured on disjoint halves of each test split (`crossfit_gain`), averaged over the folds.

    Each fold's rho uses independent halves; the estimate is their mean. The p-value is
    two-sided, from permutations of the datasets' baselines (the same permutation in both
    folds; exact when n! <= ``n_perm``); the interval is a percentile bootstrap over datasets
    (both folds resampled together; nothing is selected here).

    Parameters
    ----------
    frame : one row per (dataset, fold) with ``baseline`` and ``gain``, e.g. `crossfit_gain`'s
        rows of every dataset with a ``dataset`` column.
    baseline, gain, fold, dataset : the columns of the probe-accuracy baseline, the gain, the fold and the
        dataset's name (`crossfit_gain`'s names by default).
    method : "spearman" (default), "kendall" or "pearson".
    n_perm : permutations of the datasets' baselines for the p-value (exact enumeration when n! <= n_perm).
    n_boot : bootstrap resamples of the datasets for the interval.
    level : coverage level of the percentile interval.
    seed : seed of the permutations and the bootstrap.

    Returns
    -------
    One row: `ntps_nb.core.selection.RhoResult`'s columns (``estimate``, ``lower``, ``upper``,
    ``se``, ``p_value``, ``p_side``, ...) plus ``rho_fold_0``, ``rho_fold_1``, ``n_folds`` and
    ``construction``.
    """
    _check_method(method)
    missing = [c for c in (dataset, fold, baseline, gain) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame has no column(s) {missing}; it has {list(frame.columns)}")
    folds = sorted(v.item() if hasattr(v, "item") else v for v in frame[fold].unique())
    if len(folds) < 2:
        raise ValueError(f"cross-fitting needs at least two folds, got {folds}")
    X, Y = [], []
    datasets = None
    for f in folds:
        table = per_dataset_table(frame[frame[fold] == f], [baseline, gain], dataset=dataset)
        if datasets is not None and list(table[dataset]) != datasets:
            raise ValueError(f"fold {f} has datasets {list(table[dataset])}, fold {folds[0]} has {datasets}: "
                             "every fold needs the same datasets")
        datasets = list(table[dataset])
        X.append(table[baseline].to_numpy(np.float64))
        Y.append(table[gain].to_numpy(np.float64))
    X, Y = np.array(X), np.array(Y)  # (folds, n)
    n = X.shape[1]
    rho_folds = np.array([correlate(x, y, method) for x, y in zip(X, Y)])
    estimate = float(rho_folds.mean())
    rng = np.random.default_rng(seed)
    idx, exact = _permuted_indices(n, int(n_perm), rng)
    null = np.mean([np.clip(_embed(x[idx], method) @ _embed(y[None], method)[0], -1, 1) for x, y in zip(X, Y)], axis=0)
    p = _pvalue(estimate, null, "two-sided", exact)
    lower = upper = se = float("nan")
    n_valid = 0
    if int(n_boot) > 0:
        W = rng.multinomial(n, np.full(n, 1.0 / n), size=int(n_boot)).astype(np.float64)
        boot = np.mean([_wcorr(np.broadcast_to(x, W.shape), np.broadcast_to(y, W.shape), W, method)
                        for x, y in zip(X, Y)], axis=0)
        boot = boot[np.isfinite(boot)]
        n_valid = int(boot.size)
        lower, upper, se = _percentile_interval(boot, level)
    result = RhoResult(
        estimate=estimate, lower=lower, upper=upper, se=se, p_value=float(p), p_side="two-sided",
        p_redone="none (no selection); baselines permuted across datasets in every fold alike",
        p_mc_se=monte_carlo_se(p, idx.shape[0], exact), n_perm=int(idx.shape[0]), exact=bool(exact),
        interval="percentile bootstrap over datasets (no selection), folds resampled together" if int(n_boot) > 0
        else "none", level=float(level), n_boot=int(n_boot), n_boot_valid=n_valid, selection="none", held_out="none",
        method=method, n_datasets=int(n))
    construction = (frame["construction"].iloc[0] if "construction" in frame.columns
                    else "baseline and gain from disjoint halves of the test split")
    return pd.DataFrame([{**result.row(), **{f"rho_fold_{f}": float(r) for f, r in zip(folds, rho_folds)},
                          "n_folds": len(folds), "score": baseline, "target": gain, "construction": construction}])
