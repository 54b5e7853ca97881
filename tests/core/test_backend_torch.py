"""The torch backend (on the CPU here) against the numpy core: same numbers to 1e-9 in float64,
and batched replicates equal to one-at-a-time replicates."""

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from ntps_nb import Moments, generalized_eigh, ntps_sweep, split_into_shards, synthetic_linear_task  # noqa: E402
from ntps_nb.core.backends.torch import (  # noqa: E402
    _projected,
    generalized_eigh_torch,
    interval_replicates_torch,
    interval_sweep_torch,
    ntps_sweep_torch,
    reference_geometry_torch,
    theory_geometry_torch,
    theory_sweep_torch,
)
from ntps_nb.core.intervals import ShardStack, _Curve, _evaluate, bootstrap_counts, ntps_interval_sweep  # noqa: E402
from ntps_nb.core.score import theory_geometry  # noqa: E402
from ntps_nb.core.subspaces import nested_orthonormal_basis  # noqa: E402
from tests.core.fresh import run_fresh  # noqa: E402
from tests.core.torch_device import DEVICE  # noqa: E402

#: Agreement with numpy, relative to the largest magnitude of the quantity compared (float64).
AGREEMENT = 1e-9
#: Batched against one-at-a-time replicates: only the summation order of the combining product differs.
BATCH_AGREEMENT = 1e-12
#: Agreement of the float32 reference variant: float32 eigenvectors, NTPS values of order 1.
FLOAT32_AGREEMENT = 1e-3
SEEDS = (0, 1, 2)


def spd(rng, d, rank=None):
    A = rng.standard_normal((d, rank or d))
    return A @ A.T / d + (1e-2 * np.eye(d) if rank is None else 0.0)


def moments(rng, d, n_classes=5, rank_Sxx=None, rank_C0=None, x_mean=False):
    """Random valid moments; Sxx and C0 of the given rank (full by default), Sxy inside the range of Sxx."""
    Sxx = spd(rng, d, rank_Sxx)
    # labels carry signal only inside the range of Sxx, as for moments of data
    Sxy = Sxx @ rng.standard_normal((d, n_classes)) / d
    freqs = rng.dirichlet(np.ones(n_classes))
    return Moments(Sxx=Sxx, Sxy=Sxy, Syy=np.diag(freqs), C0=spd(rng, d, rank_C0), C1=rng.standard_normal((d, d)),
                   n_texts=100, n_tokens=1000, x_mean=rng.standard_normal(d) * 0.1 if x_mean else None)


def assert_frames_agree(got: pd.DataFrame, want: pd.DataFrame, tol: float = AGREEMENT):
    assert list(got.columns) == list(want.columns) and got.shape == want.shape
    for column in want.columns:
        a, b = got[column].to_numpy(), want[column].to_numpy()
        if want[column].dtype.kind in "fiu" and got[column].dtype.kind in "fiu":
            a, b = a.astype(np.float64), b.astype(np.float64)
            assert np.array_equal(np.isnan(a), np.isnan(b)), column
            finite = ~np.isnan(b)
            scale = max(1.0, float(np.abs(b[finite]).max(initial=0.0)))
            assert np.abs(a[finite] - b[finite]).max(initial=0.0) <= tol * scale, column
        else:
            assert list(a) == list(b), column


CASES = {
    "full rank, d=16": dict(d=16),
    "full rank, d=48": dict(d=48),
    "Sxx rank-deficient (r_V > r_U)": dict(d=32, rank_Sxx=24),
    "C0 rank-deficient (r_V < r_U)": dict(d=32, rank_C0=20),
    "both rank-deficient": dict(d=40, rank_Sxx=30, rank_C0=33),
    "C >= r_U": dict(d=16, rank_Sxx=4, n_classes=6),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_theory_sweep_equals_numpy(case, seed):
    m = moments(np.random.default_rng(seed), **case)
    want = ntps_sweep(m, variant="theory")
    got = theory_sweep_torch(m, device=DEVICE)
    assert_frames_agree(got, want)
    geometry, reference = theory_geometry_torch(m), theory_geometry(m)
    assert (geometry.r_U, geometry.r_V, geometry.m) == (reference.r_U, reference.r_V, reference.m)
    if "rank_Sxx" in case:
        assert geometry.r_U == case["rank_Sxx"]


@pytest.mark.parametrize("seed", SEEDS)
def test_centred_theory_sweep_equals_numpy(seed):
    m = moments(np.random.default_rng(seed), 24, x_mean=True)
    assert_frames_agree(theory_sweep_torch(m, centred=True), ntps_sweep(m, centred=True))


def test_undefined_geometry_raises_as_numpy_does():
    rng = np.random.default_rng(0)
    m = moments(rng, 12)
    no_signal = m.with_labels(np.zeros_like(m.Sxy), m.Syy)
    with pytest.raises(ValueError, match="Sxy is zero"):
        theory_sweep_torch(no_signal)
    one_class = m.with_labels(m.Sxy, np.diag([1.0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="1 class"):
        theory_sweep_torch(one_class)
    with pytest.raises(ValueError, match="device"):
        theory_sweep_torch(m, device="no-such-device")


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_sweep_equals_numpy_where_it_is_well_posed(seed):
    # C >= d: Sxy Sxy^T has full rank, so U has no arbitrary null-space columns
    m = moments(np.random.default_rng(seed), 12, n_classes=16)
    assert_frames_agree(ntps_sweep_torch(m, variant="reference", precision="float64"),
                        ntps_sweep(m, variant="reference", precision="float64"))
    assert_frames_agree(ntps_sweep_torch(m, variant="reference"), ntps_sweep(m, variant="reference"),
                        tol=FLOAT32_AGREEMENT)
    geometry = reference_geometry_torch(m)
    assert geometry.U.dtype == np.float32 and geometry.precision == "float32"


def test_ill_posed_reference_sweep_has_the_numpy_ranks_and_counts():
    m = moments(np.random.default_rng(6), 24, rank_Sxx=20)  # C = 5 < r_U = 20: U's first columns are arbitrary
    got, want = ntps_sweep_torch(m, variant="reference"), ntps_sweep(m, variant="reference")
    for column in ("fraction", "k_U", "k_V", "r_U", "r_V", "precision"):
        assert list(got[column]) == list(want[column])
    assert got["ntps"].between(0, 1 + FLOAT32_AGREEMENT).all()


def test_reference_sweep_reads_only_the_fractions_off_the_device_and_equals_the_geometrys_sweep():
    """The reference sweep computes its NTPS at the fractions on the device (U, V and the projection
    table stay there); its frame equals `ReferenceGeometry.sweep` of the same device solve, columns
    and dtypes included, well-posed or not, with fractions selecting no column giving NaN."""
    fractions = np.array([0.01, 0.1, 0.3, 0.95])
    for m in (moments(np.random.default_rng(9), 12, n_classes=16), moments(np.random.default_rng(6), 24, rank_Sxx=20)):
        for precision in ("float32", "float64"):
            got = ntps_sweep_torch(m, variant="reference", precision=precision, fractions=fractions)
            want = reference_geometry_torch(m, precision=precision).sweep(fractions).assign(estimator="plugin")
            pd.testing.assert_frame_equal(got.drop(columns="ntps"), want.drop(columns="ntps"))
            np.testing.assert_allclose(got["ntps"], want["ntps"], rtol=0, atol=1e-12)
            assert np.isnan(got["ntps"].iloc[0]) and got["ntps"].iloc[1:].notna().all()


def test_sweep_dispatch_and_its_errors():
    m = moments(np.random.default_rng(7), 16, n_classes=20)  # well-posed reference variant (C >= d)
    assert_frames_agree(ntps_sweep_torch(m), ntps_sweep(m))
    fractions = np.array([0.25, 0.5])
    assert_frames_agree(ntps_sweep_torch(m, variant="reference", fractions=fractions, precision="float64"),
                        ntps_sweep(m, variant="reference", fractions=fractions, precision="float64"))
    shards = [m, moments(np.random.default_rng(8), 16, n_classes=20)]
    assert_frames_agree(ntps_sweep_torch(shards), ntps_sweep(shards))  # a shard list is pooled
    with pytest.raises(ValueError, match="plug-in"):
        ntps_sweep_torch(m, estimator="wishart")
    with pytest.raises(ValueError, match="variant"):
        ntps_sweep_torch(m, variant="other")
    with pytest.raises(ValueError, match="uncentred"):
        ntps_sweep_torch(m, variant="reference", centred=True)
    with pytest.raises(ValueError, match="precision"):
        ntps_sweep_torch(m, variant="reference", precision="float16")
    with pytest.raises(ValueError, match="dtype"):
        ntps_sweep_torch(m, dtype=torch.float16)


def same_up_to_sign(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    signs = np.sign(np.sum(a * b, axis=0))
    return np.abs(a * signs - b).max() <= tol * max(1.0, np.abs(b).max())


@pytest.mark.parametrize("order", ["descending", "ascending"])
@pytest.mark.parametrize("seed", SEEDS)
def test_generalized_eigh_equals_numpy_and_batches(order, seed):
    rng = np.random.default_rng(seed)
    d = 20
    Bs = np.stack([spd(rng, d), spd(rng, d, rank=15), spd(rng, d), spd(rng, d, rank=15)])
    Fs = rng.standard_normal((4, d, d))  # full-rank A: distinct eigenvalues, eigenvectors defined up to sign
    batched = generalized_eigh_torch(Bs, A_factor=Fs, order=order)
    for i in range(4):
        want = generalized_eigh(Bs[i], A_factor=Fs[i], order=order)
        for got in (batched[i].to_numpy(), generalized_eigh_torch(Bs[i], A_factor=Fs[i], order=order).to_numpy(),
                    generalized_eigh_torch(Bs[i], A=Fs[i] @ Fs[i].T, order=order).to_numpy()):
            assert (got.rank_B, got.rank_A, got.order) == (want.rank_B, want.rank_A, want.order)
            scale = np.abs(want.eigenvalues).max()
            assert np.abs(got.eigenvalues - want.eigenvalues).max() <= AGREEMENT * scale
            assert np.abs(got.range_eigenvalues - want.range_eigenvalues).max() <= AGREEMENT * scale
            assert same_up_to_sign(got.vectors, want.vectors, 1e-7)
            assert same_up_to_sign(got.whitened, want.whitened, 1e-7)
            assert np.abs(got.vectors.T @ Bs[i] @ got.vectors - np.eye(got.rank_B)).max() <= AGREEMENT


def test_generalized_eigh_rank_of_a_thin_factor_and_errors():
    rng = np.random.default_rng(4)
    B, F = spd(rng, 12), rng.standard_normal((12, 3))
    got, want = generalized_eigh_torch(B, A_factor=F), generalized_eigh(B, A_factor=F)
    assert got.rank_A == want.rank_A == 3
    with pytest.raises(ValueError, match="no eigenvalue above"):
        generalized_eigh_torch(np.zeros((4, 4)), A_factor=np.ones((4, 1)))
    with pytest.raises(ValueError, match="exactly one"):
        generalized_eigh_torch(B)
    with pytest.raises(ValueError, match="order"):
        generalized_eigh_torch(B, A_factor=F, order="up")
    with pytest.raises(ValueError, match="shape mismatch"):
        generalized_eigh_torch(B, A_factor=F[:5])


def test_rank_deficient_spans_take_the_numpy_nested_basis():
    rng = np.random.default_rng(5)
    v = rng.standard_normal((10, 8))
    v[:, 3] = v[:, 0] - 2 * v[:, 1]  # adds no direction
    v[:, 5] = 0.0
    u = rng.standard_normal((10, 3))
    got = _projected(torch.from_numpy(v)[None], torch.from_numpy(u)[None], 1e-9)[0]
    basis, counts = nested_orthonormal_basis(v, rtol=1e-9)
    table = np.cumsum((basis.T @ u) ** 2, axis=0)
    assert list(counts) == [1, 2, 3, 3, 4, 4, 5, 6]
    assert np.abs(got - np.clip(table[counts - 1], 0, 1)).max() <= AGREEMENT


@pytest.fixture(scope="module")
def task_shards():
    return split_into_shards(synthetic_linear_task(n_texts=600, angle=np.pi / 4, seed=3), 12, seed=0)


def random_shards(seed, d=20, n_shards=6, **kwargs):
    rng = np.random.default_rng(seed)
    return [moments(rng, d, **kwargs) for _ in range(n_shards)]


@pytest.mark.parametrize("statistic", ["ntps", "excess_loss"])
@pytest.mark.parametrize("method", ["basic", "bca"])
def test_interval_sweep_equals_numpy(task_shards, statistic, method):
    options = dict(statistic=statistic, n_boot=30, seed=7, method=method)
    assert_frames_agree(interval_sweep_torch(task_shards, **options), ntps_interval_sweep(task_shards, **options))


@pytest.mark.parametrize("seed", SEEDS)
def test_interval_sweep_equals_numpy_on_random_and_rank_deficient_shards(seed):
    for shards in (random_shards(seed), random_shards(seed, d=24, rank_Sxx=18, rank_C0=20)):
        assert_frames_agree(interval_sweep_torch(shards, n_boot=15, seed=seed),
                            ntps_interval_sweep(shards, n_boot=15, seed=seed))


def test_centred_interval_sweep_equals_numpy():
    shards = random_shards(3, x_mean=True)
    assert_frames_agree(interval_sweep_torch(shards, n_boot=10, centred=True),
                        ntps_interval_sweep(shards, n_boot=10, centred=True))


def test_batched_replicates_equal_one_at_a_time_and_numpy(task_shards):
    counts = np.vstack([bootstrap_counts(len(task_shards), 25, 1), 1.0 - np.eye(len(task_shards))])
    ks = np.arange(1, 40)
    one, failed_one = interval_replicates_torch(task_shards, counts, ks, batch_size=1)
    many, failed_many = interval_replicates_torch(task_shards, counts, ks, batch_size=16)
    assert failed_one == failed_many == 0
    assert np.array_equal(np.isnan(one), np.isnan(many)) and np.isnan(one).any()  # r_V < 39 somewhere
    finite = np.isfinite(one)
    assert np.abs(one[finite] - many[finite]).max() <= BATCH_AGREEMENT
    stack = ShardStack(task_shards)
    want, failed = _evaluate(_Curve("ntps", "theory", ks=ks), stack.combined(counts), counts.shape[0], ks.size)
    assert failed == 0 and np.array_equal(np.isnan(want), np.isnan(one))
    assert np.abs(one[finite] - want[finite]).max() <= AGREEMENT


def test_undefined_replicates_are_nan_rows_and_counted_as_numpy_does():
    rng = np.random.default_rng(8)
    shards = [moments(rng, 10) for _ in range(4)]
    # shard 0 alone holds only class 0: a replicate made of it alone has one class
    shards[0] = shards[0].with_labels(shards[0].Sxy, np.diag([1.0, 0, 0, 0, 0]))
    counts = np.array([[4, 0, 0, 0], [1, 1, 1, 1], [0, 2, 2, 0]], dtype=float)
    ks = np.arange(1, 11)
    got, failed = interval_replicates_torch(shards, counts, ks)
    want, failed_numpy = _evaluate(_Curve("ntps", "theory", ks=ks), ShardStack(shards).combined(counts), 3, ks.size)
    assert failed == failed_numpy == 1 and np.isnan(got[0]).all() and np.isfinite(got[1:]).all()
    assert np.abs(got[1:] - want[1:]).max() <= AGREEMENT


def test_interval_sweep_rejects_what_numpy_rejects(task_shards):
    with pytest.raises(ValueError, match="n_boot"):
        interval_sweep_torch(task_shards, n_boot=0)
    with pytest.raises(ValueError, match="precision"):
        interval_sweep_torch(task_shards, variant="reference", precision="float16")
    with pytest.raises(ValueError, match="at least 2"):
        interval_sweep_torch(task_shards[:1])
    with pytest.raises(ValueError, match="x_mean"):
        interval_sweep_torch(random_shards(0), centred=True)
    # the torch backend computes the plug-in only; another estimator is named and sent to numpy
    with pytest.raises(ValueError, match=r"plug-in estimator only \(estimator='plugin'\), got "
                                         r"estimator='adjusted'; use ntps_nb.core.intervals.ntps_interval_sweep"):
        interval_sweep_torch(task_shards, n_boot=5, estimator="adjusted")
    assert (interval_sweep_torch(task_shards, n_boot=5, estimator="plugin")["estimator"] == "plugin").all()
    with pytest.raises(ValueError, match="batch_size"):
        interval_sweep_torch(task_shards, n_boot=2, batch_size=0)


# --------------------------------------------------------------------------------------------
# Whitening by certified Cholesky factors (the fast path of full-rank replicates)


def _stacked(ms):
    names = ("Sxx", "Sxy", "Syy", "C0", "C1")
    return [torch.as_tensor(np.stack([getattr(m, n) for m in ms]), dtype=torch.float64) for n in names]


def _solve(ms, whitening):
    from ntps_nb.core.backends.torch import _grouped_geometries

    geometries, _ = _grouped_geometries(*_stacked(ms), np.array([m.n_tokens for m in ms]), np.ones(len(ms), bool),
                                        tol=None, rtol=1e-10, span_rtol=1e-10, whitening=whitening)
    return geometries


def test_cholesky_whitening_equals_eigh_whitening_and_numpy():
    rng = np.random.default_rng(7)
    # full rank, full rank with a condition number near 1e6, and two rank-deficient ones (Sxx, C0)
    ms = [moments(rng, 24), moments(rng, 24), moments(rng, 24, rank_Sxx=15), moments(rng, 24, rank_C0=18)]
    w, Q = np.linalg.eigh(ms[1].Sxx)
    ill = (Q * np.geomspace(1e-6, 1.0, 24)) @ Q.T * w.max()
    ms[1] = Moments(Sxx=ill, Sxy=ill @ rng.standard_normal((24, 5)) / 24, Syy=ms[1].Syy, C0=ms[1].C0, C1=ms[1].C1,
                    n_texts=100, n_tokens=1000)
    from ntps_nb.core.backends.torch import _certified_cholesky

    _, ok_U = _certified_cholesky(_stacked(ms)[0], None, 1e-10)
    _, ok_V = _certified_cholesky(_stacked(ms)[3], None, 1e-10)
    assert ok_U.tolist() == [True, True, False, True] and ok_V.tolist() == [True, True, True, False]
    fast, slow = _solve(ms, "auto"), _solve(ms, "eigh")
    for f, s, m in zip(fast, slow, ms):
        want = theory_geometry(m)
        assert (f.r_U, f.r_V) == (s.r_U, s.r_V) == (want.r_U, want.r_V)
        for got in (f, s):
            assert np.abs(got.eigenvalues - want.eigenvalues).max() <= AGREEMENT * want.eigenvalues.max()
            assert np.abs(got.projected - want.projected).max() <= AGREEMENT
    # each side is whitened on its own: the full-rank C0 of element 2 and Sxx of element 3 by Cholesky
    assert not np.array_equal(fast[2].projected, slow[2].projected)


def test_cholesky_certificate_never_claims_a_rank_eigh_would_not_find():
    """Along a ladder of smallest eigenvalues around the range threshold (rtol x the largest),
    the certificate holds only where eigh keeps all d eigenvalues, and holds well above it."""
    from ntps_nb.core.backends.torch import _certified_cholesky, _eigh_range

    rng = np.random.default_rng(3)
    d, rtol = 30, 1e-10
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    ratios = np.geomspace(1e-13, 1e-6, 36)  # smallest / largest eigenvalue
    B = np.stack([(Q * np.concatenate([[r], np.geomspace(1e-3, 1.0, d - 1)])) @ Q.T for r in ratios])
    Bt = torch.as_tensor(B)
    _, ok = _certified_cholesky(Bt, None, rtol)
    _, _, _, rank = _eigh_range(Bt, None, rtol)
    ok, full = ok.numpy(), rank.numpy() == d
    assert not np.any(ok & ~full)
    assert ok[ratios >= 1e-8].all() and not ok[ratios <= 1e-10].any()
    # an absolute tolerance: the same rule against tol
    _, ok_tol = _certified_cholesky(Bt, 1e-7, rtol)
    ok_tol = ok_tol.numpy()
    assert not np.any(ok_tol & (ratios <= 1e-7)) and ok_tol[ratios >= 2e-7].all()


def test_replicates_of_fewer_texts_than_dimensions_are_whitened_inside_the_shards_range(monkeypatch):
    """30 texts in 6 shards at d = 64: every combination's Sxx lies in the 30-dimensional range of
    the pooled Sxx, so the replicates' whitening is an eigensolve of size 30. At k >= m (U is all m
    label directions, whatever the order of its eigenvalues: with fewer texts than dimensions they
    are the class counts, which replicates often tie) the intervals and the estimate frame equal
    numpy's, through the restriction and through the whole-space fallback alike."""
    from ntps_nb.core.backends import torch as backend
    from ntps_nb.core.estimators import ntps_estimate
    from ntps_nb.core.simulate import factor_model, sample_shards

    shards = sample_shards(factor_model(d=64, n_classes=3, gap="separated", seed=0), 30, 6, np.random.default_rng(0))
    stack = backend.TorchShardStack(shards, centred=False, dtype=torch.float64, device=torch.device(DEVICE))
    R, R_perp = stack.range_basis()
    assert R.shape == (64, 30) and R_perp.shape == (64, 34)
    assert backend.TorchShardStack(shards, centred=False, dtype=torch.float32,
                                   device=torch.device(DEVICE)).range_basis() is None  # float32: whole space
    assert np.abs((R.mT @ R_perp).cpu().numpy()).max() <= AGREEMENT
    want = ntps_interval_sweep(shards, n_boot=20, seed=1)
    ks = np.array([3, 4, 8, 16, 40])
    want_estimate = ntps_estimate(shards, ks)
    at_m = (want["k_U"] == want["m"]).to_numpy()
    sizes = []
    original = backend._eigh_range

    def recorded(B, tol, rtol):
        sizes.append(B.shape[-1])
        return original(B, tol, rtol)

    monkeypatch.setattr(backend, "_eigh_range", recorded)
    for safety in (backend.RANGE_BASIS_SAFETY, -1.0):  # -1: no block passes the check, all fall back
        monkeypatch.setattr(backend, "RANGE_BASIS_SAFETY", safety)
        sizes.clear()
        assert_frames_agree(interval_sweep_torch(shards, n_boot=20, seed=1)[at_m], want[at_m])
        assert_frames_agree(ntps_estimate(shards, ks, device=DEVICE), want_estimate)
        assert 30 in sizes and (64 in sizes) == (safety < 0)  # the whole space only where the check fails
    # centred: the pooled range loses the mean's direction (29 dimensions), the replicates stay inside it
    monkeypatch.undo()
    centred = backend.TorchShardStack(shards, centred=True, dtype=torch.float64, device=torch.device(DEVICE))
    assert centred.range_basis()[0].shape == (64, 29)
    want = ntps_interval_sweep(shards, n_boot=20, seed=1, centred=True)
    at_m = (want["k_U"] == want["m"]).to_numpy()
    monkeypatch.setattr(backend, "_eigh_range", recorded)
    sizes.clear()
    assert_frames_agree(interval_sweep_torch(shards, n_boot=20, seed=1, centred=True)[at_m], want[at_m])
    assert 29 in sizes and 64 not in sizes


@pytest.mark.parametrize("estimator", ["plugin", "richardson"])
def test_the_torch_sweeps_warn_of_interpolation_as_numpy_does(estimator):
    """Fewer texts than the rank of Sxx: the torch sweep says what `ntps_sweep` says, word for word (a study
    on a GPU had said nothing)."""
    import warnings

    from ntps_nb.core.moments import moments_from_sequences
    from ntps_nb.core.score import InterpolationWarning

    rng = np.random.default_rng(3)
    texts = [rng.standard_normal((int(rng.integers(3, 7)), 24)) for _ in range(16)]  # 16 texts in d = 24
    labels = np.arange(16) % 3
    shards = [moments_from_sequences(texts[i::4], labels[i::4], 3) for i in range(4)]
    said = {}
    for name, sweep in (("numpy", ntps_sweep), ("torch", ntps_sweep_torch)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sweep(shards, variant="theory", estimator=estimator)
        said[name] = [str(w.message) for w in caught if issubclass(w.category, InterpolationWarning)]
    assert len(said["numpy"]) == 1 and "16 texts, no more than the rank of Sxx" in said["numpy"][0]
    assert said["torch"] == said["numpy"]


#: The moments the fresh-interpreter warning tests read: next-token eigenvalues tied at k = 5-9 (``tied``), the same
#: with C0 rounded below zero (``noisy``), and 16 texts in d = 24, no more than the rank of Sxx (``few``).
WARNING_SAMPLES = ("from ntps_nb.core.moments import moments_from_sequences\n"
                   "from tests.core.test_score import rounded, token_embedding_moments\n"
                   "tied, _, _ = token_embedding_moments(0, n_texts=240, n_shards=4)\n"
                   "noisy = [rounded(s, 1e-8) for s in tied]\n"
                   "rng = np.random.default_rng(3)\n"
                   "texts = [rng.standard_normal((int(rng.integers(3, 7)), 24)) for _ in range(16)]\n"
                   "few = [moments_from_sequences(texts[i::4], np.arange(16)[i::4] % 3, 3) for i in range(4)]\n")


def test_every_torch_sweep_says_what_ntps_sweep_says_at_the_callers_line():
    """`ntps_sweep_torch` (plug-in and richardson), `theory_sweep_torch`, `richardson_sweep_torch` and `ntps_sweep`
    with a torch device give the warnings `ntps_sweep` gives of the same moments (interpolation, a next-token tie,
    rounded C0), each pointing at the line that called them: `ntps_sweep_torch` had pointed the tie and rounding
    warnings at its own line in the package. Checked in a fresh interpreter (the shape checker's wrappers add frames
    under tests/core)."""
    import ast


    header = ("import warnings\nimport numpy as np\n"
              "from ntps_nb.core.score import ntps_sweep\n"
              "from ntps_nb.core.backends.torch import ntps_sweep_torch, richardson_sweep_torch, theory_sweep_torch\n"
              + WARNING_SAMPLES +
              "said = []\n"
              "for shards in (tied, noisy, few):\n"
              "    with warnings.catch_warnings(record=True) as caught:\n"
              "        warnings.simplefilter('always')\n")
    calls = ["ntps_sweep(shards)", "ntps_sweep_torch(shards)", "theory_sweep_torch(shards)",
             "ntps_sweep(shards, estimator='richardson')", "ntps_sweep_torch(shards, estimator='richardson')",
             "richardson_sweep_torch(shards)", f"ntps_sweep(shards, device={DEVICE!r})",
             f"ntps_sweep(shards, estimator='richardson', device={DEVICE!r})"]
    code = (header + "".join(f"        {call}\n" for call in calls)
            + "    said.append([(w.category.__name__, w.filename, w.lineno) for w in caught "
              "if w.category.__module__.startswith('ntps_nb')])\n"
            + "print(repr(said))\n")
    out = run_fresh(code)
    said = ast.literal_eval(out)  # per moments, the (category, file, line) of each warning
    first = header.count("\n") + 1  # the line of the first call
    lines = {first + i: call for i, call in enumerate(calls)}
    expected = [["NextTokenTieWarning"], ["NextTokenTieWarning", "RoundedMomentsWarning"], ["InterpolationWarning"]]
    for categories, caught in zip(expected, said):
        assert {(name, file) for name, file, _ in caught} == {(name, "<string>") for name in categories}
        for call_line in lines:  # every sweep, numpy's and torch's, says the same at its own line
            assert sorted(name for name, _, line in caught if line == call_line) == sorted(categories), (
                lines[call_line], caught)


def test_ntps_sweep_and_ntps_interval_sweep_solve_on_the_torch_device_they_are_given(task_shards, monkeypatch):
    """``device=`` of the numpy functions hands the call to the torch backend (counted here), whose frames agree
    with numpy's; the estimators the backend does not solve are refused by name, and the warning of undefined
    replicates points at the line that called `ntps_interval_sweep` (a fresh interpreter, as above)."""

    from ntps_nb.core import backends
    from ntps_nb.core.backends import torch as backend
    from ntps_nb.core.intervals import ntps_interval_sweep

    handed = []
    for name in ("ntps_sweep_torch", "interval_sweep_torch"):
        original = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _f=original, _n=name, **kw: handed.append(_n) or _f(*a, **kw))
    assert backends.analysis_backend(DEVICE) is backend
    shards = task_shards
    for estimator in ("plugin", "richardson"):
        assert_frames_agree(ntps_sweep(shards, estimator=estimator, device=DEVICE),
                            ntps_sweep(shards, estimator=estimator))
    for statistic in ("ntps", "excess_loss"):
        assert_frames_agree(ntps_interval_sweep(shards, statistic=statistic, n_boot=12, device=DEVICE),
                            ntps_interval_sweep(shards, statistic=statistic, n_boot=12))
    assert handed == ["ntps_sweep_torch", "ntps_sweep_torch", "interval_sweep_torch", "interval_sweep_torch"]
    with pytest.raises(ValueError, match=f"device={DEVICE!r} solves the plug-in's and richardson's sweeps; "
                                         "estimator='jackknife' runs on the numpy code"):
        ntps_sweep(shards, estimator="jackknife", device=DEVICE)
    with pytest.raises(ValueError,
                       match=f"device={DEVICE!r} solves the plug-in's interval sweep; estimator='richardson'"):
        ntps_interval_sweep(shards, estimator="richardson", n_boot=12, device=DEVICE)
    code = ("import warnings\nimport numpy as np\n"
            "from ntps_nb.core.intervals import ntps_interval_sweep\n"
            "from ntps_nb.core.moments import moments_from_sequences\n"
            "rng = np.random.default_rng(0)\n"
            "texts = [rng.standard_normal((4, 6)) for _ in range(8)]\n"
            "shards = [moments_from_sequences(texts[2 * i:2 * i + 2], [i % 2] * 2, 2) for i in range(4)]\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            f"    ntps_interval_sweep(shards, n_boot=40, device={DEVICE!r}, progress=False)\n"
            "print([(w.filename, w.lineno) for w in caught if 'undefined geometry' in str(w.message)])\n")
    out = run_fresh(code)
    assert out.strip() == "[('<string>', 10)]"  # one warning (some resamples hold one class), at the call's line


def test_the_one_k_functions_solve_on_the_torch_device_they_are_given(task_shards, monkeypatch):
    """``device=`` of `ntps`, `ntps_interval`, `excess_loss_interval`, `ntps_difference` and `width_by_n` hands the
    solves to the torch backend (counted here), whose values, intervals and replicates agree with numpy's; the
    errors are numpy's, and the estimators the backend does not solve are refused by name. Before, these functions
    took no ``device``."""
    from ntps_nb.core.backends import torch as backend
    from ntps_nb.core.intervals import excess_loss_interval, ntps_difference, ntps_interval, width_by_n
    from ntps_nb.core.score import BeyondRankError, ntps

    handed = []
    for name in ("ntps_torch", "interval_replicates_torch"):
        original = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _f=original, _n=name, **kw: handed.append(_n) or _f(*a, **kw))
    shards, other = task_shards, split_into_shards(synthetic_linear_task(n_texts=600, angle=1.0, seed=4), 12, seed=0)
    for options in (dict(k=3), dict(fraction=0.5), dict(k=2, centred=True), dict(k=2, estimator="richardson")):
        assert abs(ntps(shards, device=DEVICE, **options) - ntps(shards, **options)) <= AGREEMENT, options
    assert handed == ["ntps_torch"] * 4

    def agree(got, want):
        g, w = got.as_dict(), want.as_dict()
        assert g.keys() == w.keys()
        for key in w:
            if isinstance(w[key], float) and not isinstance(w[key], bool):
                assert abs(g[key] - w[key]) <= AGREEMENT, key
            else:
                assert g[key] == w[key], key
        assert np.abs(got.replicates - want.replicates).max() <= AGREEMENT

    one = dict(n_boot=20, seed=3, progress=False)
    for options in (dict(k=3), dict(fraction=0.5, method="bca"), dict(k=2, centred=True)):
        agree(ntps_interval(shards, device=DEVICE, **options, **one), ntps_interval(shards, **options, **one))
    agree(excess_loss_interval(shards, k=2, device=DEVICE, **one), excess_loss_interval(shards, k=2, **one))
    for paired in (True, False):
        agree(ntps_difference(shards, other, k=3, paired=paired, device=DEVICE, **one),
              ntps_difference(shards, other, k=3, paired=paired, **one))
    assert_frames_agree(width_by_n(shards, 2, n_groups=3, device=DEVICE, **one),
                        width_by_n(shards, 2, n_groups=3, **one))
    assert handed.count("interval_replicates_torch") == 3 + 1 + 4 + 3  # a side per interval, 3 subsamples

    # the reference variant where it is well-posed (C >= d): float64 exactly, float32 to its precision
    rng = np.random.default_rng(7)
    well_posed = [moments(rng, 16, n_classes=20) for _ in range(4)]
    for precision, tol in (("float64", AGREEMENT), ("float32", FLOAT32_AGREEMENT)):
        options = dict(fraction=0.3, variant="reference", precision=precision)
        assert abs(ntps(well_posed, device=DEVICE, **options) - ntps(well_posed, **options)) <= tol
        got = ntps_interval(well_posed, device=DEVICE, **options, **one)
        want = ntps_interval(well_posed, **options, **one)
        assert abs(got.estimate - want.estimate) <= tol and np.abs(got.replicates - want.replicates).max() <= tol

    with pytest.raises(ValueError, match="the excess-loss identity is about the theory variant"):
        backend.interval_replicates_torch(well_posed, np.ones((1, 4)), variant="reference", statistic="excess_loss")
    for device in (None, DEVICE):  # the same errors on either backend
        with pytest.raises(BeyondRankError, match="k = 99 is beyond the retained rank of C0"):
            ntps(shards, k=99, device=device)
        with pytest.raises(BeyondRankError, match="k = 99 is beyond the retained rank of C0"):
            ntps_interval(shards, k=99, device=device, **one)
        with pytest.raises(ValueError, match="the reference variant takes fraction="):
            ntps(well_posed, k=2, variant="reference", device=device)
        with pytest.raises(ValueError, match="fraction 0.01 selects k_U = 0, k_V = 0 directions"):
            ntps(well_posed, fraction=0.01, variant="reference", device=device)
    with pytest.raises(ValueError, match=f"device={DEVICE!r} solves the plug-in's and richardson's values; "
                                         "estimator='jackknife' runs on the numpy code"):
        ntps(shards, k=2, estimator="jackknife", device=DEVICE)
    for call in (lambda: ntps_interval(shards, k=2, estimator="richardson", device=DEVICE, **one),
                 lambda: width_by_n(shards, 2, n_groups=3, estimator="richardson", device=DEVICE, **one)):
        with pytest.raises(ValueError,
                           match=f"device={DEVICE!r} solves the plug-in's interval; estimator='richardson'"):
            call()
    with pytest.raises(ValueError, match=f"device={DEVICE!r} solves the plug-in's difference; estimator='richardson'"):
        ntps_difference(shards, other, k=2, estimator="richardson", device=DEVICE, **one)


def test_shards_are_pooled_on_the_device_as_moments_combine_pools_them(monkeypatch):
    """Per-shard moments given to a device call are pooled there with `Moments.combine`'s weights and operations in
    its order: the same arrays to the bit (centred too), a shard's resident copy read where it has one. No device
    path sums d x d shards on the host any more: `ntps`, `ntps_sweep` (theory, centred, reference, richardson in
    float32), `ntps_interval` (both variants), `ntps_difference`, the geometries and subspaces of shards and
    `ntps_estimate`'s rotation sets run with `Moments.combine` made to raise. Before, each of them called it (the
    geometries took one `Moments` only)."""
    import dataclasses

    from ntps_nb.core.backends import torch as backend
    from ntps_nb.core.estimators import ntps_estimate
    from ntps_nb.core.intervals import ntps_difference, ntps_interval
    from ntps_nb.core.score import ntps

    rng = np.random.default_rng(11)
    shards = [dataclasses.replace(moments(rng, 12, x_mean=True), n_texts=10 * (i + 1), n_tokens=70 * (i + 1) + i)
              for i in range(5)]  # unequal weights
    where = backend.check_device(device=DEVICE)  # the GPU run of this file makes it "cuda"
    host, pooled = Moments.combine(shards), backend._Pooled.of(shards, where)
    for name in ("Sxx", "Sxy", "Syy", "C0", "C1", "x_mean"):
        assert np.array_equal(getattr(pooled, name).cpu().numpy(), getattr(host, name)), name
    assert pooled.n_tokens == host.n_tokens and not pooled.is_centred
    centred = pooled.centred()
    for name in ("Sxx", "Sxy", "Syy", "C0", "C1"):
        assert np.array_equal(getattr(centred, name).cpu().numpy(), getattr(host.centred(), name)), name
    stack = backend.TorchShardStack(shards, centred=False, dtype=torch.float32, device=where)
    assert np.array_equal(stack.pooled_C0().cpu().numpy(), host.C0)

    # a shard's resident copy is what a device call reads (here one deliberately twice the host array, to see it)
    doubled = dataclasses.replace(shards[0], Sxx=2.0 * shards[0].Sxx)
    backend.keep_resident(shards[0].Sxx, torch.from_numpy(doubled.Sxx).to(where))
    want, before = theory_geometry(Moments.combine([doubled] + shards[1:])), theory_geometry(host)
    got = theory_geometry_torch(shards, device=DEVICE)
    assert np.abs(want.eigenvalues - before.eigenvalues).max() > 1e3 * AGREEMENT  # the doubled Sxx is seen
    assert np.abs(got.eigenvalues - want.eigenvalues).max() <= AGREEMENT * np.abs(want.eigenvalues).max()
    shards[0] = dataclasses.replace(shards[0])  # a copy of the moments: its arrays are not the recorded ones
    assert np.array_equal(backend._Pooled.of(shards, where).Sxx.cpu().numpy(), host.Sxx)

    expected = {"ntps": ntps(shards, 2), "sweep": ntps_sweep(shards)["ntps"].to_numpy()}

    def refuse(*args, **kwargs):
        raise AssertionError("the shards were combined on the host")

    monkeypatch.setattr(Moments, "combine", staticmethod(refuse))
    one = dict(n_boot=10, progress=False)
    assert abs(ntps(shards, 2, device=DEVICE) - expected["ntps"]) <= AGREEMENT
    assert np.abs(ntps_sweep(shards, device=DEVICE)["ntps"].to_numpy() - expected["sweep"]).max() <= AGREEMENT
    ntps_sweep(shards, centred=True, device=DEVICE)
    ntps_sweep(shards, variant="reference", device=DEVICE)
    ntps_sweep_torch(shards, estimator="richardson", dtype=torch.float32)
    ntps_interval(shards, 2, device=DEVICE, **one)
    ntps_interval(shards, fraction=0.5, variant="reference", device=DEVICE, **one)
    ntps_difference(shards, shards[::-1], k=2, device=DEVICE, **one)
    theory_geometry_torch(shards, centred=True)
    reference_geometry_torch(shards)
    *_, on_host = backend.pooled_subspaces_torch(shards, with_pooled=True)  # the rotation sets' pool
    for name in ("Sxx", "Sxy", "Syy", "C0", "C1", "x_mean"):
        assert np.array_equal(getattr(on_host, name), getattr(host, name)), name
    assert (on_host.n_texts, on_host.n_tokens) == (host.n_texts, host.n_tokens)
    # the rotation interval's sets read the pool on the host: summed on the device since session 57
    ntps_estimate(shards, [1, 2], device=DEVICE, interval="rotation", progress=False)


def test_cuda_without_an_index_is_the_current_cuda_device(monkeypatch):
    """``device="cuda"`` names the current CUDA device with its index, so it equals the device of the tensors
    placed there: before, it stayed index-less, never equal to a resident copy's ``cuda:0``, and every device call
    copied resident moments from the host again."""
    from ntps_nb.core.backends.torch import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert check_device("cuda") == torch.device("cuda", 1) == check_device(torch.device("cuda"))
    assert check_device("cuda:0") == torch.device("cuda", 0) and check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees 2 CUDA device"):
        check_device("cuda:2")


def test_ntps_and_ntps_interval_warn_at_the_callers_line_on_either_backend():
    """`ntps` with a torch device says what `ntps` says of the same moments (a next-token tie at k, rounded C0,
    interpolation), at the caller's line; `ntps_interval`'s warning of undefined replicates points at the caller's
    line on either backend (numpy's had pointed at a line of `ntps_interval` in the package). A fresh interpreter,
    as above."""
    import ast

    header = ("import warnings\nimport numpy as np\n"
              "from ntps_nb.core.score import ntps\n"
              "from ntps_nb.core.intervals import ntps_interval\n"
              + WARNING_SAMPLES +
              "single = [moments_from_sequences(texts[2 * i:2 * i + 2], [i % 2] * 2, 2) for i in range(4)]\n"
              "said = []\n"
              "for shards, k in ((tied, 8), (noisy, 2), (noisy, 8), (few, 1)):\n"
              "    with warnings.catch_warnings(record=True) as caught:\n"
              "        warnings.simplefilter('always')\n")
    pairs = [("ntps(shards, k=k)", f"ntps(shards, k=k, device={DEVICE!r})"),
             ("ntps(shards, k=k, estimator='richardson')",
              f"ntps(shards, k=k, estimator='richardson', device={DEVICE!r})"),
             ("ntps_interval(single, k=1, n_boot=40, progress=False)",  # shards of one class: resamples too
              f"ntps_interval(single, k=1, n_boot=40, progress=False, device={DEVICE!r})")]
    calls = [call for pair in pairs for call in pair]
    code = (header + "".join(f"        {call}\n" for call in calls)
            + "    said.append([(w.category.__name__, w.filename, w.lineno) for w in caught "
              "if w.category.__module__.startswith('ntps_nb') or 'undefined geometry' in str(w.message)])\n"
            + "print(repr(said))\n")
    said = ast.literal_eval(run_fresh(code))  # per (moments, k), the (category, file, line) of each warning
    first = header.count("\n") + 1  # the line of the first call
    expected = [{"NextTokenTieWarning"}, {"RoundedMomentsWarning"}, {"NextTokenTieWarning", "RoundedMomentsWarning"},
                {"InterpolationWarning"}]
    assert len(said) == len(expected)
    for categories, caught in zip(expected, said):
        assert {name for name, _, _ in caught} == categories | {"RuntimeWarning"}
        assert {file for _, file, _ in caught} == {"<string>"}
        for i in range(0, len(calls), 2):  # each device call says what its numpy twin says, at its own line
            at = [sorted(name for name, _, line in caught if line == first + j) for j in (i, i + 1)]
            assert at[0] == at[1], (calls[i], caught)
        # the undefined resamples, said once by each interval at its own line
        assert sorted(line - first for name, _, line in caught if name == "RuntimeWarning") == [4, 5]


def test_estimate_by_n_on_torch_equals_numpy(monkeypatch):
    """`estimate_by_n` passes ``device`` to each subsample's `ntps_estimate`, which solves it on the torch
    backend (CPU here; counted): the rows, the drift and ``inside_first`` are numpy's, with 5 and with 10
    groups."""
    from ntps_nb.core.backends import torch as backend
    from ntps_nb.core.estimators import estimate_by_n
    from ntps_nb.core.simulate import lds_model, sample_shards

    solved = []
    original = backend.ntps_estimate_torch

    def counted(moment_shards, *args, **kwargs):
        solved.append(len(moment_shards))
        return original(moment_shards, *args, **kwargs)

    monkeypatch.setattr(backend, "ntps_estimate_torch", counted)

    shards = sample_shards(lds_model(d=16, n_classes=3, gap="separated", seed=3), 1280, 40, np.random.default_rng(5))
    for n_groups, used in ((5, [5, 10, 20, 40]), (10, [10, 20, 40])):
        want = estimate_by_n(shards, [1, 2, 4], n_groups=n_groups)
        assert want["n_shards_used"].unique().tolist() == used
        assert want["inside_first"].notna().all() and not solved
        assert_frames_agree(estimate_by_n(shards, [1, 2, 4], n_groups=n_groups, device=DEVICE), want)
        assert solved == [n_groups] * len(used)  # every subsample on the backend, as n_groups groups
        solved.clear()


def test_estimate_by_n_reads_the_whole_space_as_inside_on_either_backend():
    """At k = r_V = r_U (here d = 32) every estimate and bound is 1 up to float64 rounding, and the
    rounding differs between numpy's solve and torch's: ``inside_first`` must not depend on it. Before
    `INSIDE_ATOL` the torch backend put the 20-shard row of this sample outside its 10-shard interval."""
    from ntps_nb.core.estimators import INSIDE_ATOL, estimate_by_n
    from ntps_nb.core.simulate import lds_model, sample_shards

    shards = sample_shards(lds_model(d=32, n_classes=6, gap="moderate", seed=1), 2000, 40, np.random.default_rng(0))
    assert theory_geometry(Moments.combine(shards)).r_V == 32
    for options in ({}, {"device": DEVICE}):
        frame = estimate_by_n(shards, [32], n_groups=10, **options)
        assert np.abs(frame[["estimate", "lower", "upper"]].to_numpy(float) - 1).max() < INSIDE_ATOL
        assert frame["inside_first"].tolist() == [True] * 3, options


def test_a_resident_record_goes_quietly_after_the_modules_globals(monkeypatch):
    """An array with a resident copy that lives until the interpreter exits is freed after the backend's
    globals are cleared: its record must still go, without an error ("Exception ignored in ... 'NoneType'
    object has no attribute 'pop'" was printed at the exit of test sessions that kept moments on a device)."""
    import gc
    import sys

    from ntps_nb.core.backends import torch as backend

    array = np.ones((3, 3))
    backend.keep_resident(array, torch.ones(3, 3, dtype=torch.float64))
    table, key = backend._RESIDENT, id(array)
    assert key in table
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    monkeypatch.setattr(backend, "_RESIDENT", None)  # as at interpreter exit
    del array
    gc.collect()
    monkeypatch.undo()
    assert raised == [] and key not in table


def test_make_resident_records_one_copy_and_shares_memory_on_the_cpu():
    """make_resident: on the CPU the resident copy is the array's own memory; asked again it returns the recorded
    copy instead of making another; a non-contiguous array gets a contiguous copy with its values."""
    from ntps_nb.core.backends import torch as backend

    array = np.arange(9.0).reshape(3, 3)
    array.setflags(write=False)
    first = backend.make_resident(array, "cpu")
    assert first.data_ptr() == array.__array_interface__["data"][0]
    assert backend.make_resident(array, "cpu") is first and backend.resident(array) is first
    strided = np.arange(18.0).reshape(3, 6)[:, ::2]
    copy = backend.make_resident(strided, "cpu")
    assert copy.data_ptr() != strided.__array_interface__["data"][0]
    np.testing.assert_array_equal(copy.numpy(), strided)
