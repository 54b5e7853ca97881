"""`ntps_estimate` and `subspace_noise` on the torch backend (on the CPU here) against the numpy
code: the same frame, every column to 1e-9 in float64, on synthetic shard sets with the awkward
cases (k beyond r_V, a half or a replicate with a single class, a class only one shard holds)."""

import warnings

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from ntps_nb.core.estimators import (DEVICE_ESTIMATORS, ESTIMATORS, ntps_estimate, split_halves,  # noqa: E402
                                     subspace_noise)
from ntps_nb.core.simulate import factor_model, lds_model, moments_of_array, sample_shards  # noqa: E402
from tests.core.test_rotation import _nearly_tied_draw  # noqa: E402
from tests.core.torch_device import DEVICE  # noqa: E402

#: Agreement with numpy in float64, relative to the largest magnitude of the column (>= 1).
AGREEMENT = 1e-9
N_SHARDS = 10
#: Smallest gap between perception eigenvalues at which the backends' eigenvectors are compared.
TIE_GAP = 1e-3


def assert_frames_agree(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert list(got.dtypes) == list(want.dtypes)
    assert got.shape == want.shape
    for column in want.columns:
        if want[column].dtype.kind not in "fiub":
            assert list(got[column]) == list(want[column]), column
            continue
        a, b = got[column].to_numpy(np.float64), want[column].to_numpy(np.float64)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        finite = ~np.isnan(b)
        scale = max(1.0, float(np.abs(b[finite]).max(initial=0.0)))
        assert np.abs(a[finite] - b[finite]).max(initial=0.0) <= AGREEMENT * scale, column


def labelled_shards(model, labels: list[np.ndarray], seed: int):
    """Shards of texts with the given labels, drawn from ``model``."""
    rng = np.random.default_rng(seed)
    return [moments_of_array(model.sample_sequences(y, rng), y, model.n_classes) for y in labels]


def single_class_half(whole: bool = False):
    """C = 2: one half of the seeded split holds class 0 only, except (unless ``whole``) one shard
    with a few texts of class 1, so that leaving that shard out leaves its half with a single class;
    with ``whole`` the half has a single class outright (richardson is NaN at every k)."""
    model = factor_model(d=8, n_classes=2, n_tokens=4, seed=4)
    a, _ = split_halves(N_SHARDS, 0)
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 2, 16) for _ in range(N_SHARDS)]
    for i in a:
        labels[i] = np.zeros(16, dtype=np.int64)
    if not whole:
        labels[a[0]][:3] = 1
    return labelled_shards(model, labels, seed=2)


def class_in_one_shard():
    """C = 6: class 5 has texts in shard 0 only (its replicate loses a label direction)."""
    model = lds_model(d=12, n_classes=6, n_tokens=5, signal=1.0, seed=6)
    rng = np.random.default_rng(3)
    labels = [rng.integers(0, 5, 20) for _ in range(N_SHARDS)]
    labels[0][:4] = 5
    return labelled_shards(model, labels, seed=4)


CASES = {
    # k = 16 lies beyond r_V = 12
    "factor, C = 2": (lambda: sample_shards(factor_model(d=12, n_classes=2, seed=1), 300, N_SHARDS,
                                            np.random.default_rng(0)), [1, 2, 3, 4, 8, 12, 16]),
    # 12 texts a shard: shards and halves miss classes, m differs between replicates
    "lds, C = 6": (lambda: sample_shards(lds_model(d=10, n_classes=6, seed=2), 120, N_SHARDS,
                                         np.random.default_rng(0)), [1, 2, 3, 4, 6, 8, 10, 12]),
    # large N, separated spectra: the flag says reliable at small k
    "lds, C = 3, reliable": (lambda: sample_shards(lds_model(d=8, n_classes=3, n_tokens=4, signal=1.0, gap="separated",
                                                             seed=5), 20_000, N_SHARDS, np.random.default_rng(1)),
                             [1, 2, 3, 4, 8]),
    "a half with a single class": (single_class_half, [1, 2, 4, 8]),
    "a class in one shard": (class_in_one_shard, [1, 2, 4, 5, 6, 8]),
}


@pytest.fixture(scope="module")
def shard_sets():
    return {name: (make(), np.array(ks)) for name, (make, ks) in CASES.items()}


def numpy_and_torch(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return function(*args, **kwargs), function(*args, device=DEVICE, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("estimator", ["richardson", "plugin"])
def test_ntps_estimate_on_torch_equals_numpy(shard_sets, case, estimator):
    shards, ks = shard_sets[case]
    # the flag's conditions on every estimator's rows (by default the plug-in's are never reliable), so that
    # both backends' flags are compared
    want, got = numpy_and_torch(ntps_estimate, shards, ks, estimator=estimator, seed=0, flag_any_estimator=True)
    assert_frames_agree(got, want)
    # another seed splits the shards into other halves
    want, got = numpy_and_torch(ntps_estimate, shards, ks, estimator=estimator, seed=3, level=0.8,
                                flag_any_estimator=True)
    assert_frames_agree(got, want)


def test_the_widened_interval_on_torch_equals_numpy():
    # `rotation_widening`: the sets are computed on the host from the device's pooled solve, as the rotation
    # condition's; the nearly tied draw of tests/core/test_rotation.py, whose reliable row at k = 1 is widened
    want, got = numpy_and_torch(ntps_estimate, _nearly_tied_draw(), [1, 2], seed=465, rotation_widening=True)
    assert want.loc[0, "reliable"] and want.loc[0, "lower"] < want.loc[0, "lower_unwidened"] - 0.1
    assert_frames_agree(got, want)


def test_the_cases_cover_what_they_are_named_for(shard_sets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        frames = {name: ntps_estimate(shards, ks) for name, (shards, ks) in shard_sets.items()}
    assert frames["factor, C = 2"]["estimate"].isna().to_list()[-1]  # k beyond r_V
    assert frames["lds, C = 3, reliable"]["reliable"].any()
    # a replicate with a single-class half fails: no standard error, but an estimate
    single = frames["a half with a single class"]
    assert single["estimate"].notna().all() and single["se"].isna().all()
    # the replicate without class 5 has m = 5 < 6: U is not compared at k_U = 6
    one_shard = frames["a class in one shard"]
    assert one_shard["k_U"].max() == 6
    assert one_shard.loc[one_shard["k_U"] == 6, "noise_U"].isna().all()
    assert one_shard.loc[one_shard["k_U"] < 6, "noise_U"].notna().all()


@pytest.mark.parametrize("case", ["factor, C = 2", "lds, C = 6", "a class in one shard"])
def test_subspace_noise_on_torch_equals_numpy(shard_sets, case):
    shards, ks = shard_sets[case]
    want, got = numpy_and_torch(subspace_noise, shards, ks)
    assert_frames_agree(got, want)


def test_batches_of_combinations_equal_one_batch(shard_sets):
    shards, ks = shard_sets["lds, C = 6"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_frames_agree(ntps_estimate(shards, ks, device=DEVICE, batch_size=3),
                            ntps_estimate(shards, ks, device=DEVICE, batch_size=64))


def test_estimators_without_a_torch_path_are_refused(shard_sets):
    shards, ks = shard_sets["factor, C = 2"]
    for estimator in sorted(set(ESTIMATORS) - set(DEVICE_ESTIMATORS)):
        with pytest.raises(ValueError, match="device=None"):
            ntps_estimate(shards, ks, estimator=estimator, device=DEVICE)
    with pytest.raises(ValueError, match="estimator must be one of"):
        ntps_estimate(shards, ks, estimator="nope", device=DEVICE)
    with pytest.raises(ValueError, match="at least 3 shards"):
        ntps_estimate(shards[:2], ks, estimator="plugin", device=DEVICE)
    with pytest.raises(ValueError, match="at least 4 shards for estimator='richardson'"):
        ntps_estimate(shards[:3], ks, device=DEVICE)
    with pytest.raises(ValueError, match="device must be"):
        ntps_estimate(shards, ks, device=3)
    # the count of combinations its bar shows refuses what ntps_estimate_torch refuses
    from ntps_nb.core.backends.torch import estimate_solves

    assert (estimate_solves(20), estimate_solves(10, "plugin"), estimate_solves(4)) == (43, 11, 11)
    for n_shards, estimator, message in ((3, "richardson", "n_shards must be an integer >= 4"),
                                         (2.5, "plugin", "n_shards must be an integer >= 3"),
                                         (10, "extrapolate", "device=None"), (10, "nope", "estimator must be one of")):
        with pytest.raises(ValueError, match=message):
            estimate_solves(n_shards, estimator)


@pytest.mark.parametrize("case, seed", [(case, seed) for case in ("two_halves", "ten_shards", "k_beyond_half")
                                        for seed in (0, 3)] + [("single_class_half", 0)])  # the seed-0 split's half
def test_the_richardson_sweep_on_a_device_is_numpys(case, seed):
    """`ntps_sweep_torch(..., estimator="richardson")` (one batched solve of all shards and the two
    halves) gives `ntps_sweep`'s frame: the study's ntps stage on a GPU computes it on every layer
    from the two halves an extraction keeps, and on the interval layers from the shards."""
    from ntps_nb.core.backends.torch import ntps_sweep_torch
    from ntps_nb.core.score import ntps_sweep, theory_geometry

    if case == "single_class_half":
        shards = single_class_half(whole=True)
    elif case == "k_beyond_half":  # few texts per half: r_V of a half below the pooled r_V
        shards = sample_shards(factor_model(d=24, n_classes=3, n_tokens=2, seed=5), 40, 2, np.random.default_rng(seed))
        # below d texts a half's perception eigenvalues are its class shares: equal shares tie, and
        # each backend breaks a tie its own way (the documented exception); these halves have none
        for half in shards:
            assert np.abs(np.diff(theory_geometry(half).eigenvalues)).min() > TIE_GAP
    else:
        model = factor_model(d=16, n_classes=4, n_tokens=6, seed=1)
        shards = sample_shards(model, 400, 2 if case == "two_halves" else N_SHARDS, np.random.default_rng(seed))
    want = ntps_sweep(shards, variant="theory", estimator="richardson", seed=seed)
    got = ntps_sweep_torch(shards, variant="theory", estimator="richardson", seed=seed, device=DEVICE)
    assert_frames_agree(got, want)
    if case == "single_class_half":
        assert want["ntps"].isna().all()
    else:
        assert np.isfinite(want["ntps"]).sum() >= 3  # the comparison is not between NaNs
    with pytest.raises(ValueError, match="at least 2 shards"):
        ntps_sweep_torch(shards[:1], estimator="richardson", device=DEVICE)
    with pytest.raises(ValueError, match="computes the plug-in and, on the theory variant, 'richardson'"):
        ntps_sweep_torch(shards, variant="reference", estimator="richardson", device=DEVICE)


def test_the_quadratic_intervals_cap_on_torch_equals_numpy_at_20_shards():
    # at 20 shards the interactions take 5 of each half's 10 shards by default, every one with
    # interaction_half=None: the torch path passes the cap to the same contrasts
    shards = sample_shards(factor_model(d=12, n_classes=3, seed=4), 1_000, 20, np.random.default_rng(5))
    frames = {}
    for half in (5, None):
        want, got = numpy_and_torch(ntps_estimate, shards, [1, 2, 4], interaction_half=half)
        assert_frames_agree(got, want)
        frames[half] = want
    assert np.isfinite(frames[5]["quadratic_excess"]).all()
    assert not np.allclose(frames[5]["quadratic_excess"], frames[None]["quadratic_excess"])


def test_the_quadratic_interval_on_torch_solves_only_its_contrasts(monkeypatch):
    """The default row on a device solves the interactions' contrast poolings and nothing else for its
    interval: the plug-ins on all shards and without each are the ones the replicates solved (the device path
    solved those S + 1 again, as one more batch, before); the frame is numpy's."""
    import ntps_nb.core.backends.torch as backend
    from ntps_nb.core.quadratic import contrast_counts

    shards = sample_shards(factor_model(d=12, n_classes=3, seed=4), 1_000, 20, np.random.default_rng(5))
    solved = []
    replicates = backend.interval_replicates_torch

    def counting(moment_shards, counts, *args, **kwargs):
        solved.append(np.asarray(counts).copy())
        return replicates(moment_shards, counts, *args, **kwargs)

    monkeypatch.setattr(backend, "interval_replicates_torch", counting)
    want, got = numpy_and_torch(ntps_estimate, shards, [1, 2, 4])
    assert_frames_agree(got, want)
    contrasts, _, _ = contrast_counts(np.array([s.n_texts for s in shards]), 0)
    assert len(solved) == 1
    np.testing.assert_array_equal(solved[0], contrasts)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("interval", ["rotation", "quadratic"])
def test_the_rotation_and_quadratic_intervals_on_torch_equal_numpy(shard_sets, case, interval):
    # the widening runs on the host after either backend, the quadratic interval's contrasts on the device
    # as one more batch of combinations; the edge cases (k beyond r_V, halves and replicates missing
    # classes) keep their rows the same way, and a NaN jackknife interval stays NaN
    shards, ks = shard_sets[case]
    want, got = numpy_and_torch(ntps_estimate, shards, ks, interval=interval)
    assert_frames_agree(got, want)
    finite = np.isfinite(want["lower_jackknife"])
    np.testing.assert_array_equal(np.isfinite(want["lower"]), finite)
    wider = (want["lower"][finite] <= want["lower_jackknife"][finite]) & (want["upper"][finite]
                                                                          >= want["upper_jackknife"][finite])
    # the rotation interval contains the jackknife's; the quadratic one lies inside it
    assert wider.all() if interval == "rotation" else (want["se"][finite] <= want["se_jackknife"][finite]).all()


def test_the_rotation_sets_on_torch_read_the_devices_pooled_solve(monkeypatch):
    """The flag's rotation condition and the rotation interval on a device read the pooled subspaces solved
    there and the plug-in the replicates solved: nothing of the pooled problem is solved on the host (it was
    solved again there, 4 d x d eigensolves and a basis of every next-token direction, before), and the shards
    are not combined on the host at all: the rotation sets' pool is summed on the device too (since session 57;
    once on the host before, three times before session 46, twenty more for the delete-one pools), and C0's
    rounding is checked on the device; the frame is numpy's, every column to 1e-9."""
    import ntps_nb.core.rotation as rotation
    from ntps_nb.core.moments import Moments

    shards, ks = CASES["lds, C = 3, reliable"][0](), CASES["lds, C = 3, reliable"][1]
    want = {interval: ntps_estimate(shards, ks, interval=interval) for interval in ("rotation", None)}

    def on_the_host(*args, **kwargs):
        raise AssertionError("the pooled problem was solved on the host")

    for name in ("perception_subspace", "next_token_subspace", "_theory_geometry_of"):
        monkeypatch.setattr(rotation, name, on_the_host)
    assert want[None]["rotation_lower"].notna().any()    # the default row's flag computed its ranges somewhere
    combine, combined = Moments.combine, []

    def counting(parts, weights=None):
        combined.append(len(list(parts)))
        return combine(parts, weights)

    monkeypatch.setattr(Moments, "combine", staticmethod(counting))
    for interval, frame in want.items():
        combined.clear()
        assert_frames_agree(ntps_estimate(shards, ks, interval=interval, device=DEVICE), frame)
        assert combined == []
    combined.clear()
    frame = ntps_estimate(shards, ks, interval="jackknife", rotation_flag=False, device=DEVICE)
    assert frame["reliable"].any() and combined == []


@pytest.mark.parametrize("case", list(CASES))
def test_the_pooled_geometry_on_torch_is_numpys_from_the_shards_combined_on_the_device(shard_sets, case, monkeypatch):
    # what a study's estimates stage reads r_V from before it asks the row: numpy's geometry of the combined
    # shards, with no host combination (C0 and Sxx ranks equal, the projections to 1e-9)
    from ntps_nb.core.backends.torch import pooled_geometry_torch
    from ntps_nb.core.moments import Moments
    from ntps_nb.core.score import theory_geometry

    shards, _ = shard_sets[case]
    want = theory_geometry(Moments.combine(shards))

    def no_combine(parts, weights=None):
        raise AssertionError("the shards were combined on the host")

    monkeypatch.setattr(Moments, "combine", staticmethod(no_combine))
    got = pooled_geometry_torch(shards, device=DEVICE)
    assert (got.r_V, got.r_U, got.m) == (want.r_V, want.r_U, want.m)
    np.testing.assert_allclose(got.eigenvalues, want.eigenvalues, rtol=AGREEMENT)
    np.testing.assert_allclose(got.projected, want.projected, atol=AGREEMENT)
