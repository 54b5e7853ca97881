"""NTPS, both variants, against independent computations and invariants."""

import importlib.util
import warnings

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from ntps_nb import Moments, ntps, ntps_sweep, reference_ntps_pinv, theory_geometry
from ntps_nb.core.estimators import ntps_estimate
from ntps_nb.core.moments import moments_from_sequences
from ntps_nb.core.score import BeyondRankError, NextTokenTieWarning, next_token_tie_spread, next_token_tied_ks
from tests.core.conftest import random_moments, random_spd
from tests.core.fresh import run_fresh
from tests.core.torch_device import DEVICE

REFERENCE_MATCH = 1e-10


def released_algorithm(m: Moments, fraction: float, dtype=np.float64) -> float:
    """A plain re-implementation of the released NTPS code, written from SPEC section 4:
    ascending eigh order, absolute 1e-8 cut, int(f * r) truncation, pinv projector."""
    Sxx, Sxy, C0, C1 = (np.asarray(a, dtype=dtype) for a in (m.Sxx, m.Sxy, m.C0, m.C1))

    def directions(A, B):
        s, Q = scipy.linalg.eigh(B)
        kept = s > 1e-8
        W = Q[:, kept] @ np.diag(1.0 / np.sqrt(s[kept]))
        _, Y = scipy.linalg.eigh(W.T @ A @ W)
        return W @ Y

    U = directions(Sxy @ Sxy.T, Sxx)
    V = directions(C1 @ C1.T, C0)
    U_f = U[:, : int(fraction * U.shape[1])]
    V_f = V[:, : int(fraction * V.shape[1])]
    projector = V_f @ np.linalg.pinv(V_f)
    return float(np.linalg.norm(projector @ U_f) ** 2 / np.linalg.norm(U_f) ** 2)


def full_rank_label_moments(rng, d=6, n_classes=9):
    """C >= d so that Sxy Sxy^T has full rank: the only case where the released algorithm is
    well-posed and can be compared across implementations (SPEC section 4)."""
    return random_moments(rng, d=d, n_classes=n_classes)


@pytest.mark.parametrize("seed", range(5))
def test_reference_variant_equals_plain_reimplementation(seed):
    m = full_rank_label_moments(np.random.default_rng(seed))
    sweep = ntps_sweep(m, variant="reference", precision="float64")
    for row in sweep.itertuples():
        expected = released_algorithm(m, row.fraction) if row.k_U >= 1 and row.k_V >= 1 else np.nan
        np.testing.assert_allclose(row.ntps, expected, rtol=REFERENCE_MATCH, atol=REFERENCE_MATCH)
    single = ntps(m, fraction=0.5, variant="reference", precision="float64")
    assert single == pytest.approx(released_algorithm(m, 0.5), abs=REFERENCE_MATCH)


def test_reference_variant_float32_is_close_to_released_float32(rng):
    m = full_rank_label_moments(rng)
    for fraction in (0.35, 0.5, 0.95):
        ours = ntps(m, fraction=fraction, variant="reference")
        released = released_algorithm(m, fraction, dtype=np.float32)
        assert ours == pytest.approx(released, abs=1e-4)
        assert reference_ntps_pinv(m, fraction) == pytest.approx(released, abs=1e-4)


def test_reference_fractions_are_generated_like_the_released_code(rng):
    sweep = ntps_sweep(random_moments(rng, d=20), variant="reference", precision="float64")
    np.testing.assert_array_equal(sweep.fraction.to_numpy(), np.arange(0.05, 1.0, 0.05))
    # float rounding decides some counts: 0.15 * 20 = 3.0000000000000004 -> 3, 0.35 * 20 -> 7
    assert list(sweep.k_V) == [int(f * 20) for f in np.arange(0.05, 1.0, 0.05)]


def brute_force_theory_ntps(m: Moments, k: int) -> float:
    """NTPS_theory from explicit matrix square roots (restricted to the range of Sxx) and an
    explicit pseudo-inverse projector."""
    s, Q = np.linalg.eigh(m.Sxx)
    kept = s > 1e-10 * s.max()
    Qr, sr = Q[:, kept], s[kept]
    half = Qr @ np.diag(np.sqrt(sr)) @ Qr.T
    inv_half = Qr @ np.diag(1 / np.sqrt(sr)) @ Qr.T
    lam, Y = np.linalg.eigh(inv_half @ m.Sxy @ m.Sxy.T @ inv_half)
    order = np.argsort(lam)[::-1]
    lam, Y = lam[order], Y[:, order]
    rank = int(np.sum(lam > 1e-10 * lam[0]))
    t, R = np.linalg.eigh(m.C0)
    C0_inv_half = R @ np.diag(1 / np.sqrt(t)) @ R.T
    mu, Z = np.linalg.eigh(C0_inv_half @ m.C1 @ m.C1.T @ C0_inv_half)
    V = C0_inv_half @ Z[:, np.argsort(mu)[::-1]]
    basis = half @ V[:, :k]
    projector = basis @ np.linalg.pinv(basis, rcond=1e-9)
    kU = min(k, rank)
    return float(np.linalg.norm(projector @ Y[:, :kU]) ** 2 / kU)


@pytest.mark.parametrize("seed", range(10))
def test_theory_variant_matches_brute_force_and_lies_in_unit_interval(seed):
    m = random_moments(np.random.default_rng(seed), d=7, n_classes=3)
    for k in range(1, 8):
        value = ntps(m, k)
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(brute_force_theory_ntps(m, k), abs=1e-10)


def planted(rng, d=10, k=4, n_classes=3, inside=True):
    """Moments where Sxx^{-1/2} Sxy lies inside (or orthogonal to) span(Sxx^{1/2} V_k)."""
    Sxx = random_spd(rng, d)
    s, Q = np.linalg.eigh(Sxx)
    half = Q @ np.diag(np.sqrt(s)) @ Q.T
    Qv = ortho_group.rvs(d, random_state=rng)
    C1 = Qv @ np.diag(np.linspace(3.0, 0.5, d))  # C0 = I, so V_k = Qv[:, :k]
    span = half @ Qv[:, :k]
    if inside:
        whitened_signal = span @ rng.standard_normal((k, n_classes))
    else:
        complement = scipy.linalg.null_space(span.T)
        whitened_signal = complement @ rng.standard_normal((d - k, n_classes))
    Sxy = half @ whitened_signal
    return Moments(Sxx=Sxx, Sxy=Sxy, Syy=np.eye(n_classes) / n_classes, C0=np.eye(d), C1=C1,
                   n_texts=50, n_tokens=500)


def test_theory_is_one_when_U_inside_V_and_zero_when_orthogonal(rng):
    assert ntps(planted(rng, inside=True), 4) == pytest.approx(1.0, abs=1e-12)
    assert ntps(planted(rng, inside=False), 4) == pytest.approx(0.0, abs=1e-12)


def test_theory_invariant_to_rotation_of_hidden_space_and_label_permutation(rng):
    m = random_moments(rng, d=9, n_classes=4)
    R = ortho_group.rvs(9, random_state=rng)
    rotated = Moments(Sxx=R @ m.Sxx @ R.T, Sxy=R @ m.Sxy, Syy=m.Syy, C0=R @ m.C0 @ R.T,
                      C1=R @ m.C1 @ R.T, n_texts=m.n_texts, n_tokens=m.n_tokens)
    perm = rng.permutation(4)
    permuted = m.with_labels(m.Sxy[:, perm], m.Syy[np.ix_(perm, perm)])
    base = ntps_sweep(m).ntps.to_numpy()
    np.testing.assert_allclose(ntps_sweep(rotated).ntps, base, atol=1e-9)
    np.testing.assert_allclose(ntps_sweep(permuted).ntps, base, atol=1e-12)


def test_sweep_equals_single_k_for_both_variants(rng):
    m = random_moments(rng, d=12, n_classes=3)
    sweep = ntps_sweep(m)
    assert list(sweep.k) == list(range(1, 13))
    for row in sweep.itertuples():
        assert row.ntps == ntps(m, int(row.k))
        assert row.k_U == min(row.k, 3)
    ref = ntps_sweep(m, variant="reference")
    for row in ref.itertuples():
        if row.k_U >= 1 and row.k_V >= 1:
            assert row.ntps == ntps(m, fraction=row.fraction, variant="reference")
        else:
            assert np.isnan(row.ntps)


def test_fraction_selects_int_of_fraction_times_rank(rng):
    m = random_moments(rng, d=10)
    assert ntps(m, fraction=0.35) == ntps(m, 3)
    assert ntps(m, fraction=1.0) == ntps(m, 10)


def test_rank_deficient_pooled_states_still_give_nested_projections(rng):
    """With N < d texts Sxx has rank N < r_V: columns of Sxx^{1/2} V beyond the rank add no
    direction, and NTPS must reach 1 (U lies in the range of Sxx) instead of using arbitrary ones."""
    d, N, C = 12, 6, 2
    X = rng.standard_normal((N, d))
    labels = np.arange(N) % C
    Y = np.eye(C)[labels]
    m = Moments(Sxx=X.T @ X / N, Sxy=X.T @ Y / N, Syy=Y.T @ Y / N, C0=random_spd(rng, d),
                C1=rng.standard_normal((d, d)), n_texts=N, n_tokens=60)
    sweep = ntps_sweep(m)
    assert sweep.r_U.iloc[0] == N and sweep.r_V.iloc[0] == d
    assert sweep.ntps.iloc[-1] == pytest.approx(1.0, abs=1e-9)
    assert np.all(np.diff(sweep.ntps.to_numpy()[C - 1:]) >= -1e-12)  # nested projectors: monotone once k >= m
    for k in (3, 8, 12):
        assert ntps(m, k) == pytest.approx(brute_force_theory_ntps(m, k), abs=1e-9)


def test_bad_k_and_fraction_raise_clear_errors(rng):
    m = random_moments(rng, d=6)
    with pytest.raises(ValueError, match="k must be >= 1") as refused:
        ntps(m, 0)
    assert not isinstance(refused.value, BeyondRankError)  # only k beyond r_V is that kind
    with pytest.raises(BeyondRankError, match="beyond the retained rank"):  # a ValueError of its own kind
        ntps(m, 7)
    assert issubclass(BeyondRankError, ValueError)
    with pytest.raises(ValueError, match="exactly one of k"):
        ntps(m)
    with pytest.raises(ValueError, match="selects no direction"):
        ntps(m, fraction=0.1)
    with pytest.raises(ValueError, match="fraction="):
        ntps(m, 3, variant="reference")
    with pytest.raises(ValueError, match="selects k_U = 0"):
        ntps(m, fraction=0.1, variant="reference")
    with pytest.raises(ValueError, match="variant"):
        ntps(m, 2, variant="released")
    # a grid where one k is taken: said so, with where grids go (it was an int() TypeError)
    with pytest.raises(ValueError, match=r"k must be one number, got \[1, 2\]: for several, ntps_sweep"):
        ntps(m, [1, 2])
    with pytest.raises(ValueError, match="fraction must be one number"):
        ntps(m, fraction=[0.5])
    assert ntps(m, np.int64(2)) == ntps(m, 2.0) == ntps(m, 2)


def test_one_class_and_zero_signal_raise(rng):
    m = random_moments(rng, d=5, n_classes=2)
    one_class = m.with_labels(m.Sxy, np.diag([1.0, 0.0]))
    with pytest.raises(ValueError, match="1 class"):
        ntps(one_class, 2)
    single_column = Moments(Sxx=m.Sxx, Sxy=m.Sxy[:, :1], Syy=np.ones((1, 1)), C0=m.C0, C1=m.C1,
                            n_texts=10, n_tokens=10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ntps(single_column, 2)
    with pytest.raises(ValueError, match="no label signal"):
        ntps(m.with_labels(np.zeros_like(m.Sxy), m.Syy), 2)


def test_rank_deficient_c0_limits_k(rng):
    m = random_moments(rng, d=6)
    low_rank = Moments(Sxx=m.Sxx, Sxy=m.Sxy, Syy=m.Syy, C0=random_spd(rng, 6, rank=4), C1=m.C1,
                       n_texts=10, n_tokens=10)
    assert theory_geometry(low_rank).r_V == 4
    with pytest.raises(ValueError, match="r_V = 4"):
        ntps(low_rank, 5)


def token_embedding_moments(seed, *, n_texts=60, n_shards=1, vocab=10, later=4, d=16):
    """Moments of hidden states that are token embeddings (the embedding layer): each text's first token from
    the whole vocabulary, its later tokens from the first ``later`` only, so the next states span fewer
    directions than the prefix sums. Returns the moments (a list of ``n_shards`` shards' where more than one)
    and the ranks r0 of the prefix counts and r1 of (prefix counts x next token), computed from integer
    matrices alone: r0 - r1 zero next-token eigenvalues (the embeddings' rows are independent, vocab <= d)."""
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((vocab, d))
    texts = [np.concatenate([[rng.integers(vocab)], rng.integers(later, size=rng.integers(1, 6))])
             for _ in range(n_texts)]
    labels = rng.integers(3, size=n_texts)
    counts, nexts = [], []
    for tokens in texts:
        c = np.zeros(vocab)
        for j in range(len(tokens) - 1):
            c[tokens[j]] += 1
            counts.append(c.copy())
            nexts.append(np.eye(vocab)[tokens[j + 1]])
    counts, nexts = np.array(counts), np.array(nexts)
    r0, r1 = np.linalg.matrix_rank(counts), np.linalg.matrix_rank(counts.T @ nexts)
    shards = [moments_from_sequences([E[t] for t in texts[i::n_shards]], labels[i::n_shards], 3)
              for i in range(n_shards)]
    return (shards[0] if n_shards == 1 else shards), r0, r1


@pytest.mark.parametrize("seed", range(3))
def test_next_token_ties_are_the_k_the_tokens_predict_and_only_there_ntps_depends_on_rounding(seed):
    """At the embedding layer the next-token eigenvalues below rank(counts x next) are zero: the tied k are
    r1 + 1 .. r0 - 1 (at r0 = r_V, V_k is C0's whole range). There, and only there, NTPS is not invariant
    to a rotation of the hidden space (mathematically it is): the solver picks V_k's directions."""
    m, r0, r1 = token_embedding_moments(seed)
    assert r1 < r0 - 1  # a block with at least one tied k inside it
    geometry = theory_geometry(m)
    assert geometry.r_V == r0
    tied = next_token_tied_ks(geometry.next_token_eigenvalues)
    assert tied == list(range(r1 + 1, r0))
    R = ortho_group.rvs(m.d, random_state=np.random.default_rng(100 + seed))
    rotated = Moments(Sxx=R @ m.Sxx @ R.T, Sxy=R @ m.Sxy, Syy=m.Syy, C0=R @ m.C0 @ R.T,
                      C1=R @ m.C1 @ R.T, n_texts=m.n_texts, n_tokens=m.n_tokens)
    with pytest.warns(NextTokenTieWarning):
        base = ntps_sweep(m).set_index("k").ntps
    with pytest.warns(NextTokenTieWarning):
        moved = (ntps_sweep(rotated).set_index("k").ntps - base).abs()
    untied = [k for k in base.index if k not in tied]
    assert moved[untied].max() < 1e-9
    assert moved[tied].max() > 1e-3
    # the range the tie leaves NTPS (U's share in the tied eigenspace) holds both rounding choices
    spread = next_token_tie_spread(geometry)
    assert sorted(spread) == tied and all(moved[k] <= spread[k] + 1e-9 for k in tied)


def test_a_tie_is_not_said_where_u_has_nothing_in_the_tied_directions():
    """Labels whose perception directions lie in the span of the determined next-token directions (Sxy =
    Sxx V_{r1} c): every choice of V_k inside the block gives the same NTPS, so the spread is 0 and nothing
    is said."""
    from ntps_nb.core.subspaces import next_token_subspace

    m, r0, r1 = token_embedding_moments(1)
    determined = next_token_subspace(m, order="descending").vectors[:, :r1]
    inside = m.with_labels(m.Sxx @ determined @ np.random.default_rng(1).standard_normal((r1, 3)), m.Syy)
    geometry = theory_geometry(inside)
    assert next_token_tied_ks(geometry.next_token_eigenvalues) == list(range(r1 + 1, r0))  # the tie is there
    assert max(next_token_tie_spread(geometry).values()) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error", NextTokenTieWarning)
        ntps_sweep(inside)


def test_the_next_token_tie_warning_names_the_block_and_is_silent_elsewhere(rng):
    m, r0, r1 = token_embedding_moments(0)
    with pytest.warns(NextTokenTieWarning) as caught:
        ntps_sweep(m)
    message = str(caught[0].message)
    assert f"tied at k = {r1 + 1}-{r0 - 1}" in message
    assert f"{r0 - r1} of the r_V = {r0} are zero: C1 C1^T has rank {r1} where C0 retains {r0}" in message
    assert f"by up to {max(next_token_tie_spread(theory_geometry(m)).values()):.2g}." in message
    with pytest.warns(NextTokenTieWarning, match=f"tied at k = {r1 + 1} "):
        ntps(m, r1 + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NextTokenTieWarning)
        ntps(m, r1)  # the last nonzero eigenvalue is separated from the block
        ntps(m, r0)  # V_k is C0's whole retained range
        ntps_sweep(random_moments(rng, d=12, n_classes=3))  # a continuous spectrum ties nowhere
    assert next_token_tied_ks(np.array([3.0, 2.0, 2.0, 1.0])) == [2]
    assert next_token_tied_ks(np.array([1.0, 2.0, 3.0])) == []  # any order: sorted descending first
    assert next_token_tied_ks(np.array([5.0])) == []
    with pytest.raises(ValueError, match="finite"):
        next_token_tied_ks(np.array([1.0, np.nan]))


def test_the_flag_refuses_rows_at_tied_next_token_eigenvalues_and_ntps_estimate_says_why():
    """Inside a block of zero next-token eigenvalues the eigengap and its jackknife SE are both rounding:
    gap_ratio_V is set to 0 there, so the flag refuses every tied row, and the other rows keep their ratio.
    `ntps_estimate` says why with the `NextTokenTieWarning` `ntps_sweep` gives, on both backends, at its
    caller's line (checked in a fresh interpreter: under tests/core the shape checker wraps the functions in
    frames of its own), and is silent where it is asked only untied k."""
    from ntps_nb.core.estimators import eigengap_ratios, ntps_estimate

    shards, r0, r1 = token_embedding_moments(0, n_texts=240, n_shards=8)
    tied = list(range(r1 + 1, r0))
    assert tied and next_token_tied_ks(theory_geometry(Moments.combine(shards)).next_token_eigenvalues) == tied
    with pytest.warns(NextTokenTieWarning, match=f"tied at k = {r1 + 1}-{r0 - 1} "):
        frame = ntps_estimate(shards, list(range(1, r0 + 1))).set_index("k")
    assert (frame.loc[tied, "gap_ratio_V"] == 0).all() and not frame.loc[tied, "reliable"].any()
    untied = [k for k in range(1, r0) if k not in tied]
    assert (frame.loc[untied, "gap_ratio_V"] != 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NextTokenTieWarning)
        ntps_estimate(shards, untied)
    if importlib.util.find_spec("torch") is not None:
        with pytest.warns(NextTokenTieWarning, match=f"tied at k = {r1 + 1} "):  # the k it is asked
            ntps_estimate(shards, [r1, r1 + 1], device=DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("error", NextTokenTieWarning)
            ntps_estimate(shards, [r1, r0], device=DEVICE)
    devices = ["None", repr(DEVICE)] if importlib.util.find_spec("torch") is not None else ["None"]
    code = ("import warnings\nfrom ntps_nb.core.estimators import ntps_estimate\n"
            "from tests.core.test_score import token_embedding_moments\n"
            "shards, r0, r1 = token_embedding_moments(0, n_texts=240, n_shards=8)\n"
            "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
            + "".join(f"    ntps_estimate(shards, [r1 + 1], device={device})\n" for device in devices)
            + "print([(w.category.__name__, w.filename, w.lineno) for w in caught])\n")
    said = run_fresh(code)
    assert said.strip() == repr([("NextTokenTieWarning", "<string>", 7 + i) for i in range(len(devices))])
    gaps = eigengap_ratios(shards, tied).set_index("k")
    assert (gaps["gap_ratio_V"] == 0).all() and (gaps["gap_ratio"] <= 0).all()


def test_the_tie_warning_names_the_layer_in_a_loop_and_the_torch_sweeps_say_it_too():
    """`warnings_named` puts the loop's label before the message; the torch backend's plug-in and
    richardson sweeps warn as the numpy ones do, at the same k."""
    pytest.importorskip("torch")
    from ntps_nb.core.backends.torch import ntps_sweep_torch
    from ntps_nb.core.score import warnings_named

    shards, r0, r1 = token_embedding_moments(0, n_texts=240, n_shards=8)
    with pytest.warns(NextTokenTieWarning, match=f"^layer 0, the pooled moments: .* tied at k = {r1 + 1}-{r0 - 1} "):
        with warnings_named("layer 0"):
            ntps_sweep(Moments.combine(shards))
    for estimator in ("plugin", "richardson"):
        with pytest.warns(NextTokenTieWarning, match=f"tied at k = {r1 + 1}-{r0 - 1} "):
            ntps_sweep_torch(shards, variant="theory", estimator=estimator)
    with warnings.catch_warnings(record=True) as caught:  # other warnings pass through unnamed
        warnings.simplefilter("always")
        with warnings_named("layer 0"):
            warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]


def rounded(m, reach, seed=0):
    """``m`` with a symmetric error added to C0 whose spectrum spreads about zero (as float32 products' rounding
    does), its largest eigenvalue in magnitude ``reach`` times C0's largest (C0's most negative eigenvalue then
    lies within that)."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m.d, m.d))
    E = (G + G.T) / 2
    E *= reach * np.linalg.eigvalsh(m.C0)[-1] / np.abs(np.linalg.eigvalsh(E)).max()
    return Moments(Sxx=m.Sxx, Sxy=m.Sxy, Syy=m.Syy, C0=m.C0 + E, C1=m.C1, n_texts=m.n_texts, n_tokens=m.n_tokens)


def test_negative_reach_is_the_rounding_below_zero_against_the_eigenvalues():
    """`negative_reach` against numpy's eigenvalues: 0 for an exact rank-deficient product (float64 rounding stays
    far inside RANGE_RTOL) and for a reach at RANGE_RTOL / 2 (the Cholesky test fails there, the eigenvalues
    decide), -lambda_min / lambda_max beyond it; its torch twin (the extraction's `token_rounding`) agrees, from
    an array or a tensor."""
    from ntps_nb.core.subspaces import RANGE_RTOL, negative_reach

    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 40))  # rank 12 at d = 40
    matrices = [X.T @ X / 500]
    expected = [0.0]
    Q = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    for reach, beyond in ((RANGE_RTOL / 2, False), (1e-8, True), (1e-3, True)):
        B = (Q * np.concatenate([[1.0], np.linspace(0.5, 0.1, 30), np.zeros(8), [-reach]])) @ Q.T
        lam = np.linalg.eigvalsh(B)
        matrices.append(B)
        expected.append(-lam[0] / lam[-1] if beyond else 0.0)
    for B, value in zip(matrices, expected):
        assert negative_reach(B) == pytest.approx(value, rel=1e-6, abs=0.0)
    # a caller's own range tolerance: the reach of 1e-8 (largest eigenvalue 1) is within rtol = 1e-6 or tol = 2e-8,
    # beyond rtol = 1e-9 or tol = 5e-9
    tolerances = [({"rtol": 1e-6}, 0.0), ({"tol": 2e-8}, 0.0),
                  ({"rtol": 1e-9}, expected[2]), ({"tol": 5e-9}, expected[2])]
    for options, value in tolerances:
        assert negative_reach(matrices[2], **options) == pytest.approx(value, rel=1e-6, abs=0.0)
    torch = pytest.importorskip("torch")
    from ntps_nb.core.backends.torch import negative_reach_torch
    from ntps_nb.extract import token_rounding

    for B, value in zip(matrices, expected):
        assert token_rounding(B) == token_rounding(torch.as_tensor(B)) == pytest.approx(value, rel=1e-6, abs=0.0)
    for options, value in tolerances:
        assert negative_reach_torch(matrices[2], **options) == pytest.approx(value, rel=1e-6, abs=0.0)


def test_rounded_moments_are_said_next_to_the_number_on_both_backends():
    """C0 of token-embedding states (rank r0 < d) with a rounding-like error of up to 1e-8 of its largest eigenvalue:
    the range tolerance keeps rounding directions (r_V above r0), and `ntps_sweep`, `ntps` and the torch
    backend's plug-in and richardson sweeps say so with a `RoundedMomentsWarning` that a loop names; the exact
    moments are silent."""
    from ntps_nb.core.score import RoundedMomentsWarning, warnings_named
    from ntps_nb.core.subspaces import negative_reach

    shards, r0, _ = token_embedding_moments(0, n_texts=240, n_shards=8)
    exact = Moments.combine(shards)
    noisy = rounded(exact, 1e-8)
    assert theory_geometry(exact).r_V == r0 < theory_geometry(noisy).r_V  # rounding kept as directions of V
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NextTokenTieWarning)
        warnings.simplefilter("error", RoundedMomentsWarning)
        ntps_sweep(exact)
        reach, r_V = f"{negative_reach(noisy.C0):.1g}", theory_geometry(noisy).r_V
        with pytest.warns(RoundedMomentsWarning, match=r"^layer 0, the pooled moments: C0 has negative eigenvalues "
                                                       rf"down to {reach} .* among V's r_V = {r_V},"):
            with warnings_named("layer 0"):
                ntps_sweep(noisy)
        with pytest.warns(RoundedMomentsWarning):
            ntps(noisy, 1)
        # a range tolerance wider than the rounding keeps none of it (r_V is C0's rank) and is silent
        for options in ({"rtol": 1e-6}, {"tol": 1e-6 * np.linalg.eigvalsh(exact.C0)[-1]}):
            assert theory_geometry(noisy, **options).r_V == r0
            ntps_sweep(noisy, **options)
            ntps(noisy, 1, **options)
    noisy_shards = [rounded(shard, 1e-8, seed=i) for i, shard in enumerate(shards)]
    devices = [None] + ([DEVICE] if importlib.util.find_spec("torch") else [])
    for device in devices:  # the default estimator's rows (numpy, and the torch backend's)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NextTokenTieWarning)
            pooled_r_V = theory_geometry(Moments.combine(noisy_shards)).r_V  # both backends name the solve's r_V
            with pytest.warns(RoundedMomentsWarning, match=rf"among V's r_V = {pooled_r_V},"):
                ntps_estimate(noisy_shards, [1, 2], device=device)
            warnings.simplefilter("error", RoundedMomentsWarning)
            ntps_estimate(shards, [1, 2], device=device)
            ntps_estimate(noisy_shards, [1, 2], device=device, rtol=1e-6)
    pytest.importorskip("torch")
    from ntps_nb.core.backends.torch import ntps_sweep_torch

    for estimator in ("plugin", "richardson"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NextTokenTieWarning)
            with pytest.warns(RoundedMomentsWarning):
                ntps_sweep_torch(noisy_shards, variant="theory", estimator=estimator)
            warnings.simplefilter("error", RoundedMomentsWarning)
            ntps_sweep_torch(shards, variant="theory", estimator=estimator)
            ntps_sweep_torch(noisy_shards, variant="theory", estimator=estimator, rtol=1e-6)
