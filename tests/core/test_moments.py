"""Moments: definitions, exact merging, validation, save/load."""

import numpy as np
import pytest

from ntps_nb import LayerMoments, Moments, moments_from_sequences, one_hot
from tests.core.conftest import random_moments
from tests.core.shapes import unchecked_shapes


def definition_by_loops(sequences, labels, C):
    """The SPEC section 2 sums written out term by term (prefix sums by explicit inner sums)."""
    d = sequences[0].shape[1]
    N = len(sequences)
    C0, C1 = np.zeros((d, d)), np.zeros((d, d))
    Sxx, Sxy = np.zeros((d, d)), np.zeros((d, C))
    for h, y in zip(sequences, labels):
        T = h.shape[0]
        xbar = sum(h[t] for t in range(T)) / T
        Sxx += np.outer(xbar, xbar)
        Sxy += np.outer(xbar, np.eye(C)[y])
        for t in range(T - 1):
            s = sum(h[i] for i in range(t + 1))
            C0 += np.outer(s, s)
            C1 += np.outer(s, h[t + 1])
    return Sxx / N, Sxy / N, C0 / N, C1 / N


def test_moments_from_sequences_match_the_definitions(rng):
    lengths = [1, 2, 5, 9, 3]
    sequences = [rng.standard_normal((T, 4)) for T in lengths]
    labels = [0, 1, 2, 1, 0]
    m = moments_from_sequences(sequences, labels, 3)
    Sxx, Sxy, C0, C1 = definition_by_loops(sequences, labels, 3)
    for ours, theirs in ((m.Sxx, Sxx), (m.Sxy, Sxy), (m.C0, C0), (m.C1, C1)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    assert m.n_tokens == sum(T - 1 for T in lengths)
    np.testing.assert_allclose(np.diag(m.Syy), [0.4, 0.4, 0.2])


def test_combine_of_disjoint_parts_equals_moments_of_the_union(rng):
    sequences = [rng.standard_normal((int(rng.integers(1, 8)), 5)) for _ in range(30)]
    labels = rng.integers(0, 3, 30)
    labels[:3] = [0, 1, 2]
    whole = moments_from_sequences(sequences, labels, 3)
    parts = [moments_from_sequences(sequences[a:b], labels[a:b], 3) for a, b in ((0, 7), (7, 20), (20, 30))]
    merged = Moments.combine(parts)
    for name, value in whole.arrays().items():
        np.testing.assert_allclose(getattr(merged, name), value, rtol=1e-12, atol=1e-14)
    assert merged.n_texts == 30 and merged.n_tokens == whole.n_tokens
    summed = parts[0] + parts[1] + parts[2]
    np.testing.assert_allclose(summed.C1, whole.C1, rtol=1e-12, atol=1e-14)


def test_combine_with_weights_repeats_a_part(rng):
    a, b = random_moments(rng, n_texts=10), random_moments(rng, n_texts=30)
    twice = Moments.combine([a, b], weights=[2, 1])
    np.testing.assert_allclose(twice.Sxx, (20 * a.Sxx + 30 * b.Sxx) / 50)
    assert twice.n_texts == 50


def test_validation_names_the_problem(rng):
    m = random_moments(rng, d=4, n_classes=2)
    bad = m.C0.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="C0 has 1 NaN/inf"):
        Moments(Sxx=m.Sxx, Sxy=m.Sxy, Syy=m.Syy, C0=bad, C1=m.C1, n_texts=1, n_tokens=1)
    asym = m.Sxx.copy()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="Sxx is not symmetric"):
        Moments(Sxx=asym, Sxy=m.Sxy, Syy=m.Syy, C0=m.C0, C1=m.C1, n_texts=1, n_tokens=1)
    with unchecked_shapes():  # the messages users get (the test-time shape check would answer first)
        with pytest.raises(ValueError, match="Sxy must have shape"):
            Moments(Sxx=m.Sxx, Sxy=m.Sxy[:3], Syy=m.Syy, C0=m.C0, C1=m.C1, n_texts=1, n_tokens=1)
        with pytest.raises(ValueError, match="C1 must have shape"):
            Moments(Sxx=m.Sxx, Sxy=m.Sxy, Syy=m.Syy, C0=m.C0, C1=m.C1[:, :3], n_texts=1, n_tokens=1)
    with pytest.raises(ValueError, match="n_texts"):
        Moments(Sxx=m.Sxx, Sxy=m.Sxy, Syy=m.Syy, C0=m.C0, C1=m.C1, n_texts=0, n_tokens=1)


@pytest.mark.parametrize("name", ["Sxy", "C1", "Shh", "x_mean"])
@pytest.mark.parametrize("bad_value", [np.inf, -np.inf, np.nan])
def test_every_non_finite_entry_is_found(rng, name, bad_value):
    """The finiteness check goes through matrix-vector products; each bad entry, anywhere, must show."""
    m = random_moments(rng, d=5, n_classes=3)
    arrays = {**m.arrays(), "Shh": m.Sxx, "x_mean": np.ones(5)}
    for index in [(0,), (4,)] if name == "x_mean" else [(0, 0), (4, 2), (2, 1)]:
        bad = arrays[name].copy()
        bad[index] = bad_value
        if name == "Shh":
            bad[index[::-1]] = bad_value
        with pytest.raises(ValueError, match=f"{name} has [12] NaN/inf"):
            Moments(**{**arrays, name: bad}, n_texts=1, n_tokens=1)


def test_finite_entries_whose_products_overflow_are_accepted(rng):
    m = random_moments(rng, d=3, n_classes=2)
    huge = np.full((3, 3), 1e308)  # A v overflows to inf; every entry is finite
    out = Moments(Sxx=m.Sxx, Sxy=m.Sxy, Syy=m.Syy, C0=m.C0, C1=huge, n_texts=1, n_tokens=1)
    assert np.all(out.C1 == 1e308)


def test_moments_are_read_only(rng):
    m = random_moments(rng)
    with pytest.raises(ValueError):
        m.Sxx[0, 0] = 1.0


def test_one_hot_rejects_bad_labels():
    np.testing.assert_array_equal(one_hot([1, 0, 2]), np.eye(3)[[1, 0, 2]])
    with pytest.raises(ValueError, match="integers"):
        one_hot(np.array(["a", "b"]))
    with pytest.raises(ValueError, match="non-integer"):
        one_hot(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="must lie in 0..1"):
        one_hot([0, 2], n_classes=2)
    with pytest.raises(ValueError, match="empty"):
        one_hot([])


def test_save_load_round_trip_and_metadata(tmp_path, rng):
    layers = LayerMoments({0: random_moments(rng), 3: random_moments(rng)}, {"model": "tiny", "max_length": 64})
    path = layers.save(tmp_path / "m.npz")
    loaded = LayerMoments.load(path)
    assert loaded.layers == [0, 3] and loaded.metadata == {"model": "tiny", "max_length": 64}
    for layer in layers:
        for name, value in layers[layer].arrays().items():
            np.testing.assert_array_equal(getattr(loaded[layer], name), value)


def test_interrupted_save_leaves_no_entry(tmp_path, rng, monkeypatch):
    layers = LayerMoments({0: random_moments(rng)})

    def broken_savez(handle, **arrays):
        handle.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        layers.save(tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []


def test_layer_moments_combine_checks_layers(rng):
    a = LayerMoments({0: random_moments(rng), 1: random_moments(rng)})
    b = LayerMoments({0: random_moments(rng)})
    with pytest.raises(ValueError, match="layers"):
        a + b
    with pytest.raises(KeyError, match="layer 5"):
        a[5]
