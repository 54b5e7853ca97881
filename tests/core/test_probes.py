"""Probes: against independent fits, protocol semantics, validation and the tidy layer frame."""

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from ntps_nb.core.probes import (
    ProbeConvergenceWarning,
    chance_corrected_accuracy,
    heldout_probe,
    probe_layers,
)
from ntps_nb.core.theory import least_squares_loss
from tests.core.shapes import unchecked_shapes


def blobs(rng, n=240, d=6, n_classes=3, spread=1.5):
    centres = rng.standard_normal((n_classes, d)) * spread
    y = rng.integers(0, n_classes, n)
    y[:n_classes] = np.arange(n_classes)
    return centres[y] + rng.standard_normal((n, d)), y


def standardised_lstsq_mse(Xtr, ytr, Xev, yev, C, ridge=0.0):
    """Least squares with intercept on train-standardised features, by the normal equations."""
    mu, sd = Xtr.mean(0), Xtr.std(0)
    Ztr, Zev = (Xtr - mu) / sd, (Xev - mu) / sd
    Ytr, Yev = np.eye(C)[ytr], np.eye(C)[yev]
    y_mean = Ytr.mean(0)
    Zc = Ztr - Ztr.mean(0)
    W = np.linalg.solve(Zc.T @ Zc + ridge * np.eye(Zc.shape[1]), Zc.T @ (Ytr - y_mean))
    predicted = (Zev - Ztr.mean(0)) @ W + y_mean
    return float(np.mean((Yev - predicted) ** 2))


def test_heldout_probe_against_independent_computations(rng):
    X, y = blobs(rng)
    Xtr, ytr, Xte, yte = X[:160], y[:160], X[160:], y[160:]
    row = heldout_probe(Xtr, ytr, Xte, yte, n_classes=3)
    assert row["protocol"] == "heldout" and row["evaluated_on"] == "test" and row["converged"]
    assert row["n_train"] == 160 and row["n_eval"] == 80 and row["d"] == 6
    assert row["mse"] == pytest.approx(standardised_lstsq_mse(Xtr, ytr, Xte, yte, 3, ridge=1.0), rel=1e-9)
    ols = heldout_probe(Xtr, ytr, Xte, yte, n_classes=3, ridge=0.0)
    assert ols["mse"] == pytest.approx(standardised_lstsq_mse(Xtr, ytr, Xte, yte, 3), rel=1e-9)
    assert row["mse_per_text"] == pytest.approx(3 * row["mse"])
    assert row["kappa"] == pytest.approx((row["accuracy"] - 1 / 3) / (2 / 3))
    majority = np.bincount(ytr).argmax()
    assert row["majority_rate"] == pytest.approx(np.mean(yte == majority))
    assert row["accuracy"] > 0.8 > row["majority_rate"]
    ridge = heldout_probe(Xtr, ytr, Xte, yte, n_classes=3, ridge=5.0)
    assert ridge["mse"] == pytest.approx(standardised_lstsq_mse(Xtr, ytr, Xte, yte, 3, ridge=5.0), rel=1e-9)
    # the per-text classes: an independent standardised lbfgs fit predicts the same, and they give the accuracy
    same, predicted = heldout_probe(Xtr, ytr, Xte, yte, n_classes=3, return_predictions=True)
    assert same == row and predicted.shape == (80,) and predicted.dtype == np.int64
    assert np.mean(predicted == yte) == row["accuracy"]
    mean, sd = Xtr.mean(axis=0), Xtr.std(axis=0)
    independent = LogisticRegression(C=1.0, max_iter=10_000, tol=1e-10).fit((Xtr - mean) / sd, ytr)
    np.testing.assert_array_equal(predicted, independent.predict((Xte - mean) / sd))
    _, in_sample = heldout_probe(Xtr, ytr, n_classes=3, protocol="paper_in_sample", return_predictions=True)
    assert in_sample.shape == (160,)


def test_heldout_logistic_probe_reaches_the_unique_optimum(rng):
    """lbfgs iterated to convergence: the fitted coefficients satisfy the first-order conditions of
    the L2-penalised multinomial likelihood (independent of sklearn's stopping details)."""
    X, y = blobs(rng, n=150, d=4)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X)
    model = LogisticRegression(C=0.5, max_iter=10_000, tol=1e-10).fit(Z, y)
    logits = Z @ model.coef_.T + model.intercept_
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    gradient = Z.T @ (P - np.eye(3)[y]) + model.coef_.T / 0.5  # sklearn: 0.5||W||^2 + C * sum of losses
    assert np.abs(gradient).max() < 1e-5
    row = heldout_probe(X, y, X, y, n_classes=3, C=0.5)
    assert row["accuracy"] == pytest.approx(np.mean(model.predict(Z) == y))


def test_paper_protocol_is_in_sample_with_the_released_settings(rng):
    X, y = blobs(rng, n=200, d=5, n_classes=4)
    row = heldout_probe(X, y, n_classes=4, protocol="paper_in_sample", seed=3)
    assert row["evaluated_on"] == "train" and row["n_eval"] == 200 and row["solver"] == "saga"
    # in-sample least squares with intercept = the (no-intercept) loss of SPEC section 5 on [X, 1]
    design = np.column_stack([X, np.ones(len(X))])
    assert row["mse_per_text"] == pytest.approx(least_squares_loss(design, np.eye(4)[y]), rel=1e-9)
    assert row["mse"] == pytest.approx(standardised_lstsq_mse(X, y, X, y, 4), rel=1e-9)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(solver="saga", max_iter=1000, tol=0.01, random_state=3))
    assert row["accuracy"] == pytest.approx(np.mean(pipe.fit(X, y).predict(X) == y))
    assert heldout_probe(X, y, n_classes=4, protocol="paper_in_sample", seed=3) == row  # seeded


def test_chance_correction_and_baselines():
    assert chance_corrected_accuracy(0.5, 2) == 0.0
    assert chance_corrected_accuracy(1.0, 77) == 1.0
    assert chance_corrected_accuracy(0.1, 5) == pytest.approx(-0.125)
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2, got 1"):
        chance_corrected_accuracy(0.5, 1)
    for bad in (1.5, -0.1, [0.5, 0.6], "0.5"):  # a percentage, a list or a string is not an accuracy (1.5 gave 1.75)
        with pytest.raises(ValueError, match="accuracy must be one number in"):
            chance_corrected_accuracy(bad, 3)
    assert np.isnan(chance_corrected_accuracy(float("nan"), 3))


def test_probe_errors_name_the_problem(rng):
    X, y = blobs(rng, n=60, d=3, n_classes=2)
    with pytest.raises(ValueError, match="single class"):
        heldout_probe(X, np.zeros(60, dtype=int), X, y, n_classes=2)
    with pytest.raises(ValueError, match="60 feature rows but 59 labels"):
        heldout_probe(X, y[:59], X, y, n_classes=2)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="train features have NaN/inf in 1 row"):
        heldout_probe(bad, y, X, y, n_classes=2)
    with pytest.raises(ValueError, match=r"test labels must lie in 0..1 \(n_classes=2\), got range 0..2"):
        heldout_probe(X, y, X, np.r_[y[:-1], 2], n_classes=2)
    with pytest.raises(ValueError, match="train labels must lie in"):
        heldout_probe(X, y - 1, X, y, n_classes=2)
    with pytest.raises(ValueError, match="needs test_X and test_y"):
        heldout_probe(X, y, n_classes=2)
    with unchecked_shapes(), pytest.raises(ValueError, match="d=3 columns, test features d=2"):
        heldout_probe(X, y, X[:, :2], y, n_classes=2)
    with pytest.raises(ValueError, match="n_classes must be an integer >= 2"):
        heldout_probe(X, y, X, y, n_classes=1)
    with pytest.raises(ValueError, match="protocol must be one of"):
        heldout_probe(X, y, X, y, n_classes=2, protocol="in_sample")


def test_non_convergence_is_recorded_and_warned(rng):
    X, y = blobs(rng, n=100, d=4)
    with pytest.warns(ProbeConvergenceWarning, match="did not converge"):
        row = heldout_probe(X, y, X, y, n_classes=3, max_iter=1)
    assert not row["converged"] and row["n_iter"] == 1


def test_probe_layers_is_tidy_with_provenance(rng):
    X, y = blobs(rng, n=120, d=4)
    feats = {2: (X[:80], X[80:]), 0: (X[:80] * 0.1 + rng.standard_normal((80, 4)), X[80:])}
    frame = probe_layers(feats, y[:80], y[80:], n_classes=3, protocol=("heldout", "paper_in_sample"),
                         model="tiny", dataset="blobs", max_length=64)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 4
    assert list(frame.layer) == [0, 0, 2, 2]
    assert list(frame.protocol) == ["heldout", "paper_in_sample"] * 2
    assert (frame.model == "tiny").all() and (frame.max_length == 64).all()
    expected = heldout_probe(X[:80], y[:80], X[80:], y[80:], n_classes=3)
    assert frame.iloc[2].accuracy == expected["accuracy"]
    in_sample_only = probe_layers({5: X[:80]}, y[:80], n_classes=3, protocol="paper_in_sample")
    assert in_sample_only.iloc[0].n_eval == 80
    with pytest.raises(ValueError, match="layer 5, protocol 'heldout'"):
        probe_layers({5: X[:80]}, y[:80], n_classes=3)
    with pytest.raises(ValueError, match="would overwrite"):
        probe_layers(feats, y[:80], y[80:], n_classes=3, accuracy=1.0)


def test_probe_layers_in_worker_processes_equal_the_serial_rows(rng):
    """n_jobs > 1 runs the scikit-learn fits in worker processes: the same rows as one at a time
    (lbfgs is deterministic, saga seeded), errors still name the layer, and a held-out probe that
    did not converge is still warned about in this process."""
    X, y = blobs(rng, n=150, d=5)
    feats = {layer: (X[:100] + 0.1 * layer * rng.standard_normal((100, 5)), X[100:]) for layer in range(4)}
    both = ("heldout", "paper_in_sample")
    serial = probe_layers(feats, y[:100], y[100:], n_classes=3, protocol=both, n_jobs=1, model="m")
    parallel = probe_layers(feats, y[:100], y[100:], n_classes=3, protocol=both, n_jobs=2, model="m")
    pd.testing.assert_frame_equal(parallel, serial)
    with pytest.raises(ValueError, match="layer 5, protocol 'heldout'"):
        probe_layers({5: X[:100], 6: (X[:100], X[100:])}, y[:100], y[100:], n_classes=3, n_jobs=2)
    with pytest.warns(ProbeConvergenceWarning, match="layer 1: logistic probe did not converge"):
        frame = probe_layers(feats, y[:100], y[100:], n_classes=3, max_iter=1, n_jobs=2)
    assert not frame["converged"].any()
    with pytest.raises(ValueError, match="n_jobs must be a positive integer"):
        probe_layers(feats, y[:100], y[100:], n_classes=3, n_jobs=0)
