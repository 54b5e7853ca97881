"""NTPS moments of one layer (`Moments`) and of all layers (`LayerMoments`).

The moments are those of SPEC section 2: uncentred, divided by the number of texts N.

Perception side (sequence level, mean pooling over valid positions)::

    Sxx = (1/N) sum_n xbar_n xbar_n^T      Sxy = (1/N) sum_n xbar_n y_n^T      Syy = (1/N) sum_n y_n y_n^T

Next-token side (token level, prefix sum s_{n,t} = sum_{i<=t} h_{n,i} as context)::

    C0 = (1/N) sum_n sum_{t<T_n} s_{n,t} s_{n,t}^T     C1 = (1/N) sum_n sum_{t<T_n} s_{n,t} h_{n,t+1}^T

Two optional moments make derived quantities possible without another pass: ``x_mean`` (the mean
pooled vector, for the centred variants) and ``Shh`` (the uncentred second moment of the token
states, (1/N) sum_n sum_t h h^T, for the PCA-overlap control).

Because every moment is a mean over texts, partial accumulations (batches, shards, processes)
combine exactly by weighting with their text counts: see `Moments.combine`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from jaxtyping import Float

from ntps_nb.core.atomic import atomic_path
from ntps_nb.core.validation import check_count, check_labels

#: Relative asymmetry ``||A - A^T||_F / ||A||_F`` above which a moment is rejected as not symmetric.
SYMMETRY_RTOL = 1e-6

_SYMMETRIC = ("Sxx", "Syy", "C0", "Shh")
_ARRAYS = ("Sxx", "Sxy", "Syy", "C0", "C1", "x_mean", "Shh")


@dataclass(frozen=True, eq=False)
class Moments:
    """The NTPS moments of one layer, as float64 arrays divided by the number of texts.

    Parameters
    ----------
    Sxx : (d, d) second moment of the mean-pooled states.
    Sxy : (d, C) cross moment of pooled states and one-hot labels.
    Syy : (C, C) second moment of the one-hot labels (diagonal of class frequencies).
    C0 : (d, d) second moment of the prefix sums.
    C1 : (d, d) cross moment of prefix sums and next states.
    n_texts : number of texts N the means are over.
    n_tokens : number of (prefix, next state) pairs that entered C0/C1.
    x_mean : (d,) optional mean pooled vector, needed for `centred`.
    Shh : (d, d) optional second moment of the token states.
    """

    Sxx: Float[np.ndarray, "d d"]
    Sxy: Float[np.ndarray, "d C"]
    Syy: Float[np.ndarray, "C C"]
    C0: Float[np.ndarray, "d d"]
    C1: Float[np.ndarray, "d d"]
    n_texts: int
    n_tokens: int
    x_mean: Float[np.ndarray, " d"] | None = None
    Shh: Float[np.ndarray, "d d"] | None = None
    is_centred: bool = field(default=False)

    def __post_init__(self) -> None:
        for name in _ARRAYS:
            value = getattr(self, name)
            if value is None:
                continue
            # a read-only view: float64 input is not copied (moments of large models are GBs)
            array = np.asarray(value, dtype=np.float64).view()
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        d, n_classes = _check_shapes(self)
        products = {}
        for name in _ARRAYS:
            value = getattr(self, name)
            if value is None:
                continue
            # A v with v free of zeros is finite exactly when every entry of A is, unless finite entries
            # overflow the sum: one multi-threaded matrix-vector pass instead of an elementwise scan of
            # GBs (for large models), with the scan kept to count the bad entries or rule out overflow
            products[name] = value @ _probes(value.shape[-1]) if value.ndim == 2 else value
            if not np.all(np.isfinite(products[name])) and not np.all(np.isfinite(value)):
                bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
                raise ValueError(f"moment {name} has {bad} NaN/inf entries; the hidden states or labels that produced it are not finite")
        for name in _SYMMETRIC:
            value = getattr(self, name)
            if value is None:
                continue
            # ||(A - A^T) v|| / ||A v|| for Gaussian v estimates ||A - A^T||_F / ||A||_F with two
            # matrix-vector products, where a transposed copy of a large d x d array costs seconds
            Av = products[name]
            asym = np.linalg.norm(Av - value.T @ _probes(value.shape[0]))
            scale = np.linalg.norm(Av)
            if asym > SYMMETRY_RTOL * max(scale, np.finfo(float).tiny):
                raise ValueError(f"moment {name} is not symmetric: ||A - A^T|| / ||A|| ~ {asym / scale:.3g} > {SYMMETRY_RTOL:g}")
            # the two products round differently on some BLAS builds: copy only if not exactly symmetric
            if asym > 0 and not np.array_equal(value, value.T):
                sym = (value + value.T) / 2
                sym.setflags(write=False)
                object.__setattr__(self, name, sym)
        object.__setattr__(self, "n_texts", check_count(self.n_texts, "n_texts"))
        object.__setattr__(self, "n_tokens", check_count(self.n_tokens, "n_tokens", minimum=0))

    @property
    def d(self) -> int:
        """Hidden size."""
        return self.Sxx.shape[0]

    @property
    def n_classes(self) -> int:
        """Number of label columns C."""
        return self.Sxy.shape[1]

    @property
    def class_frequencies(self) -> Float[np.ndarray, " C"]:
        """Fraction of texts in each class (the diagonal of the uncentred Syy)."""
        if self.is_centred:
            raise ValueError("class frequencies are not recoverable from centred moments")
        return np.diag(self.Syy).copy()

    def centred(self) -> "Moments":
        """The centred perception moments (a probe with intercept); the next-token side is unchanged.

        Returns
        -------
        `Moments` with Sxx - x_mean x_mean^T, Sxy - x_mean y_mean^T, Syy - y_mean y_mean^T
        (y_mean the diagonal of Syy) and ``is_centred`` True; ``self`` if already centred.
        Raises ValueError when ``x_mean`` is missing.
        """
        if self.is_centred:
            return self
        if self.x_mean is None:
            raise ValueError("centred moments need x_mean (the mean pooled vector); extract with it recorded")
        y_mean = np.diag(self.Syy)
        return replace(
            self,
            Sxx=self.Sxx - np.outer(self.x_mean, self.x_mean),
            Sxy=self.Sxy - np.outer(self.x_mean, y_mean),
            Syy=self.Syy - np.outer(y_mean, y_mean),
            is_centred=True,
        )

    def with_labels(self, Sxy: Float[np.ndarray, "d C"], Syy: Float[np.ndarray, "C C"]) -> "Moments":
        """A copy with other label moments (e.g. under permuted labels); the cached arrays stay unchanged.

        Parameters
        ----------
        Sxy : (d, C) the new cross moment of pooled states and one-hot labels.
        Syy : (C, C) the new label second moment.

        Returns
        -------
        `Moments`, the other fields unchanged.
        """
        return replace(self, Sxy=Sxy, Syy=Syy)

    @staticmethod
    def combine(parts: Sequence["Moments"], weights: Sequence[float] | None = None) -> "Moments":
        """Exact moments of the union of disjoint parts: the text-count-weighted mean of each moment.

        ``weights`` multiplies each part's text count (a bootstrap draws a part several times).

        Parameters
        ----------
        parts : uncentred `Moments` with the same d and C.
        weights : (P,) non-negative multiplicities, one per part, not all zero (default: ones).

        Returns
        -------
        `Moments` with n_texts and n_tokens the weighted totals (rounded); an optional array is kept
        only when every part has it.
        """
        parts = list(parts)
        counts = Moments.combination_counts(parts, weights)
        weights = np.ones(len(parts)) if weights is None else np.asarray(weights, dtype=np.float64)
        total = counts.sum()
        merged: dict[str, Any] = {}
        for name in _ARRAYS:
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                merged[name] = None
                continue
            acc = np.zeros_like(values[0])
            for count, value in zip(counts, values):
                if count:
                    acc += (count / total) * value
            merged[name] = acc
        n_tokens = sum(w * p.n_tokens for w, p in zip(weights, parts))
        return Moments(n_texts=int(round(total)), n_tokens=int(round(n_tokens)), **merged)

    @staticmethod
    def combination_counts(parts: Sequence["Moments"], weights: Sequence[float] | None = None) -> np.ndarray:
        """The weighted text count of each part that `combine` weighs it by, after `combine`'s checks of the
        parts (a ValueError says what is wrong); the torch backend pools shards on a device with them.

        Parameters
        ----------
        parts : uncentred `Moments` with the same d and C, at least one.
        weights : as in `combine`.

        Returns
        -------
        (P,) float64: each part's n_texts times its weight.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("combine needs at least one Moments")
        weights = np.ones(len(parts)) if weights is None else np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(parts),) or np.any(weights < 0) or not np.any(weights > 0):
            raise ValueError("weights must be one non-negative number per part, not all zero")
        first = parts[0]
        for other in parts[1:]:
            if other.Sxx.shape != first.Sxx.shape or other.Sxy.shape != first.Sxy.shape:
                raise ValueError(f"cannot combine moments of shapes d={first.d}, C={first.n_classes} and "
                                 f"d={other.d}, C={other.n_classes}")
            if other.is_centred or first.is_centred:
                raise ValueError("combine uncentred moments, then centre the result")
        return np.array([p.n_texts for p in parts], dtype=np.float64) * weights

    def __add__(self, other: "Moments") -> "Moments":
        return Moments.combine([self, other])

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that are set, by name."""
        return {name: getattr(self, name) for name in _ARRAYS if getattr(self, name) is not None}


def _probes(n: int) -> np.ndarray:
    """Two fixed Gaussian probe vectors of length n, with no zero entry (see Moments' checks)."""
    v = np.random.default_rng(0).standard_normal((n, 2))
    v[v == 0] = 1.0
    return v


def _check_shapes(m: Moments) -> tuple[int, int]:
    if m.Sxx.ndim != 2 or m.Sxx.shape[0] != m.Sxx.shape[1]:
        raise ValueError(f"Sxx must be square (d, d), got shape {m.Sxx.shape}")
    d = m.Sxx.shape[0]
    if m.Sxy.ndim != 2 or m.Sxy.shape[0] != d:
        raise ValueError(f"Sxy must have shape (d={d}, C), got {m.Sxy.shape}")
    n_classes = m.Sxy.shape[1]
    expected = {"Syy": (n_classes, n_classes), "C0": (d, d), "C1": (d, d), "Shh": (d, d), "x_mean": (d,)}
    for name, shape in expected.items():
        value = getattr(m, name)
        if value is not None and value.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (d={d}, C={n_classes}), got {value.shape}")
    return d, n_classes


def one_hot(labels: Iterable[int], n_classes: int | None = None) -> Float[np.ndarray, "N C"]:
    """One-hot matrix of integer labels in 0..C-1, with clear errors for anything else.

    Parameters
    ----------
    labels : (N,) integer labels.
    n_classes : number of columns C (default: max(labels) + 1).

    Returns
    -------
    (N, C) float64 array with a single 1 per row.
    """
    labels = check_labels(list(labels) if not isinstance(labels, np.ndarray) else labels, n_classes=n_classes)
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    out = np.zeros((labels.size, n_classes))
    out[np.arange(labels.size), labels] = 1.0
    return out


def perception_moments(
    features: Float[np.ndarray, "N d"], labels: Iterable[int], n_classes: int | None = None
) -> dict[str, np.ndarray]:
    """Sxx, Sxy, Syy and x_mean of pooled features and labels, in float64 (brute force).

    Parameters
    ----------
    features : (N, d) pooled states.
    labels : (N,) integer labels.
    n_classes : number of label columns C (default: max(labels) + 1).

    Returns
    -------
    dict with ``Sxx`` (d, d), ``Sxy`` (d, C), ``Syy`` (C, C) (each a mean over the N texts) and
    ``x_mean`` (d,).
    """
    X = np.asarray(features, dtype=np.float64)
    Y = one_hot(labels, n_classes)
    if X.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"features must be (N, d) with N = {Y.shape[0]} labels, got {X.shape}")
    n = X.shape[0]
    return {"Sxx": X.T @ X / n, "Sxy": X.T @ Y / n, "Syy": Y.T @ Y / n, "x_mean": X.mean(axis=0)}


def moments_from_sequences(
    sequences: Sequence[Float[np.ndarray, "_T d"]],
    labels: Iterable[int],
    n_classes: int | None = None,
) -> Moments:
    """Moments of SPEC section 2 from explicit per-text states, by the definitions, in float64.

    This is the brute-force computation the streaming extraction is tested against, and the way
    synthetic tasks become moments. Texts with a single state contribute to pooling only.

    Parameters
    ----------
    sequences : N per-text state arrays, each (T_n, d) with T_n >= 1.
    labels : (N,) integer labels.
    n_classes : number of label columns C (default: max(labels) + 1).

    Returns
    -------
    `Moments` with C0, C1, Shh (d, d) averaged over the N texts, the perception moments of the
    mean-pooled states, ``n_texts`` = N and ``n_tokens`` = sum_n (T_n - 1).
    """
    sequences = [np.asarray(s, dtype=np.float64) for s in sequences]
    if not sequences:
        raise ValueError("no sequences")
    d = sequences[0].shape[1]
    C0 = np.zeros((d, d))
    C1 = np.zeros((d, d))
    Shh = np.zeros((d, d))
    pooled = np.empty((len(sequences), d))
    n_tokens = 0
    for n, h in enumerate(sequences):
        if h.ndim != 2 or h.shape[1] != d or h.shape[0] < 1:
            raise ValueError(f"sequence {n} must be (T >= 1, d={d}), got shape {h.shape}")
        pooled[n] = h.mean(axis=0)
        Shh += h.T @ h
        if h.shape[0] > 1:
            s = np.cumsum(h, axis=0)[:-1]
            C0 += s.T @ s
            C1 += s.T @ h[1:]
            n_tokens += h.shape[0] - 1
    N = len(sequences)
    return Moments(C0=C0 / N, C1=C1 / N, Shh=Shh / N, n_texts=N, n_tokens=n_tokens,
                   **perception_moments(pooled, labels, n_classes))


class LayerMoments(Mapping[int, Moments]):
    """Moments of several layers of one model on one dataset split, with provenance metadata.

    Behaves as a read-only mapping ``layer -> Moments``. Partial accumulations over disjoint
    texts merge with ``+`` (or `LayerMoments.combine`); save/load use ``.npz`` without pickle.
    """

    def __init__(self, layers: Mapping[int, Moments], metadata: Mapping[str, Any] | None = None):
        if not layers:
            raise ValueError("LayerMoments needs at least one layer")
        self._layers = {int(k): v for k, v in sorted(layers.items())}
        for layer, moments in self._layers.items():
            if not isinstance(moments, Moments):
                raise TypeError(f"layer {layer}: expected Moments, got {type(moments).__name__}")
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __getitem__(self, layer: int) -> Moments:
        try:
            return self._layers[int(layer)]
        except KeyError:
            raise KeyError(f"layer {layer} not in these moments (layers {self.layers})") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        first = next(iter(self._layers.values()))
        return (f"LayerMoments(layers={self.layers[0]}..{self.layers[-1]} ({len(self)}), d={first.d}, "
                f"C={first.n_classes}, n_texts={first.n_texts})")

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    @property
    def n_texts(self) -> int:
        return next(iter(self._layers.values())).n_texts

    @staticmethod
    def combine(parts: Sequence["LayerMoments"], weights: Sequence[float] | None = None) -> "LayerMoments":
        """Layer-wise `Moments.combine`; the metadata of the first part is kept.

        Parameters
        ----------
        parts : `LayerMoments` with the same layers.
        weights : as in `Moments.combine`.

        Returns
        -------
        `LayerMoments` of the combined layers.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("combine needs at least one LayerMoments")
        layers = parts[0].layers
        for other in parts[1:]:
            if other.layers != layers:
                raise ValueError(f"cannot combine moments of layers {layers} and {other.layers}")
        merged = {layer: Moments.combine([p[layer] for p in parts], weights) for layer in layers}
        return LayerMoments(merged, parts[0].metadata)

    def __add__(self, other: "LayerMoments") -> "LayerMoments":
        return LayerMoments.combine([self, other])

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (no pickle) atomically: the file appears complete or not at all.

        Parameters
        ----------
        path : destination file.

        Returns
        -------
        Path of the written file.
        """
        path = Path(path)
        payload: dict[str, np.ndarray] = {}
        for layer, moments in self._layers.items():
            for name, value in moments.arrays().items():
                payload[f"layer{layer}/{name}"] = value
            payload[f"layer{layer}/counts"] = np.array([moments.n_texts, moments.n_tokens, int(moments.is_centred)])
        payload["__metadata__"] = np.array(json.dumps(self.metadata, sort_keys=True, default=str))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **payload)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerMoments":
        """Read what `save` wrote.

        Parameters
        ----------
        path : an ``.npz`` written by `save`.

        Returns
        -------
        `LayerMoments` with the saved layers and metadata.
        """
        with np.load(Path(path), allow_pickle=False) as data:
            metadata = json.loads(str(data["__metadata__"]))
            grouped: dict[int, dict[str, Any]] = {}
            for key in data.files:
                if not key.startswith("layer"):
                    continue
                layer, name = key[len("layer"):].split("/")
                grouped.setdefault(int(layer), {})[name] = data[key]
        layers = {}
        for layer, arrays in grouped.items():
            n_texts, n_tokens, centred = (int(v) for v in arrays.pop("counts"))
            layers[layer] = Moments(n_texts=n_texts, n_tokens=n_tokens, is_centred=bool(centred), **arrays)
        return cls(layers, metadata)


def moment_names() -> tuple[str, ...]:
    """Names of the array fields of `Moments`.

    Returns
    -------
    tuple of str, in the dataclass's field order.
    """
    return tuple(f.name for f in fields(Moments) if f.name in _ARRAYS)
