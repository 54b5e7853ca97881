"""Configuration selection across datasets with honest statistics (SPEC sections 10 and 11).

One model gives a score (NTPS) per dataset and configuration (layer, k) and one target (probe
accuracy, kappa, ...) per dataset. Choosing the configuration and measuring how well it ranks
the datasets on the same datasets is optimistic; this module measures it without that optimism:

- `leave_one_dataset_out`: each dataset's configuration is chosen on the OTHER datasets, and
  its held-out prediction is put on a scale shared by all folds before the folds are pooled:
  its rank (default) or standardised score among all datasets under the configuration its fold
  chose (scores only, no targets). Raw NTPS values of different configurations are not
  comparable (NTPS grows with k), so pooling them (``held_out="pooled_raw"``, the earlier
  statistic, kept for comparison) can rank datasets by which configuration their fold chose.
  Configurations tied for a fold's maximum share the fold: its held-out value is the average
  over them;
- `lodo_rho`: that rho with a permutation p-value that redoes the whole selection under
  shuffled targets, and a bootstrap interval that redoes it inside every resample of datasets;
- `in_sample_rho`: the paper's in-sample maximum with the selection-aware permutation p-value
  of `ntps_nb.core.stats.selection_null` and NO interval (a bootstrap interval of an in-sample
  maximum covers the optimism, not the truth);
- `fixed_rho`: a score without selection (a baseline, a pre-specified configuration).

Results follow one convention: ``estimate``, ``lower``, ``upper``, ``se``, ``p_value`` +
``p_side``, plus what was redone inside the permutations (``p_redone``) and the Monte Carlo
standard error of the p-value (``p_mc_se``): `RhoResult`, whose ``row()`` is a tidy row.

Bootstrap resamples are handled as weights: a dataset drawn w times counts w times, and the
correlations below are those of the expanded sample (equal to scipy's on the repeated values).
Leave-one-out inside a resample leaves out every copy of the held-out dataset.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from ntps_nb.core.stats import (
    MIN_DATASETS,
    TIE_ATOL,
    DegenerateSampleWarning,
    Direction,
    Method,
    _check_method,
    _Grid,
    _paired,
    _permuted_indices,
    _pvalue,
    _sign,
    correlate,
    p_side,
    permutation_pvalue,
    selection_null,
)

__all__ = [
    "HELD_OUT", "N_BOOT", "N_PERM", "LodoSelection", "RhoResult", "fixed_rho", "in_sample_rho",
    "leave_one_dataset_out", "lodo_rho", "monte_carlo_se", "p_side", "weighted_correlation",
]

HeldOut = Literal["rank", "standardised", "pooled_raw"]
#: How a held-out dataset's score is put on a scale shared by the folds (see `leave_one_dataset_out`).
HELD_OUT = ("rank", "standardised", "pooled_raw")
Ties = Literal["average", "first"]
#: Default number of permutations of every p-value here (exact enumeration when n! is smaller).
N_PERM = 2000
#: Default number of bootstrap resamples of datasets.
N_BOOT = 1000
#: Upper bound on the floats of one block of the vectorised selection (bounds memory, ~40 MB).
_BLOCK_FLOATS = 5_000_000


# -- weighted correlations ----------------------------------------------------------------------

def _constant(A: np.ndarray, W: np.ndarray) -> np.ndarray:
    """True where the values carrying positive weight are all equal (or none carry weight)."""
    present = W > 0
    high = np.max(np.where(present, A, -np.inf), axis=-1)
    low = np.min(np.where(present, A, np.inf), axis=-1)
    return ~(high > low)


def _weighted_ranks(A: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based) of each value in the sample where value k appears W[..., k] times."""
    A = np.asarray(A, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    less = (A[..., None, :] < A[..., :, None]).astype(np.float64)  # [i, k] = a_k < a_i
    count = less + 0.5 * (A[..., None, :] == A[..., :, None])  # below, plus half of the tie group
    if A.ndim == 2 and W.ndim >= 2 and W.shape[-2] == 1:  # configs (C, n) under many weightings: one product
        C, n = A.shape
        flat = W[..., 0, :].reshape(-1, n) @ count.reshape(C * n, n).T
        return flat.reshape(*W.shape[:-2], C, n) + 0.5
    return (count @ W[..., :, None])[..., 0] + 0.5


def _wembed(A: np.ndarray, W: np.ndarray, method: str) -> np.ndarray:
    """Unit vectors whose dot products are the correlations of the weighted samples.

    ``A`` (..., n) values and ``W`` (..., n) non-negative weights, broadcastable; a weight w
    counts the value w times. Rows with a constant (weighted) sample are NaN.
    """
    A = np.asarray(A, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    n = A.shape[-1]
    if method == "kendall":
        i, j = np.triu_indices(n, k=1)
        Z = np.sign(A[..., j] - A[..., i]) * np.sqrt(W[..., i] * W[..., j])
    else:
        V = _weighted_ranks(A, W) if method == "spearman" else A
        total = np.sum(W, axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.sum(V * W, axis=-1, keepdims=True) / total
        Z = np.sqrt(W) * (V - mean)
    constant = _constant(A, W)
    with np.errstate(invalid="ignore", divide="ignore"):
        Z = Z / np.linalg.norm(Z, axis=-1, keepdims=True)
    return np.where(constant[..., None], np.nan, Z)


def _wcorr(X: np.ndarray, Y: np.ndarray, W: np.ndarray, method: str) -> np.ndarray:
    return np.clip(np.sum(_wembed(X, W, method) * _wembed(Y, W, method), axis=-1), -1.0, 1.0)


def weighted_correlation(
    x: Sequence[float], y: Sequence[float], weights: Sequence[float], method: Method = "spearman",
) -> float:
    """Correlation of the sample in which dataset i appears ``weights[i]`` times (a bootstrap
    resample as counts). Equals `ntps_nb.core.stats.correlate` of the repeated values; NaN when
    either sample is constant among the datasets with positive weight.

    Parameters
    ----------
    x, y : sequence of float, shape (n,)
        One value per dataset each.
    weights : sequence of float, shape (n,)
        How many times each dataset appears (non-negative counts).
    method : {"spearman", "kendall", "pearson"}
        The correlation.

    Returns
    -------
    float
        The weighted correlation, in [-1, 1], or NaN.
    """
    _check_method(method)
    x, y = _paired(x, y)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != x.shape or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be {x.size} finite non-negative values, got {np.asarray(weights)!r}")
    return float(_wcorr(x, y, w, method))


# -- leave-one-dataset-out, vectorised over targets and weights ---------------------------------

def _held_out_values(S: np.ndarray, W: np.ndarray, held_out: str) -> np.ndarray:
    """(P, n datasets, C configs): dataset j's value under configuration c, among the datasets
    of the sample weighted by W (P, n)."""
    if held_out == "pooled_raw":
        return np.broadcast_to(S.T[None], (W.shape[0], *S.T.shape))
    if held_out == "rank":
        return np.transpose(_weighted_ranks(S, W[:, None, :]), (0, 2, 1))
    total = np.sum(W, axis=-1)[:, None, None]  # standardised within configuration
    mean = np.sum(S[None] * W[:, None, :], axis=-1, keepdims=True) / total
    var = np.sum(W[:, None, :] * (S[None] - mean) ** 2, axis=-1, keepdims=True) / total
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.transpose((S[None] - mean) / np.sqrt(var), (0, 2, 1))


def _lodo_block(S, T, W, *, method, held_out, sign, ties, atol):
    """Leave-one-dataset-out of scores S (C, n) against targets T (P, n) with dataset weights
    W (P, n). Returns rho (P,), held-out values (P, n), tied (P, n, C) and fold maxima (P, n)."""
    P, n = T.shape
    keep = ~np.eye(n, dtype=bool)
    Wf = W[:, None, :] * keep[None]  # fold j: every copy of dataset j left out
    Zt = _wembed(T[:, None, :], Wf, method)  # (P, F, p)
    if np.all(W == W[:1]):  # the same weights for every row (permutations): embed scores once
        Zs = _wembed(S, Wf[0][:, None, :], method)  # (F, C, p)
        rho = np.einsum("fcq,pfq->pfc", Zs, Zt)
    else:
        Zs = _wembed(S, Wf[:, :, None, :], method)  # (P, F, C, p)
        rho = np.einsum("pfcq,pfq->pfc", Zs, Zt)
    criterion = np.where(np.isfinite(rho), sign * np.clip(rho, -1.0, 1.0), -np.inf)
    best = np.max(criterion, axis=-1)  # (P, F)
    tied = (criterion >= best[..., None] - atol) & np.isfinite(criterion)
    if ties == "first":  # the first tied configuration in sorted order, as the earlier statistic did
        tied &= np.arange(tied.shape[-1]) == np.argmax(tied, axis=-1)[..., None]
    H = _held_out_values(S, W, held_out)
    count = tied.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.sum(np.where(tied, H, 0.0), axis=-1) / count
    active = W > 0
    defined = np.all(~active | (count > 0), axis=-1)
    values = np.where(active, values, 0.0)
    rho_out = np.where(defined, _wcorr(values, T, W, method), np.nan)
    return rho_out, values, tied, np.where(np.isfinite(best), sign * best, np.nan)


def _lodo_many(S, T, W, **kwargs) -> np.ndarray:
    """`_lodo_block`'s rho for many rows of (T, W), in blocks that bound memory."""
    C, n = S.shape
    if np.all(W == W[:1]):  # permutations: the scores' embedding is shared, rows hold (folds x configs)
        per_row = 8 * n * C
    else:  # resamples: every row embeds the scores anew
        per_row = 2 * n * C * max(n, n * (n - 1) // 2)
    step = max(1, _BLOCK_FLOATS // per_row)
    out = np.empty(T.shape[0])
    for start in range(0, T.shape[0], step):
        out[start:start + step] = _lodo_block(S, T[start:start + step], W[start:start + step], **kwargs)[0]
    return out


def _check_options(method, held_out, ties) -> None:
    _check_method(method)
    if held_out not in HELD_OUT:
        raise ValueError(f"held_out must be one of {HELD_OUT}, got {held_out!r}")
    if ties not in ("average", "first"):
        raise ValueError(f"ties must be 'average' (share the fold among tied configurations) or 'first', got {ties!r}")


# -- results ------------------------------------------------------------------------------------

def monte_carlo_se(p_value: float, n_perm: int, exact: bool) -> float:
    """Monte Carlo standard error of a permutation p-value: sqrt(p (1 - p) / n_perm), 0 when
    every ordering was enumerated, NaN for a NaN p-value.

    Parameters
    ----------
    p_value : float
        The permutation p-value.
    n_perm : int
        The number of random orderings it was computed from.
    exact : bool
        Whether every ordering was enumerated.

    Returns
    -------
    float
        The standard error of ``p_value``.
    """
    if exact:
        return 0.0 if np.isfinite(p_value) else float("nan")
    return float(np.sqrt(p_value * (1.0 - p_value) / n_perm))


@dataclass(frozen=True)
class RhoResult:
    """A correlation across datasets with its interval and p-value, saying how each was made.

    ``estimate`` rho; ``lower``, ``upper`` the interval at ``level`` (NaN when no interval that
    respects the selection exists, e.g. for an in-sample maximum); ``se`` the bootstrap
    standard deviation of rho (NaN without a bootstrap); ``p_value`` with ``p_side`` ("one-sided
    greater", "one-sided less", "two-sided"), ``p_redone`` (what each permutation redid),
    ``p_mc_se`` (its Monte Carlo standard error, 0 when exact), ``n_perm`` and ``exact``;
    ``interval`` says how the interval was made, ``n_boot`` / ``n_boot_valid`` the resamples
    drawn / with a defined rho.
    """

    estimate: float
    lower: float
    upper: float
    se: float
    p_value: float
    p_side: str
    p_redone: str
    p_mc_se: float
    n_perm: int
    exact: bool
    interval: str
    level: float
    n_boot: int
    n_boot_valid: int
    selection: str
    held_out: str
    method: str
    n_datasets: int

    def row(self) -> dict:
        """The result as one tidy row (a dict of scalars)."""
        return asdict(self)


@dataclass(frozen=True)
class LodoSelection:
    """Leave-one-dataset-out selection and its held-out rho (see `leave_one_dataset_out`).

    ``folds``: one row per held-out dataset: dataset, ``target``, ``held_out_score`` (on the
    ``held_out`` scale), ``rho_others`` (the fold's best rho on the other datasets), ``n_tied``
    (configurations tied for that best) and ``configs`` (them, as text). ``chosen``: one row per
    (fold, chosen configuration): dataset, the configuration columns and ``weight`` = 1 / n_tied.
    ``n_distinct_configs``: how many different configurations some fold chose.
    """

    rho: float
    folds: pd.DataFrame
    chosen: pd.DataFrame
    n_distinct_configs: int
    n_configs: int
    n_datasets: int
    held_out: str
    ties: str
    method: str
    direction: str


def _grid(frame, score, target, configs, dataset) -> _Grid:
    grid = _Grid(frame, score, target, configs, dataset)
    if grid.datasets.size < MIN_DATASETS + 1:
        raise ValueError(f"leave-one-dataset-out needs at least {MIN_DATASETS + 1} datasets, got {grid.datasets.size}")
    return grid


def _config_label(config: dict) -> str:
    parts = []
    for name, value in config.items():
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        parts.append(f"{name}={value}")
    return ", ".join(parts)


def _observed(grid: _Grid, **options) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """`_lodo_block` on the observed targets; raises where a fold has no defined selection."""
    T, W = grid.target[None], np.ones((1, grid.datasets.size))
    rho, values, tied, best = (a[0] for a in _lodo_block(grid.scores, T, W, **options))
    empty = np.flatnonzero(tied.sum(axis=-1) == 0)
    if empty.size:
        raise ValueError(f"no configuration has a defined rho on the datasets other than "
                         f"{list(grid.datasets[empty])} (constant scores or a constant target there)")
    return float(rho), values, tied, best


def leave_one_dataset_out(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
    direction: Direction = "positive", held_out: HeldOut = "rank", ties: Ties = "average",
    atol: float = TIE_ATOL,
) -> LodoSelection:
    """Leave-one-dataset-out selection with held-out predictions on a scale shared by the folds.

    For each dataset, the configuration(s) with the best rho on the OTHER datasets are chosen
    (configurations within ``atol`` of the best all count); the held-out dataset's value is its
    score under the chosen configuration, expressed by ``held_out`` as:

    - ``"rank"`` (default): its mid-rank among ALL datasets' scores under that configuration;
    - ``"standardised"``: (score - mean) / sd over all datasets under that configuration;
    - ``"pooled_raw"``: the raw score (the earlier statistic: values of different
      configurations ranked together; for comparison only).

    These use scores only, never targets, so the held-out target stays out of its prediction.
    With ``ties="average"`` the held-out value is averaged over the tied configurations;
    ``ties="first"`` takes the first in sorted order (the earlier statistic:
    ``held_out="pooled_raw", ties="first"`` reproduces
    `ntps_nb.core.stats.select_leave_one_dataset_out`). rho is the correlation of the held-out
    values with the targets; NaN, with a warning, when the held-out values are constant.

    Parameters
    ----------
    frame : tidy, one row per (dataset, configuration) with ``score`` and the per-dataset ``target``.
    score, target, dataset : the columns of the score, the per-dataset target and the dataset's name.
    configs : the configuration columns (e.g. ``("layer", "k")``).
    method : "spearman" (default), "kendall" or "pearson".
    direction : "positive" chooses the largest rho, "negative" the most negative (MSE, gain).
    held_out : "rank" (default), "standardised" or "pooled_raw": the scale of the held-out values (above).
    ties : "average" (default) or "first": the configurations tied for the best rho (above).
    atol : how close to the best rho a configuration counts as tied with it (default `TIE_ATOL`).

    Returns
    -------
    `LodoSelection`.
    """
    _check_options(method, held_out, ties)
    grid = _grid(frame, score, target, configs, dataset)
    n = grid.datasets.size
    rho, values, tied, best = _observed(grid, method=method, held_out=held_out, sign=_sign(direction), ties=ties,
                                        atol=atol)
    folds, chosen = [], []
    for j in range(n):
        picked = np.flatnonzero(tied[j])
        folds.append({dataset: grid.datasets[j], "target": float(grid.target[j]), "held_out_score": float(values[j]),
                      "rho_others": float(best[j]), "n_tied": int(picked.size),
                      "configs": "; ".join(_config_label(grid.config(c)) for c in picked)})
        chosen += [{dataset: grid.datasets[j], **grid.config(c), "weight": 1.0 / picked.size} for c in picked]
    if not np.isfinite(rho):
        warnings.warn("the held-out values are constant across datasets: leave-one-dataset-out rho is NaN",
                      DegenerateSampleWarning, stacklevel=2)
    return LodoSelection(
        rho=float(rho), folds=pd.DataFrame(folds), chosen=pd.DataFrame(chosen),
        n_distinct_configs=int(np.count_nonzero(tied.any(axis=0))), n_configs=int(grid.scores.shape[0]),
        n_datasets=int(n), held_out=held_out, ties=ties, method=method, direction=direction)


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float, float]:
    if values.size < 2:
        return float("nan"), float("nan"), float("nan")
    alpha = (1.0 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high), float(np.std(values, ddof=1))


def _check_counts(n_perm: int, n_boot: int, level: float) -> None:
    if int(n_perm) < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    if int(n_boot) < 0:
        raise ValueError(f"n_boot must be >= 0 (0: no interval), got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def lodo_rho(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
    direction: Direction = "positive", held_out: HeldOut = "rank", ties: Ties = "average",
    n_perm: int = N_PERM, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0, atol: float = TIE_ATOL,
) -> RhoResult:
    """The leave-one-dataset-out rho (`leave_one_dataset_out`) with a permutation p-value and a
    bootstrap interval that both redo the selection.

    - p-value, one-sided in ``direction``: the targets are shuffled across datasets and the
      whole leave-one-out selection is redone for each ordering; all n! orderings when n! <=
      ``n_perm`` (exact), else ``n_perm`` random ones, p = (1 + #{as extreme}) / (1 + n_perm).
      A permutation whose selection is undefined counts as not extreme.
    - interval: datasets are resampled with replacement and the leave-one-out selection (every
      copy of the held-out dataset left out of its fold) and the held-out ranks are redone in
      each resample; percentile interval at ``level``, ``se`` their standard deviation.
      Resamples with fewer than 4 distinct datasets or an undefined rho are left out (counted
      in ``n_boot_valid``). ``n_boot=0``: no interval.

    Parameters
    ----------
    frame : DataFrame
        Tidy: one row per (dataset, configuration) with the ``score`` and the per-dataset ``target``.
    score, target, dataset : str
        Column names of the score, the target and the dataset.
    configs : str or sequence of str
        The configuration column(s), e.g. ``("layer", "k")``.
    method : {"spearman", "kendall", "pearson"}
        The correlation.
    direction : {"positive", "negative"}
        "positive" selects the largest rho, "negative" the most negative (MSE, gain); the
        p-value is one-sided that way.
    held_out : {"rank", "standardised", "pooled_raw"}
        How a held-out dataset's score is expressed (see `leave_one_dataset_out`).
    ties : {"average", "first"}
        How configurations tied within ``atol`` are combined (see `leave_one_dataset_out`).
    n_perm : int
        Random orderings of the targets when not all n! are enumerated (>= 1).
    n_boot : int
        Bootstrap resamples of the datasets (0: no interval).
    level : float
        Coverage of the interval, in (0, 1).
    seed : int
        Seed of the permutation and resampling generators.
    atol : float
        Two rho closer than this count as tied.

    Returns
    -------
    `RhoResult` with ``selection="leave_one_dataset_out"``.
    """
    _check_options(method, held_out, ties)
    _check_counts(n_perm, n_boot, level)
    sign = _sign(direction)
    grid = _grid(frame, score, target, configs, dataset)
    options = dict(method=method, held_out=held_out, sign=sign, ties=ties, atol=atol)
    observed = _observed(grid, **options)[0]
    n = grid.datasets.size
    S = grid.scores
    rng = np.random.default_rng(seed)
    idx, exact = _permuted_indices(n, int(n_perm), rng)
    null = _lodo_many(S, grid.target[idx], np.ones(idx.shape), **options)
    side = "greater" if sign > 0 else "less"
    p = _pvalue(observed, null, side, exact) if np.isfinite(observed) else float("nan")
    lower = upper = se = float("nan")
    n_valid = 0
    if int(n_boot) > 0:
        W = rng.multinomial(n, np.full(n, 1.0 / n), size=int(n_boot)).astype(np.float64)
        boot = _lodo_many(S, np.broadcast_to(grid.target, W.shape), W, **options)
        boot = boot[(np.count_nonzero(W, axis=1) >= MIN_DATASETS + 1) & np.isfinite(boot)]
        n_valid = int(boot.size)
        lower, upper, se = _percentile_interval(boot, level)
    return RhoResult(
        estimate=float(observed), lower=lower, upper=upper, se=se, p_value=float(p), p_side=p_side(direction),
        p_redone="leave-one-dataset-out selection redone", p_mc_se=monte_carlo_se(p, idx.shape[0], exact),
        n_perm=int(idx.shape[0]), exact=bool(exact),
        interval=("percentile bootstrap over datasets, selection redone in each resample" if int(n_boot) > 0
                  else "none"),
        level=float(level), n_boot=int(n_boot), n_boot_valid=n_valid, selection="leave_one_dataset_out",
        held_out=held_out, method=method, n_datasets=int(n))


def in_sample_rho(
    frame: pd.DataFrame, *, score: str = "ntps", target: str = "accuracy",
    configs: str | Sequence[str] = ("layer", "k"), dataset: str = "dataset", method: Method = "spearman",
    direction: Direction = "positive", n_perm: int = N_PERM, seed: int = 0,
) -> RhoResult:
    """The paper's in-sample maximum over configurations with its selection-aware p-value
    (`ntps_nb.core.stats.selection_null`: the search over configurations redone under every
    shuffle of the targets; exact when n! <= ``n_perm``) and NO interval: a bootstrap of an
    in-sample maximum, even with the maximum redone per resample, centres on the optimistic
    value, so ``lower`` / ``upper`` / ``se`` are NaN and ``interval`` says why.

    Parameters
    ----------
    frame : DataFrame
        Tidy: one row per (dataset, configuration) with the ``score`` and the per-dataset ``target``.
    score, target, dataset : str
        Column names of the score, the target and the dataset.
    configs : str or sequence of str
        The configuration column(s), e.g. ``("layer", "k")``.
    method : {"spearman", "kendall", "pearson"}
        The correlation.
    direction : {"positive", "negative"}
        "positive" selects the largest rho, "negative" the most negative (MSE, gain); the
        p-value is one-sided that way.
    n_perm : int
        Random orderings of the targets when not all n! are enumerated (>= 1).
    seed : int
        Seed of the permutation generator.

    Returns
    -------
    `RhoResult` with ``selection="in_sample"``.
    """
    if int(n_perm) < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateSampleWarning)
        null = selection_null(frame, score=score, target=target, configs=configs, dataset=dataset, method=method,
                              direction=direction, n_perm=n_perm, seed=seed)
    n = int(frame[dataset].nunique())
    return RhoResult(
        estimate=float(null["observed"]), lower=float("nan"), upper=float("nan"), se=float("nan"),
        p_value=float(null["p_value"]), p_side=p_side(direction),
        p_redone="in-sample selection (maximum over configurations) redone",
        p_mc_se=monte_carlo_se(null["p_value"], null["n_perm"], null["exact"]), n_perm=int(null["n_perm"]),
        exact=bool(null["exact"]), interval="none: an in-sample maximum has no selection-aware interval here",
        level=float("nan"), n_boot=0, n_boot_valid=0, selection="in_sample", held_out="none",
        method=method, n_datasets=n)


def fixed_rho(
    x: Sequence[float], y: Sequence[float], *, method: Method = "spearman", direction: Direction | None = None,
    n_perm: int = N_PERM, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0,
) -> RhoResult:
    """rho of a score chosen without looking at the targets (a baseline such as -C, or a
    pre-specified configuration), with a percentile bootstrap interval over datasets (valid
    here: nothing was selected) and a permutation p-value, two-sided unless ``direction``
    gives the expected sign (exact when n! <= ``n_perm``).

    Parameters
    ----------
    x, y : sequence of float, shape (n,)
        The score and the target, one value per dataset each.
    method : {"spearman", "kendall", "pearson"}
        The correlation.
    direction : {"positive", "negative"} or None
        The expected sign of rho (one-sided p-value), or None (two-sided).
    n_perm : int
        Random orderings of the targets when not all n! are enumerated (>= 1).
    n_boot : int
        Bootstrap resamples of the datasets (0: no interval).
    level : float
        Coverage of the interval, in (0, 1).
    seed : int
        Seed of the permutation and resampling generators.

    Returns
    -------
    `RhoResult` with ``selection="none"``.
    """
    _check_method(method)
    _check_counts(n_perm, n_boot, level)
    x, y = _paired(x, y)
    alternative = "two-sided" if direction is None else ("greater" if _sign(direction) > 0 else "less")
    perm = permutation_pvalue(x, y, method=method, n_perm=n_perm, seed=seed, alternative=alternative)
    lower = upper = se = float("nan")
    n_valid = 0
    if int(n_boot) > 0:  # the resamples of `ntps_nb.core.stats.bootstrap_ci` (same seed), as weights
        idx = np.random.default_rng(seed).integers(0, x.size, size=(int(n_boot), x.size))
        W = np.stack([np.bincount(row, minlength=x.size) for row in idx]).astype(np.float64)
        values = _wcorr(np.broadcast_to(x, W.shape), np.broadcast_to(y, W.shape), W, method)
        values = values[np.isfinite(values)]
        n_valid = int(values.size)
        lower, upper, se = _percentile_interval(values, level)
    return RhoResult(
        estimate=correlate(x, y, method), lower=float(lower), upper=float(upper), se=se,
        p_value=float(perm["p_value"]), p_side=p_side(direction), p_redone="none (no selection)",
        p_mc_se=monte_carlo_se(perm["p_value"], perm["n_perm"], perm["exact"]), n_perm=int(perm["n_perm"]),
        exact=bool(perm["exact"]),
        interval="percentile bootstrap over datasets (no selection)" if int(n_boot) > 0 else "none",
        level=float(level), n_boot=int(n_boot), n_boot_valid=int(n_valid), selection="none", held_out="none",
        method=method, n_datasets=int(x.size))
