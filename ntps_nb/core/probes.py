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

``device=`` on `heldout_probe`, `probe_layers` and `cv_logistic_probe` (None or "cpu-numpy":
scikit-learn, the default; a torch device such as "cuda") fits on that device, batched over
layers in `probe_layers`:

- the closed-form least-squares probe (`ntps_nb.core.backends.torch.least_squares_predictions_torch`;
  the same predictions to 1e-9);
- the held-out logistic probe (`ntps_nb.core.backends.torch.logistic_probe_torch`): the same
  strictly convex objective as sklearn's lbfgs (StandardScaler, L2, unpenalised intercept,
  multinomial, binomial for two classes), solved by batched Newton-CG to the same gradient
  tolerance, so the same optimum and predictions (coefficients to the solvers' tolerance); the
  row's ``solver`` says which solver produced the number ("lbfgs" or "torch-newton-cg") and
  ``n_iter`` counts that solver's iterations (Newton steps on the device);
- the cross-validated probe's folds x C grid and its refit, as one batched solve.

The paper's in-sample protocol keeps scikit-learn's saga on the host on every device: its number
is the released code's early-stopped stochastic iterate (max_iter=1000, tol=0.01, stopped far
from the optimum), which a solver run to convergence does not reproduce.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from threadpoolctl import threadpool_limits

from ntps_nb.core.backends import analysis_backend
from ntps_nb.core.progress import progress_bar
from ntps_nb.core.validation import check_finite, check_labels, check_n_classes

Protocol = Literal["heldout", "paper_in_sample"]
PROTOCOLS = ("heldout", "paper_in_sample")

#: BLAS/OpenMP threads of each scikit-learn logistic fit on the host. lbfgs (and saga) is a
#: sequence of small matrix-vector products whose thread wake-ups cost more than a second core
#: gives: on the project's 2-core machines the held-out fit of 300 x 576 features took 5-8x longer
#: with two threads than with one (`benchmarks/bench_probe_threads.py`, two runs), and notebook 00's
#: 31 layer probes 57 s instead of 4 s. One thread also makes an
#: in-process fit the same as one in a worker process of `probe_layers` (``n_jobs``), bit for bit.
LOGISTIC_FIT_THREADS = 1

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
    """kappa = (acc - 1/C) / (1 - 1/C): 0 at chance, 1 at perfect, negative below chance.

    Parameters
    ----------
    accuracy : accuracy in [0, 1].
    n_classes : number of classes C >= 2.

    Returns
    -------
    float, the chance-corrected accuracy (NaN for a NaN accuracy: a probe that could not run).
    """
    n_classes = check_n_classes(n_classes)
    if not isinstance(accuracy, (numbers.Real, np.number)) or not (np.isnan(accuracy) or 0.0 <= accuracy <= 1.0):
        raise ValueError(f"accuracy must be one number in [0, 1], got {accuracy!r}")
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


def _newton_cap(backend, max_iter: int) -> int:
    """The Newton iterations a device fit may take: ``max_iter`` counts lbfgs iterations (hundreds
    where Newton takes 5-20), so it is capped at the backend's `LOGISTIC_NEWTON_MAX_ITER`."""
    return min(int(max_iter), backend.LOGISTIC_NEWTON_MAX_ITER)


# -- cross-validated logistic probe (regularisation chosen on the train split only) -------------

#: Inverse L2 strengths the cross-validated logistic probe chooses from (decades, weakest last).
CV_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: Stratified folds of the train split used to choose C.
CV_FOLDS = 5
#: How the folds score a C: "neg_log_loss" (a proper score, smooth in C), "accuracy" or "balanced_accuracy".
CV_SCORINGS = ("neg_log_loss", "accuracy", "balanced_accuracy")


def classification_scores(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and Cohen's kappa of predicted labels, beside the chance-corrected
    accuracy of SPEC section 10.

    - ``balanced_accuracy``: the mean recall over the classes present in ``y_true``;
    - ``cohen_kappa``: (p_o - p_e) / (1 - p_e) with p_e = sum_k p_true(k) p_pred(k), chance
      agreement from the class marginals (equal to sklearn's ``cohen_kappa_score``; NaN when
      p_e = 1, e.g. one class everywhere). Predicting the majority class gives 0;
    - ``kappa_chance``: (accuracy - 1/C) / (1 - 1/C), chance from the number of classes only
      (`chance_corrected_accuracy`): a majority-class predictor scores above 0 on imbalanced data.

    Parameters
    ----------
    y_true, y_pred : (N,) integer labels in 0..C-1, N >= 1.
    n_classes : number of classes C.

    Returns
    -------
    dict of str to float with keys ``accuracy``, ``balanced_accuracy``, ``cohen_kappa``,
    ``kappa_chance``.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or y_true.size == 0:
        raise ValueError(f"y_true and y_pred must be non-empty 1-D of one length, got {y_true.shape} and {y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= n_classes:
            raise ValueError(f"{name} must be integers in 0..{n_classes - 1}, got dtype {y.dtype}, "
                             f"range {y.min()}..{y.max()}")
    confusion = np.zeros((n_classes, n_classes))
    np.add.at(confusion, (y_true, y_pred), 1.0)
    total = confusion.sum()
    accuracy = float(np.trace(confusion) / total)
    support = confusion.sum(axis=1)
    present = support > 0
    balanced = float(np.mean(np.diag(confusion)[present] / support[present]))
    expected = float(np.sum(support * confusion.sum(axis=0)) / total ** 2)
    kappa = float((accuracy - expected) / (1.0 - expected)) if expected < 1.0 else float("nan")
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "cohen_kappa": kappa,
            "kappa_chance": chance_corrected_accuracy(accuracy, n_classes)}


def _fold_score(model, X: np.ndarray, y: np.ndarray, scoring: str, n_classes: int) -> float:
    if scoring == "neg_log_loss":
        return _scored(model.classes_, model.predict_proba(X), None, y, scoring, n_classes)
    return _scored(model.classes_, None, model.predict(X), y, scoring, n_classes)


def _scored(classes: np.ndarray, probabilities: np.ndarray | None, predictions: np.ndarray | None, y: np.ndarray,
            scoring: str, n_classes: int) -> float:
    """A fold's score from the probe's probabilities (M, K) over ``classes`` or its predicted labels (M,)."""
    if scoring == "neg_log_loss":
        full = np.full((y.size, n_classes), 0.0)
        full[:, classes] = probabilities
        return float(-np.mean(-np.log(np.clip(full[np.arange(y.size), y], 1e-300, None))))
    return classification_scores(y, np.asarray(predictions).astype(np.int64), n_classes)[scoring]


@dataclass(frozen=True)
class CVProbeResult:
    """A cross-validated logistic probe: ``row`` (the tidy row), ``predictions`` (M,) predicted
    class per test text in input order, ``cv_scores`` (one row per C: ``C``, ``mean_score``,
    ``sd_score`` over folds, ``chosen``)."""

    row: dict
    predictions: np.ndarray
    cv_scores: pd.DataFrame


def cv_logistic_probe(
    train_X: Float[np.ndarray, "N d"],
    train_y: Sequence[int],
    test_X: Float[np.ndarray, "M d"],
    test_y: Sequence[int],
    *,
    n_classes: int,
    Cs: Sequence[float] = CV_C_GRID,
    n_folds: int = CV_FOLDS,
    scoring: str = "neg_log_loss",
    class_weight: Literal["balanced"] | None = None,
    seed: int = 0,
    max_iter: int = LOGISTIC_MAX_ITER,
    tol: float = LOGISTIC_TOL,
    device: Any = None,
) -> CVProbeResult:
    """Held-out logistic probe whose L2 strength is chosen by cross-validation on the TRAIN split.

    Protocol ``"heldout_cv"``: for every C of ``Cs``, StandardScaler + LogisticRegression (lbfgs)
    is fitted on k-1 stratified folds of the train split (scaler included, shuffled with
    ``seed``) and scored on the k-th by ``scoring``; the C with the best mean score wins (ties:
    the smallest C, the strongest regularisation); the probe is refitted on the whole train
    split with it and scored once on the test split. The test split is never seen before that.
    Along the grid each fold warm-starts from the previous C (same optimum, fewer iterations).
    On a torch ``device`` every fold at every C and the refit on the whole train split at every C
    are one batched solve (`ntps_nb.core.backends.torch.logistic_probe_torch`, Newton-CG to the
    same gradient tolerance; the same optimum), and the chosen C's refit is read off it.

    Parameters
    ----------
    train_X, train_y, test_X, test_y : pooled features and integer labels of the two splits.
    n_classes : C, the number of classes of the task.
    Cs : the inverse L2 strengths to choose from (default `CV_C_GRID`, 1e-4 .. 1e2).
    n_folds : stratified folds (lowered to the smallest class count of the train split, >= 2).
    scoring : one of `CV_SCORINGS`.
    class_weight : None (every text counts once) or "balanced" (sklearn's inverse class frequency).
    seed : shuffling of the folds (and the solver's random state).
    max_iter, tol : iteration cap (lbfgs iterations; on a torch device Newton iterations, at most
        LOGISTIC_NEWTON_MAX_ITER = 100) and gradient tolerance (sklearn's, on either) of every fit.
    device : None or "cpu-numpy" (scikit-learn, default) or a torch device.

    Returns
    -------
    `CVProbeResult` whose ``row`` has ``protocol`` ("heldout_cv"), ``evaluated_on`` ("test"),
    ``n_classes``, ``classes_in_train``, ``n_train``, ``n_eval``, ``d``, ``accuracy``,
    ``balanced_accuracy``, ``cohen_kappa``, ``kappa_chance``, ``chance``, ``majority_rate``,
    ``train_accuracy`` (in-sample, to see the overfit), ``logreg_C`` (chosen), ``C_grid``,
    ``cv_folds``, ``cv_scoring``, ``cv_score`` (the chosen C's mean fold score),
    ``class_weight``, ``solver`` ("lbfgs", or "torch-newton-cg" on a torch device), ``converged``
    (of the refit), ``seed``.
    """
    backend = analysis_backend(device)
    Xtr, ytr, Xte, yte = _check_inputs(train_X, train_y, test_X, test_y, n_classes, need_test=True)
    n_classes = int(n_classes)
    grid = np.sort(np.asarray(list(Cs), dtype=np.float64))
    if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise ValueError(f"Cs must be positive finite inverse strengths, got {list(Cs)}")
    if scoring not in CV_SCORINGS:
        raise ValueError(f"scoring must be one of {CV_SCORINGS}, got {scoring!r}")
    if class_weight not in (None, "balanced"):
        raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    counts = np.bincount(ytr, minlength=n_classes)
    folds = min(int(n_folds), int(counts[counts > 0].min()))
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 train texts of every class present; the smallest "
                         f"class has {int(counts[counts > 0].min())} (n_folds={n_folds})")

    def logistic(C: float, warm_start: bool = False) -> LogisticRegression:
        return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, class_weight=class_weight,
                                  random_state=seed, warm_start=warm_start)

    scores = np.empty((grid.size, folds))
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(Xtr, ytr))
    if backend is not None:  # every fold and the refit, at every C, as one batched solve
        fits = backend.logistic_probe_torch([Xtr[fit] for fit, _ in splits] + [Xtr],
                                            [ytr[fit] for fit, _ in splits] + [ytr],
                                            [Xtr[held] for _, held in splits] + [Xte], Cs=grid,
                                            class_weight=class_weight, tol=tol,
                                            max_iter=_newton_cap(backend, max_iter),
                                            train_predictions=True, device=device)
        for f, (_, held) in enumerate(splits):
            for c in range(grid.size):
                scores[c, f] = _scored(fits[f].classes, fits[f].eval_probabilities[c], fits[f].eval_predictions[c],
                                       ytr[held], scoring, n_classes)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the refit below reports convergence
            for f, (fit, held) in enumerate(splits):
                scaler = StandardScaler().fit(Xtr[fit])
                Zfit, Zheld = scaler.transform(Xtr[fit]), scaler.transform(Xtr[held])
                model = logistic(grid[0], warm_start=True)
                for c, C in enumerate(grid):
                    with threadpool_limits(LOGISTIC_FIT_THREADS):
                        model.set_params(C=C).fit(Zfit, ytr[fit])
                    scores[c, f] = _fold_score(model, Zheld, ytr[held], scoring, n_classes)
    mean = scores.mean(axis=1)
    best = int(np.flatnonzero(mean >= mean.max() - 1e-12)[0])

    if backend is not None:
        refit = fits[-1]
        converged = bool(refit.converged[best])
        predictions = refit.eval_predictions[best].astype(np.int64)
        train_accuracy = float(np.mean(refit.train_predictions[best] == ytr))
        solver = refit.solver
    else:
        classifier = make_pipeline(StandardScaler(), logistic(grid[best]))
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(LOGISTIC_FIT_THREADS):
            warnings.simplefilter("always", ConvergenceWarning)
            classifier.fit(Xtr, ytr)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        predictions = classifier.predict(Xte).astype(np.int64)
        train_accuracy = float(np.mean(classifier.predict(Xtr) == ytr))
        solver = "lbfgs"
    if not converged:
        warnings.warn(f"cross-validated logistic probe (C={grid[best]:g}) did not converge in max_iter={max_iter}",
                      ProbeConvergenceWarning, stacklevel=2)
    row = {
        "protocol": "heldout_cv", "evaluated_on": "test", "n_classes": n_classes,
        "classes_in_train": int(np.count_nonzero(counts)), "n_train": int(Xtr.shape[0]), "n_eval": int(Xte.shape[0]),
        "d": int(Xtr.shape[1]), **classification_scores(yte, predictions, n_classes), "chance": 1.0 / n_classes,
        "majority_rate": float(np.mean(yte == int(np.argmax(counts)))),
        "train_accuracy": train_accuracy,
        "logreg_C": float(grid[best]), "C_grid": " ".join(f"{C:g}" for C in grid), "cv_folds": folds,
        "cv_scoring": scoring, "cv_score": float(mean[best]), "class_weight": class_weight or "none",
        "solver": solver, "converged": bool(converged), "seed": int(seed),
    }
    cv_scores = pd.DataFrame({"C": grid, "mean_score": mean, "sd_score": scores.std(axis=1, ddof=1),
                              "chosen": np.arange(grid.size) == best})
    return CVProbeResult(row=row, predictions=predictions, cv_scores=cv_scores)


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
    device: Any = None,
    return_predictions: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], np.ndarray]:
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
    max_iter, tol : iteration cap and gradient tolerance of the held-out logistic probe (the
        paper protocol fixes its own): lbfgs iterations and its ``gtol`` on scikit-learn; on a
        torch device the same gradient test, and Newton iterations capped at
        min(max_iter, LOGISTIC_NEWTON_MAX_ITER = 100).
    device : None or "cpu-numpy" (scikit-learn, default) or a torch device: the least-squares
        probe and the held-out protocol's logistic probe are fitted there (Newton-CG,
        `ntps_nb.core.backends.torch.logistic_probe_torch`); the paper protocol's saga stays on
        scikit-learn (its early-stopped iterate is what the released code reports).
    return_predictions : also return the logistic probe's predicted class of every evaluated text
        (the test split, or the train split in the paper's protocol), in input order: what a
        per-text comparison with another classifier needs (`ntps_nb.core.gain.crossfit_gain`).

    Returns
    -------
    A tidy row (dict): ``protocol``, ``evaluated_on``, ``n_classes``, ``classes_in_train``,
    ``n_train``, ``n_eval``, ``d``, ``accuracy``, ``kappa``, ``chance``, ``majority_rate``,
    ``mse``, ``mse_per_text``, ``lstsq_accuracy``, ``logreg_C``, ``ridge``, ``solver`` (the
    logistic probe's: "lbfgs", "saga" or "torch-newton-cg"), ``converged``, ``n_iter`` (that
    solver's iterations), ``seed``; with ``return_predictions`` the tuple (row, predictions),
    predictions an int64 array of shape (n_eval,) whose agreement with the labels is ``accuracy``.
    """
    kept: dict[str, np.ndarray] = {}
    row = _heldout_probe(train_X, train_y, test_X, test_y, n_classes=n_classes, seed=seed, C=C, ridge=ridge,
                         protocol=protocol, max_iter=max_iter, tol=tol, backend=analysis_backend(device),
                         device=device, kept=kept)
    return (row, kept["predictions"]) if return_predictions else row


def _not_converged(max_iter: int, tol: float) -> str:
    """The held-out logistic probe's non-convergence message."""
    return f"logistic probe did not converge in max_iter={max_iter} iterations (tol={tol:g}); raise max_iter or C"


def _least_squares_ridge(protocol: str, ridge: float) -> float:
    """The L2 strength of the least-squares probe: 0 (LinearRegression) in the paper's protocol."""
    return 0.0 if protocol == "paper_in_sample" else float(ridge)


def _heldout_probe(train_X, train_y, test_X, test_y, *, n_classes, seed, C, ridge, protocol, max_iter, tol,
                   backend=None, device=None, predicted: np.ndarray | None = None,
                   logistic_fit: Any = None, kept: dict[str, np.ndarray] | None = None,
                   fit_threads: int | None = LOGISTIC_FIT_THREADS) -> dict[str, Any]:
    """`heldout_probe`; ``predicted``: the least-squares probe's predictions when already made;
    ``logistic_fit``: the held-out logistic probe's `LogisticProbeFit` when already made on a device;
    ``kept``: receives the logistic probe's class predictions of the evaluated texts as "predictions";
    ``fit_threads``: BLAS/OpenMP threads of the scikit-learn logistic fit (None: the pools as they are)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    in_sample = protocol == "paper_in_sample"
    Xtr, ytr, Xte, yte = _check_inputs(train_X, train_y, test_X, test_y, n_classes, need_test=not in_sample)
    n_classes = int(n_classes)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    Xev, yev = (Xtr, ytr) if in_sample else (Xte, yte)
    if not in_sample and logistic_fit is None and backend is not None:
        (logistic_fit,) = backend.logistic_probe_torch([Xtr], ytr, [Xte], Cs=C, tol=tol,
                                                       max_iter=_newton_cap(backend, max_iter), device=device)
    if logistic_fit is not None:  # fitted on the device
        converged, n_iter = bool(logistic_fit.converged[0]), int(logistic_fit.n_iter[0])
        solver = logistic_fit.solver
        classes = np.asarray(logistic_fit.eval_predictions[0])
    else:
        if in_sample:
            logistic = LogisticRegression(C=C, random_state=seed, **PAPER_LOGISTIC)
        else:
            logistic = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, random_state=seed)
        classifier = make_pipeline(StandardScaler(), logistic)
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(fit_threads):
            warnings.simplefilter("always", ConvergenceWarning)
            classifier.fit(Xtr, ytr)
            classes = classifier.predict(Xev)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        solver, n_iter = logistic.solver, int(np.max(logistic.n_iter_))
    accuracy = float(np.mean(classes == yev))
    if kept is not None:
        kept["predictions"] = np.asarray(classes, dtype=np.int64)
    if not converged and not in_sample:
        warnings.warn(_not_converged(max_iter, tol), ProbeConvergenceWarning, stacklevel=2)
    alpha = _least_squares_ridge(protocol, ridge)

    if predicted is None and backend is not None:
        (predicted,) = backend.least_squares_predictions_torch([Xtr], _one_hot(ytr, n_classes), [Xev], ridge=alpha,
                                                               device=device)
    elif predicted is None:
        regressor = make_pipeline(StandardScaler(), Ridge(alpha=alpha) if alpha > 0 else LinearRegression())
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
        "solver": solver,
        "converged": bool(converged),
        "n_iter": n_iter,
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
    device: Any = None,
    n_jobs: int | None = 1,
    progress: bool = True,
    **provenance: Any,
) -> pd.DataFrame:
    """`heldout_probe` for every layer (and protocol), as a tidy frame with provenance columns.

    The scikit-learn fits left on the host (every logistic probe without a device; the paper
    protocol's saga with one) run ``n_jobs`` at a time in worker processes; each fit is
    single-threaded and deterministic, so the rows are the same for any ``n_jobs``.

    Parameters
    ----------
    features_by_layer : layer -> (train_X, test_X); for "paper_in_sample" alone, test_X may be
        None or the value may be train_X itself.
    train_y, test_y : labels of the two splits (shared by all layers).
    n_classes : number of classes C >= 2 (labels are 0 .. C - 1).
    protocol : one protocol or several (one row per layer and protocol).
    seed, C, ridge, max_iter : as in `heldout_probe`, the same for every layer.
    device : None or "cpu-numpy" (scikit-learn, default) or a torch device: the least-squares
        probes of all layers (per protocol) and the held-out protocol's logistic probes of all
        layers are fitted there, each batched over layers; the paper protocol's saga stays on
        scikit-learn.
    n_jobs : scikit-learn fits at once; 1 (default) runs them here, one after the other; more, in
        worker processes; None: as many as the BLAS thread bound in force (`ntps_nb.analysis_threads`;
        the study's probes stage passes None, i.e. its share of the cores).
    progress : a bar over the (layer, protocol) rows as their fits finish, shown once the call has run
        `ntps_nb.core.progress.PROGRESS_DELAY_S` seconds (False: none; a study's stage passes False).
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
    backend = analysis_backend(device)
    layers = sorted(features_by_layer)
    splits = {layer: (value if isinstance(value, tuple) else (value, None))
              for layer, value in ((layer, features_by_layer[layer]) for layer in layers)}
    predicted: dict[tuple[int, str], np.ndarray] = {}
    logistic_fits: dict[int, Any] = {}
    if backend is not None:  # the least-squares probes of every layer, batched, per protocol
        for proto in protocols:
            if proto not in PROTOCOLS:
                raise ValueError(f"protocol must be one of {PROTOCOLS}, got {proto!r}")
            checked = {}
            for layer in layers:
                try:
                    checked[layer] = _check_inputs(splits[layer][0], train_y, splits[layer][1], test_y, n_classes,
                                                   need_test=proto != "paper_in_sample")
                except ValueError as error:
                    raise ValueError(f"layer {layer}, protocol {proto!r}: {error}") from None
            if ridge < 0:
                raise ValueError(f"ridge must be >= 0, got {ridge}")
            Ytr = _one_hot(checked[layers[0]][1], int(n_classes))
            evaluated = [checked[layer][0] if proto == "paper_in_sample" else checked[layer][2] for layer in layers]
            fitted = backend.least_squares_predictions_torch([checked[layer][0] for layer in layers], Ytr, evaluated,
                                                             ridge=_least_squares_ridge(proto, ridge), device=device)
            predicted.update({(layer, proto): p for layer, p in zip(layers, fitted)})
            if proto == "heldout":  # and the held-out logistic probes of every layer, batched
                fits = backend.logistic_probe_torch([checked[layer][0] for layer in layers], checked[layers[0]][1],
                                                    evaluated, Cs=C, tol=LOGISTIC_TOL,
                                                    max_iter=_newton_cap(backend, max_iter),
                                                    device=device)
                logistic_fits.update(zip(layers, fits))
            del checked, evaluated
    tasks = [dict(layer=layer, proto=proto, train_X=splits[layer][0], test_X=splits[layer][1],
                  predicted=predicted.get((layer, proto)),
                  logistic_fit=logistic_fits.get(layer) if proto == "heldout" else None)
             for layer in layers for proto in protocols]
    common = dict(train_y=train_y, test_y=test_y, n_classes=n_classes, seed=seed, C=C, ridge=ridge,
                  max_iter=max_iter)
    jobs = _host_jobs(n_jobs, len(tasks))
    if jobs == 1:
        with progress_bar(len(tasks), "probe_layers", progress, unit="fit") as bar:
            rows = [_counted(bar, _layer_row(**task, **common)) for task in tasks]
    else:
        from joblib import Parallel, delayed

        # worker processes: each fit's warnings are its own (catch_warnings is not thread-safe)
        with warnings.catch_warnings(), progress_bar(len(tasks), "probe_layers", progress, unit="fit") as bar:
            warnings.simplefilter("ignore", ProbeConvergenceWarning)  # re-issued below, from the rows
            fits = Parallel(n_jobs=jobs, backend="loky", inner_max_num_threads=1, return_as="generator")(
                delayed(_layer_row)(**task, **common) for task in tasks)
            rows = [_counted(bar, row) for row in fits]
        for row in rows:
            if not row["converged"] and row["protocol"] == "heldout":
                warnings.warn(f"layer {row['layer']}: {_not_converged(max_iter, LOGISTIC_TOL)}",
                              ProbeConvergenceWarning, stacklevel=2)
    return pd.DataFrame([{"layer": row.pop("layer"), **provenance, **row} for row in rows])


def _counted(bar: Any, row: dict[str, Any]) -> dict[str, Any]:
    """``row``, once ``bar`` has counted it."""
    bar.update(1)
    return row


def _host_jobs(n_jobs: int | None, tasks: int) -> int:
    """How many host fits run at once: ``n_jobs``, or the BLAS bound in force, at most ``tasks``."""
    if n_jobs is None:
        from threadpoolctl import threadpool_info

        bounds = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        n_jobs = max(bounds) if bounds else 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive integer or None, got {n_jobs!r}")
    return int(max(1, min(n_jobs, tasks)))


def _layer_row(*, layer, proto, train_X, test_X, predicted, logistic_fit, train_y, test_y, n_classes, seed, C,
               ridge, max_iter) -> dict[str, Any]:
    """One (layer, protocol) row of `probe_layers` (run here or in a worker process)."""
    try:
        row = _heldout_probe(train_X, train_y, test_X, test_y, n_classes=n_classes, seed=seed, C=C, ridge=ridge,
                             protocol=proto, max_iter=max_iter, tol=LOGISTIC_TOL, predicted=predicted,
                             logistic_fit=logistic_fit)
    except ValueError as error:
        raise ValueError(f"layer {layer}, protocol {proto!r}: {error}") from None
    return {"layer": int(layer), **row}


def __getattr__(name: str) -> Any:
    # torch_linear_probe moved to ntps_nb.torch_probe (the core imports no torch); the old import
    # path still finds it, importing torch only when asked for this one name.
    if name == "torch_linear_probe":
        import importlib

        warnings.warn("ntps_nb.core.probes.torch_linear_probe moved to ntps_nb.torch_probe.torch_linear_probe",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module("ntps_nb.torch_probe").torch_linear_probe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
