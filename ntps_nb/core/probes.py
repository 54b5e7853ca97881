"""Linear probes on pooled features: the targets NTPS is supposed to predict (SPEC section 6).

Every number says which protocol produced it:

- ``"heldout"`` (default): StandardScaler fitted on the train split, then a logistic-regression
  probe (lbfgs, L2 with inverse strength ``C``, iterated to convergence) and a least-squares probe
  (ridge when ``ridge > 0``) on one-hot targets, both scored on the TEST split;
- ``"paper_in_sample"``: the released code's protocol, StandardScaler + LogisticRegression(saga,
  max_iter=1000, tol=0.01) and StandardScaler + LinearRegression, fitted AND scored on the
  train split (its ``train_accuracy`` / ``train_mse``);
- ``"torch_linear"``: the paper's torch probe (SPEC section 7), `torch_linear_probe`.

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
    if n_classes < 2:
        raise ValueError(f"chance correction needs n_classes >= 2, got {n_classes}")
    chance = 1.0 / n_classes
    return float((accuracy - chance) / (1.0 - chance))


def _check_split(X, y, n_classes: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"{split} features must be (N, d), got shape {X.shape}")
    if y.ndim != 1:
        raise ValueError(f"{split} labels must be one-dimensional, got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{split} has {X.shape[0]} feature rows but {y.shape[0]} labels")
    if X.shape[0] == 0:
        raise ValueError(f"{split} split is empty")
    if not np.all(np.isfinite(X)):
        bad = int(np.sum(~np.all(np.isfinite(X), axis=1)))
        raise ValueError(f"{split} features have NaN/inf in {bad} row(s); the extraction produced non-finite states")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{split} labels must be integers 0..{n_classes - 1}; got non-integer or NaN floats")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise ValueError(f"{split} labels must be integers 0..{n_classes - 1}, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{split} labels must lie in 0..{n_classes - 1} (n_classes={n_classes}), "
                         f"got range {y.min()}..{y.max()}")
    return X, y.astype(np.int64)


def _check_inputs(train_X, train_y, test_X, test_y, n_classes: int, need_test: bool):
    if isinstance(n_classes, (bool, np.bool_)) or int(n_classes) != n_classes or int(n_classes) < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    n_classes = int(n_classes)
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


def torch_linear_probe(
    train_X: Float[np.ndarray, "N d"],
    train_y: Sequence[int],
    test_X: Float[np.ndarray, "M d"],
    test_y: Sequence[int],
    *,
    n_classes: int,
    epochs: int = 50,
    lr: float = 1e-4,
    batch_size: int = 64,
    dropout: float = 0.05,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """The paper's torch probe (SPEC section 7): dropout + linear head on mean-pooled features,
    cross-entropy, AdamW, shuffled mini-batches; test accuracy after the last epoch.

    Features are used as given (no standardisation, as in the paper). The global torch RNG is
    left untouched: initialisation, dropout and shuffling draw from a forked, seeded state.
    ``weight_decay`` 0.01 is AdamW's default.

    Returns
    -------
    A tidy row like `heldout_probe`'s with ``protocol="torch_linear"``, ``final_train_loss``,
    ``epochs``, ``lr``, ``batch_size``, ``dropout``, and NaN for the least-squares columns.
    """
    import torch  # optional dependency: only this probe needs it

    Xtr, ytr, Xte, yte = _check_inputs(train_X, train_y, test_X, test_y, n_classes, need_test=True)
    n_classes = int(n_classes)
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0, 0 <= dropout < 1; got {epochs}, "
                         f"{batch_size}, {lr}, {dropout}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        head = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(Xtr.shape[1], n_classes)).to(device)
        optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        X = torch.as_tensor(Xtr, dtype=torch.float32, device=device)
        y = torch.as_tensor(ytr, dtype=torch.long, device=device)
        head.train()
        for _ in range(epochs):
            total, order = 0.0, torch.randperm(X.shape[0], generator=generator).to(device)
            for start in range(0, X.shape[0], batch_size):
                batch = order[start:start + batch_size]
                optimiser.zero_grad()
                loss = loss_fn(head(X[batch]), y[batch])
                loss.backward()
                optimiser.step()
                total += loss.item() * batch.numel()
        head.eval()
        with torch.no_grad():
            logits = head(torch.as_tensor(Xte, dtype=torch.float32, device=device))
            predicted = logits.argmax(dim=1).cpu().numpy()
    accuracy = float(np.mean(predicted == yte))
    counts = np.bincount(ytr, minlength=n_classes)
    return {
        "protocol": "torch_linear", "evaluated_on": "test", "n_classes": n_classes,
        "classes_in_train": int(np.count_nonzero(counts)), "n_train": int(Xtr.shape[0]), "n_eval": int(Xte.shape[0]),
        "d": int(Xtr.shape[1]), "accuracy": accuracy, "kappa": chance_corrected_accuracy(accuracy, n_classes),
        "chance": 1.0 / n_classes, "majority_rate": float(np.mean(yte == int(np.argmax(counts)))),
        "mse": float("nan"), "mse_per_text": float("nan"), "lstsq_accuracy": float("nan"),
        "final_train_loss": total / X.shape[0], "epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size),
        "dropout": float(dropout), "weight_decay": float(weight_decay), "seed": int(seed),
    }
