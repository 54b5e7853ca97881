"""Stability and label-dependence diagnostics: the theory variant is stable and label-dependent,
the reference variant is not stable; the factorised permutation path equals the plain one."""

import numpy as np
import pandas as pd
import pytest

from ntps_nb import (
    moments_from_sequences,
    perception_moments,
    reference_geometry,
    synthetic_linear_task,
    theory_geometry,
)
from ntps_nb.core.diagnostics import (
    PERTURB_THRESHOLD,
    ReferenceFactorization,
    TheoryFactorization,
    _tail,
    label_null_p_value,
    ntps_diagnostics,
    stability_summary,
    three_dim_example,
)
from tests.core.conftest import random_moments
from tests.core.fresh import run_fresh

PLANTED_K = 8  # n_predictable of the planted task: V has a wide eigengap after its 8th direction
# Shuffle seed of the null task. Under independent labels the permutation p-value is uniform,
# so a fixed seed passes "p > 0.05" with probability 0.95 before it is drawn and always after;
# test_null_task_pvalues_are_calibrated checks that this is not a lucky pick.
NULL_SHUFFLE_SEED = 1000


@pytest.fixture(scope="module")
def planted():
    return synthetic_linear_task(angle=0.3, seed=0)


@pytest.fixture(scope="module")
def planted_both(planted):
    return ntps_diagnostics(planted.moments, planted.features, planted.labels, variant=["theory", "reference"],
                            n_perturb=20, n_permutations=100, seed=0, model="synthetic", layer=3)


def shuffled(task, seed):
    labels = np.random.default_rng(seed).permutation(task.labels)
    return moments_from_sequences(list(task.sequences), labels, task.n_classes), labels


def permuted_moments(task, seed):
    labels = np.random.default_rng(seed).permutation(task.labels)
    pm = perception_moments(task.features, labels, task.n_classes)
    return task.moments.with_labels(pm["Sxy"], pm["Syy"])


# --- the factorised permutation path against the plain computation ---------------------------

@pytest.mark.parametrize("seed", [1, 2])
def test_theory_factorization_equals_theory_geometry_under_permuted_labels(planted, seed):
    factor = TheoryFactorization.from_moments(planted.moments)
    numpy_factor = TheoryFactorization.from_moments(planted.moments, solver="numpy")
    for moments in (planted.moments, permuted_moments(planted, seed)):
        expected = theory_geometry(moments)
        for f, atol in ((factor, 1e-10), (numpy_factor, 1e-9)):
            got = f.geometry(moments)
            assert (got.m, got.r_U, got.r_V) == (expected.m, expected.r_U, expected.r_V)
            np.testing.assert_allclose(got.eigenvalues, expected.eigenvalues, rtol=1e-10)
            np.testing.assert_allclose(got.projected, expected.projected, atol=atol)
            assert got.trace_Syy == pytest.approx(expected.trace_Syy)


def test_reference_factorization_repeats_reference_geometry_exactly(planted):
    # ill-posed here (C = 4 < d = 32), so only an operation-by-operation repeat agrees
    factor = ReferenceFactorization.from_moments(planted.moments)
    for moments in (planted.moments, permuted_moments(planted, 3)):
        expected = reference_geometry(moments).sweep()["ntps"].to_numpy()
        got = factor.geometry(moments).sweep()["ntps"].to_numpy()
        np.testing.assert_array_equal(got, expected)


def test_reference_solvers_agree_when_well_posed(rng):
    # C >= d: Sxy Sxy^T has full rank and every setting must give the same score
    m = random_moments(rng, d=6, n_classes=9)
    values = [ReferenceFactorization.from_moments(m, precision=p, solver=s).geometry(m).sweep()["ntps"].to_numpy()
              for p in ("float32", "float64") for s in ("scipy", "numpy")]
    np.testing.assert_allclose(values[2], reference_geometry(m, precision="float64").sweep()["ntps"], atol=1e-12)
    np.testing.assert_allclose(values[3], values[2], atol=1e-9)
    np.testing.assert_allclose(values[0], values[2], atol=1e-3)
    frame = ntps_diagnostics(m, variant="reference", n_perturb=5, n_permutations=0)
    assert np.nanmax(frame["solver_max_dev"]) < 1e-3
    assert np.nanmax(frame["perturb_max_dev"]) < 1e-3


def test_factorization_rejects_moments_with_other_unlabelled_moments(planted, rng):
    factor = TheoryFactorization.from_moments(planted.moments)
    other = synthetic_linear_task(angle=0.3, seed=1, n_texts=200).moments
    with pytest.raises(ValueError, match="differ from the factorised ones in Sxx"):
        factor.geometry(other)


# --- the planted task: theory stable and label-dependent, reference unstable -----------------

def test_theory_is_stable_and_responds_to_labels_on_planted_task(planted_both):
    theory = planted_both[planted_both["variant"] == "theory"].set_index("k")
    # a 1e-6 relative perturbation: at the planted k the score moves by less than 1e-6; over all k
    # the change is the perturbation times a condition number (the V eigengaps), below 1e-4
    assert theory.loc[PLANTED_K, "perturb_max_dev"] < 1e-6
    assert theory["perturb_max_dev"].max() < 1e-4
    assert (theory["perturb_rank_changes"] == 0).all()
    for k in (4, PLANTED_K):
        assert theory.loc[k, "p_value"] < 0.05
        assert theory.loc[k, "p_value"] == pytest.approx(1 / 101)  # no permutation reached the real score
        assert theory.loc[k, "ntps"] > theory.loc[k, "perm_mean"] + 5 * theory.loc[k, "perm_std"]
    assert theory["solver_max_dev"].max() < 1e-10
    # k = r_V: V spans everything, NTPS = 1 whatever the labels, and the null says so
    full = theory.loc[theory.index.max()]
    assert full["ntps"] == pytest.approx(1.0) and full["p_value"] == 1.0


def test_reference_moves_more_under_rounding_than_theory_and_than_under_random_labels(planted_both):
    theory = planted_both[planted_both["variant"] == "theory"]
    reference = planted_both[planted_both["variant"] == "reference"].set_index("fraction")
    assert reference["perturb_max_dev"].max() > 1e-2
    assert reference["perturb_max_dev"].max() > 1e3 * theory["perturb_max_dev"].max()
    assert reference["solver_max_dev"].max() > 1e-2
    # SPEC section 4: at the smallest fraction a 1e-6 perturbation moves the released score more
    # than replacing the labels by random ones
    first = reference.iloc[0]
    assert first["perturb_max_dev"] > abs(first["ntps"] - first["perm_mean"])
    assert first["p_value"] > 0.05


def test_stability_summary_says_which_variant_measures_the_task(planted_both):
    summary = stability_summary(planted_both).set_index("variant")
    assert summary.loc["theory", "responds_to_labels"] and summary.loc["theory", "survives_rounding"]
    assert not summary.loc["reference", "survives_rounding"]
    assert summary.loc["reference", "max_perturb_dev"] >= PERTURB_THRESHOLD
    assert "does NOT survive rounding" in summary.loc["reference", "statement"]
    by_layer = stability_summary(planted_both, by=("layer", "variant"))
    assert list(by_layer["layer"]) == [3, 3]
    with pytest.raises(ValueError, match="lacks columns"):
        stability_summary(planted_both.drop(columns="p_value"))


def test_label_null_p_value_reads_perm_p_as_a_one_sided_p_value(planted_both):
    # a table as version 1 of the study's diagnostics stage wrote it: perm_p, no p_side
    stored = planted_both.drop(columns="p_side").rename(columns={"p_value": "perm_p"})
    renamed = label_null_p_value(stored)
    assert "perm_p" not in renamed and "perm_p" in stored  # a copy: the stored table is left as it is
    np.testing.assert_array_equal(renamed["p_value"], stored["perm_p"])
    assert (renamed["p_side"] == "one-sided greater").all()
    assert list(renamed.columns).index("p_side") == list(renamed.columns).index("p_value") + 1
    assert label_null_p_value(renamed).equals(renamed)  # already in the package's names: unchanged
    pd.testing.assert_frame_equal(stability_summary(renamed), stability_summary(planted_both))


# --- labels independent of the features -------------------------------------------------------

def test_null_task_pvalue_is_not_small(planted):
    moments, labels = shuffled(planted, NULL_SHUFFLE_SEED)
    frame = ntps_diagnostics(moments, planted.features, labels, k=[4, PLANTED_K], n_perturb=0, seed=0,
                             solvers=False).set_index("k")
    assert (frame["p_value"] > 0.05).all(), frame["p_value"]
    # the theory score falls when the labels carry no information about the features
    planted_value = theory_geometry(planted.moments).ntps(PLANTED_K)
    assert frame.loc[PLANTED_K, "ntps"] < planted_value - 0.3


def test_null_task_pvalues_are_calibrated(planted):
    # independent shuffles: p ~ uniform, so #{p < 0.05} ~ Binomial(10, 0.05); P(>= 3) = 0.012
    small = 0
    for seed in range(10):
        labels = np.random.default_rng(2000 + seed).permutation(planted.labels)
        pm = perception_moments(planted.features, labels, planted.n_classes)
        moments = planted.moments.with_labels(pm["Sxy"], pm["Syy"])
        frame = ntps_diagnostics(moments, planted.features, labels, k=PLANTED_K, n_perturb=0, n_permutations=50,
                                 seed=seed, solvers=False)
        small += int(frame["p_value"].iloc[0] < 0.05)
    assert small <= 2


# --- contract: grid, provenance, reproducibility, no side effects ---------------------------

def test_grid_columns_and_provenance(planted, planted_both):
    required = {"variant", "k", "fraction", "ntps", "perturb_max_dev", "perturb_std", "perm_mean", "perm_std",
                "p_value", "p_side", "perm_z", "solver_max_dev", "model", "layer", "seed", "perturb_scale", "n_permutations"}
    assert required <= set(planted_both.columns)
    r_V = theory_geometry(planted.moments).r_V
    assert (planted_both["variant"] == "theory").sum() == r_V
    assert (planted_both["variant"] == "reference").sum() == 19
    assert (planted_both["model"] == "synthetic").all() and (planted_both["layer"] == 3).all()
    # the unperturbed values are those of the score module
    theory = planted_both[planted_both["variant"] == "theory"]
    np.testing.assert_allclose(theory["ntps"], theory_geometry(planted.moments).sweep()["ntps"], atol=1e-12)
    reference = planted_both[planted_both["variant"] == "reference"]
    np.testing.assert_array_equal(reference["ntps"], reference_geometry(planted.moments).sweep()["ntps"])

    both = ntps_diagnostics(planted.moments, variant=["theory", "reference"], k=[2, 8], fraction=[0.25, 0.5],
                            n_perturb=2, n_permutations=0, solvers=False)
    assert list(both["k"].iloc[:2]) == [2, 8] and list(both["fraction"].iloc[2:]) == [0.25, 0.5]
    by_fraction = ntps_diagnostics(planted.moments, fraction=[0.25, 0.5], n_perturb=0, n_permutations=0,
                                   solvers=False)
    assert list(by_fraction["k"]) == [int(0.25 * r_V), int(0.5 * r_V)]
    skipped = ntps_diagnostics(planted.moments, k=4, n_perturb=0, n_permutations=0, solvers=False)
    assert skipped[["perturb_max_dev", "p_value", "perm_z", "solver_max_dev"]].isna().all().all()


def test_reproducible_for_a_fixed_seed(planted):
    def run(seed):
        return ntps_diagnostics(planted.moments, planted.features, planted.labels, variant=["theory", "reference"],
                                k=[1, 4, 8], fraction=[0.05, 0.5], n_perturb=4, n_permutations=20, seed=seed)

    first = run(7)
    pd.testing.assert_frame_equal(first, run(7))
    other = run(8)
    assert not np.allclose(first["perm_mean"], other["perm_mean"])
    assert not np.allclose(first["perturb_std"], other["perturb_std"])
    np.testing.assert_array_equal(first["ntps"], other["ntps"])


def test_input_moments_features_and_labels_are_left_untouched(planted):
    moments = planted.moments
    before = {name: (value.tobytes(), value.flags.writeable) for name, value in moments.arrays().items()}
    features, labels = planted.features.copy(), planted.labels.copy()
    ntps_diagnostics(moments, features, labels, variant=["theory", "reference"], k=[1, 8], fraction=[0.05],
                     n_perturb=3, n_permutations=5)
    after = {name: (value.tobytes(), value.flags.writeable) for name, value in moments.arrays().items()}
    assert after == before
    np.testing.assert_array_equal(features, planted.features)
    np.testing.assert_array_equal(labels, planted.labels)


def test_centred_moments_use_the_centred_label_null(planted):
    centred = planted.moments.centred()
    frame = ntps_diagnostics(centred, planted.features, planted.labels, k=[4, PLANTED_K], n_perturb=0,
                             n_permutations=20, solvers=False)
    assert (frame["p_value"] < 0.05).all()
    permuted = permuted_moments(planted, 5).centred()  # label shuffle, then centring
    factor = TheoryFactorization.from_moments(centred)
    relabelled = centred.with_labels(permuted.Sxy, permuted.Syy)
    np.testing.assert_allclose(factor.geometry(relabelled).projected, theory_geometry(relabelled).projected,
                               atol=1e-10)


def test_tail_pvalue_counts_ties_and_uses_the_plus_one_correction():
    real = np.array([0.5, 0.9, 1.0])
    null = np.array([[0.4, 0.1, 1.0], [0.6, 0.2, 1.0 - 1e-14], [0.5, 0.3, 1.0]])
    tail = _tail(real, null, 1e-10)
    np.testing.assert_allclose(tail["p_value"], [(1 + 2) / 4, 1 / 4, 1.0])
    assert tail["perm_z"][1] == pytest.approx((0.9 - 0.2) / 0.1)
    assert np.isnan(tail["perm_z"][2])  # a constant null has no z-score


# --- bad input ---------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors(planted):
    m, X, y = planted.moments, planted.features, planted.labels
    with pytest.raises(ValueError, match="needs the pooled features and labels"):
        ntps_diagnostics(m)
    with pytest.raises(ValueError, match="n_permutations = 0"):
        ntps_diagnostics(m, X, y, n_permutations=0)
    with pytest.raises(ValueError, match="both features and labels"):
        ntps_diagnostics(m, X, None, n_permutations=0)
    with pytest.raises(ValueError, match="2000 rows but there are 1999 labels"):
        ntps_diagnostics(m, X, y[:-1], n_perturb=0)
    other_layer = synthetic_linear_task(angle=0.3, seed=1).features
    with pytest.raises(ValueError, match="do not reproduce the moments' Sxx"):
        ntps_diagnostics(m, other_layer, y, n_perturb=0)
    with pytest.raises(ValueError, match="do not reproduce the moments' Sxy"):
        ntps_diagnostics(m, X, np.random.default_rng(0).permutation(y), n_perturb=0)
    with pytest.raises(ValueError, match="dimension 31"):
        ntps_diagnostics(m, X[:, :31], y, n_perturb=0)
    with pytest.raises(ValueError, match="n_permutations must be a non-negative integer"):
        ntps_diagnostics(m, X, y, n_permutations=-1)
    with pytest.raises(ValueError, match="n_perturb must be"):
        ntps_diagnostics(m, n_perturb=2.5, n_permutations=0)
    with pytest.raises(ValueError, match="perturb_scale"):
        ntps_diagnostics(m, perturb_scale=0.0, n_permutations=0)
    with pytest.raises(ValueError, match="variant must be"):
        ntps_diagnostics(m, variant="released", n_permutations=0)
    with pytest.raises(ValueError, match="takes fraction="):
        ntps_diagnostics(m, variant="reference", k=4, n_permutations=0)
    with pytest.raises(ValueError, match="not both"):
        ntps_diagnostics(m, k=4, fraction=0.5, n_permutations=0)
    with pytest.raises(ValueError, match="outside 1..r_V"):
        ntps_diagnostics(m, k=[4, 33], n_permutations=0)
    with pytest.raises(ValueError, match="fraction must lie in"):
        ntps_diagnostics(m, variant="reference", fraction=1.0, n_permutations=0)
    with pytest.raises(ValueError, match="selects k_U = 0"):
        ntps_diagnostics(m, variant="reference", fraction=0.01, n_permutations=0)
    with pytest.raises(ValueError, match="clash"):
        ntps_diagnostics(m, n_permutations=0, ntps=1)
    with pytest.raises(TypeError, match="Moments"):
        ntps_diagnostics({"Sxx": m.Sxx}, n_permutations=0)


# --- the three-dimensional example for notebook 01 ---------------------------------------------

def test_three_dim_example_shows_arbitrary_ascending_and_stable_descending_vector():
    example = three_dim_example()
    a, zero = example["a"], example["zero_space"]
    assert np.linalg.matrix_rank(example["A"]) == 1
    np.testing.assert_allclose(zero.T @ a, 0.0, atol=1e-15)
    assert example["ascending_overlap"] < 1e-6  # two valid "first" vectors, orthogonal
    assert example["descending_overlap"] == pytest.approx(1.0, abs=1e-12)
    frame = example["frame"]
    ascending = frame[frame["order"] == "ascending"]
    descending = frame[frame["order"] == "descending"]
    np.testing.assert_allclose(ascending["norm_in_zero_space"], 1.0, atol=1e-12)
    np.testing.assert_allclose(descending["abs_cos_with_a"], 1.0, atol=1e-12)
    np.testing.assert_allclose(descending["eigenvalue"], a @ a)


# --- estimators ------------------------------------------------------------------------------


def test_a_pooled_estimator_is_scored_on_the_real_perturbed_and_permuted_moments(planted):
    """estimator='wishart': the real value is estimate_ntps of the moments, the permutation null
    that of the moments under the same permutations of the labels (recomputed here from the
    features), and the eigensolver spread, a plug-in measurement, is not reported."""
    from ntps_nb.core.estimators import estimate_ntps

    ks = np.array([1, 2, PLANTED_K])
    frame = ntps_diagnostics(planted.moments, planted.features, planted.labels, k=list(ks), n_perturb=3,
                             n_permutations=15, seed=4, estimator="wishart")
    assert (frame["estimator"] == "wishart").all() and list(frame.columns[:3]) == ["variant", "estimator", "k"]
    np.testing.assert_allclose(frame["ntps"], estimate_ntps(planted.moments, ks, estimator="wishart").estimate,
                               rtol=1e-12)
    # the permutations of ntps_diagnostics: the second stream of SeedSequence(seed)
    rng = np.random.default_rng(np.random.SeedSequence(4).spawn(2)[1])
    Y = np.eye(planted.n_classes)[planted.labels]
    null = []
    for _ in range(15):
        Sxy = planted.features.T @ Y[rng.permutation(len(planted.labels))] / len(planted.labels)
        null.append(estimate_ntps(planted.moments.with_labels(Sxy, planted.moments.Syy), ks,
                                  estimator="wishart").estimate)
    np.testing.assert_allclose(frame["perm_mean"], np.mean(null, axis=0), rtol=1e-9)
    assert frame["solver_max_dev"].isna().all() and (frame["perturb_max_dev"] < PERTURB_THRESHOLD).all()
    assert (frame["p_value"] < 0.1).all()  # the planted labels: above every permuted value
    plugin = ntps_diagnostics(planted.moments, planted.features, planted.labels, k=list(ks), n_perturb=3,
                              n_permutations=15, seed=4)
    assert (plugin["estimator"] == "plugin").all() and plugin["solver_max_dev"].notna().all()


@pytest.mark.parametrize("options, match", [
    ({"estimator": "ridge"}, r"estimator must be one of \('plugin', "),
    ({"estimator": "crossfit"}, r"needs per-shard moments.*pooled estimators \('plugin', 'adjusted'"),
    ({"estimator": "adjusted", "variant": ["theory", "reference"]}, "theory variant only"),
])
def test_an_estimator_the_diagnostics_cannot_evaluate_is_refused(planted, options, match):
    with pytest.raises(ValueError, match=match):
        ntps_diagnostics(planted.moments, planted.features, planted.labels, k=[1], n_perturb=1, n_permutations=2,
                         **options)


def test_host_solver_values_split_by_setting_equal_the_whole_and_feed_solvers():
    """`host_solver_values` of each setting alone equals its share of all settings at once, and
    handed back as ``solvers=`` gives the frame ntps_diagnostics computes itself; bad settings and
    malformed values are refused."""
    from ntps_nb.core.diagnostics import SOLVER_CONFIGS, host_solver_values

    m = synthetic_linear_task(n_texts=300, d=12, n_classes=3, n_predictable=4, seed=4).moments
    for variant, grid in (("theory", dict(k=[1, 2, 4])), ("reference", dict(fraction=[0.2, 0.5]))):
        whole = host_solver_values(m, variant, **grid)
        parts = [host_solver_values(m, variant, configs=[c], **grid)[0] for c in SOLVER_CONFIGS[variant]]
        for a, b in zip(whole, parts):
            np.testing.assert_array_equal(a, b)
        own = ntps_diagnostics(m, variant=variant, n_perturb=0, n_permutations=0, **grid)
        given = ntps_diagnostics(m, variant=variant, n_perturb=0, n_permutations=0, solvers={variant: parts}, **grid)
        np.testing.assert_array_equal(given["solver_max_dev"].to_numpy(float), own["solver_max_dev"].to_numpy(float))
        with pytest.raises(ValueError, match="solvers"):
            ntps_diagnostics(m, variant=variant, n_perturb=0, n_permutations=0, solvers={variant: parts[:1]}, **grid)
    with pytest.raises(ValueError, match="unknown solver settings"):
        host_solver_values(m, "theory", k=[1], configs=[("float32", "scipy")])


def test_host_solver_processes_compute_each_setting_in_a_bounded_worker_process():
    """`HostSolverProcesses` computes a setting in another process (not a thread of this one: scipy's
    LAPACK wrappers keep the GIL), with its BLAS threads bound, and gets exactly the values this
    process gets, on either grid form; unknown settings and bad sizes are refused."""
    import os

    from threadpoolctl import threadpool_info

    from ntps_nb.core.diagnostics import SOLVER_CONFIGS, HostSolverProcesses, host_solver_values

    m = synthetic_linear_task(n_texts=300, d=12, n_classes=3, n_predictable=4, seed=4).moments
    grids = {"theory": dict(k=[1, 2, 4]), "reference": dict(fraction=[0.2, 0.5])}
    with HostSolverProcesses(2, 1) as pool:
        assert pool.pool.submit(os.getpid).result() != os.getpid()
        blas = {p["num_threads"] for p in pool.pool.submit(threadpool_info).result() if p["user_api"] == "blas"}
        assert blas == {1}
        for variant, grid in grids.items():
            here = host_solver_values(m, variant, **grid)
            futures = [pool.submit(m, variant, c, **grid) for c in SOLVER_CONFIGS[variant]]
            for want, future in zip(here, futures):
                np.testing.assert_array_equal(future.result(), want)
        # the explicit grid form (a caller's own ks / fractions) gives the same numbers
        explicit = pool.submit(m, "theory", ("float64", "numpy"), ks=np.array([1, 2, 4]), fractions=np.zeros(3))
        np.testing.assert_array_equal(explicit.result(),
                                      host_solver_values(m, "theory", k=[1, 2, 4], configs=[("float64", "numpy")])[0])
        with pytest.raises(ValueError, match="unknown solver setting"):
            pool.submit(m, "theory", ("float32", "scipy"), k=[1])
    with pytest.raises(ValueError, match="positive"):
        HostSolverProcesses(0, 1)


def test_host_solver_processes_work_from_a_script_without_a_main_guard(tmp_path):
    """A user's script that calls the device diagnostics at top level (no ``if __name__ ==
    "__main__"``) is not re-run by the workers, as multiprocessing's spawn would re-run it."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from ntps_nb.core.diagnostics import HostSolverProcesses, host_solver_values\n"
        "from ntps_nb import synthetic_linear_task\n"
        "print('top level ran', flush=True)\n"
        "m = synthetic_linear_task(n_texts=200, d=8, n_classes=3, n_predictable=3, seed=1).moments\n"
        "with HostSolverProcesses(2, 1) as pool:\n"
        "    got = pool.submit(m, 'theory', ('float64', 'scipy'), k=[1, 2]).result()\n"
        "want = host_solver_values(m, 'theory', k=[1, 2], configs=[('float64', 'scipy')])[0]\n"
        "print('equal', bool((got == want).all()), flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["top level ran", "equal True"]


def test_host_solver_processes_closed_with_cancel_terminate_a_running_task():
    """An interrupted analysis does not wait for a running factorisation: ``close(cancel=True)``
    terminates it (its future ends without a result); a plain close waits and gets the result."""
    import time

    from ntps_nb.core.diagnostics import HostSolverProcesses

    pool = HostSolverProcesses(1, 1)
    running = pool.pool.submit(time.sleep, 120)
    while not running.running():
        time.sleep(0.05)
    pool.close(cancel=True)
    assert running.done() and (running.cancelled() or running.exception() is not None)
    with HostSolverProcesses(1, 1) as pool:
        short = pool.pool.submit(time.sleep, 0.1)
    assert short.done() and short.result() is None


def test_the_unperturbed_theory_rows_carry_the_sweeps_warnings_and_the_copies_none(planted):
    """`ntps_diagnostics` says of its unperturbed NTPS what `ntps_sweep` says of it: once, however many
    perturbed copies and permutations it draws, on both backends; a sample `ntps_sweep` is silent on gives
    no warning. Where each points is checked in a fresh interpreter (the shape checker's wrappers add frames
    here)."""
    import importlib.util
    import warnings

    import ntps_nb
    from ntps_nb.core.score import InterpolationWarning, NextTokenTieWarning, RoundedMomentsWarning
    from tests.core.test_score import rounded, token_embedding_moments

    said = (InterpolationWarning, NextTokenTieWarning, RoundedMomentsWarning)
    devices = [None, "cpu"] if importlib.util.find_spec("torch") is not None else [None]

    def caught(moments, features=None, labels=None, **options):
        """The package's warnings of one call per device, as (category, sweep's first words) pairs."""
        out = []
        for device in devices:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                ntps_diagnostics(moments, features, labels, n_perturb=5, n_permutations=10 if labels is not None
                                 else 0, solvers=False, device=device, **options)
            out.append([w.category for w in record if issubclass(w.category, said)])
        return out

    for categories in caught(planted.moments, planted.features, planted.labels, k=[4, PLANTED_K]):
        assert categories == []  # 2,000 texts in d = 32: nothing to say
    few = synthetic_linear_task(angle=0.3, seed=0, n_texts=24)  # no more texts than d
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ntps_nb.ntps_sweep(few.moments)
    assert [w.category for w in record if issubclass(w.category, said)] == [InterpolationWarning]
    for categories in caught(few.moments, few.features, few.labels, k=[4, PLANTED_K]):
        assert categories == [InterpolationWarning]
    m, r0, r1 = token_embedding_moments(0)
    for categories in caught(m, k=[r1 + 1]):
        assert categories == [NextTokenTieWarning]
    for categories in caught(m, k=[r1]):
        assert categories == []
    for categories in caught(rounded(m, 1e-8), k=[r1]):  # C0 of rank r0 < d: the rounding reaches below zero
        assert categories == [RoundedMomentsWarning]
    header = ("import warnings\nfrom ntps_nb import ntps_diagnostics\n"
              "from ntps_nb.core.theory import synthetic_linear_task\n"
              "from tests.core.test_score import rounded, token_embedding_moments\n"
              "m, r0, r1 = token_embedding_moments(0)\nfew = synthetic_linear_task(angle=0.3, seed=0, n_texts=24)\n"
              "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n")
    calls = [(category, f"    ntps_diagnostics({moments}, k=[{k}], n_perturb=2, n_permutations=0, solvers=False, "
                        f"device={device!r})\n")
             for category, moments, k in (("InterpolationWarning", "few.moments", 4),
                                          ("NextTokenTieWarning", "m", "r1 + 1"),
                                          ("RoundedMomentsWarning", "rounded(m, 1e-8)", "r1"))
             for device in devices]
    code = (header + "".join(call for _, call in calls)
            + "print([(w.category.__name__, w.filename, w.lineno) for w in caught])\n")
    where = run_fresh(code)
    first = header.count("\n") + 1  # the line of the first call
    assert where.strip() == repr([(category, "<string>", first + i) for i, (category, _) in enumerate(calls)])
