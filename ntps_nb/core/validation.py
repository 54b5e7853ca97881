"""One place for the input checks the package repeats: counts, k, class labels, finite arrays.

In the spirit of scikit-learn's ``check_array`` / ``check_scalar``: each function takes the value
and the name the caller knows it by, returns it in the form the caller computes with (a Python
``int``, an ``int64`` label vector, a float64 array), and otherwise raises ``ValueError`` with a
message that names the value and says what was expected.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from jaxtyping import Float, Int

__all__ = [
    "check_count",
    "check_features",
    "check_finite",
    "check_k",
    "check_labels",
    "check_n_classes",
]


def _integral(value: Any) -> int | None:
    """``value`` as an ``int`` if it is an integral number (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """An integer count of at least ``minimum`` (steps, batch sizes, ranks, sample sizes).

    Parameters
    ----------
    value : Any
        The count; integral floats such as ``8.0`` are accepted, bools are not.
    name : str
        What the caller calls it, for the error message.
    minimum : int
        Smallest allowed value (1: a positive integer).

    Returns
    -------
    int
        ``value`` as a Python int.
    """
    count = _integral(value)
    if count is None or count < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return count


def check_k(k: Any, *, limit: int | None = None, limit_name: str = "the rank", name: str = "k") -> int:
    """A number of directions (or neighbours) ``k`` in ``1..limit``.

    Parameters
    ----------
    k : Any
        The requested number.
    limit : int, optional
        Largest allowed value (a rank, a number of texts); no upper bound when None.
    limit_name : str
        What ``limit`` is, for the error message (e.g. ``"rank(Shh)"``).
    name : str
        What the caller calls ``k``.

    Returns
    -------
    int
    """
    value = _integral(k)
    if limit is None:
        if value is None or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {k!r}")
        return value
    if value is None or not 1 <= value <= limit:
        raise ValueError(f"{name} must be an integer in 1..{limit_name} = {limit}, got {k!r}")
    return value


def check_n_classes(n_classes: Any, name: str = "n_classes") -> int:
    """A number of classes: an integer >= 2.

    Parameters
    ----------
    n_classes : Any
    name : str

    Returns
    -------
    int
    """
    value = _integral(n_classes)
    if value is None or value < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {n_classes!r}")
    return value


def check_labels(
    labels: Any,
    *,
    n_classes: int | None = None,
    n_rows: int | None = None,
    min_classes: int = 1,
    name: str = "labels",
) -> Int[np.ndarray, " N"]:
    """Integer class labels ``0..C-1`` as a one-dimensional ``int64`` array.

    Parameters
    ----------
    labels : array-like, shape (N,)
        Integers, or floats that are exactly integers (as pandas turns integer columns with
        missing values into floats); not empty.
    n_classes : int, optional
        C; the labels must lie in ``0..C-1``. Without it they must be >= 0.
    n_rows : int, optional
        N the labels must have (one per feature row or text).
    min_classes : int
        Distinct classes that must be present (2 for a classifier or a probe).
    name : str
        What the caller calls the labels (e.g. ``"train labels"``).

    Returns
    -------
    ndarray of int64, shape (N,)
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {y.shape}")
    if n_rows is not None and y.shape[0] != n_rows:
        raise ValueError(f"{name} must be one per feature row: {n_rows} feature rows but {y.shape[0]} labels")
    if y.size == 0:
        raise ValueError(f"{name} are empty")
    expected = "0..C-1" if n_classes is None else f"0..{int(n_classes) - 1}"
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{name} must be integers {expected}; got non-integer or NaN floats")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers {expected}, got dtype {y.dtype}; map class names to "
                         "integers first")
    if y.min() < 0 or (n_classes is not None and y.max() >= n_classes):
        given = "" if n_classes is None else f" (n_classes={int(n_classes)})"
        raise ValueError(f"{name} must lie in {expected}{given}, got range {y.min()}..{y.max()}")
    if min_classes > 1:
        present = np.unique(y)
        if present.size < min_classes:
            found = f"a single class ({present[0]})" if present.size == 1 else f"{present.size} classes"
            raise ValueError(f"{name} contain {found}; at least {min_classes} are needed")
    return y.astype(np.int64)


def check_finite(array: Any, name: str, *, ndim: int | None = None, hint: str = "") -> np.ndarray:
    """A float64 array with no NaN or infinity (and ``ndim`` dimensions if given).

    Parameters
    ----------
    array : array-like
    name : str
        What the caller calls it.
    ndim : int, optional
        Required number of dimensions.
    hint : str
        Appended to the error for non-finite entries (where they probably came from).

    Returns
    -------
    ndarray of float64
        ``array`` itself when it already is one (no copy).
    """
    values = np.asarray(array, dtype=np.float64)
    if ndim is not None and values.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {values.shape}")
    finite = np.isfinite(values)
    if not finite.all():
        if values.ndim == 2:
            where = f"{int(np.sum(~finite.all(axis=1)))} row(s)"
        else:
            where = f"{int(values.size - np.count_nonzero(finite))} entries"
        raise ValueError(f"{name} have NaN/inf in {where}{'; ' + hint if hint else ''}")
    return values


def check_features(
    features: Any, name: str = "features", *, min_rows: int = 1, hint: str = ""
) -> Float[np.ndarray, "N d"]:
    """A finite float64 feature matrix (N, d) with at least ``min_rows`` rows and one column.

    Parameters
    ----------
    features : array-like, shape (N, d)
    name : str
        What the caller calls it (e.g. ``"train features"``).
    min_rows : int
        Fewest rows N allowed.
    hint : str
        Appended to the error for non-finite entries.

    Returns
    -------
    ndarray of float64, shape (N, d)
    """
    X = np.asarray(features, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < min_rows or X.shape[1] < 1:
        rows = "N" if min_rows <= 1 else f"N >= {min_rows}"
        raise ValueError(f"{name} must be ({rows}, d >= 1), got shape {X.shape}")
    return check_finite(X, name, hint=hint)
