"""Cross-validated probe targets: C chosen on the train split only, Cohen's kappa and balanced
accuracy against sklearn, against an independent grid search."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ntps_nb.core.probes import CV_C_GRID, classification_scores, cv_logistic_probe, heldout_probe


def blobs(rng, n, d, n_test=0, n_classes=3, spread=1.0, noise_dims=0):
    """Gaussian classes plus pure-noise dimensions; train (n) and test (n_test) share the centres."""
    centres = rng.standard_normal((n_classes, d)) * spread
    y = rng.integers(0, n_classes, n + n_test)
    y[:n_classes] = np.arange(n_classes)
    X = np.hstack([centres[y] + rng.standard_normal((y.size, d)), rng.standard_normal((y.size, noise_dims))])
    return X[:n], y[:n], X[n:], y[n:]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_scores_equal_sklearn_on_balanced_and_imbalanced_labels(rng):
    for weights in (None, [0.75, 0.2, 0.05]):
        for _ in range(20):
            y_true = rng.choice(3, size=60, p=weights)
            y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 3, 60))
            out = classification_scores(y_true, y_pred, n_classes=3)
            assert out["cohen_kappa"] == pytest.approx(cohen_kappa_score(y_true, y_pred), abs=1e-12)
            assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
            assert out["accuracy"] == pytest.approx(np.mean(y_true == y_pred))


def test_majority_predictor_has_zero_cohen_kappa_but_positive_chance_corrected_accuracy():
    y_true = np.array([0] * 75 + [1] * 25)
    out = classification_scores(y_true, np.zeros(100, dtype=int), n_classes=2)
    assert out["cohen_kappa"] == 0.0 and out["balanced_accuracy"] == 0.5
    assert out["kappa_chance"] == pytest.approx(0.5)  # (0.75 - 0.5) / 0.5: what the 1/C correction credits


def test_classification_scores_name_bad_labels():
    with pytest.raises(ValueError, match="y_pred must be integers in 0..1"):
        classification_scores([0, 1], [0, 2], n_classes=2)
    with pytest.raises(ValueError, match="one length"):
        classification_scores([0, 1, 1], [0, 1], n_classes=2)


def test_chosen_C_never_looks_at_the_test_split(rng):
    Xtr, ytr, Xte, yte = blobs(rng, 150, 5, n_test=100, spread=1.5, noise_dims=40)
    clean = cv_logistic_probe(Xtr, ytr, Xte, yte, n_classes=3)
    poisoned_X = 1e3 * rng.standard_normal(Xte.shape)  # no signal, absurd scale
    poisoned_y = (yte + 1) % 3  # every label wrong
    poisoned = cv_logistic_probe(Xtr, ytr, poisoned_X, poisoned_y, n_classes=3)
    assert poisoned.row["logreg_C"] == clean.row["logreg_C"]
    assert poisoned.row["cv_score"] == clean.row["cv_score"]
    np.testing.assert_array_equal(poisoned.cv_scores["mean_score"], clean.cv_scores["mean_score"])
    assert clean.row["accuracy"] > 0.9 and poisoned.row["accuracy"] < 0.5  # the test split is what gets scored


def test_chosen_C_equals_an_independent_grid_search(rng):
    chosen = []
    for noise_dims, n in ((60, 90), (0, 300)):  # overfit-prone (smaller C wins) and clean (larger C wins)
        Xtr, ytr, Xte, yte = blobs(rng, n, 4, n_test=60, spread=0.8, noise_dims=noise_dims)
        ours = cv_logistic_probe(Xtr, ytr, Xte, yte, n_classes=3, seed=7)
        search = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=10_000, tol=1e-8)),
            {"logisticregression__C": list(CV_C_GRID)}, scoring="neg_log_loss",
            cv=StratifiedKFold(5, shuffle=True, random_state=7)).fit(Xtr, ytr)
        assert ours.row["logreg_C"] == search.best_params_["logisticregression__C"]
        assert ours.row["cv_score"] == pytest.approx(search.best_score_, abs=1e-4)
        assert ours.row["cohen_kappa"] == pytest.approx(cohen_kappa_score(yte, ours.predictions), abs=1e-12)
        chosen.append(ours.row["logreg_C"])
    assert chosen[0] < chosen[1]  # the choice follows the data
    assert ours.row["protocol"] == "heldout_cv" and ours.row["evaluated_on"] == "test"


def test_cv_probe_at_the_chosen_C_equals_the_plain_heldout_probe(rng):
    Xtr, ytr, Xte, yte = blobs(rng, 200, 6, n_test=80)
    cv = cv_logistic_probe(Xtr, ytr, Xte, yte, n_classes=3, Cs=[0.5])
    plain = heldout_probe(Xtr, ytr, Xte, yte, n_classes=3, C=0.5)
    assert cv.row["accuracy"] == pytest.approx(plain["accuracy"])
    assert cv.row["kappa_chance"] == pytest.approx(plain["kappa"])  # the earlier kappa, renamed


def test_cv_probe_names_bad_settings(rng):
    Xtr, ytr, _, _ = blobs(rng, 60, 3)
    with pytest.raises(ValueError, match="Cs must be positive"):
        cv_logistic_probe(Xtr, ytr, Xtr, ytr, n_classes=3, Cs=[0.0, 1.0])
    with pytest.raises(ValueError, match="scoring must be one of"):
        cv_logistic_probe(Xtr, ytr, Xtr, ytr, n_classes=3, scoring="f1")
    rare = ytr.copy()
    rare[rare == 2] = 0
    rare[0] = 2  # a single text of class 2
    with pytest.raises(ValueError, match="at least 2 train texts of every class"):
        cv_logistic_probe(Xtr, rare, Xtr, ytr, n_classes=3)
    balanced = cv_logistic_probe(Xtr, ytr, Xtr, ytr, n_classes=3, class_weight="balanced")
    assert balanced.row["class_weight"] == "balanced"
