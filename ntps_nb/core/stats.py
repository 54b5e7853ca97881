"""Across-dataset statistics: correlations, their uncertainty, and configuration selection.

The unit of analysis is a dataset: one model gives one score (e.g. NTPS at a chosen layer and
k) and one target (e.g. probe accuracy) per dataset, and the question is whether the scores rank
the datasets like the targets. With 7-12 datasets every number here is noisy, so each comes with
an interval or a null distribution, and the selection of a configuration (layer, k) is either
done in-sample (the paper's protocol, optimistic) or leave-one-dataset-out (honest).
`select_leave_one_dataset_out` here pools the held-out RAW scores of folds that chose different
configurations; `ntps_nb.core.selection` ranks each held-out dataset within its fold's
configuration first, and adds selection-redone p-values and intervals (use that one for claims).

All three correlations are computed the same way: each sample becomes a unit vector (centred
values for Pearson, centred average ranks for Spearman, signs of all pairwise differences for
Kendall's tau-b) and the correlation is the dot product of two such vectors. That makes
bootstrap, permutation and max-over-configuration loops one matrix product each. A constant
sample has no unit vector: its correlation is NaN, never a number.
"""

from __future__ import annotations

import math
import warnings
from itertools import permutations
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.stats
from jaxtyping import Float

from ntps_nb.core.validation import check_count

Method = Literal["spearman", "kendall", "pearson"]
Direction = Literal["positive", "negative"]

METHODS = ("spearman", "kendall", "pearson")
#: The fewest datasets a correlation is computed on.
MIN_DATASETS = 3
#: Two statistics closer than this count as equal when a permutation p-value counts ties
#: (rank correlations take few distinct values, so exact ties are common).
TIE_ATOL = 1e-12
#: Exact permutation tests enumerate all n! orderings when n! is at most this many.
EXACT_PERMUTATION_MAX = 40_320  # 8!


class DegenerateSampleWarning(UserWarning):
    """A correlation was NaN (a constant sample) and was left out or reported as NaN."""


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _embed(samples: Float[np.ndarray, "B n"], method: str) -> Float[np.ndarray, "B p"]:
    """Unit vectors whose dot products are the correlations; rows of NaN for constant samples."""
    A = np.asarray(samples, dtype=np.float64)
    if method == "spearman":
        A = scipy.stats.rankdata(A, axis=1)  # average ranks for ties
    if method == "kendall":
        i, j = np.triu_indices(A.shape[1], k=1)
        Z = np.sign(A[:, j] - A[:, i])
    else:
        Z = A - A.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    constant = np.ptp(A, axis=1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        Z = Z / norms
    Z[constant] = np.nan
    return Z


def _rowwise(X: np.ndarray, Y: np.ndarray, method: str) -> np.ndarray:
    """Correlation of X[b] with Y[b] for every row b (NaN where either row is constant)."""
    return np.clip(np.sum(_embed(X, method) * _embed(Y, method), axis=1), -1.0, 1.0)


def _paired(x, y, *, names: tuple[str, str] = ("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    for name, v in zip(names, (x, y)):
        if v.ndim != 1:
            raise ValueError(f"{name} must be one value per dataset (1-D), got shape {v.shape}")
    if x.size != y.size:
        raise ValueError(f"{names[0]} and {names[1]} must have one value per dataset each, got {x.size} and {y.size}")
    if x.size < MIN_DATASETS:
        raise ValueError(f"need at least {MIN_DATASETS} datasets for a correlation, got {x.size}")
    for name, v in zip(names, (x, y)):
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} has {int(np.sum(~np.isfinite(v)))} NaN/inf value(s); drop or fix those datasets first")
        if np.ptp(v) == 0:
            raise ValueError(f"{name} is constant across datasets ({v[0]:g}): its correlation is undefined")
    return x, y


def correlate(x: Sequence[float], y: Sequence[float], method: Method = "spearman") -> float:
    """Correlation of two per-dataset samples: Spearman (average ranks), Kendall tau-b or Pearson.

    Raises ValueError for fewer than `MIN_DATASETS` values, NaN/inf, different lengths or a
    constant sample (whose correlation is undefined).

    Parameters
    ----------
    x, y : sequence of float, shape (n,)
        One value per dataset each (n >= `MIN_DATASETS`, finite, not constant).
    method : {"spearman", "kendall", "pearson"}
        Spearman (average ranks), Kendall tau-b or Pearson.

    Returns
    -------
    float
        The correlation, in [-1, 1].
    """
    _check_method(method)
    x, y = _paired(x, y)
    return float(_rowwise(x[None], y[None], method)[0])


def bootstrap_ci(
    x: Sequence[float], y: Sequence[float], method: Method = "spearman", n_boot: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap interval of a correlation, resampling datasets (pairs) with replacement.

    A resample that draws a constant sample (e.g. one dataset n times) has no correlation; such
    resamples are left out, counted in ``n_valid``, and a warning says how many.

    Parameters
    ----------
    x, y : sequence of float, shape (n,)
        One value per dataset each (n >= `MIN_DATASETS`, finite, not constant).
    method : {"spearman", "kendall", "pearson"}
        Spearman (average ranks), Kendall tau-b or Pearson.
    n_boot : int
        Number of resamples (>= 1).
    level : float
        Coverage of the interval, in (0, 1).
    seed : int
        Seed of the resampling generator.

    Returns
    -------
    dict
        ``estimate`` (on the original sample), ``lower``, ``upper`` (percentile interval at
        ``level``), ``se`` (standard deviation of the valid resampled correlations), ``level``,
        ``n_boot``, ``n_valid``, ``method``, ``n_datasets``.
    """
    _check_method(method)
    x, y = _paired(x, y)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n_boot = check_count(n_boot, "n_boot")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(int(n_boot), x.size))
    values = _rowwise(x[idx], y[idx], method)
    valid = values[np.isfinite(values)]
    if valid.size < values.size:
        warnings.warn(f"{values.size - valid.size} of {values.size} bootstrap resamples had a constant "
                      f"sample and were left out", DegenerateSampleWarning, stacklevel=2)
    alpha = (1.0 - level) / 2
    lower, upper = (np.quantile(valid, [alpha, 1 - alpha]) if valid.size else (np.nan, np.nan))
    return {"estimate": correlate(x, y, method), "lower": float(lower), "upper": float(upper), "se": _boot_se(valid),
            "level": float(level), "n_boot": int(n_boot), "n_valid": int(valid.size), "method": method,
            "n_datasets": int(x.size)}


def _boot_se(values: np.ndarray) -> float:
    """Bootstrap standard error: the standard deviation (ddof=1) of the valid replicates, NaN for < 2."""
    return float(np.std(values, ddof=1)) if values.size >= 2 else float("nan")


#: The ``p_side`` of a result for each ``alternative`` of a permutation test.
P_SIDES = {"two-sided": "two-sided", "greater": "one-sided greater", "less": "one-sided less"}


def p_side(direction: Direction | None) -> str:
    """The side of a p-value, as results name it in ``p_side``.

    Parameters
    ----------
    direction : {"positive", "negative"} or None
        The expected sign of the statistic; None when no sign is expected.

    Returns
    -------
    str
        "one-sided greater" (positive), "one-sided less" (negative) or "two-sided" (None).
    """
    if direction is None:
        return P_SIDES["two-sided"]
    return P_SIDES["greater"] if _sign(direction) > 0 else P_SIDES["less"]


def _permuted_indices(n: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    if math.factorial(n) <= min(n_perm, EXACT_PERMUTATION_MAX):
        return np.array(list(permutations(range(n)))), True
    return rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1), False


def _pvalue(observed: float, null: np.ndarray, alternative: str, exact: bool) -> float:
    if alternative == "two-sided":
        hits = np.abs(null) >= abs(observed) - TIE_ATOL
    elif alternative == "greater":
        hits = null >= observed - TIE_ATOL
    elif alternative == "less":
        hits = null <= observed + TIE_ATOL
    else:
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    if exact:  # the identity ordering is among the enumerated ones
        return float(hits.mean())
    return float((1 + hits.sum()) / (1 + hits.size))


def permutation_pvalue(
    x: Sequence[float], y: Sequence[float], method: Method = "spearman", n_perm: int = 10_000,
    seed: int = 0, alternative: Literal["two-sided", "greater", "less"] = "two-sided",
) -> dict[str, float]:
    """Permutation p-value of a correlation under exchangeable datasets (y shuffled across datasets).

    With n! <= min(n_perm, 8!) all orderings are enumerated and the p-value is exact; otherwise
    it is the Monte-Carlo estimate (1 + #{null as extreme}) / (1 + n_perm), which is never 0.

    Parameters
    ----------
    x, y : sequence of float, shape (n,)
        One value per dataset each (n >= `MIN_DATASETS`, finite, not constant).
    method : {"spearman", "kendall", "pearson"}
        Spearman (average ranks), Kendall tau-b or Pearson.
    n_perm : int
        Random orderings drawn when not all are enumerated (>= 1).
    seed : int
        Seed of the permutation generator.
    alternative : {"two-sided", "greater", "less"}
        Which correlations count as at least as extreme as the observed one.

    Returns
    -------
    dict
        ``estimate``, ``p_value``, ``p_side`` ("two-sided", "one-sided greater" or "one-sided
        less", from ``alternative``), ``n_perm`` (orderings used), ``exact``, ``alternative``,
        ``method``, ``n_datasets``.
    """
    _check_method(method)
    x, y = _paired(x, y)
    n_perm = check_count(n_perm, "n_perm")
    observed = correlate(x, y, method)
    idx, exact = _permuted_indices(x.size, int(n_perm), np.random.default_rng(seed))
    null = np.clip(_embed(y[idx], method) @ _embed(x[None], method)[0], -1.0, 1.0)
    return {"estimate": observed, "p_value": _pvalue(observed, null, alternative, exact), "p_side": P_SIDES[alternative],
            "n_perm": int(idx.shape[0]), "exact": exact, "alternative": alternative, "method": method, "n_datasets": int(x.size)}


def partial_correlation(
    x: Sequence[float], y: Sequence[float],
    controls: Sequence[float] | Sequence[Sequence[float]] | Mapping[str, Sequence[float]] | np.ndarray,
    method: Literal["spearman", "pearson"] = "spearman",
) -> float:
    """Correlation of x and y after removing what the controls explain linearly (with intercept).

    ``method="spearman"`` ranks x, y and every control first (rank-based partial correlation),
    e.g. NTPS vs accuracy controlling for -C (the number of classes). ``controls`` is one
    sample, an (n, q) array or a mapping name -> sample. Needs n >= q + 3 datasets. When x or
    y is entirely explained by the controls the partial correlation is undefined: NaN with a
    warning.

    Parameters
    ----------
    x, y : sequence of float, shape (n,)
        One value per dataset each (n >= `MIN_DATASETS`, finite, not constant).
    controls : sequence of float (n,), array (n, q) or mapping name -> sequence (n,)
        The variables whose linear effect is removed from x and y.
    method : {"spearman", "pearson"}
        Rank everything first ("spearman") or not.

    Returns
    -------
    float
        The partial correlation, in [-1, 1], or NaN when it is undefined.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"partial_correlation supports 'spearman' and 'pearson', got {method!r}")
    x, y = _paired(x, y)
    if isinstance(controls, Mapping):
        names = list(controls)
        Z = np.column_stack([np.asarray(controls[k], dtype=np.float64) for k in names]) if names else np.empty((x.size, 0))
    else:
        Z = np.asarray(controls, dtype=np.float64)
        Z = Z[:, None] if Z.ndim == 1 else Z
        names = [f"control {j}" for j in range(Z.shape[1])] if Z.ndim == 2 else []
    if Z.ndim != 2 or Z.shape[0] != x.size:
        raise ValueError(f"controls must have one value per dataset ({x.size}), got shape {np.shape(controls)}")
    if not np.all(np.isfinite(Z)):
        raise ValueError("controls have NaN/inf values")
    for j, name in enumerate(names):
        if np.ptp(Z[:, j]) == 0:
            raise ValueError(f"{name} is constant across datasets: it controls for nothing (drop it)")
    if x.size < Z.shape[1] + MIN_DATASETS:
        raise ValueError(f"{Z.shape[1]} control(s) need at least {Z.shape[1] + MIN_DATASETS} datasets, got {x.size}")
    if method == "spearman":
        x, y = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
        Z = scipy.stats.rankdata(Z, axis=0)
    design = np.column_stack([np.ones(x.size), Z])
    coef, *_ = np.linalg.lstsq(design, np.column_stack([x, y]), rcond=None)
    residual = np.column_stack([x, y]) - design @ coef
    scale = np.linalg.norm(np.column_stack([x - x.mean(), y - y.mean()]), axis=0)
    if np.any(np.linalg.norm(residual, axis=0) <= 1e-12 * scale):
        warnings.warn("x or y is a linear function of the controls (after ranking): the partial correlation "
                      "is undefined, returning NaN", DegenerateSampleWarning, stacklevel=2)
        return float("nan")
    return float(_rowwise(residual[:, 0][None], residual[:, 1][None], "pearson")[0])


def partial_correlation_ci(
    x: Sequence[float], y: Sequence[float], controls: Sequence[float] | np.ndarray,
    method: Literal["spearman", "pearson"] = "spearman", n_boot: int = 1000, level: float = 0.95, seed: int = 0,
) -> dict[str, float]:
    """`partial_correlation` with a percentile bootstrap interval over datasets.

    Resamples where the partial correlation is undefined (a control constant in the resample, x
    or y explained by the controls) are left out and counted; with fewer than half of them
    valid the interval is NaN. An undefined estimate (too few datasets, a constant control) is
    NaN with NaN bounds rather than an error.

    Parameters
    ----------
    x, y : sequence of float, shape (n,)
        One value per dataset each (n >= `MIN_DATASETS`, finite, not constant).
    controls : sequence of float (n,) or array (n, q)
        The variables whose linear effect is removed from x and y.
    method : {"spearman", "pearson"}
        Rank everything first ("spearman") or not.
    n_boot : int
        Number of resamples of the datasets (0: the estimate alone, with NaN bounds).
    level : float
        Coverage of the interval, in (0, 1).
    seed : int
        Seed of the resampling generator.

    Returns
    -------
    dict
        ``estimate``, ``lower``, ``upper``, ``se`` (standard deviation of the valid resampled
        values; NaN with the bounds), ``level``, ``n_boot``, ``n_valid``.
    """
    x, y = _paired(x, y)
    Z = np.asarray(controls, dtype=np.float64)
    Z = Z[:, None] if Z.ndim == 1 else Z
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n_boot = check_count(n_boot, "n_boot", minimum=0)
    out = {"estimate": np.nan, "lower": np.nan, "upper": np.nan, "se": np.nan, "level": float(level),
           "n_boot": int(n_boot), "n_valid": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateSampleWarning)
        try:
            out["estimate"] = partial_correlation(x, y, Z, method=method)
        except ValueError:
            return out
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(int(n_boot)):
            idx = rng.integers(0, x.size, x.size)
            try:
                boot.append(partial_correlation(x[idx], y[idx], Z[idx], method=method))
            except ValueError:
                continue
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    out["n_valid"] = int(boot.size)
    if boot.size >= max(10, int(n_boot) // 2):
        alpha = (1.0 - level) / 2
        out["lower"], out["upper"] = (float(v) for v in np.quantile(boot, [alpha, 1 - alpha]))
        out["se"] = _boot_se(boot)
    return out


def stratified_concordance(
    x: Sequence[float], y: Sequence[float], groups: Sequence, n_perm: int = 2000, seed: int = 0,
) -> dict[str, float]:
    """Do x and y order the members of each group the same way? (e.g. groups = datasets, members =
    models: is the model with the higher NTPS also the one with the better probe?)

    ``tau`` = (concordant - discordant) / pairs over every pair of members within a group (ties in
    x or y count as neither), so +1 means every within-group comparison agrees. ``pvalue`` is
    two-sided, from permutations that shuffle y among the members of each group (groups are kept
    apart: what differs between groups cannot enter). Groups with one member contribute nothing.

    Parameters
    ----------
    x, y : sequence of float, shape (n,)
        One value per member (finite).
    groups : sequence, shape (n,)
        The group of each member; pairs are formed within groups only.
    n_perm : int
        Number of within-group shuffles of y (>= 1).
    seed : int
        Seed of the permutation generator.

    Returns
    -------
    dict
        ``estimate`` (tau), ``n_pairs``, ``n_groups`` (with at least two members), ``p_value``,
        ``p_side`` ("two-sided"), ``n_perm``. NaN estimate and p-value, with a `DegenerateSampleWarning`,
        when there is no pair.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    labels = np.asarray(groups)
    if not (x.shape == y.shape == labels.shape) or x.ndim != 1:
        raise ValueError(f"x, y and groups must be 1-d of one length, got {x.shape}, {y.shape}, {labels.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    n_perm = check_count(n_perm, "n_perm")
    members = [np.flatnonzero(labels == g) for g in pd.unique(labels)]
    members = [m for m in members if m.size >= 2]
    n_pairs = int(sum(m.size * (m.size - 1) // 2 for m in members))
    if n_pairs == 0:
        warnings.warn("no group has two members, so there is no pair to compare: the concordance is undefined, "
                      "returning NaN", DegenerateSampleWarning, stacklevel=2)
        return {"estimate": np.nan, "n_pairs": 0, "n_groups": 0, "p_value": np.nan, "p_side": P_SIDES["two-sided"], "n_perm": 0}
    pairs = [np.triu_indices(m.size, 1) for m in members]
    x_signs = [np.sign(x[m][i] - x[m][j]) for m, (i, j) in zip(members, pairs)]

    def tau(y_of: list[np.ndarray]) -> float:
        return sum(float(sx @ np.sign(v[i] - v[j])) for sx, v, (i, j) in zip(x_signs, y_of, pairs)) / n_pairs

    observed = tau([y[m] for m in members])
    rng = np.random.default_rng(seed)
    null = np.array([tau([rng.permutation(y[m]) for m in members]) for _ in range(int(n_perm))])
    p_value = (1 + np.sum(np.abs(null) >= abs(observed) - TIE_ATOL)) / (1 + int(n_perm))
    return {"estimate": observed, "n_pairs": n_pairs, "n_groups": len(members), "p_value": float(p_value),
            "p_side": P_SIDES["two-sided"], "n_perm": int(n_perm)}


# -- configuration selection --------------------------------------------------------------------

def _as_list(configs: str | Sequence[str]) -> list[str]:
    return [configs] if isinstance(configs, str) else list(configs)


class _Grid:
    """A tidy frame as a (configs x datasets) score matrix and a per-dataset target vector."""

    def __init__(self, frame: pd.DataFrame, score: str, target: str, configs: Sequence[str], dataset: str):
        configs = _as_list(configs)
        missing = [c for c in (dataset, score, target, *configs) if c not in frame.columns]
        if missing:
            raise ValueError(f"frame has no column(s) {missing}; it has {list(frame.columns)}")
        if not configs:
            raise ValueError("give at least one configuration column (e.g. 'layer', 'k')")
        duplicated = frame.duplicated([dataset, *configs])
        if duplicated.any():
            raise ValueError(f"{int(duplicated.sum())} row(s) repeat a (dataset, {', '.join(configs)}) pair; "
                             "filter to one model and one variant first")
        targets = frame.groupby(dataset, sort=True)[target]
        if (targets.nunique(dropna=False) > 1).any():
            bad = list(targets.nunique(dropna=False).loc[lambda s: s > 1].index[:3])
            raise ValueError(f"target {target!r} varies within dataset(s) {bad}; it must be one value per dataset")
        self.datasets = np.asarray(targets.first().index)
        self.target = targets.first().to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(self.target)):
            raise ValueError(f"target {target!r} is NaN/inf for dataset(s) {list(self.datasets[~np.isfinite(self.target)])}")
        if self.datasets.size < MIN_DATASETS:
            raise ValueError(f"need at least {MIN_DATASETS} datasets, got {self.datasets.size}")
        if np.ptp(self.target) == 0:
            raise ValueError(f"target {target!r} is constant across datasets: no correlation is defined")
        wide = frame.pivot(index=configs, columns=dataset, values=score).reindex(columns=self.datasets)
        wide = wide.sort_index()
        values = wide.to_numpy(dtype=np.float64)
        incomplete = ~np.all(np.isfinite(values), axis=1)
        if incomplete.any():
            warnings.warn(f"{int(incomplete.sum())} of {len(wide)} configurations lack a finite {score!r} on some "
                          "dataset and are left out of the selection", DegenerateSampleWarning, stacklevel=3)
        self.configs = configs
        self.index = wide.index[~incomplete]
        self.scores = values[~incomplete]
        if self.scores.shape[0] == 0:
            raise ValueError(f"no configuration has a finite {score!r} on every dataset")

    def config(self, i: int) -> dict:
        key = self.index[i]
        key = key if isinstance(key, tuple) else (key,)
        return {c: (v.item() if hasattr(v, "item") else v) for c, v in zip(self.configs, key)}


def _sign(direction: str) -> float:
    if direction not in ("positive", "negative"):
        raise ValueError(f"direction must be 'positive' (maximise rho) or 'negative' (minimise rho), got {direction!r}")
    return 1.0 if direction == "positive" else -1.0


def _correlate_configs(scores: np.ndarray, target: np.ndarray, method: str) -> np.ndarray:
    """rho of every configuration's scores with the target (NaN for constant scores)."""
    return np.clip(_embed(scores, method) @ _embed(target[None], method)[0], -1.0, 1.0)


def _best(rho: np.ndarray, sign: float) -> int:
    """Index of the best finite rho; ties (within `TIE_ATOL`) go to the first configuration in sorted order.

    Rank correlations take few distinct values, so two configurations often tie exactly in exact
    arithmetic; computed as dot products, the tied values can differ in the last bit, and which one
    comes out larger depends on the BLAS kernel the CPU selects (AVX2 vs AVX-512). Comparing within
    `TIE_ATOL` makes the choice the documented one on every machine.
    """
    if not np.any(np.isfinite(rho)):
        raise ValueError("every configuration has constant scores across these datasets: no correlation is defined")
    signed = sign * rho
    return int(np.flatnonzero(signed >= np.nanmax(signed) - TIE_ATOL)[0])


def _warn_constant(rho: np.ndarray, what: str) -> None:
    n = int(np.sum(~np.isfinite(rho)))
    if n:
        warnings.warn(f"{n} configuration(s) have constant scores {what} and cannot be selected",
                      DegenerateSampleWarning, stacklevel=3)


def config_correlations(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
) -> pd.DataFrame:
    """rho across datasets for every configuration of one model: one row per configuration.

    ``frame`` is tidy: one row per (dataset, configuration) with the score and the (per-dataset)
    target. Configurations with constant scores get rho = NaN.

    Parameters
    ----------
    frame : DataFrame
        Tidy: one row per (dataset, configuration) with the ``score`` and the per-dataset ``target``.
    score, target, dataset : str
        Column names of the score, the target and the dataset.
    configs : str or sequence of str
        The column(s) that name a configuration (e.g. layer and k).
    method : {"spearman", "kendall", "pearson"}
        The correlation.

    Returns
    -------
    DataFrame
        One row per configuration: the configuration columns, ``rho``, ``n_datasets``, ``method``.
    """
    _check_method(method)
    grid = _Grid(frame, score, target, configs, dataset)
    out = grid.index.to_frame(index=False)
    out["rho"] = _correlate_configs(grid.scores, grid.target, method)
    out["n_datasets"] = grid.datasets.size
    out["method"] = method
    return out


def select_in_sample(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
    direction: Direction = "positive",
) -> dict:
    """The paper's selection: the configuration whose scores correlate best with the target over
    ALL datasets, and that correlation. Optimistic by construction (see `selection_null`).

    ``direction="negative"`` selects the most negative rho (e.g. for MSE or LoRA gain targets).
    Ties go to the first configuration in sorted order.

    Parameters
    ----------
    frame : DataFrame
        Tidy: one row per (dataset, configuration) with the ``score`` and the per-dataset ``target``.
    score, target, dataset : str
        Column names of the score, the target and the dataset.
    configs : str or sequence of str
        The column(s) that name a configuration (e.g. layer and k).
    method : {"spearman", "kendall", "pearson"}
        The correlation.
    direction : {"positive", "negative"}
        Select the largest rho ("positive") or the most negative ("negative").

    Returns
    -------
    dict
        ``config`` (column -> value), ``rho``, ``n_datasets``, ``n_configs``, ``method``, ``direction``.
    """
    _check_method(method)
    sign = _sign(direction)
    grid = _Grid(frame, score, target, configs, dataset)
    rho = _correlate_configs(grid.scores, grid.target, method)
    _warn_constant(rho, "across datasets")
    best = _best(rho, sign)
    return {"config": grid.config(best), "rho": float(rho[best]), "n_datasets": int(grid.datasets.size),
            "n_configs": int(rho.size), "method": method, "direction": direction}


def select_leave_one_dataset_out(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
    direction: Direction = "positive",
) -> dict:
    """Honest selection: for each dataset, choose the configuration on the OTHER datasets only, take
    the held-out dataset's score under that choice, then correlate held-out scores with targets.

    The held-out dataset's scores and target never enter its own choice. Needs
    ``MIN_DATASETS + 1`` datasets (the others must support a correlation).

    Parameters
    ----------
    frame : DataFrame
        Tidy: one row per (dataset, configuration) with the ``score`` and the per-dataset ``target``.
    score, target, dataset : str
        Column names of the score, the target and the dataset.
    configs : str or sequence of str
        The column(s) that name a configuration (e.g. layer and k).
    method : {"spearman", "kendall", "pearson"}
        The correlation.
    direction : {"positive", "negative"}
        Select the largest rho ("positive") or the most negative ("negative").

    Returns
    -------
    dict
        ``rho`` (held-out scores vs targets), ``chosen`` (a frame: dataset, the configuration
        columns, ``rho_others`` (the selection criterion on the other datasets), ``held_out_score``,
        ``target``), ``n_distinct_configs``, ``n_datasets``, ``method``, ``direction``. ``rho`` is
        NaN, with a warning, if the held-out scores come out constant.
    """
    _check_method(method)
    sign = _sign(direction)
    grid = _Grid(frame, score, target, configs, dataset)
    n = grid.datasets.size
    if n < MIN_DATASETS + 1:
        raise ValueError(f"leave-one-dataset-out needs at least {MIN_DATASETS + 1} datasets, got {n}")
    rows = []
    held_out = np.empty(n)
    for i in range(n):
        others = np.arange(n) != i
        rho = _correlate_configs(grid.scores[:, others], grid.target[others], method)
        best = _best(rho, sign)
        held_out[i] = grid.scores[best, i]
        rows.append({dataset: grid.datasets[i], **grid.config(best), "rho_others": float(rho[best]),
                     "held_out_score": float(held_out[i]), "target": float(grid.target[i])})
    chosen = pd.DataFrame(rows)
    if np.ptp(held_out) == 0:
        warnings.warn("the held-out scores are constant across datasets: leave-one-dataset-out rho is NaN",
                      DegenerateSampleWarning, stacklevel=2)
        rho_out = float("nan")
    else:
        rho_out = correlate(held_out, grid.target, method)
    return {"rho": rho_out, "chosen": chosen, "n_distinct_configs": int(len(chosen.drop_duplicates(grid.configs))),
            "n_datasets": int(n), "method": method, "direction": direction}


def selection_null(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
    direction: Direction = "positive", n_perm: int = 1000, seed: int = 0,
) -> dict:
    """Permutation null of the in-sample max: shuffle the target across datasets, redo the whole
    search over configurations, and compare the observed max with the shuffled maxima.

    This answers "how high does in-sample selection push rho when scores and targets are
    unrelated?" for THIS grid of (correlated) configurations.

    Parameters
    ----------
    frame : DataFrame
        Tidy: one row per (dataset, configuration) with the ``score`` and the per-dataset ``target``.
    score, target, dataset : str
        Column names of the score, the target and the dataset.
    configs : str or sequence of str
        The column(s) that name a configuration (e.g. layer and k).
    method : {"spearman", "kendall", "pearson"}
        The correlation.
    direction : {"positive", "negative"}
        Select the largest rho ("positive") or the most negative ("negative").
    n_perm : int
        Random orderings of the target when not all n! are enumerated (>= 1).
    seed : int
        Seed of the permutation generator.

    Returns
    -------
    dict
        ``observed`` (the best rho, signed as selected), ``p_value`` ((1 + #{null max >=
        observed}) / (1 + n_perm), or exact when all orderings are enumerated), ``p_side``
        ("one-sided greater" for direction positive, "one-sided less" for negative), ``null``
        (array (n_perm,) of null maxima, in the same sign), ``null_median``, ``null_q95``,
        ``n_perm``, ``exact``, ``config``, ``method``, ``direction``.
    """
    _check_method(method)
    sign = _sign(direction)
    n_perm = check_count(n_perm, "n_perm")
    grid = _Grid(frame, score, target, configs, dataset)
    S = _embed(grid.scores, method)  # (n_configs, p)
    rho = np.clip(S @ _embed(grid.target[None], method)[0], -1.0, 1.0)
    _warn_constant(rho, "across datasets")
    best = _best(rho, sign)
    observed = float(rho[best])
    idx, exact = _permuted_indices(grid.datasets.size, int(n_perm), np.random.default_rng(seed))
    null = np.empty(idx.shape[0])
    S = S[np.isfinite(rho)]  # constant configurations cannot be selected, in the null either
    for start in range(0, idx.shape[0], 512):  # (configs x perms) in blocks bounds memory
        T = _embed(grid.target[idx[start:start + 512]], method)
        null[start:start + 512] = np.max(sign * (S @ T.T), axis=0)
    null = np.clip(null, -1.0, 1.0) * sign
    p_value = _pvalue(observed, null, "greater" if sign > 0 else "less", exact)
    return {"observed": observed, "p_value": p_value, "p_side": p_side(direction), "null": null, "null_median": float(np.median(null)),
            "null_q95": float(np.quantile(null, 0.95 if sign > 0 else 0.05)), "n_perm": int(idx.shape[0]),
            "exact": exact, "config": grid.config(best), "method": method, "direction": direction}


def winning_configs(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
    direction: Direction = "positive", top: int = 5,
) -> pd.DataFrame:
    """Which configurations win: the ``top`` configurations by in-sample rho, plus every
    configuration some leave-one-dataset-out fold chose, with how many folds chose it.

    One row per configuration: the configuration columns, ``rho`` (in-sample), ``rank``
    (1 = best in-sample, in the selected direction), ``n_folds_chosen`` (of ``n_datasets``).
    A stable winner has a small rank and many folds; a fragile in-sample maximum has neither.

    Parameters
    ----------
    frame : DataFrame
        Tidy: one row per (dataset, configuration) with the ``score`` and the per-dataset ``target``.
    score, target, dataset : str
        Column names of the score, the target and the dataset.
    configs : str or sequence of str
        The column(s) that name a configuration (e.g. layer and k).
    method : {"spearman", "kendall", "pearson"}
        The correlation.
    direction : {"positive", "negative"}
        Select the largest rho ("positive") or the most negative ("negative").
    top : int
        How many of the best in-sample configurations to keep (0: only those chosen in a fold).

    Returns
    -------
    DataFrame
        The configuration columns, ``rho``, ``rank``, ``n_folds_chosen``, ``n_datasets``, ``method``.
    """
    _check_method(method)
    top = check_count(top, "top", minimum=0)
    sign = _sign(direction)
    table = config_correlations(frame, score=score, target=target, configs=configs, dataset=dataset, method=method)
    names = _as_list(configs)
    table["rank"] = (-sign * table["rho"]).rank(method="min", na_option="bottom").astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateSampleWarning)  # config_correlations already shows NaN rho
        if table["n_datasets"].iloc[0] >= MIN_DATASETS + 1:
            chosen = select_leave_one_dataset_out(frame, score=score, target=target, configs=names, dataset=dataset,
                                                  method=method, direction=direction)["chosen"]
            folds = chosen.groupby(names).size().rename("n_folds_chosen").reset_index()
        else:
            folds = pd.DataFrame(columns=[*names, "n_folds_chosen"])
    out = table.merge(folds, on=names, how="left")
    out["n_folds_chosen"] = out["n_folds_chosen"].fillna(0).astype(int)
    keep = (out["rank"] <= top) | (out["n_folds_chosen"] > 0)
    return out[keep].sort_values(["rank", *names]).reset_index(drop=True)[
        [*names, "rho", "rank", "n_folds_chosen", "n_datasets", "method"]]


def leave_one_dataset_out_null(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
    direction: Direction = "positive", n_perm: int = 200, seed: int = 0, observed: float | None = None,
) -> dict:
    """Permutation null of the leave-one-dataset-out rho (`select_leave_one_dataset_out`): shuffle
    the targets across datasets and redo the whole leave-one-out selection under each shuffle, so
    the selection is inside the null.

    Parameters
    ----------
    frame : DataFrame
        One row per (dataset, configuration) with columns ``dataset``, ``configs``, ``score`` and
        ``target`` (one target value per dataset).
    score, target, dataset : str
        The columns of the score, the per-dataset target and the dataset's name.
    configs : str or sequence of str
        The configuration columns (e.g. ``("layer", "k")``).
    method : {"spearman", "kendall", "pearson"}
        The correlation.
    direction : {"positive", "negative"}
        As in `select_leave_one_dataset_out`: the sign of rho the selection looks for.
    observed : float, optional
        The observed leave-one-dataset-out rho (computed here when None).
    n_perm : int
        With ``n! <= n_perm`` datasets every ordering is enumerated (the identity among them) and
        the p-value is exact; otherwise ``n_perm`` random orderings (generator ``seed``).
    seed : int
        Seed of the random orderings.

    Returns
    -------
    dict with ``observed``, ``p_value`` (the share of orderings whose rho is at least as extreme
    in ``direction``, within `TIE_ATOL`; ``(1 + hits) / (1 + n_perm)`` when sampled; NaN when
    ``observed`` is NaN), ``p_side`` ("one-sided greater" or "one-sided less", from ``direction``),
    ``n_perm`` (orderings used), ``exact``. An ordering under which some
    fold's other datasets cannot support a selection (a constant target) counts as no hit.
    """
    n_perm = check_count(n_perm, "n_perm")
    kwargs = dict(score=score, target=target, configs=configs, dataset=dataset, method=method, direction=direction)
    if observed is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateSampleWarning)  # a NaN rho says it
            observed = select_leave_one_dataset_out(frame, **kwargs)["rho"]
    observed = float(observed)
    if not np.isfinite(observed):
        return {"observed": observed, "p_value": float("nan"), "p_side": p_side(direction), "n_perm": 0, "exact": False}
    per_dataset = frame.groupby(dataset)[target].first()
    values = per_dataset.to_numpy()
    exact = math.factorial(values.size) <= int(n_perm)
    if exact:
        orderings = [values[list(p)] for p in permutations(range(values.size))]
    else:
        rng = np.random.default_rng(seed)
        orderings = [rng.permutation(values) for _ in range(int(n_perm))]
    sign = _sign(direction)
    hits = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateSampleWarning)  # constant held-out scores: a NaN rho, no hit
        for ordering in orderings:
            permuted = frame.assign(**{target: frame[dataset].map(dict(zip(per_dataset.index, ordering)))})
            try:
                rho = select_leave_one_dataset_out(permuted, **kwargs)["rho"]
            except ValueError:  # a fold whose other datasets have a constant target: no selection possible
                rho = float("nan")
            hits += bool(np.isfinite(rho) and sign * rho >= sign * observed - TIE_ATOL)
    p_value = hits / len(orderings) if exact else (1 + hits) / (1 + len(orderings))
    return {"observed": observed, "p_value": p_value, "p_side": p_side(direction), "n_perm": len(orderings),
            "exact": exact}
