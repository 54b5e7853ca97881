"""The held-out logistic probe on the torch backend (on the CPU here) against scikit-learn's lbfgs
fitted tightly: the same optimum (coefficients, probabilities, predictions), batched equal to one
at a time, the cross-validated probe's choice of C, and the same errors as the numpy path."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from ntps_nb.core import probes  # noqa: E402
from ntps_nb.core.backends.torch import (  # noqa: E402
    LOGISTIC_NEWTON_MAX_ITER,
    LOGISTIC_SOLVER,
    logistic_probe_torch,
)
from tests.core.shapes import unchecked_shapes  # noqa: E402
from tests.core.torch_device import DEVICE  # noqa: E402

#: Both solvers iterated to this gradient tolerance (sklearn's max-abs test on its mean objective).
TIGHT_TOL = 1e-10
#: Coefficients and intercepts against sklearn's, relative to the largest |coefficient|. sklearn's
#: lbfgs also stops when f changes by < 64 eps relative, about 1e-7 from the optimum on these problems.
COEF_RTOL = 1e-6
#: Predicted probabilities against sklearn's, absolute.
PROBABILITY_ATOL = 1e-6
#: The batched solve against one problem at a time: the same arithmetic per problem, products in
#: another blocking at most.
BATCH_RTOL = 1e-12


def problem(seed, *, n, m, d, k, spread, imbalance=False):
    """Blobs seen through a random mixing and uneven feature scales (what the scaler must undo)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * spread
    p = np.linspace(1, 4, k) if imbalance else np.ones(k)
    y = rng.choice(k, n + m, p=p / p.sum())
    y[:k], y[n:n + k] = np.arange(k), np.arange(k)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    X = (centres[y] + rng.standard_normal((n + m, d))) @ mixing * rng.uniform(0.1, 10.0, d) + 3.0
    return X[:n], y[:n], X[n:], y[n:]


def mean_objective_gradient(Z, y, classes, coef, intercept, C, weights):
    """The gradient of sklearn's objective (sum_i s_i loss_i + ||W||^2 / (2C)) / sum_i s_i, by numpy."""
    logits = Z @ coef.T + intercept
    if classes.size == 2:  # binomial: one column, the second class is the positive one
        residual = 1.0 / (1.0 + np.exp(-logits)) - (y == classes[1])[:, None]
    else:
        P = np.exp(logits - logits.max(axis=1, keepdims=True))
        residual = P / P.sum(axis=1, keepdims=True) - (y[:, None] == classes[None, :])
    residual = residual * weights[:, None]
    return np.concatenate([(residual.T @ Z + coef / C).ravel(), residual.sum(axis=0)]) / weights.sum()


CASES = {
    "well conditioned": (dict(seed=1, n=150, m=60, d=8, k=3, spread=0.7), 1.0, None),
    "nearly separable, small C": (dict(seed=2, n=80, m=40, d=12, k=4, spread=3.0), 0.05, None),
    "nearly separable, C=1": (dict(seed=2, n=80, m=40, d=12, k=4, spread=3.0), 1.0, None),
    "binary": (dict(seed=3, n=120, m=50, d=6, k=2, spread=0.8), 1.0, None),
    "d > N": (dict(seed=4, n=40, m=30, d=60, k=3, spread=0.5), 1.0, None),
    "balanced class weights": (dict(seed=5, n=150, m=60, d=8, k=3, spread=0.7, imbalance=True), 1.0, "balanced"),
    "balanced, binary": (dict(seed=5, n=150, m=60, d=8, k=2, spread=0.7, imbalance=True), 2.0, "balanced"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_logistic_probe_equals_tightly_fitted_sklearn(case):
    shape, C, class_weight = case
    Xtr, ytr, Xte, yte = problem(**shape)
    scaler = StandardScaler().fit(Xtr)
    Z, Zte = scaler.transform(Xtr), scaler.transform(Xte)
    model = LogisticRegression(C=C, tol=TIGHT_TOL, max_iter=100_000, class_weight=class_weight).fit(Z, ytr)
    (fit,) = logistic_probe_torch([Xtr], ytr, [Xte], Cs=C, tol=TIGHT_TOL, class_weight=class_weight,
                                  train_predictions=True)
    assert fit.converged.all() and fit.solver == LOGISTIC_SOLVER
    np.testing.assert_array_equal(fit.classes, model.classes_)
    assert fit.coef.shape == (1, *model.coef_.shape) and fit.intercept.shape == (1, *model.intercept_.shape)
    scale = np.abs(model.coef_).max()
    assert np.abs(fit.coef[0] - model.coef_).max() <= COEF_RTOL * scale
    assert np.abs(fit.intercept[0] - model.intercept_).max() <= COEF_RTOL * scale
    assert np.abs(fit.eval_probabilities[0] - model.predict_proba(Zte)).max() <= PROBABILITY_ATOL
    np.testing.assert_array_equal(fit.eval_predictions[0], model.predict(Zte))
    np.testing.assert_array_equal(fit.train_predictions[0], model.predict(Z))
    # the first-order conditions, by numpy: the torch fit is at the optimum to its own tolerance
    counts = np.bincount(np.searchsorted(fit.classes, ytr))
    weights = (ytr.size / (counts.size * counts))[np.searchsorted(fit.classes, ytr)] if class_weight else np.ones(
        ytr.size)
    gradient = mean_objective_gradient(Z, ytr, fit.classes, fit.coef[0], fit.intercept[0], C, weights)
    assert np.abs(gradient).max() <= TIGHT_TOL


def test_batched_over_layers_and_a_grid_of_C_equals_one_at_a_time():
    rng = np.random.default_rng(11)
    layers = [problem(20 + i, n=90, m=30, d=7, k=3, spread=0.8) for i in range(3)]
    ytr = layers[0][1]
    train = [layer[0] for layer in layers]
    test = [layer[2] for layer in layers]
    grid = [0.01, 1.0, 30.0]
    batched = logistic_probe_torch(train, ytr, test, Cs=grid)
    for i in range(3):
        for c, C in enumerate(grid):
            (alone,) = logistic_probe_torch([train[i]], ytr, [test[i]], Cs=C)
            np.testing.assert_allclose(batched[i].coef[c], alone.coef[0], rtol=0, atol=BATCH_RTOL * np.abs(
                alone.coef).max())
            np.testing.assert_array_equal(batched[i].eval_predictions[c], alone.eval_predictions[0])
            assert batched[i].n_iter[c] == alone.n_iter[0] and batched[i].converged[c]
    # problems of different sizes (the folds of the cross-validated probe) share a padded batch
    rows = rng.permutation(90)
    folds = logistic_probe_torch([train[0][rows[:60]], train[0][rows[:75]]], [ytr[rows[:60]], ytr[rows[:75]]],
                                 [test[0], test[0]], Cs=1.0)
    (short,) = logistic_probe_torch([train[0][rows[:60]]], ytr[rows[:60]], [test[0]], Cs=1.0)
    np.testing.assert_allclose(folds[0].coef, short.coef, rtol=0, atol=1e-9 * np.abs(short.coef).max())
    np.testing.assert_array_equal(folds[0].eval_predictions, short.eval_predictions)


def test_a_tolerance_below_rounding_stops_as_not_converged_instead_of_iterating_to_the_cap():
    Xtr, ytr, Xte, _ = problem(1, n=150, m=60, d=8, k=3, spread=0.7)
    (fit,) = logistic_probe_torch([Xtr], ytr, [Xte], Cs=[0.01, 100.0], tol=1e-300)
    (tight,) = logistic_probe_torch([Xtr], ytr, [Xte], Cs=[0.01, 100.0], tol=TIGHT_TOL)
    assert not fit.converged.any() and (fit.n_iter < LOGISTIC_NEWTON_MAX_ITER).all()
    np.testing.assert_allclose(fit.coef, tight.coef, rtol=0, atol=COEF_RTOL * np.abs(tight.coef).max())


def test_probe_layers_and_heldout_probe_on_the_device_equal_sklearn():
    Xtr, ytr, Xte, yte = problem(7, n=120, m=60, d=9, k=3, spread=0.6)
    features = {0: (Xtr, Xte), 3: (Xtr * 0.5 + np.sin(Xtr), Xte * 0.5 + np.sin(Xte))}
    options = dict(n_classes=3, protocol=["heldout", "paper_in_sample"], model="m")
    want = probes.probe_layers(features, ytr, yte, **options)
    got = probes.probe_layers(features, ytr, yte, device=DEVICE, **options)
    heldout = (got["protocol"] == "heldout").to_numpy()
    assert list(got["solver"]) == [LOGISTIC_SOLVER if h else "saga" for h in heldout]
    assert got["converged"].all() and (got["n_iter"] >= 1).all()
    np.testing.assert_array_equal(got["accuracy"], want["accuracy"])  # saga in sample: the same host fit
    np.testing.assert_array_equal(got["n_iter"][~heldout], want["n_iter"][~heldout])
    row = probes.heldout_probe(features[3][0], ytr, features[3][1], yte, n_classes=3, device=DEVICE)
    assert row["solver"] == LOGISTIC_SOLVER
    assert row["accuracy"] == got.query("layer == 3 and protocol == 'heldout'")["accuracy"].item()
    _, predicted = probes.heldout_probe(features[3][0], ytr, features[3][1], yte, n_classes=3, device=DEVICE,
                                        return_predictions=True)
    assert np.mean(predicted == yte) == row["accuracy"]
    with pytest.warns(probes.ProbeConvergenceWarning, match="did not converge"):
        capped = probes.heldout_probe(Xtr, ytr, Xte, yte, n_classes=3, max_iter=1, device=DEVICE)
    assert not capped["converged"] and capped["n_iter"] == 1


@pytest.mark.parametrize("scoring, class_weight", [("neg_log_loss", None), ("accuracy", "balanced")])
def test_cv_probe_on_the_device_chooses_sklearns_C(scoring, class_weight):
    Xtr, ytr, Xte, yte = problem(9, n=90, m=60, d=30, k=3, spread=0.45, imbalance=class_weight is not None)
    options = dict(n_classes=3, Cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), scoring=scoring, class_weight=class_weight,
                   seed=3, tol=TIGHT_TOL)  # at the default 1e-6 the fold scores of large C agree to ~1e-5
    want = probes.cv_logistic_probe(Xtr, ytr, Xte, yte, **options)
    got = probes.cv_logistic_probe(Xtr, ytr, Xte, yte, device=DEVICE, **options)
    assert got.row["logreg_C"] == want.row["logreg_C"] and got.row["solver"] == LOGISTIC_SOLVER
    assert got.row["accuracy"] == want.row["accuracy"] and got.row["converged"]
    assert got.row["train_accuracy"] == want.row["train_accuracy"]
    np.testing.assert_array_equal(got.predictions, want.predictions)
    np.testing.assert_allclose(got.cv_scores["mean_score"], want.cv_scores["mean_score"], rtol=0, atol=1e-6)
    assert {k: v for k, v in got.row.items() if k not in ("solver", "cv_score")} == {
        k: v for k, v in want.row.items() if k not in ("solver", "cv_score")}


def raised(function, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        function(*args, **kwargs)
    return str(error.value)


def test_bad_input_raises_the_numpy_paths_errors_on_the_device():
    Xtr, ytr, Xte, yte = problem(13, n=40, m=20, d=4, k=3, spread=1.0)
    nan = Xtr.copy()
    nan[5, 2] = np.nan
    single = np.zeros_like(ytr)
    bad_inputs = [
        ("NaN features", (nan, ytr, Xte, yte)),
        ("a single class", (Xtr, single, Xte, yte)),
        ("train and test d differ", (Xtr, ytr, Xte[:, :3], yte)),
        ("labels and rows differ", (Xtr, ytr[:-1], Xte, yte)),
    ]
    with unchecked_shapes():
        for what, (a, b, c, e) in bad_inputs:
            message = raised(probes.heldout_probe, a, b, c, e, n_classes=3)
            assert raised(probes.heldout_probe, a, b, c, e, n_classes=3, device=DEVICE) == message, what
            message = raised(probes.probe_layers, {1: (a, c)}, b, e, n_classes=3)
            assert raised(probes.probe_layers, {1: (a, c)}, b, e, n_classes=3, device=DEVICE) == message, what
            message = raised(probes.cv_logistic_probe, a, b, c, e, n_classes=3)
            assert raised(probes.cv_logistic_probe, a, b, c, e, n_classes=3, device=DEVICE) == message, what
    assert "single class" in raised(probes.heldout_probe, Xtr, single, Xte, yte, n_classes=3, device=DEVICE)
    # the backend function checks its own arguments too
    with pytest.raises(ValueError, match="2 train arrays but 1 evaluation arrays"):
        logistic_probe_torch([Xtr, Xtr], ytr, [Xte])
    with pytest.raises(ValueError, match="Cs must be positive"):
        logistic_probe_torch([Xtr], ytr, [Xte], Cs=[1.0, -1.0])
    with pytest.raises(ValueError, match="class_weight must be None or 'balanced'"):
        logistic_probe_torch([Xtr], ytr, [Xte], class_weight={0: 2.0})
    with pytest.raises(ValueError, match="at least 2"):
        logistic_probe_torch([Xtr], single, [Xte])
    with pytest.raises(ValueError, match="NaN"):
        logistic_probe_torch([nan], ytr, [Xte])
    with pytest.raises(ValueError, match="evaluation features d=3"):
        logistic_probe_torch([Xtr], ytr, [Xte[:, :3]])
