"""The excess-loss identity and bounds: against fitted probes and a brute-force formula."""

import re

import numpy as np
import pytest

from ntps_nb import (
    Moments,
    excess_loss,
    excess_loss_bounds,
    ntps,
    ntps_sweep,
    perception_moments,
    synthetic_linear_task,
    next_token_subspace,
    perception_subspace,
)
from ntps_nb.core.theory import fitted_excess_loss
from tests.core.conftest import random_moments
from tests.core.shapes import unchecked_shapes

IDENTITY_RTOL = 1e-8
BOUND_SLACK = 1e-10


def lstsq_loss(F, Y):
    """Mean squared residual of the least-squares fit of Y on F (no intercept), via the normal
    equations' pseudo-inverse: a different route from the package's lstsq."""
    coef = np.linalg.pinv(F.T @ F) @ (F.T @ Y)
    return float(np.mean(np.sum((Y - F @ coef) ** 2, axis=1)))


@pytest.mark.parametrize("angle", [0.0, 0.4, 0.9, 1.4])
def test_identity_equals_excess_mse_of_two_fitted_probes(angle):
    task = synthetic_linear_task(angle=angle, n_texts=600, seed=3)
    X, Y = task.features, np.eye(task.n_classes)[task.labels]
    V = next_token_subspace(task.moments)
    U = perception_subspace(task.moments)
    for k in (1, 2, 4, 8, 20):
        fitted = lstsq_loss(X @ V.top(k), Y) - lstsq_loss(X @ U.top(k), Y)
        assert excess_loss(task.moments, k) == pytest.approx(fitted, rel=IDENTITY_RTOL, abs=1e-14)
        package_fit = fitted_excess_loss(X, task.labels, task.moments, k)["excess_loss"]
        assert package_fit == pytest.approx(fitted, rel=1e-8, abs=1e-14)


def test_fitted_probes_scored_on_a_test_split():
    train, test = synthetic_linear_task(angle=0.5, n_texts=400, seed=1), synthetic_linear_task(angle=0.5, n_texts=200, seed=1)
    k = 4
    out = fitted_excess_loss(train.features, train.labels, train.moments, k,
                             test_features=test.features, test_labels=test.labels)
    V = next_token_subspace(train.moments).top(k)
    Y, Yt = np.eye(4)[train.labels], np.eye(4)[test.labels]
    coef = np.linalg.pinv(train.features @ V) @ Y
    expected = float(np.mean(np.sum((Yt - test.features @ V @ coef) ** 2, axis=1)))
    assert out["heldout_loss_next_token"] == pytest.approx(expected, rel=1e-8)
    assert out["heldout_excess_loss"] == pytest.approx(out["heldout_loss_next_token"] - out["heldout_loss_best"])


def test_fitted_probes_refuse_features_that_are_not_the_moments_texts():
    task = synthetic_linear_task(n_texts=60, d=12, n_predictable=4, n_classes=3, seed=2)
    X, y, m = task.features, task.labels, task.moments
    bad = [((X[:, :5], y), "features have d = 5 columns, the moments d = 12"),
           ((X[:10], y), "labels must be one per feature row: 10 feature rows but 60 labels"),
           ((np.where(X > 2, np.nan, X), y), "features have NaN/inf in 17 row(s)"),
           ((X, y.astype(str)), "labels must be integers 0..2, got dtype <U"),
           ((X, y + 3), "labels must lie in 0..2"),
           ((X[:0], y[:0]), "features must be (N, d >= 1), got shape (0, 12)")]
    with unchecked_shapes():  # the messages users get (the test-time shape check would answer first)
        for (features, labels), message in bad:
            with pytest.raises(ValueError, match=re.escape(message)):
                fitted_excess_loss(features, labels, m, 2)
        with pytest.raises(ValueError, match="test_features and test_labels together"):
            fitted_excess_loss(X, y, m, 2, test_features=X)
        with pytest.raises(ValueError, match=re.escape("test_features have d = 11 columns")):
            fitted_excess_loss(X, y, m, 2, test_features=X[:, 1:], test_labels=y)
        with pytest.raises(ValueError, match=re.escape("test_labels must be one per feature row")):
            fitted_excess_loss(X, y, m, 2, test_features=X, test_labels=y[:3])


def test_identity_holds_for_centred_moments():
    task = synthetic_linear_task(angle=0.6, n_texts=500, seed=5)
    X, Y = task.features, np.eye(task.n_classes)[task.labels]
    centred = task.moments.centred()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    np.testing.assert_allclose(centred.Sxx, Xc.T @ Xc / len(X), atol=1e-12)
    V = next_token_subspace(centred)
    U = perception_subspace(centred)
    k = 6
    fitted = lstsq_loss(Xc @ V.top(k), Yc) - lstsq_loss(Xc @ U.top(k), Yc)
    assert excess_loss(task.moments, k, centred=True) == pytest.approx(fitted, rel=IDENTITY_RTOL)


def brute_force_excess_loss(m: Moments, k: int) -> tuple[float, float, int, np.ndarray]:
    """DeltaL, NTPS, k_U and eigenvalues from explicit whitening and an explicit projector."""
    s, Q = np.linalg.eigh(m.Sxx)
    half, inv_half = Q @ np.diag(np.sqrt(s)) @ Q.T, Q @ np.diag(1 / np.sqrt(s)) @ Q.T
    M = inv_half @ m.Sxy @ m.Sxy.T @ inv_half
    lam, u = np.linalg.eigh(M)
    lam, u = lam[::-1], u[:, ::-1]
    rank = int(np.sum(lam > 1e-10 * lam[0]))
    V = next_token_subspace(m).top(k)
    basis = half @ V
    P = basis @ np.linalg.pinv(basis)
    loss_V = -np.trace(P @ M)
    kU = min(k, rank)
    loss_best = -lam[:kU].sum()
    nt = float(np.linalg.norm(P @ u[:, :kU]) ** 2 / kU)
    return float(loss_V - loss_best), nt, kU, lam


def test_bounds_hold_on_1500_random_instances():
    rng = np.random.default_rng(2026)
    checked = 0
    for _ in range(1500):
        d = int(rng.integers(3, 9))
        C = int(rng.integers(2, 6))
        m = random_moments(rng, d=d, n_classes=C)
        k = int(rng.integers(1, d + 1))
        delta, nt, kU, lam = brute_force_excess_loss(m, k)
        assert excess_loss(m, k) == pytest.approx(delta, rel=1e-7, abs=1e-9)
        lower, upper = excess_loss_bounds(m, k)
        scale = max(abs(upper), 1.0)
        assert lower - BOUND_SLACK * scale <= delta <= upper + BOUND_SLACK * scale
        assert ntps(m, k) == pytest.approx(nt, abs=1e-8)
        checked += 1
    assert checked == 1500


def test_bounds_are_tight_with_a_single_informative_direction(rng):
    """rank(Sxy Sxy^T) = 1: DeltaL = lambda_1 (1 - NTPS) and both bounds equal it."""
    m = random_moments(rng, d=8, n_classes=2)
    a = rng.standard_normal(8)
    one_direction = m.with_labels(np.column_stack([a, -2 * a]), m.Syy)
    for k in (1, 3, 8):
        lower, upper = excess_loss_bounds(one_direction, k)
        delta = excess_loss(one_direction, k)
        assert lower == pytest.approx(delta, rel=1e-9)
        assert upper == pytest.approx(delta, rel=1e-9)
    assert excess_loss(one_direction, 8) == pytest.approx(0.0, abs=1e-12)  # V_d spans everything


def test_sweep_carries_identity_and_bounds(rng):
    m = random_moments(rng, d=10, n_classes=4)
    sweep = ntps_sweep(m)
    for row in sweep.itertuples():
        assert row.excess_loss == pytest.approx(excess_loss(m, int(row.k)), rel=1e-10, abs=1e-13)
        assert (row.lower_bound, row.upper_bound) == pytest.approx(excess_loss_bounds(m, int(row.k)), rel=1e-10, abs=1e-13)


def test_synthetic_task_angle_controls_ntps():
    values = [ntps(synthetic_linear_task(angle=a, n_texts=4000, seed=1).moments, 8)
              for a in (0.0, np.pi / 4, np.pi / 2)]
    assert values[0] > 0.9 and values[2] < 0.1
    assert values[0] > values[1] > values[2]
    assert values[1] == pytest.approx(0.5, abs=0.1)


def test_synthetic_task_moments_match_its_features():
    task = synthetic_linear_task(n_texts=200, seed=9)
    direct = perception_moments(task.features, task.labels, task.n_classes)
    np.testing.assert_allclose(task.moments.Sxx, direct["Sxx"], atol=1e-12)
    np.testing.assert_allclose(task.moments.Sxy, direct["Sxy"], atol=1e-12)
    with pytest.raises(ValueError, match="n_predictable"):
        synthetic_linear_task(d=8, n_predictable=8, n_classes=2)
