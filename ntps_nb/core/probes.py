"""Linear probes on pooled features: the targets NTPS is supposed to predict (SPEC section 6).

Every number says which protocol produced it:

- ``"heldout"`` (default): StandardScaler fitted on the train split, then a logistic-regression
  probe (lbfgs, L2 with inverse strength ``C``, iterated to convergence) and a least-squares probe
  (ridge when ``ridge > 0``) on one-hot targets, both scored on the TEST split;
- ``"paper_in_sample"``: the released code's protocol, StandardScaler + LogisticRegression(saga,
  max_iter=1000, tol=0.01) and StandardScaler + LinearRegression, fitted AND scored on the
  train split (its ``train_accuracy`` / ``train_mse``);
- ``"torch_linear"``: the paper's torch probe (SPEC section 7), `ntps_nb.torch_probe.torch_linear_probe`
  (outside the core: it needs torch).

MSE is sklearn's ``mean_squared_error`` on the one-hot targets (mean over N x C entries, as in
the published ``train_mse``); ``mse_per_text`` = C * mse is the loss of SPEC section 5.
Beside accuracy every row carries the dataset baselines of SPEC section 10: chance 1/C, the
chance-corrected kappa = (acc - 1/C) / (1 - 1/C), and the majority-class rate.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ntps_nb.core.validation import check_finite, check_labels, check_n_classes

Protocol = Literal["heldout", "paper_in_sample"]
PROTOCOLS = ("heldout", "paper_in_sample")

#: Iteration cap of the held-out logistic probe (lbfgs on standardised features converges long before).
LOGISTIC_MAX_ITER = 10_000
#: Gradient tolerance of the held-out logistic probe.
LOGISTIC_TOL = 1e-6
#: The released code's logistic-regression settings (SPEC section 6).
PAPER_LOGISTIC = {"solver": "saga", "max_iter": 1000, "tol": 0.01}


#: Default L2 strength of the held-out least-squares probe (on standardised features).
HELDOUT_RIDGE = 1.0


class ProbeConvergenceWarning(UserWarning):
    """The held-out logistic probe hit its iteration cap; its accuracy may be off."""


def chance_corrected_accuracy(accuracy: float, n_classes: int) -> float:
    """kappa = (acc - 1/C) / (1 - 1/C): 0 at chance, 1 at perfect, negative below chance."""
    n_classes = check_n_classes(n_classes)
    chance = 1.0 / n_classes
    return float((accuracy - chance) / (1.0 - chance))


def _check_split(X, y, n_classes: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{split} features must be (N, d), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"{split} split is empty")
    X = check_finite(X, f"{split} features", hint="the extraction produced non-finite states")
    y = check_labels(y, n_classes=n_classes, n_rows=X.shape[0], name=f"{split} labels")
    return X, y


def _check_inputs(train_X, train_y, test_X, test_y, n_classes: int, need_test: bool):
    n_classes = check_n_classes(n_classes)
    Xtr, ytr = _check_split(train_X, train_y, n_classes, "train")
    present = np.unique(ytr)
    if present.size < 2:
        raise ValueError(f"the train split has a single class ({present[0]}); a probe needs at least 2")
    if not need_test:
        return Xtr, ytr, None, None
    if test_X is None or test_y is None:
        raise ValueError("the held-out protocol needs test_X and test_y")
    Xte, yte = _check_split(test_X, test_y, n_classes, "test")
    if Xte.shape[1] != Xtr.shape[1]:
        raise ValueError(f"train features have d={Xtr.shape[1]} columns, test features d={Xte.shape[1]}")
    return Xtr, ytr, Xte, yte


def _one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[y]


def heldout_probe(
    train_X: Float[np.ndarray, "N d"],
    train_y: Sequence[int],
    test_X: Float[np.ndarray, "M d"] | None = None,
    test_y: Sequence[int] | None = None,
    *,
    n_classes: int,
    seed: int = 0,
    C: float = 1.0,
    ridge: float = HELDOUT_RIDGE,
    protocol: Protocol = "heldout",
    max_iter: int = LOGISTIC_MAX_ITER,
    tol: float = LOGISTIC_TOL,
) -> dict[str, Any]:
    """Logistic-regression accuracy and least-squares MSE of linear probes on one layer's features.

    Parameters
    ----------
    train_X, train_y : (N, d) pooled features and integer labels in 0..n_classes-1 of the train split.
    test_X, test_y : (M, d) and (M,) of the test split; unused (may be None) for "paper_in_sample".
    n_classes : C, the number of classes of the task (sets one-hot width, chance and kappa).
    seed : random state of the logistic solver (saga is stochastic; lbfgs is deterministic).
    C : inverse L2 strength of the logistic probe (sklearn's ``C``; 1.0 is the paper's default).
    ridge : L2 strength of the held-out least-squares probe on standardised features (default
        HELDOUT_RIDGE = 1.0: with d close to or above N, ordinary least squares interpolates the
        train split and its test MSE measures the interpolation, not the features); 0 is ordinary
        least squares. The paper's in-sample protocol always uses LinearRegression.
    protocol : "heldout" (fit on train, score on test) or "paper_in_sample" (the released code's
        saga / LinearRegression settings, fitted and scored on the train split).
    max_iter, tol : lbfgs settings of the held-out protocol (the paper protocol fixes its own).

    Returns
    -------
    A tidy row (dict): ``protocol``, ``evaluated_on``, ``n_classes``, ``classes_in_train``,
    ``n_train``, ``n_eval``, ``d``, ``accuracy``, ``kappa``, ``chance``, ``majority_rate``,
    ``mse``, ``mse_per_text``, ``lstsq_accuracy``, ``logreg_C``, ``ridge``, ``solver``,
    ``converged``, ``n_iter``, ``seed``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    in_sample = protocol == "paper_in_sample"
    Xtr, ytr, Xte, yte = _check_inputs(train_X, train_y, test_X, test_y, n_classes, need_test=not in_sample)
    n_classes = int(n_classes)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if in_sample:
        Xev, yev = Xtr, ytr
        logistic = LogisticRegression(C=C, random_state=seed, **PAPER_LOGISTIC)
        least_squares = LinearRegression()
    else:
        Xev, yev = Xte, yte
        logistic = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, random_state=seed)
        least_squares = Ridge(alpha=ridge) if ridge > 0 else LinearRegression()

    classifier = make_pipeline(StandardScaler(), logistic)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(Xtr, ytr)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not converged and not in_sample:
        warnings.warn(f"logistic probe did not converge in max_iter={max_iter} iterations (tol={tol:g}); "
                      "raise max_iter or C", ProbeConvergenceWarning, stacklevel=2)
    accuracy = float(np.mean(classifier.predict(Xev) == yev))

    regressor = make_pipeline(StandardScaler(), least_squares)
    regressor.fit(Xtr, _one_hot(ytr, n_classes))
    predicted = regressor.predict(Xev)
    mse = float(np.mean((_one_hot(yev, n_classes) - predicted) ** 2))

    counts = np.bincount(ytr, minlength=n_classes)
    majority = int(np.argmax(counts))
    return {
        "protocol": protocol,
        "evaluated_on": "train" if in_sample else "test",
        "n_classes": n_classes,
        "classes_in_train": int(np.count_nonzero(counts)),
        "n_train": int(Xtr.shape[0]),
        "n_eval": int(Xev.shape[0]),
        "d": int(Xtr.shape[1]),
        "accuracy": accuracy,
        "kappa": chance_corrected_accuracy(accuracy, n_classes),
        "chance": 1.0 / n_classes,
        "majority_rate": float(np.mean(yev == majority)),
        "mse": mse,
        "mse_per_text": mse * n_classes,
        "lstsq_accuracy": float(np.mean(np.argmax(predicted, axis=1) == yev)),
        "logreg_C": float(C),
        "ridge": float(ridge) if not in_sample else 0.0,
        "solver": logistic.solver,
        "converged": bool(converged),
        "n_iter": int(np.max(logistic.n_iter_)),
        "seed": int(seed),
    }


def probe_layers(
    features_by_layer: Mapping[int, tuple[np.ndarray, np.ndarray | None] | np.ndarray],
    train_y: Sequence[int],
    test_y: Sequence[int] | None = None,
    *,
    n_classes: int,
    protocol: Protocol | Sequence[Protocol] = "heldout",
    seed: int = 0,
    C: float = 1.0,
    ridge: float = HELDOUT_RIDGE,
    max_iter: int = LOGISTIC_MAX_ITER,
    **provenance: Any,
) -> pd.DataFrame:
    """`heldout_probe` for every layer (and protocol), as a tidy frame with provenance columns.

    Parameters
    ----------
    features_by_layer : layer -> (train_X, test_X); for "paper_in_sample" alone, test_X may be
        None or the value may be train_X itself.
    train_y, test_y : labels of the two splits (shared by all layers).
    protocol : one protocol or several (one row per layer and protocol).
    **provenance : constant columns (model, dataset, max_length, drop_bos, ...), e.g.
        ``probe_layers(feats, ytr, yte, n_classes=2, model="smollm2-135m", dataset="trec6")``.

    Returns
    -------
    One row per (layer, protocol): ``layer``, the provenance columns, then `heldout_probe`'s row.
    """
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    if not protocols:
        raise ValueError("give at least one protocol")
    if not features_by_layer:
        raise ValueError("features_by_layer is empty")
    reserved = {"layer", "protocol", "evaluated_on", "accuracy", "kappa", "mse", "seed", "n_classes"}
    clash = sorted(reserved & set(provenance))
    if clash:
        raise ValueError(f"provenance keys {clash} would overwrite probe columns; rename them")
    rows = []
    for layer in sorted(features_by_layer):
        value = features_by_layer[layer]
        train_X, test_X = (value if isinstance(value, tuple) else (value, None))
        for proto in protocols:
            try:
                row = heldout_probe(train_X, train_y, test_X, test_y, n_classes=n_classes, seed=seed, C=C,
                                    ridge=ridge, protocol=proto, max_iter=max_iter)
            except ValueError as error:
                raise ValueError(f"layer {layer}, protocol {proto!r}: {error}") from None
            rows.append({"layer": int(layer), **provenance, **row})
    return pd.DataFrame(rows)


def __getattr__(name: str) -> Any:
    # torch_linear_probe moved to ntps_nb.torch_probe (the core imports no torch); the old import
    # path still finds it, importing torch only when asked for this one name.
    if name == "torch_linear_probe":
        import importlib

        warnings.warn("ntps_nb.core.probes.torch_linear_probe moved to ntps_nb.torch_probe.torch_linear_probe",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module("ntps_nb.torch_probe").torch_linear_probe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
