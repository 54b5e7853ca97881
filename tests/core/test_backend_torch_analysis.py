"""The rest of a unit's analysis on the torch backend (on the CPU here) against the numpy core:
diagnostics, reference-variant intervals, least-squares probes and peers; same numbers to 1e-9 in
float64, batched equal to one at a time, and the device= dispatch with its errors."""

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from ntps_nb import Moments, reference_geometry, synthetic_linear_task  # noqa: E402
from ntps_nb.core import peers, probes  # noqa: E402
from ntps_nb.core.backends import analysis_backend  # noqa: E402
from ntps_nb.core.backends.torch import (  # noqa: E402
    _ascending_solutions,
    _certified_cholesky,
    _perturbed_stack,
    _reference_rows,
    _ReferenceFactor,
    interval_sweep_torch,
    least_squares_predictions_torch,
    ntps_diagnostics_torch,
)
from ntps_nb.core.diagnostics import ReferenceFactorization, _perturb, ntps_diagnostics  # noqa: E402
from ntps_nb.core.intervals import ntps_interval_sweep  # noqa: E402
from ntps_nb.core.moments import one_hot  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402
from tests.core.torch_device import DEVICE  # noqa: E402

#: Agreement with numpy in float64, relative to the largest magnitude of the quantity (>= 1).
AGREEMENT = 1e-9
#: Agreement of the float32 reference variant where it is well-posed.
FLOAT32_AGREEMENT = 1e-3
#: Interval replicates in blocks against one at a time: the combining product (shares x stacked
#: shards) sums in another order for another block size; nothing else differs.
BATCH_AGREEMENT = 1e-12


def assert_frames_agree(got: pd.DataFrame, want: pd.DataFrame, tol: float = AGREEMENT, exact: bool = False):
    assert list(got.columns) == list(want.columns) and got.shape == want.shape
    for column in want.columns:
        numeric = want[column].dtype.kind in "fiub" or str(want[column].dtype) == "Int64"
        if not numeric:
            assert list(got[column]) == list(want[column]), column
            continue
        a = got[column].to_numpy(dtype=np.float64, na_value=np.nan)
        b = want[column].to_numpy(dtype=np.float64, na_value=np.nan)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        finite = ~np.isnan(b)
        if exact:
            assert np.array_equal(a[finite], b[finite]), column
        else:
            scale = max(1.0, float(np.abs(b[finite]).max(initial=0.0)))
            assert np.abs(a[finite] - b[finite]).max(initial=0.0) <= tol * scale, column


def labelled_moments(seed: int, *, n: int = 240, d: int = 10, n_classes: int = 4, centred: bool = False):
    """Moments whose perception side comes from features and labels (for the label null)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    labels[:n_classes] = np.arange(n_classes)
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + one_hot(labels, n_classes) @ rng.standard_normal(
        (n_classes, d))
    Y = one_hot(labels, n_classes)
    A = rng.standard_normal((d, d))
    m = Moments(Sxx=X.T @ X / n, Sxy=X.T @ Y / n, Syy=Y.T @ Y / n, C0=A @ A.T / d + 0.1 * np.eye(d),
                C1=rng.standard_normal((d, d)), n_texts=n, n_tokens=10 * n, x_mean=X.mean(axis=0))
    return (m.centred() if centred else m), X, labels


DIAGNOSTIC_OPTIONS = dict(k=[1, 2, 4, 8], n_perturb=4, n_permutations=12, seed=3)
BOTH_VARIANTS = dict(variant=["theory", "reference"], fraction=[0.2, 0.5, 0.9])


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_theory_diagnostics_equal_numpy(seed, centred):
    m, X, y = labelled_moments(seed, centred=centred)
    want = ntps_diagnostics(m, X, y, model="m", layer=2, **DIAGNOSTIC_OPTIONS)
    assert_frames_agree(ntps_diagnostics(m, X, y, model="m", layer=2, device=DEVICE, **DIAGNOSTIC_OPTIONS), want)
    # no features: perturbations only
    options = {**DIAGNOSTIC_OPTIONS, "n_permutations": 0}
    assert_frames_agree(ntps_diagnostics(m, device=DEVICE, **options), ntps_diagnostics(m, **options))


def test_reference_diagnostics_equal_numpy_where_well_posed():
    m, X, y = labelled_moments(2, d=8, n_classes=12)  # C >= d: U has no arbitrary null-space columns
    options = {**DIAGNOSTIC_OPTIONS, **BOTH_VARIANTS}
    got, want = ntps_diagnostics(m, X, y, device=DEVICE, **options), ntps_diagnostics(m, X, y, **options)
    theory = got["variant"] == "theory"
    assert_frames_agree(got[theory], want[theory])
    assert_frames_agree(got, want, tol=FLOAT32_AGREEMENT)


def test_reference_null_and_perturbations_equal_numpy_in_float64():
    m, X, y = labelled_moments(3, d=8, n_classes=12)
    fractions = np.array([0.25, 0.5, 0.75])
    rng = np.random.default_rng(0)
    permuted = [m.with_labels(X.T @ one_hot(y[rng.permutation(y.size)], 12) / y.size, m.Syy) for _ in range(3)]
    factor = _ReferenceFactor.of(m, precision="float64", tol=1e-8, span_rtol=1e-9, device=torch.device(DEVICE))
    got = factor.values(torch.from_numpy(np.stack([p.Sxy for p in permuted])).to(DEVICE), fractions)
    numpy_factor = ReferenceFactorization.from_moments(m, precision="float64")
    want = np.array([[numpy_factor.geometry(p).ntps(f) for f in fractions] for p in permuted])
    assert np.abs(got - want).max() <= AGREEMENT
    copies = [_perturb(m, 1e-6, rng) for _ in range(3)]
    arrays = _perturbed_stack(copies, torch.float64, torch.device(DEVICE))
    got, outcome = _reference_rows(arrays["Sxx"], arrays["Sxy"], arrays["C0"], arrays["C1"], np.ones(3, bool),
                                   fractions, precision="float64", tol=1e-8, span_rtol=1e-9)
    geometries = [reference_geometry(c, precision="float64") for c in copies]
    assert outcome == [(g.r_U, g.r_V) for g in geometries]
    assert np.abs(got - np.array([[g.ntps(f) for f in fractions] for g in geometries])).max() <= AGREEMENT


def test_cholesky_whitening_gives_the_eigh_whitening_solutions_and_keeps_the_batch_order():
    # (A, B) pairs with a full-rank B (Cholesky-whitened), a rank-deficient B (certification fails:
    # eigh on its range, as without the option) and another full-rank one, in that order; A has
    # distinct eigenvalues, so the B-orthonormal eigenvectors are unique up to sign
    rng = np.random.default_rng(7)
    d = 9
    Bs, As = [], []
    for rank in (d, d - 3, d):
        F = rng.standard_normal((d, rank))
        Bs.append(F @ F.T / rank + (0.1 * np.eye(d) if rank == d else 0.0))
        G = rng.standard_normal((d, d))
        As.append(G @ G.T)
    B, A = torch.from_numpy(np.stack(Bs)), torch.from_numpy(np.stack(As))
    _, certified = _certified_cholesky(B, 1e-8, RANGE_RTOL)
    assert certified.tolist() == [True, False, True]  # both paths are exercised
    plain = _ascending_solutions(B, A, 1e-8)
    whitened = _ascending_solutions(B, A, 1e-8, cholesky=True)
    assert [x.shape for x in whitened] == [x.shape for x in plain] == [(d, d), (d, d - 3), (d, d)]
    for i in range(3):  # element 1 takes the eigh path in both calls (batched apart: equal to rounding)
        X, want = whitened[i].numpy(), plain[i].numpy()
        assert np.abs(X.T @ Bs[i] @ X - np.eye(X.shape[1])).max() <= AGREEMENT * d
        signs = np.sign(np.sum(X * want, axis=0))
        assert np.abs(X * signs - want).max() <= AGREEMENT * max(1.0, np.abs(want).max())


def test_batched_diagnostics_equal_one_at_a_time():
    m, X, y = labelled_moments(4)
    options = {**DIAGNOSTIC_OPTIONS, **BOTH_VARIANTS}
    one = ntps_diagnostics_torch(m, X, y, batch_size=1, **options)
    assert_frames_agree(ntps_diagnostics_torch(m, X, y, batch_size=64, **options), one, exact=True)
    assert_frames_agree(ntps_diagnostics_torch(m, X, y, batch_size=3, **options), one, exact=True)


def test_diagnostics_dispatch_and_errors():
    m, X, y = labelled_moments(5)
    with pytest.raises(ValueError, match="plug-in"):
        ntps_diagnostics_torch(m, X, y, estimator="wishart")
    for call in (lambda device: ntps_diagnostics(m, X, y, device=device),
                 lambda device: ntps_diagnostics_torch(m, X, y, device=device)):
        with pytest.raises(ValueError, match="device"):
            call("gpu")
    with pytest.raises(ValueError, match="n_permutations"):  # the numpy function's checks, in its order
        ntps_diagnostics(m, device=DEVICE)
    with pytest.raises(ValueError, match="do not reproduce"):
        ntps_diagnostics(m, X[:, ::-1], y, device=DEVICE)
    assert_frames_agree(ntps_diagnostics(m, X, y, device="cpu-numpy", n_perturb=2, n_permutations=3),
                        ntps_diagnostics(m, X, y, n_perturb=2, n_permutations=3), exact=True)


def test_bad_device_strings_raise_clear_errors():
    assert analysis_backend(None) is None and analysis_backend("cpu-numpy") is None
    assert analysis_backend(DEVICE).__name__ == "ntps_nb.core.backends.torch"
    for bad, message in (("gpu", "torch device name"), ("", "torch device name"), (3.5, "torch device name"),
                         ("meta", "cpu or cuda")):
        with pytest.raises(ValueError, match=message):
            analysis_backend(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            analysis_backend("cuda")
        with pytest.raises(ValueError, match="no CUDA device"):
            peers.h_score(np.eye(4), [0, 1, 0, 1], device="cuda:0")


# --- reference-variant intervals -------------------------------------------------------------------

@pytest.fixture(scope="module")
def well_posed_shards():
    """Shards of data with C >= d, where the reference variant is well-posed."""
    shards = []
    for seed in range(5):
        m, _, _ = labelled_moments(10 + seed, n=80, d=8, n_classes=12)
        shards.append(m)
    return shards


def test_reference_interval_sweep_equals_numpy(well_posed_shards):
    options = dict(variant="reference", n_boot=12, seed=2, fractions=np.array([0.25, 0.5, 0.75]))
    assert_frames_agree(interval_sweep_torch(well_posed_shards, precision="float64", **options),
                        ntps_interval_sweep(well_posed_shards, precision="float64", **options))
    assert_frames_agree(interval_sweep_torch(well_posed_shards, **options),
                        ntps_interval_sweep(well_posed_shards, **options), tol=FLOAT32_AGREEMENT)
    one = interval_sweep_torch(well_posed_shards, precision="float64", batch_size=1, **options)
    assert_frames_agree(interval_sweep_torch(well_posed_shards, precision="float64", batch_size=7, **options), one,
                        tol=BATCH_AGREEMENT)
    with pytest.raises(ValueError, match="uncentred"):
        interval_sweep_torch(well_posed_shards, variant="reference", centred=True, n_boot=2)
    with pytest.raises(ValueError, match="fractions"):
        interval_sweep_torch(well_posed_shards, fractions=np.array([0.5]), n_boot=2)


# --- probes ----------------------------------------------------------------------------------------

PROBE_SHAPES = {"N > d": dict(n=90, m=40, d=12), "d > N": dict(n=30, m=20, d=45)}


@pytest.mark.parametrize("ridge", [1.0, 0.0])
@pytest.mark.parametrize("shape", PROBE_SHAPES.values(), ids=PROBE_SHAPES.keys())
def test_probe_layers_least_squares_equal_sklearn(shape, ridge):
    rng = np.random.default_rng(6)
    n, m, d = shape["n"], shape["m"], shape["d"]
    y_train, y_test = rng.integers(0, 3, n), rng.integers(0, 3, m)
    y_train[:3] = np.arange(3)
    features = {layer: ((rng.standard_normal((n, d)) * (layer + 1) + 5.0).astype(np.float32),
                        rng.standard_normal((m, d)).astype(np.float32)) for layer in range(3)}
    features[1][0][:, 2] = 7.0  # a constant feature: StandardScaler's scale 1
    options = dict(n_classes=3, protocol=["heldout", "paper_in_sample"], ridge=ridge, model="x")
    want = probes.probe_layers(features, y_train, y_test, **options)
    got = probes.probe_layers(features, y_train, y_test, device=DEVICE, **options)
    # the held-out logistic probe is fitted by another solver on the device (its own test file
    # checks it against sklearn): it names itself and counts its own iterations
    heldout = (want["protocol"] == "heldout").to_numpy()
    assert list(got["solver"]) == ["torch-newton-cg" if h else "saga" for h in heldout]
    assert list(want["solver"]) == ["lbfgs" if h else "saga" for h in heldout]
    assert np.array_equal(got["n_iter"][~heldout], want["n_iter"][~heldout])
    assert_frames_agree(got.drop(columns=["solver", "n_iter"]), want.drop(columns=["solver", "n_iter"]))
    row = probes.heldout_probe(features[2][0], y_train, features[2][1], y_test, ridge=ridge, n_classes=3, device=DEVICE)
    assert abs(row["mse"] - want.query("layer == 2 and protocol == 'heldout'")["mse"].item()) <= AGREEMENT


def test_least_squares_batched_over_layers_equal_one_at_a_time():
    rng = np.random.default_rng(7)
    train = [rng.standard_normal((25, 6)) for _ in range(4)]
    test = [rng.standard_normal((9, 6)) for _ in range(4)]
    Y = one_hot(rng.integers(0, 3, 25), 3)
    for ridge in (0.5, 0.0):
        batched = least_squares_predictions_torch(train, Y, test, ridge=ridge, batch_size=4)
        for i in range(4):
            (alone,) = least_squares_predictions_torch([train[i]], Y, [test[i]], ridge=ridge)
            assert np.array_equal(batched[i], alone)
    with pytest.raises(ValueError, match="ridge"):
        least_squares_predictions_torch(train, Y, test, ridge=-1.0)


# --- peers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(150, 12), (40, 60)], ids=["N > d", "d > N"])
def test_peers_on_torch_equal_numpy(shape):
    n, d = shape
    rng = np.random.default_rng(8)
    y = rng.integers(0, 4, n)
    y[:4] = np.arange(4)
    X = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + one_hot(y, 4) @ rng.standard_normal((4, d))
    for name in peers.DEVICE_PEERS:
        want = peers.PEERS[name](X, y)
        assert abs(peers.PEERS[name](X, y, device=DEVICE) - want) <= AGREEMENT * max(1.0, abs(want)), name
    assert_frames_agree(peers.logme_per_class(X, y, device=DEVICE), peers.logme_per_class(X, y))
    assert abs(peers.h_score_ledoit_wolf(X, y, scale_between=False, device=DEVICE)
               - peers.h_score_ledoit_wolf(X, y, scale_between=False)) <= AGREEMENT
    got, want = peers.peer_scores(X, y, device=DEVICE, layer=3), peers.peer_scores(X, y, layer=3)
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) <= AGREEMENT * max(1.0, abs(want[k])) for k in peers.PEERS)


def test_pca_overlap_control_on_torch_equals_numpy():
    task = synthetic_linear_task(n_texts=300, seed=1)
    m = task.moments
    assert m.Shh is not None
    assert_frames_agree(peers.pca_overlap_sweep(m, device=DEVICE), peers.pca_overlap_sweep(m))
    assert abs(peers.pca_overlap_ntps(m, 3, device=DEVICE) - peers.pca_overlap_ntps(m, 3)) <= AGREEMENT
