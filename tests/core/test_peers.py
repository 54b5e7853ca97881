"""Peer scores: hand-solvable cases, independent computations and invariances."""

import warnings

import numpy as np
import pytest
from scipy.stats import ortho_group

from ntps_nb import Moments, ntps, theory_geometry
from ntps_nb.core.peers import (
    HSCORE_SATURATED_RTOL,
    PeerConvergenceWarning,
    PeerUndefinedWarning,
    h_score,
    h_score_ledoit_wolf,
    knn_accuracy,
    logme,
    logme_per_class,
    pca_overlap_ntps,
    pca_overlap_sweep,
    peer_scores,
    rankme,
)
from tests.core.conftest import random_moments, random_spd

INVARIANCE_RTOL = 1e-8


def labelled_features(rng, n=180, d=6, n_classes=3, shift=1.0):
    y = rng.integers(0, n_classes, n)
    y[:n_classes] = np.arange(n_classes)
    centres = rng.standard_normal((n_classes, d)) * shift
    X = centres[y] + rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.5 + 3.0
    return X, y


def permute_labels(y, rng):
    perm = rng.permutation(int(y.max()) + 1)
    return perm[y]


# -- RankMe ------------------------------------------------------------------------------------------

def test_rankme_of_orthogonal_and_low_rank_matrices():
    assert rankme(np.eye(7)) == pytest.approx(7, rel=1e-5)
    low = np.zeros((10, 6))
    low[:3, :3] = 2.0 * np.eye(3)
    assert rankme(low) == pytest.approx(3, rel=1e-4)
    assert rankme(np.outer(np.arange(1.0, 6), np.ones(4))) == pytest.approx(1, rel=1e-4)


def test_rankme_is_rotation_invariant_and_label_free(rng):
    X = rng.standard_normal((40, 8)) @ np.diag(np.linspace(0.1, 3, 8))
    Q1, Q2 = ortho_group.rvs(40, random_state=1), ortho_group.rvs(8, random_state=2)
    assert rankme(Q1 @ X @ Q2) == pytest.approx(rankme(X), rel=INVARIANCE_RTOL)
    assert rankme(X, rng.integers(0, 3, 40)) == rankme(X)
    with pytest.raises(ValueError, match="all zero"):
        rankme(np.zeros((4, 3)))


# -- H-score -----------------------------------------------------------------------------------------

def test_h_score_two_clusters_by_hand():
    # class means -1 and +1, within-class spread a: cov(f) = 1 + a^2, cov(E[f|y]) = 1
    a = 0.5
    X = np.array([[-1 - a], [-1 + a], [1 - a], [1 + a]])
    assert h_score(X, [0, 0, 1, 1]) == pytest.approx(1 / (1 + a**2))
    # unbalanced: n_0 = 1 at 0, n_1 = 3 at {2, 2, 2}: means 0 and 2, p = (1/4, 3/4)
    # cov(f) = cov(E[f|y]) = p0 p1 (2 - 0)^2 = 0.75 (no within-class spread) -> H = 1
    assert h_score(np.array([[0.0], [2.0], [2.0], [2.0]]), [0, 1, 1, 1]) == pytest.approx(1.0)


def test_h_score_against_explicit_inverse(rng):
    X, y = labelled_features(rng, n_classes=4)
    mu = X.mean(0)
    cov = (X - mu).T @ (X - mu) / len(X)
    between = np.zeros_like(cov)
    for c in range(4):
        g = X[y == c].mean(0) - mu
        between += np.mean(y == c) * np.outer(g, g)
    assert h_score(X, y) == pytest.approx(np.trace(np.linalg.inv(cov) @ between), rel=1e-10)
    assert 0 < h_score(X, y) <= 3  # at most C - 1


def test_h_score_of_no_more_texts_than_dimensions_counts_the_classes(rng):
    """With N <= d + 1 the H-score is C - 1 whatever the features (the class indicators are fitted exactly): it
    says so with an InterpolationWarning. One dimension fewer and the features are seen again, with no warning."""
    from ntps_nb.core.score import InterpolationWarning

    y = np.arange(50) % 3
    for d in (49, 80):
        with pytest.warns(InterpolationWarning, match="is C - 1 = 2 whatever the features"):
            assert h_score(rng.standard_normal((50, d)), y) == pytest.approx(2.0, rel=HSCORE_SATURATED_RTOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InterpolationWarning)
        assert h_score(rng.standard_normal((50, 48)), y) < 2.0 * (1 - HSCORE_SATURATED_RTOL)
        assert h_score_ledoit_wolf(rng.standard_normal((50, 80)), y) < 2.0 * (1 - HSCORE_SATURATED_RTOL)


def test_h_score_invariances(rng):
    X, y = labelled_features(rng)
    A = rng.standard_normal((6, 6)) + 3 * np.eye(6)  # invertible, not orthogonal
    reference = h_score(X, y)
    assert h_score(X @ A + 5.0, y) == pytest.approx(reference, rel=1e-8)
    assert h_score(X, permute_labels(y, rng)) == pytest.approx(reference, rel=1e-12)
    Q = ortho_group.rvs(6, random_state=3)
    lw = h_score_ledoit_wolf(X, y)
    assert h_score_ledoit_wolf(X @ Q, y) == pytest.approx(lw, rel=INVARIANCE_RTOL)
    assert h_score_ledoit_wolf(X, permute_labels(y, rng)) == pytest.approx(lw, rel=1e-12)


def ledoit_wolf_by_formula(X):
    """Ledoit & Wolf (2004): shrink S toward mu I with delta = min(b^2, d^2) / d^2, where
    d^2 = ||S - mu I||^2 and b^2 = (1/n^2) sum_k ||x_k x_k^T - S||^2 (centred x_k, S with 1/n)."""
    Z = X - X.mean(0)
    n, p = Z.shape
    S = Z.T @ Z / n
    mu = np.trace(S) / p
    d2 = np.sum((S - mu * np.eye(p)) ** 2)
    b2 = sum(np.sum((np.outer(z, z) - S) ** 2) for z in Z) / n**2
    delta = min(b2, d2) / d2
    return (1 - delta) * S + delta * mu * np.eye(p), delta


def test_ledoit_wolf_h_score_against_the_shrinkage_formula(rng):
    X, y = labelled_features(rng, n=40, d=12)  # d comparable to N: the case shrinkage is for
    shrunk, delta = ledoit_wolf_by_formula(X)
    mu = X.mean(0)
    between = sum(np.mean(y == c) * np.outer(X[y == c].mean(0) - mu, X[y == c].mean(0) - mu) for c in range(3))
    expected = (1 - delta) * np.trace(np.linalg.solve(shrunk, between))
    assert 0 < delta < 1
    assert h_score_ledoit_wolf(X, y) == pytest.approx(expected, rel=1e-9)
    assert h_score_ledoit_wolf(X, y, scale_between=False) == pytest.approx(expected / (1 - delta), rel=1e-9)
    # in one dimension the shrinkage target is the sample variance itself: nothing changes
    X1 = np.array([[-1.5], [-0.5], [0.5], [1.5]])
    assert h_score_ledoit_wolf(X1, [0, 0, 1, 1]) == pytest.approx(h_score(X1, [0, 0, 1, 1]))


# -- LogME -------------------------------------------------------------------------------------------

def direct_log_evidence(F, y, alpha, beta):
    """log p(y | F, alpha, beta) / N of Bayesian linear regression, from explicit matrices."""
    n, d = F.shape
    A = alpha * np.eye(d) + beta * F.T @ F
    m = beta * np.linalg.solve(A, F.T @ y)
    _, logdet = np.linalg.slogdet(A)
    value = (n * np.log(beta) + d * np.log(alpha) - n * np.log(2 * np.pi)
             - beta * np.sum((F @ m - y) ** 2) - alpha * m @ m - logdet) / 2
    return value / n


def grid_maximum(F, y, centre=(0.0, 0.0), half_width=12.0, steps=41, rounds=7):
    """Brute-force maximum over a log-spaced (alpha, beta) grid, refined around the best point."""
    la, lb = centre
    for _ in range(rounds):
        grid_a = np.linspace(la - half_width, la + half_width, steps)
        grid_b = np.linspace(lb - half_width, lb + half_width, steps)
        values = np.array([[direct_log_evidence(F, y, np.exp(a), np.exp(b)) for b in grid_b] for a in grid_a])
        i, j = np.unravel_index(np.argmax(values), values.shape)
        la, lb, best = grid_a[i], grid_b[j], values[i, j]
        half_width /= 4
    return best


def test_logme_equals_the_evidence_maximum_found_by_brute_force(rng):
    F, y = labelled_features(rng, n=60, d=4, n_classes=2)
    table = logme_per_class(F, y)
    for row in table.itertuples():
        target = (y == row._1).astype(float)
        # the returned evidence is the direct formula at the returned (alpha, beta)...
        assert row.evidence == pytest.approx(direct_log_evidence(F, target, row.alpha, row.beta), rel=1e-10)
        # ...and no grid point does better, while the refined grid gets arbitrarily close
        best = grid_maximum(F, target, centre=(0.0, 0.0))
        assert row.evidence >= best - 1e-12
        assert row.evidence == pytest.approx(best, abs=1e-6)
    assert logme(F, y) == pytest.approx(table.evidence.mean())


def test_logme_with_more_features_than_texts_and_label_permutation(rng):
    F, y = labelled_features(rng, n=20, d=30, n_classes=3)
    table = logme_per_class(F, y)
    assert table.converged.all()
    for row in table.itertuples():
        target = (y == row._1).astype(float)
        assert row.evidence == pytest.approx(direct_log_evidence(F, target, row.alpha, row.beta), rel=1e-9)
    assert logme(F, permute_labels(y, rng)) == pytest.approx(logme(F, y), rel=1e-12)
    Q = ortho_group.rvs(30, random_state=0)
    assert logme(F @ Q, y) == pytest.approx(logme(F, y), rel=1e-8)


def test_logme_of_a_target_without_signal_is_the_noise_models_evidence():
    """A target the features fit no better than noise sends the fixed point's alpha to infinity (it raised
    "unbounded" before): LogME is then the limit alpha -> inf, w = 0, beta = N / ||y||^2, which a brute-force grid
    over (alpha, beta) reaches from below and never beats. Three such targets: one orthogonal to every feature, one
    of labels drawn apart from the features (seed 0: class 1), and one of 10 texts in 50 dimensions (it was said to
    be fitted exactly, but with as many singular values as texts the evidence stays bounded)."""
    rng = np.random.default_rng(0)
    F, y = rng.normal(size=(200, 8)), rng.integers(0, 3, 200)
    target = (y == 0).astype(float)
    orthogonal = F - np.outer(target, target @ F) / (target @ target)
    wide = np.random.default_rng(12345).standard_normal((10, 50))
    for features, labels, c in ((orthogonal, y, 0), (F, y, 1), (wide, np.arange(10) % 2, 0)):
        row = logme_per_class(features, labels).iloc[c]
        target = (labels == c).astype(float)
        noise_beta = len(target) / (target @ target)
        assert np.isinf(row.alpha) and row.converged and row.beta == pytest.approx(noise_beta, rel=1e-12)
        assert row.evidence == pytest.approx(direct_log_evidence(features, target, 1e12, noise_beta), abs=1e-9)
        best = grid_maximum(features, target, centre=(20.0, 0.0), half_width=20.0)  # alpha from 1 to e^40
        assert row.evidence >= best - 1e-12 and row.evidence == pytest.approx(best, abs=1e-6)
    assert np.isfinite(logme(F, y))


def test_logme_reads_the_classes_present(rng):
    """Labels 0, 2 and 5 (values no text carries between them): LogME is over the three classes present, as with
    the labels 0, 1, 2 (it raised 'unbounded' on the empty targets of 1, 3 and 4)."""
    F, y = labelled_features(rng, n=90, d=4, n_classes=3)
    gapped = np.array([0, 2, 5])[y]
    assert logme_per_class(F, gapped)["class"].tolist() == [0, 2, 5]
    assert logme(F, gapped) == logme(F, y)


def test_logme_warns_when_stopped_early(rng):
    F, y = labelled_features(rng, n=50, d=3)
    with pytest.warns(PeerConvergenceWarning, match="max_iter=1"):
        logme(F, y, max_iter=1)


# -- k-NN --------------------------------------------------------------------------------------------

def brute_force_loo_knn(X, y, k):
    D = np.sum((X[:, None] - X[None]) ** 2, axis=-1)
    np.fill_diagonal(D, np.inf)
    correct = 0
    for i in range(len(X)):
        order = np.argsort(D[i], kind="stable")[:k]
        votes = np.bincount(y[order], minlength=y.max() + 1)
        tied = np.flatnonzero(votes == votes.max())
        winner = next(y[j] for j in order if y[j] in tied)  # nearest member of a tied class
        correct += winner == y[i]
    return correct / len(X)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_knn_leave_one_out_against_explicit_distances(rng, k):
    X, y = labelled_features(rng, n=90, n_classes=3, shift=0.7)
    assert knn_accuracy(X, y, k=k) == pytest.approx(brute_force_loo_knn(X, y, k))


def test_knn_hand_case_and_invariances(rng):
    X = np.array([[0.0], [0.1], [0.3], [5.0], [5.2], [5.3]])
    y = [0, 0, 0, 1, 1, 1]
    assert knn_accuracy(X, y, k=1) == 1.0
    assert knn_accuracy(X, [0, 1, 0, 1, 0, 1], k=1) == pytest.approx(0.0)  # nearest is always the other label
    X, y = labelled_features(rng, n=120, shift=0.8)
    Q = ortho_group.rvs(6, random_state=5)
    for k in (1, 4, 5):
        reference = knn_accuracy(X, y, k=k)
        assert knn_accuracy(X @ Q + 2.0, y, k=k) == reference
        assert knn_accuracy(X, permute_labels(y, rng), k=k) == reference
    assert knn_accuracy(3.0 * X, y, metric="cosine") == knn_accuracy(X, y, metric="cosine")


def test_knn_heldout_is_seeded_and_stratified(rng):
    X, y = labelled_features(rng, n=100, shift=2.0)
    a = knn_accuracy(X, y, mode="heldout", seed=1)
    assert a == knn_accuracy(X, y, mode="heldout", seed=1)
    assert 0.5 < a <= 1.0
    with pytest.raises(ValueError, match="mode must be"):
        knn_accuracy(X, y, mode="kfold")
    with pytest.raises(ValueError, match="need at least 100 texts"):
        knn_accuracy(X[:5], y[:5] % 2, k=99)


def test_peers_reject_bad_input(rng):
    X, y = labelled_features(rng, n=30)
    for score in (logme, h_score, h_score_ledoit_wolf, knn_accuracy):
        with pytest.raises(ValueError, match="single class"):
            score(X, np.zeros(30, dtype=int))
        with pytest.raises(ValueError, match="one per feature row"):
            score(X, y[:29])
        bad = X.copy()
        bad[0, 0] = np.inf
        with pytest.raises(ValueError, match="NaN/inf"):
            score(bad, y)
        with pytest.raises(ValueError, match="labels must"):
            score(X, y - 1)


def test_peer_scores_row(rng):
    X, y = labelled_features(rng, n=60)
    row = peer_scores(X, y, model="tiny", layer=3)
    assert row["model"] == "tiny" and row["layer"] == 3
    assert row["h_score"] == h_score(X, y) and row["rankme"] == rankme(X)
    assert set(row) >= {"logme", "h_score", "h_score_lw", "knn_accuracy", "rankme"}
    with pytest.raises(ValueError, match="unknown peer"):
        peer_scores(X, y, peers=["leep"])
    with pytest.raises(ValueError, match="single class"):
        peer_scores(X, np.zeros(len(y), dtype=int))  # bad input still raises


def test_an_undefined_peer_is_nan_with_its_reason(rng):
    y = np.arange(60) % 2
    X = np.column_stack([y, 1 - y, rng.standard_normal((60, 3))])  # the labels among the features: fitted exactly
    with pytest.raises(ValueError, match="unbounded"):
        logme(X, y)
    with pytest.warns(PeerUndefinedWarning, match="logme"):
        row = peer_scores(X, y, layer=0)
    assert np.isnan(row["logme"]) and "unbounded" in row["logme_error"]
    assert row["rankme"] == rankme(X) and "rankme_error" not in row


# -- PCA-overlap control -----------------------------------------------------------------------------

def with_shh(m: Moments, Shh) -> Moments:
    return Moments(Sxx=m.Sxx, Sxy=m.Sxy, Syy=m.Syy, C0=m.C0, C1=m.C1, n_texts=m.n_texts, n_tokens=m.n_tokens,
                   Shh=Shh)


def brute_force_pca_overlap(m: Moments, k: int) -> float:
    s, Q = np.linalg.eigh(m.Sxx)
    half, inv_half = Q @ np.diag(np.sqrt(s)) @ Q.T, Q @ np.diag(1 / np.sqrt(s)) @ Q.T
    lam, u = np.linalg.eigh(inv_half @ m.Sxy @ m.Sxy.T @ inv_half)
    lam, u = lam[::-1], u[:, ::-1]
    rank = int(np.sum(lam > 1e-10 * lam[0]))
    w, P = np.linalg.eigh(m.Shh)
    principal = P[:, np.argsort(w)[::-1][:k]]
    basis = half @ principal
    projector = basis @ np.linalg.pinv(basis)
    kU = min(k, rank)
    return float(np.linalg.norm(projector @ u[:, :kU]) ** 2 / kU)


def test_pca_overlap_against_brute_force_and_sweep(rng):
    m = with_shh(random_moments(rng, d=8, n_classes=3), random_spd(rng, 8))
    sweep = pca_overlap_sweep(m)
    assert list(sweep.k) == list(range(1, 9)) and (sweep.variant == "pca_overlap").all()
    for k in range(1, 9):
        assert pca_overlap_ntps(m, k) == pytest.approx(brute_force_pca_overlap(m, k), abs=1e-10)
        assert sweep.ntps[k - 1] == pytest.approx(pca_overlap_ntps(m, k), abs=1e-12)
    assert pca_overlap_ntps(m, 8) == pytest.approx(1.0)


def test_pca_overlap_equals_ntps_when_principal_and_next_token_directions_coincide(rng):
    """If C0 = I and C1 = Shh^{1/2}, V_k are Shh's top-k eigenvectors: both scores must agree."""
    base = random_moments(rng, d=6, n_classes=2)
    Shh = random_spd(rng, 6)
    w, P = np.linalg.eigh(Shh)
    m = Moments(Sxx=base.Sxx, Sxy=base.Sxy, Syy=base.Syy, C0=np.eye(6), C1=P @ np.diag(np.sqrt(w)) @ P.T,
                n_texts=10, n_tokens=20, Shh=Shh)
    for k in range(1, 7):
        assert pca_overlap_ntps(m, k) == pytest.approx(ntps(m, k), abs=1e-10)


def test_pca_overlap_rotation_invariance_rank_and_errors(rng):
    m = with_shh(random_moments(rng, d=7, n_classes=3), random_spd(rng, 7, rank=4))
    R = ortho_group.rvs(7, random_state=9)
    rotated = Moments(Sxx=R.T @ m.Sxx @ R, Sxy=R.T @ m.Sxy, Syy=m.Syy, C0=R.T @ m.C0 @ R, C1=R.T @ m.C1 @ R,
                      n_texts=m.n_texts, n_tokens=m.n_tokens, Shh=R.T @ m.Shh @ R)
    for k in range(1, 5):
        assert pca_overlap_ntps(rotated, k) == pytest.approx(pca_overlap_ntps(m, k), abs=1e-8)
    assert len(pca_overlap_sweep(m)) == 4  # only k up to rank(Shh)
    with pytest.raises(ValueError, match=r"rank\(Shh\) = 4, got 5"):
        pca_overlap_ntps(m, 5)
    with pytest.raises(ValueError, match="needs moments.Shh"):
        pca_overlap_ntps(random_moments(rng), 2)
    assert theory_geometry(m).m == 3  # the control leaves U untouched
