"""How sure is an NTPS value? Bootstrap and jackknife intervals from shard moments.

Every moment is a mean over texts, so moments of disjoint groups of texts ("shards") combine
exactly: the moments of a union are the text-count-weighted mean of the parts
(`Moments.combine`). A bootstrap over shards therefore needs no further forward pass: draw S
shards with replacement, weight shard s by (times drawn) x (its text count), and recompute NTPS
from the weighted moments. The unit that is resampled is the shard, not the text: the texts must
be assigned to shards at random, and with few shards the bootstrap distribution is coarse and its
spread biased low (by about a factor sqrt((S - 1) / S)); the coverage study used S = 20.

Combining is a weighted sum of arrays, done for a block of replicates at once as one matrix
product ``(replicates x shards) @ (shards x d*d)``; the eigen-solves of each replicate are the
only per-replicate cost, and one solve per replicate gives every k.

The estimate is always the value on all shards combined, i.e. the full-data NTPS. NTPS is a
biased statistic at finite N: sampling noise in the estimated subspaces pulls the overlap toward
that of a random subspace (about k / r_V), so below the population value whenever that is above
chance. An interval describes the sampling variability of the finite-N value and can cover the
population value far less often than its nominal level. Measured with `coverage_study`
(synthetic task at 45 degrees, d = 32, C = 4, k = 8, population NTPS 0.534, 20 shards, 1000
replicates, 200 repetitions), coverage of nominal 95% intervals:

    N       percentile  basic  bca    mean width  mean bias of the estimate
    500     0.06        0.62   0.30   0.152       -0.094
    2000    0.47        0.89   0.79   0.109       -0.028
    8000    0.78        0.93   0.90   0.061       -0.011

The percentile interval is centred near estimate + bootstrap bias, which doubles the bias; the
"basic" interval reflects it (centre estimate - bootstrap bias) and covers best, but the bootstrap
sees only part of the bias at small N (-0.039 of -0.094 at N = 500).

Every interval function takes ``estimator=`` (default "plugin", the NTPS of the combined
moments; the others are `ntps_nb.core.estimators.ESTIMATORS`, theory variant only). Each
replicate then evaluates that estimator: on the replicate's combined moments for the pooled
estimators, on the replicate's list of shards (shard s repeated as often as it was drawn; the
left-out shard removed) for the shard estimators (`ntps_nb.core.estimators.SHARD_ESTIMATORS`).
A shard estimator costs several factorisations per replicate, and a bootstrap resample can put
copies of one shard into both halves of a split-half estimator (which the estimator's own
delete-one-shard jackknife interval, `ntps_nb.core.estimators.ntps_estimate`, never does). The
plug-in keeps its own path: one factorisation per replicate, whatever k.

Bootstrap replicates are drawn from ``numpy.random.default_rng(seed)`` as a multinomial count
matrix that depends only on (seed, n_shards, n_boot): calls with the same seed on two layers of
one extraction resample the same shards, so their intervals are paired by construction.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import scipy.special
from jaxtyping import Float, Int

from ntps_nb.core.backends import estimator_backend
from ntps_nb.core.moments import LayerMoments, Moments, moments_from_sequences
from ntps_nb.core.progress import progress_bar
from ntps_nb.core.score import (
    REFERENCE_ABS_TOL,
    REFERENCE_FRACTIONS,
    RANGE_RTOL,
    TheoryGeometry,
    check_reference_fraction,
    reference_geometry,
    theory_geometry,
)
from ntps_nb.core.theory import SyntheticTask, synthetic_linear_task

IntervalMethod = Literal["percentile", "basic", "bca"]
Statistic = Literal["ntps", "excess_loss"]

INTERVAL_METHODS = ("percentile", "basic", "bca")
STATISTICS = ("ntps", "excess_loss")
VARIANTS = ("theory", "reference")
#: Fewest shards an interval is computed from (a bootstrap of one unit has no spread).
MIN_SHARDS = 2
#: Replicate moments are formed in blocks whose largest moment takes at most this many bytes.
COMBINE_BLOCK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------
# Shards


def split_into_shards(
    data: SyntheticTask | Sequence[Float[np.ndarray, "T d"]] | Float[np.ndarray, "N T d"],
    n_shards: int,
    labels: Sequence[int] | np.ndarray | None = None,
    *,
    n_classes: int | None = None,
    seed: int = 0,
) -> list[Moments]:
    """Moments of disjoint random shards of texts, one `Moments` per shard.

    Texts are assigned round-robin along a seeded permutation, so shard sizes differ by at most
    one; each shard's moments are `moments_from_sequences` of its texts, and
    ``Moments.combine(shards)`` equals the moments of all texts to round-off.

    Parameters
    ----------
    data : a `SyntheticTask`, or per-text state sequences (each (T_n, d)).
    n_shards : number of shards S, 1 <= S <= N.
    labels : (N,) integer labels; taken from the task when ``data`` is a `SyntheticTask`.
    n_classes : number of label columns C (default: the task's, or max(labels) + 1), the same
        for every shard even if a shard lacks a class.
    seed : seed of the permutation that assigns texts to shards.

    Returns
    -------
    list of S `Moments`, shard j holding texts ``permutation[j::S]``.
    """
    if isinstance(data, SyntheticTask):
        if labels is not None:
            raise ValueError("labels come from the SyntheticTask; do not pass labels as well")
        sequences, labels = data.sequences, data.labels
        n_classes = data.n_classes if n_classes is None else n_classes
    else:
        if labels is None:
            raise ValueError("labels are required when data are sequences")
        sequences = data
    labels = np.asarray(labels)
    n = len(sequences)
    if labels.shape != (n,):
        raise ValueError(f"need one label per text: {n} sequences, labels of shape {labels.shape}")
    if isinstance(n_shards, (bool, np.bool_)) or not isinstance(n_shards, (int, np.integer)):
        raise ValueError(f"n_shards must be an integer, got {n_shards!r}")
    if not 1 <= n_shards <= n:
        raise ValueError(f"n_shards must lie in 1..{n} (the number of texts), got {n_shards}")
    if n_classes is None:
        n_classes = int(labels.max()) + 1
    order = np.random.default_rng(seed).permutation(n)
    shards = []
    for j in range(int(n_shards)):
        members = np.sort(order[j::n_shards])
        shards.append(moments_from_sequences([sequences[i] for i in members], labels[members], n_classes))
    return shards


def layer_shards(parts: Sequence[LayerMoments]) -> dict[int, list[Moments]]:
    """Per-layer shard lists from per-shard `LayerMoments` (as a sharded extraction returns them).

    Parameters
    ----------
    parts : S per-shard `LayerMoments`, all with the same layers (none may be None).

    Returns
    -------
    dict ``{layer: [Moments of shard 0, shard 1, ...]}``, each list of length S.
    """
    parts = list(parts)
    for i, part in enumerate(parts):
        if part is None:
            raise ValueError(f"shard {i} is None: every shard must hold the moments of at least one text")
        if not isinstance(part, LayerMoments):
            raise TypeError(f"shard {i}: expected LayerMoments, got {type(part).__name__}")
    if not parts:
        raise ValueError("no shards")
    layers = parts[0].layers
    for i, part in enumerate(parts[1:], start=1):
        if part.layers != layers:
            raise ValueError(f"shard {i} has layers {part.layers}, shard 0 has {layers}")
    return {layer: [part[layer] for part in parts] for layer in layers}


def check_shards(moment_shards: Sequence[Moments], *, name: str = "moment_shards") -> list[Moments]:
    """The shards as a list, or a ValueError naming what is wrong with them.

    Parameters
    ----------
    moment_shards : per-shard uncentred `Moments` of one layer: at least `MIN_SHARDS`, with the
        same d and C.
    name : name of the argument in error messages.

    Returns
    -------
    list of the S shards, unchanged.
    """
    if isinstance(moment_shards, Moments):
        raise ValueError(f"{name} must be a list of per-shard Moments, got a single Moments")
    if isinstance(moment_shards, LayerMoments):
        raise ValueError(f"{name} must be a list of per-shard Moments, got one LayerMoments; "
                         "split per-shard LayerMoments by layer with layer_shards(...)")
    if moment_shards is None:
        raise ValueError(f"{name} is None")
    shards = list(moment_shards)
    for i, shard in enumerate(shards):
        if shard is None or (isinstance(shard, (list, tuple)) and len(shard) == 0):
            raise ValueError(f"{name}[{i}] is empty ({shard!r}): every shard must hold at least one text")
        if isinstance(shard, LayerMoments):
            raise ValueError(f"{name}[{i}] is a LayerMoments; pick one layer with layer_shards(...)")
        if not isinstance(shard, Moments):
            raise ValueError(f"{name}[{i}] must be Moments, got {type(shard).__name__}")
        if shard.is_centred:
            raise ValueError(f"{name}[{i}] is centred; shards must be uncentred (pass centred=True instead)")
    if len(shards) < MIN_SHARDS:
        raise ValueError(f"{name} has {len(shards)} shard(s); an interval needs at least {MIN_SHARDS}")
    first = shards[0]
    for i, shard in enumerate(shards[1:], start=1):
        if shard.Sxx.shape != first.Sxx.shape or shard.Sxy.shape != first.Sxy.shape:
            raise ValueError(f"{name}[{i}] has d={shard.d}, C={shard.n_classes}; {name}[0] has "
                             f"d={first.d}, C={first.n_classes}: shards must come from one layer and label set")
    return shards


class ShardStack:
    """Shards' moment arrays stacked once, so that many weighted combinations are one product.

    ``combined(counts)`` yields, for each row c of a (B, S) count matrix, the moments of the
    union in which shard s is taken c[s] times, i.e. ``Moments.combine(shards, weights=c)``
    (restricted to the moments in `CARRIED`).
    """

    #: The moments NTPS and the excess loss need (x_mean for centred=True); Shh is not carried.
    CARRIED = ("Sxx", "Sxy", "Syy", "C0", "C1", "x_mean")

    def __init__(self, moment_shards: Sequence[Moments]):
        self.shards = check_shards(moment_shards)
        self.n_texts = np.array([s.n_texts for s in self.shards], dtype=np.float64)
        self.n_tokens = np.array([s.n_tokens for s in self.shards], dtype=np.float64)
        # the optional x_mean is carried only when every shard has it
        names = [n for n in self.CARRIED if all(getattr(s, n) is not None for s in self.shards)]
        self.shapes = {n: getattr(self.shards[0], n).shape for n in names}
        self.stacked = {n: np.stack([getattr(s, n) for s in self.shards]).reshape(len(self.shards), -1)
                        for n in names}

    def __len__(self) -> int:
        return len(self.shards)

    def combined(self, counts: Float[np.ndarray, "B S"]) -> Iterator[Moments]:
        """Moments of the weighted union of the shards, one per row of ``counts``.

        Parameters
        ----------
        counts : (B, S) non-negative float array; row b takes shard s ``counts[b, s]`` times, and
            every row must cover at least one text.

        Returns
        -------
        iterator of B `Moments` (the arrays of `CARRIED` present on every shard, mixed with weights
        proportional to counts * n_texts; ``n_texts`` and ``n_tokens`` the weighted totals).
        """
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 2 or counts.shape[1] != len(self):
            raise ValueError(f"counts must have shape (B, {len(self)}), got {counts.shape}")
        texts = counts * self.n_texts
        totals = texts.sum(axis=1)
        if np.any(totals <= 0) or np.any(counts < 0):
            raise ValueError("every combination needs non-negative counts and at least one text")
        shares = texts / totals[:, None]
        tokens = counts @ self.n_tokens
        block = max(1, COMBINE_BLOCK_BYTES // (8 * max(a.shape[1] for a in self.stacked.values())))
        for start in range(0, counts.shape[0], block):
            stop = min(start + block, counts.shape[0])
            arrays = {n: shares[start:stop] @ a for n, a in self.stacked.items()}
            for row in range(stop - start):
                yield Moments(n_texts=int(round(totals[start + row])), n_tokens=int(round(tokens[start + row])),
                              **{n: arrays[n][row].reshape(self.shapes[n]) for n in arrays})

    def resampled(self, counts: Int[np.ndarray, "B S"] | Float[np.ndarray, "B S"]) -> Iterator[list[Moments]]:
        """The shard lists of resamples: for each row c of ``counts``, shard s repeated c[s] times.

        Parameters
        ----------
        counts : (B, S) non-negative integer counts (a bootstrap draw; a row of ones with one 0
            leaves that shard out); every row must keep at least one shard.

        Returns
        -------
        iterator of B lists of `Moments` (the shards themselves, not copies), in shard order.
        """
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[1] != len(self):
            raise ValueError(f"counts must have shape (B, {len(self)}), got {counts.shape}")
        whole = np.round(counts)
        if np.any(whole != counts) or np.any(whole < 0) or np.any(whole.sum(axis=1) < 1):
            raise ValueError("a resample of shard lists needs non-negative integer counts keeping at least one shard")
        for row in whole.astype(np.int64):
            yield [shard for shard, times in zip(self.shards, row) for _ in range(times)]


def bootstrap_counts(n_shards: int, n_boot: int, seed: int) -> Int[np.ndarray, "B S"]:
    """How often each shard is drawn in each of n_boot resamples of n_shards with replacement.

    Parameters
    ----------
    n_shards : number of shards S.
    n_boot : number of resamples B.
    seed : seed of the multinomial draws.

    Returns
    -------
    (B, S) integer array, each row summing to S.
    """
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_shards, np.full(n_shards, 1.0 / n_shards), size=n_boot)


# --------------------------------------------------------------------------------------------
# Statistics per replicate


@dataclass(frozen=True, eq=False)
class _Curve:
    """Maps moments to the statistic at several k (theory) or fractions (reference).

    With an ``estimator`` other than "plugin" (theory NTPS only) it maps the replicate's data to
    that estimator's values: its combined moments, or its list of shards when the estimator
    needs shards (`needs_shards`); ``seed`` seeds the estimator's own splits."""

    statistic: str
    variant: str
    ks: np.ndarray | None = None
    fractions: np.ndarray | None = None
    centred: bool = False
    tol: float | None = None
    rtol: float = RANGE_RTOL
    precision: str = "float32"
    estimator: str = "plugin"
    seed: int = 0

    @property
    def needs_shards(self) -> bool:
        if self.estimator == "plugin":
            return False
        from ntps_nb.core.estimators import SHARD_ESTIMATORS

        return self.estimator in SHARD_ESTIMATORS

    def __call__(self, moments: Moments | list[Moments]) -> np.ndarray:
        if self.estimator != "plugin":
            from ntps_nb.core.estimators import estimate_ntps

            return estimate_ntps(moments, self.ks, estimator=self.estimator, seed=self.seed, rtol=self.rtol).estimate
        if self.variant == "reference":
            tol = REFERENCE_ABS_TOL if self.tol is None else self.tol
            geometry = reference_geometry(moments, precision=self.precision, tol=tol)
            return np.array([geometry.ntps(f) for f in self.fractions])
        geometry = theory_geometry(moments, centred=self.centred, tol=self.tol, rtol=self.rtol)
        return theory_values(geometry, self.ks, self.statistic)


def theory_values(geometry: TheoryGeometry, ks: np.ndarray, statistic: Statistic = "ntps") -> np.ndarray:
    """NTPS_theory or the excess loss at each k of ``ks`` from one `TheoryGeometry`; NaN where
    k exceeds the geometry's r_V.

    Parameters
    ----------
    geometry : `TheoryGeometry` of one layer.
    ks : (K,) integer array of numbers of next-token directions.
    statistic : "ntps" (default) or "excess_loss".

    Returns
    -------
    (K,) float array, NaN where k < 1 or k > r_V.
    """
    ks = np.asarray(ks, dtype=np.int64)
    out = np.full(ks.shape, np.nan)
    ok = (ks >= 1) & (ks <= geometry.r_V)
    k = ks[ok]
    k_U = np.minimum(k, geometry.m)
    if statistic == "ntps":
        cum = np.cumsum(geometry.projected, axis=1)
        out[ok] = cum[k - 1, k_U - 1] / k_U
    elif statistic == "excess_loss":
        lam, proj = geometry.eigenvalues, geometry.projected[k - 1]
        top = np.arange(geometry.m)[None, :] < k_U[:, None]
        out[ok] = np.where(top, lam * (1.0 - proj), -lam * proj).sum(axis=1)
    else:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    return out


def _evaluate(curve: _Curve, moments: Iterator[Moments] | Iterator[list[Moments]], n: int,
              width: int, bar=None) -> tuple[np.ndarray, int]:
    """The curve on each of n moments (or shard lists); a replicate whose geometry is undefined
    (e.g. a resample with a single class) becomes a row of NaN and is counted. ``bar`` (a
    `progress_bar`) advances by one per replicate."""
    values = np.full((n, width), np.nan)
    failed = 0
    for i, m in enumerate(moments):
        try:
            values[i] = curve(m)
        except (ValueError, np.linalg.LinAlgError):
            failed += 1
        if bar is not None:
            bar.update(1)
    return values, failed


@dataclass(frozen=True, eq=False)
class _Replicates:
    estimate: np.ndarray  # (K,)
    boot: np.ndarray  # (B, K)
    jack: np.ndarray  # (S, K) leave-one-shard-out values
    failed: int


def _replicates(stack: ShardStack, curve: _Curve, counts: np.ndarray, estimate: np.ndarray,
                bar=None) -> _Replicates:
    width = estimate.size
    # a shard estimator sees the resample's shards; every other curve its combined moments
    replicate = stack.resampled if curve.needs_shards else stack.combined
    boot, failed_boot = _evaluate(curve, replicate(counts), counts.shape[0], width, bar)
    leave_one_out = 1.0 - np.eye(len(stack))
    jack, failed_jack = _evaluate(curve, replicate(leave_one_out), len(stack), width, bar)
    return _Replicates(estimate=estimate, boot=boot, jack=jack, failed=failed_boot + failed_jack)


def _jackknife(jack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(deviations mean - theta_(i), standard error) of leave-one-out values, per column."""
    s = jack.shape[0]
    deviations = jack.mean(axis=0) - jack
    se = np.sqrt((s - 1) / s * np.sum(deviations**2, axis=0))
    return deviations, se


def _interval(estimate: np.ndarray, boot: np.ndarray, deviations: np.ndarray, level: float,
              method: str) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) per column from the finite bootstrap values of that column."""
    alpha = 1.0 - level
    lower = np.full(estimate.shape, np.nan)
    upper = np.full(estimate.shape, np.nan)
    for j in range(estimate.size):
        b = boot[:, j]
        b = b[np.isfinite(b)]
        if b.size == 0 or not np.isfinite(estimate[j]):
            continue
        if method == "percentile":
            lower[j], upper[j] = np.quantile(b, [alpha / 2, 1 - alpha / 2])
        elif method == "basic":
            lo, hi = np.quantile(b, [alpha / 2, 1 - alpha / 2])
            lower[j], upper[j] = 2 * estimate[j] - hi, 2 * estimate[j] - lo
        else:  # bca: bias correction from the bootstrap, acceleration from the jackknife
            below = (np.sum(b < estimate[j]) + 0.5 * np.sum(b == estimate[j])) / b.size
            z0 = scipy.special.ndtri(np.clip(below, 0.5 / b.size, 1 - 0.5 / b.size))
            d = deviations[:, j]
            if not np.all(np.isfinite(d)):
                continue
            spread = np.sum(d**2)
            accel = np.sum(d**3) / (6.0 * spread**1.5) if spread > 0 else 0.0
            z = scipy.special.ndtri(np.array([alpha / 2, 1 - alpha / 2]))
            shares = scipy.special.ndtr(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))
            lower[j], upper[j] = np.quantile(b, shares)
    return lower, upper


def _summary(estimate: np.ndarray, boot: np.ndarray, deviations: np.ndarray, se_jack: np.ndarray,
             level: float, method: str) -> dict[str, np.ndarray]:
    lower, upper = _interval(estimate, boot, deviations, level, method)
    finite = np.isfinite(boot)
    n_valid = finite.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as they should
        se_boot = np.where(n_valid >= 2, np.nanstd(np.where(finite, boot, np.nan), axis=0, ddof=1), np.nan)
        bias = np.nanmean(np.where(finite, boot, np.nan), axis=0) - estimate
    return {"lower": lower, "upper": upper, "se_bootstrap": se_boot, "se_jackknife": se_jack,
            "bias_bootstrap": bias, "n_valid": n_valid}


# --------------------------------------------------------------------------------------------
# Arguments


def _check_options(n_boot, level, seed, method, variant, statistic) -> None:
    if isinstance(n_boot, (bool, np.bool_)) or not isinstance(n_boot, (int, np.integer)):
        raise ValueError(f"n_boot must be an integer, got {n_boot!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, float, np.floating, np.integer)):
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    if not (math.isfinite(level) and 0 < level < 1):
        raise ValueError(f"level must lie in (0, 1) (e.g. 0.95), got {level}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer (intervals must be reproducible), got {seed!r}")
    if method not in INTERVAL_METHODS:
        raise ValueError(f"method must be one of {INTERVAL_METHODS}, got {method!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if variant == "reference" and statistic != "ntps":
        raise ValueError("the excess-loss identity is about the theory variant; use variant='theory'")


def _check_estimator(estimator, *, variant, statistic, centred, tol) -> None:
    """The estimator is known, and the options asked with it apply to it."""
    from ntps_nb.core.estimators import ESTIMATORS

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "plugin":
        return
    if variant == "reference":
        raise ValueError("the reference variant is the released algorithm, computed from the pooled moments; "
                         f"estimator={estimator!r} applies to the theory variant only")
    if statistic != "ntps":
        raise ValueError(f"the excess loss is a plug-in quantity; estimator={estimator!r} estimates NTPS only")
    if centred or tol is not None:
        raise ValueError("centred= and tol= are options of the plug-in; the other estimators use rtol only")


def _estimate(curve: _Curve, stack: ShardStack, full: Moments) -> np.ndarray:
    """The curve on all shards: the combined moments, or the shard list for a shard estimator."""
    return curve(list(stack.shards) if curve.needs_shards else full)


def _single_curve(full: Moments | None, k, fraction, *, statistic, variant, centred, tol, rtol, precision,
                  estimator: str = "plugin", seed: int = 0, geometry: TheoryGeometry | None = None) -> _Curve:
    """The curve at one k (theory; a fraction is turned into k with the full data's r_V and then
    held fixed across replicates) or one fraction (reference; int(fraction * r) per replicate).
    ``geometry``: the full data's theory geometry where the caller solved it (on a device; ``full`` is then
    not read, nor by the reference variant)."""
    if variant == "reference":
        check_reference_fraction(k, fraction, centred)
        return _Curve(statistic, variant, fractions=np.array([float(fraction)]), tol=tol, precision=precision)
    if geometry is None:
        geometry = theory_geometry(full, centred=centred, tol=tol, rtol=rtol)
    kk = geometry.k(k, fraction)
    return _Curve(statistic, variant, ks=np.array([kk]), centred=centred, tol=tol, rtol=rtol, estimator=estimator,
                  seed=int(seed))


@dataclass(frozen=True, eq=False)
class _Side:
    """One sharded sample's statistic at one k or fraction: its curve, its estimate on all shards, and its
    bootstrap and leave-one-shard-out replicates, solved by this numpy code or on a torch device."""

    shards: list[Moments]
    n_texts: int
    curve: _Curve
    estimate: np.ndarray
    stack: ShardStack | None  # the numpy code's stacked shards; None on a device
    backend: Any = None
    device: Any = None

    @classmethod
    def of(cls, moment_shards: Sequence[Moments], k, fraction, *, backend: Any = None, device: Any = None,
           **options) -> "_Side":
        """The side of ``moment_shards`` at ``k`` or ``fraction``; ``backend`` (`estimator_backend`'s) on ``device``,
        or None for this numpy code; ``options`` those of `_single_curve`."""
        if backend is None:
            stack = ShardStack(moment_shards)
            full = Moments.combine(stack.shards)
            curve = _single_curve(full, k, fraction, **options)
            return cls(stack.shards, full.n_texts, curve, _estimate(curve, stack, full), stack)
        # on a device the shards are pooled there (the backend's), never on the host
        shards = check_shards(moment_shards)
        if options["variant"] == "reference":
            curve = _single_curve(None, k, fraction, **options)
            estimate = backend.ntps_sweep_torch(shards, variant="reference", tol=curve.tol, precision=curve.precision,
                                                fractions=curve.fractions, device=device)["ntps"].to_numpy()
        else:
            geometry = backend.theory_geometry_torch(shards, centred=options["centred"], tol=options["tol"],
                                                     rtol=options["rtol"], device=device)
            curve = _single_curve(None, k, fraction, **options, geometry=geometry)
            estimate = theory_values(geometry, curve.ks, curve.statistic)
        return cls(shards, sum(s.n_texts for s in shards), curve, estimate, None, backend, device)

    def __len__(self) -> int:
        return len(self.shards)

    def replicates(self, counts: np.ndarray, bar=None) -> _Replicates:
        """The statistic on each bootstrap draw of ``counts`` and on each leave-one-shard-out combination."""
        if self.backend is None:
            return _replicates(self.stack, self.curve, counts, self.estimate, bar)
        curve = self.curve
        values, failed = self.backend.interval_replicates_torch(
            self.shards, np.vstack([counts, 1.0 - np.eye(len(self))]), curve.ks, variant=curve.variant,
            fractions=curve.fractions, statistic=curve.statistic, centred=curve.centred, tol=curve.tol,
            rtol=curve.rtol, precision=curve.precision, device=self.device, bar=bar)
        return _Replicates(estimate=self.estimate, boot=values[:len(counts)], jack=values[len(counts):], failed=failed)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class BootstrapInterval:
    """A statistic of the combined shards with its bootstrap interval and standard errors.

    Attributes
    ----------
    statistic : "ntps" or "excess_loss".
    estimate : the value on all shards combined (the full-data value).
    lower, upper : the ``level`` interval by ``method`` ("percentile", "basic" or "bca").
    se_bootstrap : standard deviation of the bootstrap replicates.
    se_jackknife : leave-one-shard-out jackknife standard error.
    bias_bootstrap : mean of the replicates minus the estimate (a resample has fewer distinct
        texts, so this tracks, roughly, the finite-N bias of the statistic).
    n_shards, n_texts : shards and texts the estimate is over.
    n_boot : replicates drawn; n_valid : replicates with a defined value.
    estimator : the estimator of NTPS every value comes from ("plugin": the combined moments'
        NTPS; see `ntps_nb.core.estimators.ESTIMATORS`).
    replicates : (n_boot,) the bootstrap values (NaN where undefined).
    """

    statistic: str
    estimate: float
    lower: float
    upper: float
    se_bootstrap: float
    se_jackknife: float
    bias_bootstrap: float
    n_shards: int
    n_texts: int
    n_boot: int
    n_valid: int
    level: float
    method: str
    seed: int
    variant: str
    k: int | None
    fraction: float | None
    centred: bool
    estimator: str
    replicates: np.ndarray = field(repr=False)

    @property
    def width(self) -> float:
        return self.upper - self.lower

    @property
    def bias_corrected(self) -> float:
        """estimate - bias_bootstrap: the centre of the "basic" interval."""
        return self.estimate - self.bias_bootstrap

    def as_dict(self) -> dict:
        """The fields without the replicates, for one row of a tidy frame."""
        out = asdict(self)
        out.pop("replicates")
        return out


@dataclass(frozen=True)
class BootstrapDifference:
    """statistic(a) - statistic(b) with its bootstrap interval, standard errors and p-value.

    Attributes
    ----------
    estimate : estimate_a - estimate_b on all shards.
    lower, upper : the ``level`` interval of the difference by ``method``.
    p_value : two-sided bootstrap p-value of "no difference": twice the share of replicates on
        the other side of 0 from the estimate, (1 + count) / (n_valid + 1), capped at 1; 1 when the
        estimate is exactly 0.
    paired : whether the same shard indices were resampled for a and b.
    se_bootstrap, se_jackknife : standard errors of the difference.
    estimator : the estimator of NTPS on both sides.
    replicates : (n_boot,) bootstrap differences.
    """

    statistic: str
    estimate: float
    estimate_a: float
    estimate_b: float
    lower: float
    upper: float
    p_value: float
    se_bootstrap: float
    se_jackknife: float
    paired: bool
    n_shards_a: int
    n_shards_b: int
    n_texts_a: int
    n_texts_b: int
    n_boot: int
    n_valid: int
    level: float
    method: str
    seed: int
    variant: str
    k: int | None
    fraction: float | None
    centred: bool
    estimator: str
    replicates: np.ndarray = field(repr=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("replicates")
        return out


# --------------------------------------------------------------------------------------------
# Public entry points


def _warn_failed(failed: int, total: int, stacklevel: int = 3) -> None:
    if failed:
        warnings.warn(f"{failed} of {total} resamples had undefined geometry (e.g. a single class, or "
                      "k beyond the resample's rank of C0); they are left out of the interval", RuntimeWarning,
                      stacklevel=stacklevel)


def _interval_of(moment_shards, k, fraction, *, statistic, variant, n_boot, level, seed, method,
                 centred, tol, rtol, precision, estimator="plugin", progress=True, device=None) -> BootstrapInterval:
    _check_options(n_boot, level, seed, method, variant, statistic)
    _check_estimator(estimator, variant=variant, statistic=statistic, centred=centred, tol=tol)
    backend = estimator_backend(device, estimator, ("plugin",), "the plug-in's interval")
    side = _Side.of(moment_shards, k, fraction, backend=backend, device=device, statistic=statistic, variant=variant,
                    centred=centred, tol=tol, rtol=rtol, precision=precision, estimator=estimator, seed=seed)
    with progress_bar(n_boot + len(side), f"{statistic}_interval", progress, unit="replicate") as bar:
        reps = side.replicates(bootstrap_counts(len(side), n_boot, seed), bar)
    _warn_failed(reps.failed, n_boot + len(side), stacklevel=4)
    deviations, se_jack = _jackknife(reps.jack)
    estimate, curve = side.estimate, side.curve
    s = _summary(estimate, reps.boot, deviations, se_jack, level, method)
    return BootstrapInterval(
        statistic=statistic, estimate=float(estimate[0]), lower=float(s["lower"][0]), upper=float(s["upper"][0]),
        se_bootstrap=float(s["se_bootstrap"][0]), se_jackknife=float(s["se_jackknife"][0]),
        bias_bootstrap=float(s["bias_bootstrap"][0]), n_shards=len(side), n_texts=side.n_texts,
        n_boot=int(n_boot), n_valid=int(s["n_valid"][0]), level=float(level), method=method, seed=int(seed),
        variant=variant, k=None if curve.ks is None else int(curve.ks[0]),
        fraction=None if fraction is None else float(fraction), centred=centred, estimator=estimator,
        replicates=reps.boot[:, 0].copy(),
    )


def ntps_interval(
    moment_shards: Sequence[Moments],
    k: int | None = None,
    *,
    fraction: float | None = None,
    variant: str = "theory",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: IntervalMethod = "basic",
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    precision: str = "float32",
    estimator: str = "plugin",
    progress: bool = True,
    device: Any = None,
) -> BootstrapInterval:
    """NTPS of the combined shards with a shard-bootstrap interval and jackknife standard error.

    The interval describes the sampling spread of the plug-in (or of ``estimator``) at this N; at the
    sizes of most studies it misses the population NTPS far more often than its level says (module
    docstring). For a number to report with an interval on the population value and a reliability
    flag, use `ntps_nb.core.estimators.ntps_estimate` on the same shards.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer (disjoint texts, at least 2 shards).
    k, fraction : as in `ntps`. For the theory variant a fraction becomes k = int(fraction * r_V)
        with the full data's r_V, and that k is used in every replicate; the reference variant
        applies int(fraction * r) per replicate, as its definition does.
    variant : "theory" (default) or "reference".
    n_boot : bootstrap replicates (each costs one NTPS factorisation).
    level : coverage level of the interval, in (0, 1).
    seed : seed of the shard resampling.
    method : "basic" (default; reflected percentile, 2 * estimate - quantiles), "percentile", or
        "bca" (bias-corrected and accelerated; acceleration from the leave-one-shard-out values).
        NTPS is biased low at finite N and "percentile" doubles that bias; "basic" covered the
        population value best in the coverage study (see the module docstring).
    centred, tol, rtol, precision : passed to the NTPS computation, as in `ntps`.
    estimator : "plugin" (default) or another of `ntps_nb.core.estimators.ESTIMATORS` (theory
        variant, rtol only): the estimate and every replicate come from it (module docstring);
        ``seed`` also seeds its splits into halves.
    progress : show a bar over the replicates once the call has run `ntps_nb.core.progress.PROGRESS_DELAY_S`
        seconds (each replicate is one factorisation: minutes at d = 576 on one core).
    device : None or "cpu-numpy" (default): this numpy code; a torch device ("cpu", "cuda", ...): the same interval
        with the full data and the replicates solved there, the replicates in batches
        (`ntps_nb.core.backends.torch.interval_replicates_torch`), for the plug-in (another estimator raises a
        ValueError). The bar advances a solved batch at a time.

    Returns
    -------
    `BootstrapInterval` with statistic "ntps" and ``estimator``; ``replicates`` is (n_boot,).
    """
    return _interval_of(moment_shards, k, fraction, statistic="ntps", variant=variant, n_boot=n_boot,
                        level=level, seed=seed, method=method, centred=centred, tol=tol, rtol=rtol,
                        precision=precision, estimator=estimator, progress=progress, device=device)


def excess_loss_interval(
    moment_shards: Sequence[Moments],
    k: int | None = None,
    *,
    fraction: float | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: IntervalMethod = "basic",
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    progress: bool = True,
    device: Any = None,
) -> BootstrapInterval:
    """The excess loss DeltaL = L(V_k) - L* (SPEC section 5) of the combined shards, with a
    shard-bootstrap interval; arguments as in `ntps_interval` (theory variant only).

    Parameters
    ----------
    moment_shards, k, fraction, n_boot, level, seed, method, centred, tol, rtol, progress, device : as in
        `ntps_interval`.

    Returns
    -------
    `BootstrapInterval` with statistic "excess_loss" and variant "theory".
    """
    return _interval_of(moment_shards, k, fraction, statistic="excess_loss", variant="theory", n_boot=n_boot,
                        level=level, seed=seed, method=method, centred=centred, tol=tol, rtol=rtol,
                        precision="float64", progress=progress, device=device)


def ntps_interval_sweep(
    moment_shards: Sequence[Moments],
    *,
    statistic: Statistic = "ntps",
    variant: str = "theory",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: IntervalMethod = "basic",
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    precision: str = "float32",
    fractions: np.ndarray | None = None,
    estimator: str = "plugin",
    progress: bool = True,
    device: Any = None,
) -> pd.DataFrame:
    """Intervals at every k (theory: k = 1..r_V of the full data) or every fraction (reference),
    from one factorisation per replicate (plug-in), as a tidy frame.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer (disjoint texts, at least 2 shards).
    statistic : "ntps" (default) or "excess_loss" (theory variant only).
    variant : "theory" (default) or "reference".
    n_boot, level, seed, method, centred, tol, rtol, precision : as in `ntps_interval`.
    fractions : (F,) fractions for the reference variant (default: `REFERENCE_FRACTIONS`);
        not allowed with the theory variant.
    estimator : "plugin" (default) or another of `ntps_nb.core.estimators.ESTIMATORS` (theory
        variant, statistic "ntps", rtol only): the estimate and every replicate at every k come
        from it (the k grid and the fraction, k_U, m, r_V columns from the plug-in geometry of
        the full data); ``seed`` also seeds its splits into halves.
    progress : a bar over the n_boot + S replicates, shown once the call has run
        `ntps_nb.core.progress.PROGRESS_DELAY_S` seconds (False: none).
    device : None or "cpu-numpy" (default): this numpy code; a torch device ("cpu", "cuda", ...): the same frame
        from `ntps_nb.core.backends.torch.interval_sweep_torch`, the replicates solved in batches there, for the
        plug-in (another estimator raises a ValueError).

    Returns
    -------
    DataFrame, one row per k = 1..r_V (theory; with fraction, k_U, m, r_V) or per fraction
    (reference). Columns: statistic, variant, estimator, k (theory) / fraction, the statistic's
    value (column named ``ntps`` or ``excess_loss``), lower, upper, se_bootstrap, se_jackknife,
    bias_bootstrap, n_valid (replicates with a defined value; a replicate is undefined where its
    r_V is below k, or where the estimator is undefined), and the settings (n_shards, n_texts,
    n_boot, level, method, seed, centred).
    """
    _check_options(n_boot, level, seed, method, variant, statistic)
    _check_estimator(estimator, variant=variant, statistic=statistic, centred=centred, tol=tol)
    backend = estimator_backend(device, estimator, ("plugin",), "the plug-in's interval sweep")
    if backend is not None:
        return backend.interval_sweep_torch(
            moment_shards, statistic=statistic, variant=variant, n_boot=n_boot, level=level, seed=seed, method=method,
            centred=centred, tol=tol, rtol=rtol, precision=precision, fractions=fractions, device=device,
            progress=progress, stacklevel=3)  # its warning at the line that called ntps_interval_sweep
    stack = ShardStack(moment_shards)
    full = Moments.combine(stack.shards)
    if variant == "reference":
        if centred:
            raise ValueError("the reference variant uses the uncentred moments, as released")
        fr = REFERENCE_FRACTIONS if fractions is None else np.asarray(fractions, dtype=np.float64)
        curve = _Curve(statistic, variant, fractions=fr, tol=tol, precision=precision)
        index = {"fraction": fr}
    else:
        if fractions is not None:
            raise ValueError("fractions= is for the reference variant; the theory sweep covers every k")
        geometry = theory_geometry(full, centred=centred, tol=tol, rtol=rtol)
        ks = np.arange(1, geometry.r_V + 1)
        curve = _Curve(statistic, variant, ks=ks, centred=centred, tol=tol, rtol=rtol, estimator=estimator,
                       seed=int(seed))
        index = {"k": ks, "fraction": ks / geometry.r_V, "k_U": np.minimum(ks, geometry.m),
                 "m": geometry.m, "r_V": geometry.r_V}
    estimate = _estimate(curve, stack, full)
    with progress_bar(n_boot + len(stack), f"{statistic}_interval_sweep", progress, unit="replicate") as bar:
        reps = _replicates(stack, curve, bootstrap_counts(len(stack), n_boot, seed), estimate, bar)
    _warn_failed(reps.failed, n_boot + len(stack))
    deviations, se_jack = _jackknife(reps.jack)
    summary = _summary(estimate, reps.boot, deviations, se_jack, level, method)
    return pd.DataFrame({
        "statistic": statistic, "variant": variant, "estimator": estimator, **index, statistic: estimate, **summary,
        "n_shards": len(stack), "n_texts": full.n_texts, "n_boot": int(n_boot), "level": float(level),
        "method": method, "seed": int(seed), "centred": centred,
    })


def nested_groups(moment_shards: Sequence[Moments], n_groups: int, *, min_groups: int = MIN_SHARDS,
                  caller: str = "nested_groups") -> Iterator[tuple[int, list[Moments]]]:
    """Nested subsamples of one sharded extraction, each as ``n_groups`` groups of shards.

    The first ``n_groups * j`` shards (j = 1, 2, 4, ... while shards last) hold about ``j`` times the
    texts of the first ``n_groups``; each prefix is merged into ``n_groups`` groups of ``j``
    consecutive shards, so every subsample has the same number of units and only N changes. Shards
    are random groups of texts, so a prefix is a random subsample, and each is nested in the next.

    Parameters
    ----------
    moment_shards : sequence of Moments
        Per-shard moments of one layer, at least ``n_groups`` of them.
    n_groups : int
        Groups per subsample, at least ``min_groups``.
    min_groups : int
        The fewest groups the caller's statistic needs (`MIN_SHARDS` by default).
    caller : str
        The function named in the errors.

    Returns
    -------
    iterator of (int, list of Moments)
        For each subsample, smallest first: the number of shards it uses and its ``n_groups`` groups.

    Raises
    ------
    ValueError
        When ``n_groups`` is not an integer of at least ``min_groups``, or there are fewer shards.
    """
    shards = check_shards(moment_shards)
    if not isinstance(n_groups, (int, np.integer)) or isinstance(n_groups, bool) or n_groups < min_groups:
        raise ValueError(f"n_groups must be an integer >= {min_groups}, got {n_groups!r}")
    if len(shards) < n_groups:
        raise ValueError(f"{caller} needs at least n_groups = {n_groups} shards, got {len(shards)}")
    sizes = [n_groups * 2 ** i for i in range((len(shards) // n_groups).bit_length())]
    return ((used, [Moments.combine(shards[g * (used // n_groups):(g + 1) * (used // n_groups)])
                    for g in range(n_groups)]) for used in sizes)


def width_by_n(
    moment_shards: Sequence[Moments],
    k: int,
    *,
    n_groups: int = 5,
    variant: str = "theory",
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    method: IntervalMethod = "basic",
    estimator: str = "plugin",
    progress: bool = True,
    device: Any = None,
) -> pd.DataFrame:
    """How the interval narrows as texts are added, from one sharded extraction.

    The nested subsamples of `nested_groups` (the first ``n_groups``, ``2 n_groups``, ``4 n_groups``, ...
    shards, each merged into ``n_groups`` groups), so every interval is a bootstrap over the same number
    of units and only N changes.

    Parameters
    ----------
    moment_shards : per-shard `Moments` of one layer, at least ``n_groups`` of them.
    k : number of next-token directions (theory) passed to `ntps_interval`.
    n_groups : bootstrap units per interval, >= `MIN_SHARDS`.
    variant, n_boot, level, seed, method, estimator : as in `ntps_interval` (a shard estimator
        sees the ``n_groups`` merged groups as its shards).
    progress : a bar over the subsamples (each ``n_boot + n_groups`` factorisations), shown as in `ntps_interval`.
    device : where each subsample's interval is solved, as in `ntps_interval` (plug-in only on a torch device).

    Returns
    -------
    DataFrame, one row per N: n_texts, n_shards_used, ntps (the estimate), lower, upper, width,
    se_jackknife, and the settings (k, variant, estimator, n_groups, n_boot, level, method, seed).
    """
    _check_options(n_boot, level, seed, method, variant, "ntps")
    estimator_backend(device, estimator, ("plugin",), "the plug-in's interval")
    subsamples = list(nested_groups(moment_shards, n_groups, caller="width_by_n"))
    rows = []
    with progress_bar(len(subsamples), "width_by_n", progress, unit="subsample") as bar:
        for used, groups in subsamples:
            iv = ntps_interval(groups, k=k, variant=variant, n_boot=n_boot, level=level, seed=seed, method=method,
                               estimator=estimator, progress=False, device=device)
            rows.append({"n_texts": iv.n_texts, "n_shards_used": used, "ntps": iv.estimate, "lower": iv.lower,
                         "upper": iv.upper, "width": iv.upper - iv.lower, "se_jackknife": iv.se_jackknife})
            bar.update(1)
    return pd.DataFrame(rows).assign(k=k, variant=variant, estimator=estimator, n_groups=n_groups, n_boot=n_boot,
                                     level=level, method=method, seed=seed)


def _same_counts(a: list[Moments], b: list[Moments]) -> bool:
    return len(a) == len(b) and all(x.n_texts == y.n_texts for x, y in zip(a, b))


def _default_paired(a: list[Moments], b: list[Moments]) -> bool:
    """Same number of shards, same text counts and (uncentred, so class frequencies) the same
    label moments shard by shard: what two layers or two models on one sharded dataset show."""
    return _same_counts(a, b) and all(
        x.Syy.shape == y.Syy.shape and np.allclose(x.Syy, y.Syy, rtol=1e-12, atol=1e-15) for x, y in zip(a, b))


def ntps_difference(
    shards_a: Sequence[Moments],
    shards_b: Sequence[Moments],
    k: int | None = None,
    *,
    fraction: float | None = None,
    paired: bool | None = None,
    statistic: Statistic = "ntps",
    variant: str = "theory",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: IntervalMethod = "basic",
    centred: bool = False,
    tol: float | None = None,
    rtol: float = RANGE_RTOL,
    precision: str = "float32",
    estimator: str = "plugin",
    progress: bool = True,
    device: Any = None,
) -> BootstrapDifference:
    """Do two NTPS values differ? statistic(a) - statistic(b) with a bootstrap interval and p-value.

    Parameters
    ----------
    shards_a, shards_b : per-shard `Moments` of the two things compared (two layers, two models).
    k, fraction : as in `ntps_interval`, applied to each side (a fraction is resolved per side).
    paired : True when shard i of a and shard i of b hold the same texts (same dataset, same
        sharding): the same shard indices are then resampled for both, which removes the
        dataset's sampling noise shared by a and b. False: independent bootstraps. Default:
        paired when both have the same number of shards with identical text counts and identical
        per-shard class frequencies (Syy). That is a heuristic (it cannot prove the texts are the
        same), so say paired= when you know; paired=True only requires equal text counts.
    statistic : "ntps" (default) or "excess_loss".
    estimator : as in `ntps_interval`, the same on both sides.
    progress : one bar over both sides' replicates, as in `ntps_interval`.
    device : as in `ntps_interval`: both sides' replicates solved in batches on a torch device (plug-in only).
    variant, n_boot, level, seed, method, centred, tol, rtol, precision : as in `ntps_interval`, the same on both
        sides.

    Returns
    -------
    `BootstrapDifference`; ``replicates`` is the (n_boot,) array of bootstrap differences.
    """
    _check_options(n_boot, level, seed, method, variant, statistic)
    _check_estimator(estimator, variant=variant, statistic=statistic, centred=centred, tol=tol)
    backend = estimator_backend(device, estimator, ("plugin",), "the plug-in's difference")
    shards_a, shards_b = check_shards(shards_a, name="shards_a"), check_shards(shards_b, name="shards_b")
    if paired is None:
        paired = _default_paired(shards_a, shards_b)
    elif paired and not _same_counts(shards_a, shards_b):
        raise ValueError("paired=True needs the same number of shards with the same text counts on both sides; got "
                         f"{[s.n_texts for s in shards_a]} and {[s.n_texts for s in shards_b]}")
    paired = bool(paired)
    options = dict(statistic=statistic, variant=variant, centred=centred, tol=tol, rtol=rtol, precision=precision,
                   estimator=estimator, seed=seed, backend=backend, device=device)
    side_a, side_b = _Side.of(shards_a, k, fraction, **options), _Side.of(shards_b, k, fraction, **options)
    est_a, est_b = side_a.estimate, side_b.estimate
    counts_a = bootstrap_counts(len(side_a), n_boot, seed)
    if paired:
        counts_b = counts_a
    else:
        # an independent stream for b, reproducible from the same seed
        counts_b = bootstrap_counts(len(side_b), n_boot, np.random.SeedSequence([int(seed), 1]).generate_state(1)[0])
    total = 2 * n_boot + len(side_a) + len(side_b)
    with progress_bar(total, "ntps_difference", progress, unit="replicate") as bar:
        reps_a = side_a.replicates(counts_a, bar)
        reps_b = side_b.replicates(counts_b, bar)
    _warn_failed(reps_a.failed + reps_b.failed, total)
    estimate = est_a - est_b
    boot = reps_a.boot - reps_b.boot
    if paired:
        deviations, se_jack = _jackknife(reps_a.jack - reps_b.jack)
    else:
        dev_a, se_a = _jackknife(reps_a.jack)
        dev_b, se_b = _jackknife(reps_b.jack)
        deviations, se_jack = np.vstack([dev_a, -dev_b]), np.sqrt(se_a**2 + se_b**2)
    s = _summary(estimate, boot, deviations, se_jack, level, method)
    values = boot[:, 0][np.isfinite(boot[:, 0])]
    return BootstrapDifference(
        statistic=statistic, estimate=float(estimate[0]), estimate_a=float(est_a[0]), estimate_b=float(est_b[0]),
        lower=float(s["lower"][0]), upper=float(s["upper"][0]), p_value=bootstrap_pvalue(float(estimate[0]), values),
        se_bootstrap=float(s["se_bootstrap"][0]), se_jackknife=float(se_jack[0]), paired=paired,
        n_shards_a=len(side_a), n_shards_b=len(side_b), n_texts_a=side_a.n_texts,
        n_texts_b=side_b.n_texts, n_boot=int(n_boot), n_valid=int(values.size), level=float(level), method=method,
        seed=int(seed), variant=variant, k=None if side_a.curve.ks is None else int(side_a.curve.ks[0]),
        fraction=None if fraction is None else float(fraction), centred=centred, estimator=estimator,
        replicates=boot[:, 0].copy(),
    )


def bootstrap_pvalue(estimate: float, replicates: Float[np.ndarray, " B"]) -> float:
    """Two-sided bootstrap p-value of "the statistic is 0": 2 (1 + #replicates on the other side
    of 0 from the estimate, 0 included) / (B + 1), capped at 1; 1 when the estimate is 0 or NaN.

    Parameters
    ----------
    estimate : the statistic on the full data.
    replicates : (B,) bootstrap values; non-finite ones are dropped (B counts the finite ones).

    Returns
    -------
    float in (0, 1]; 1 also when no replicate is finite.
    """
    replicates = np.asarray(replicates, dtype=np.float64)
    replicates = replicates[np.isfinite(replicates)]
    if not np.isfinite(estimate) or estimate == 0 or replicates.size == 0:
        return 1.0
    other_side = np.sum(replicates <= 0) if estimate > 0 else np.sum(replicates >= 0)
    return float(min(1.0, 2.0 * (1 + other_side) / (replicates.size + 1)))


# --------------------------------------------------------------------------------------------
# Coverage


def coverage_study(
    n_repetitions: int = 200,
    *,
    n_texts: int = 2000,
    n_shards: int = 20,
    k: int | None = None,
    statistic: Statistic = "ntps",
    n_boot: int = 1000,
    level: float = 0.95,
    methods: Sequence[str] = INTERVAL_METHODS,
    population_n_texts: int = 200_000,
    truth_shards: int = 20,
    seed: int = 0,
    angle: float = np.pi / 4,
    estimator: str = "plugin",
    progress: bool = True,
    **task_kwargs,
) -> pd.DataFrame:
    """How often do nominal intervals cover the population value? Repeated draws on a synthetic task.

    The population is one large draw of ``population_n_texts`` texts from `synthetic_linear_task`
    (``seed``, ``angle`` and ``task_kwargs`` fix the planted geometry; the task's seed fixes both
    geometry and sample, so independent samples of one geometry cannot come from separate calls).
    Its NTPS (column ``truth``) stands in for the population value; its own sampling error is
    reported as ``truth_se_jackknife`` (from ``truth_shards`` shards of the population draw; 0
    skips it and reports NaN). Each repetition draws
    ``n_texts`` texts from that pool without replacement (independently across repetitions),
    splits them into ``n_shards`` shards and computes the interval by every method from one set
    of ``n_boot`` replicates.

    Parameters
    ----------
    n_repetitions : number of samples drawn from the pool.
    n_texts : texts per sample, 1..population_n_texts.
    n_shards : shards per sample (bootstrap units).
    k : number of next-token directions (default: the task's ``n_predictable``).
    statistic : "ntps" (default) or "excess_loss".
    n_boot, level : replicates and coverage level of every interval.
    methods : interval methods to evaluate, among `INTERVAL_METHODS`.
    population_n_texts : size of the population draw.
    truth_shards : shards for the jackknife error of the truth; 0 skips it.
    seed : seed of the population task and of the sampling.
    angle : planted angle of the task (radians).
    estimator : the estimator of every sample's value and replicates, as in `ntps_interval`
        (statistic "ntps" only); the truth is always the plug-in NTPS of the population draw.
    progress : a bar over the repetitions (each ``n_boot + n_shards`` factorisations), shown as in `ntps_interval`.
    **task_kwargs : further arguments of `synthetic_linear_task`.

    Returns
    -------
    DataFrame, one row per (repetition, method): estimate, lower, upper, width, covered, miss
    ("below": the interval lies below the truth, "above", or ""), se_bootstrap, se_jackknife,
    bias_bootstrap, n_valid, truth, truth_se_jackknife, and the settings (estimator among them).
    """
    for method in methods:
        if method not in INTERVAL_METHODS:
            raise ValueError(f"methods must be among {INTERVAL_METHODS}, got {method!r}")
    _check_options(n_boot, level, seed, methods[0], "theory", statistic)
    _check_estimator(estimator, variant="theory", statistic=statistic, centred=False, tol=None)
    if not 0 < n_texts <= population_n_texts:
        raise ValueError(f"n_texts must lie in 1..population_n_texts={population_n_texts}, got {n_texts}")
    pool = synthetic_linear_task(n_texts=population_n_texts, seed=seed, angle=angle, **task_kwargs)
    k = pool.settings["n_predictable"] if k is None else int(k)
    curve = _Curve(statistic, "theory", ks=np.array([k]))
    truth = float(curve(pool.moments)[0])
    truth_se = np.array([np.nan])
    if truth_shards:
        pool_stack = ShardStack(split_into_shards(pool, truth_shards, seed=seed))
        leave_one_out = 1.0 - np.eye(truth_shards)
        _, truth_se = _jackknife(_evaluate(curve, pool_stack.combined(leave_one_out), truth_shards, 1)[0])

    sample_curve = curve if estimator == "plugin" else _Curve(statistic, "theory", ks=np.array([k]),
                                                              estimator=estimator, seed=int(seed))
    rng = np.random.default_rng([int(seed), 2])
    rows = []
    with progress_bar(int(n_repetitions), "coverage_study", progress, unit="sample") as bar:
        for rep in range(int(n_repetitions)):
            idx = np.sort(rng.choice(population_n_texts, size=n_texts, replace=False))
            stack = ShardStack(split_into_shards(pool.sequences[idx], n_shards, pool.labels[idx],
                                                 n_classes=pool.n_classes, seed=rep))
            full = Moments.combine(stack.shards)
            estimate = _estimate(sample_curve, stack, full)
            reps = _replicates(stack, sample_curve, bootstrap_counts(n_shards, n_boot, rep), estimate)
            deviations, se_jack = _jackknife(reps.jack)
            for method in methods:
                s = _summary(estimate, reps.boot, deviations, se_jack, level, method)
                lower, upper = float(s["lower"][0]), float(s["upper"][0])
                rows.append({
                    "repetition": rep, "method": method, "statistic": statistic, "estimator": estimator, "k": k,
                    "estimate": float(estimate[0]), "lower": lower, "upper": upper, "width": upper - lower,
                    "covered": lower <= truth <= upper,
                    "miss": "below" if upper < truth else ("above" if lower > truth else ""),
                    "se_bootstrap": float(s["se_bootstrap"][0]), "se_jackknife": float(se_jack[0]),
                    "bias_bootstrap": float(s["bias_bootstrap"][0]), "n_valid": int(s["n_valid"][0]),
                    "truth": truth, "truth_se_jackknife": float(truth_se[0]),
                    "n_texts": n_texts, "n_shards": n_shards, "n_boot": int(n_boot), "level": float(level),
                    "population_n_texts": population_n_texts, "seed": int(seed),
                    **{f"task_{key}": value for key, value in pool.settings.items() if key not in ("n_texts", "seed")},
                })
            bar.update(1)
    return pd.DataFrame(rows)


def summarise_coverage(study: pd.DataFrame) -> pd.DataFrame:
    """Coverage, misses on each side, mean width and bias of the estimate, per method (and N).

    Parameters
    ----------
    study : DataFrame returned by `coverage_study` (possibly several concatenated).

    Returns
    -------
    DataFrame, one row per (estimator, n_texts, n_shards, method) present: repetitions, coverage, miss_below,
    miss_above, mean_width, mean_estimate_minus_truth, mean_se_bootstrap, sd_estimate,
    mean_bias_bootstrap.
    """
    keys = [c for c in ("estimator", "n_texts", "n_shards", "method") if c in study.columns]
    grouped = study.groupby(keys, sort=False)
    return pd.DataFrame({
        "repetitions": grouped.size(),
        "coverage": grouped["covered"].mean(),
        "miss_below": grouped["miss"].apply(lambda m: float(np.mean(m == "below"))),
        "miss_above": grouped["miss"].apply(lambda m: float(np.mean(m == "above"))),
        "mean_width": grouped["width"].mean(),
        "mean_estimate_minus_truth": grouped.apply(lambda g: float((g["estimate"] - g["truth"]).mean()),
                                                   include_groups=False),
        "mean_se_bootstrap": grouped["se_bootstrap"].mean(),
        "sd_estimate": grouped["estimate"].std(ddof=1),
        "mean_bias_bootstrap": grouped["bias_bootstrap"].mean(),
    }).reset_index()
