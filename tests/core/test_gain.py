"""Gain prediction across datasets: exact recovery, honest leave-one-dataset-out, bad inputs."""

import numpy as np
import pandas as pd
import pytest

from ntps_nb.core.gain import fit_gain_predictor, gain_correlation, gain_prediction


def frame(ntps, gain, **extra):
    return pd.DataFrame({"dataset": [f"d{i}" for i in range(len(ntps))], "ntps": ntps, "gain": gain, **extra})


def test_noiseless_linear_data_is_recovered_exactly():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 8)
    table = frame(x, 0.2 - 0.15 * x)
    fit = fit_gain_predictor(x, 0.2 - 0.15 * x)
    assert fit["a"] == pytest.approx(0.2, abs=1e-12) and fit["b"] == pytest.approx(-0.15, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0)
    exact = fit_gain_predictor(x[:2], [0.3, -0.1])  # two datasets, two coefficients: any gains fit exactly
    assert exact["n_datasets"] == 2 and np.isnan(exact["r2"])
    assert np.isnan(fit_gain_predictor(x[:3], [0.3, -0.1, 0.2], probe_accuracy=[0.5, 0.7, 0.6])["r2"])
    assert 0 <= fit_gain_predictor(x[:3], [0.3, -0.1, 0.2])["r2"] <= 1  # three datasets, two coefficients: a fit
    out = gain_prediction(table)
    folds, summary = out["folds"], out["summary"].set_index("predictor")
    np.testing.assert_allclose(folds["predicted"], folds["gain"], atol=1e-12)
    np.testing.assert_allclose(folds[["a", "b"]].to_numpy(), np.tile([0.2, -0.15], (8, 1)), atol=1e-12)
    assert summary.loc["linear", "mae_points"] < 1e-9
    assert summary.loc["trivial", "mae_points"] > 1.0
    assert summary.loc["linear", "beats_trivial"]
    assert gain_correlation(table)["rho"].iloc[0] == pytest.approx(-1.0)


def test_probe_accuracy_term_is_recovered():
    rng = np.random.default_rng(1)
    x, p = rng.uniform(0, 1, 7), rng.uniform(0.5, 1, 7)
    table = frame(x, 0.1 - 0.05 * x - 0.2 * p, probe_accuracy=p)
    out = gain_prediction(table, probe="probe_accuracy")
    np.testing.assert_allclose(out["folds"]["predicted"], out["folds"]["gain"], atol=1e-12)
    linear = out["summary"].iloc[0]
    assert (linear["a"], linear["b"], linear["c"]) == pytest.approx((0.1, -0.05, -0.2), abs=1e-12)


def test_trivial_predictor_is_the_mean_of_the_others():
    table = frame([0.1, 0.5, 0.2, 0.9], [0.01, 0.04, 0.10, 0.03])
    folds = gain_prediction(table)["folds"]
    g = table["gain"].to_numpy()
    np.testing.assert_allclose(folds["trivial"], [(g.sum() - gi) / 3 for gi in g])


def test_held_out_dataset_never_enters_its_own_prediction():
    rng = np.random.default_rng(2)
    x, p = rng.uniform(0, 1, 6), rng.uniform(0.5, 1, 6)
    base = frame(x, 0.1 - 0.1 * x + 0.01 * rng.standard_normal(6), probe_accuracy=p)
    reference = gain_prediction(base, probe="probe_accuracy")["folds"]
    for i in range(6):
        changed = base.copy()
        changed.loc[i, "gain"] += 5.0  # a wild value: any use of it moves the prediction
        folds = gain_prediction(changed, probe="probe_accuracy")["folds"]
        assert folds.loc[i, "predicted"] == pytest.approx(reference.loc[i, "predicted"], abs=1e-12)
        assert folds.loc[i, "trivial"] == pytest.approx(reference.loc[i, "trivial"], abs=1e-12)
        others = np.arange(6) != i
        assert not np.allclose(folds.loc[others, "predicted"], reference.loc[others, "predicted"])


def test_correlation_interval_and_sign():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, 10)
    row = gain_correlation(frame(x, -x + 0.05 * rng.standard_normal(10)), n_boot=500, n_perm=2000).iloc[0]
    assert row["rho"] < -0.8 and row["lower"] <= row["rho"] <= row["upper"] and row["p_value"] < 0.01
    assert row["n_datasets"] == 10 and row["method"] == "spearman"


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 3 datasets"):
        gain_prediction(frame([0.1, 0.2], [0.0, 0.1]))
    with pytest.raises(ValueError, match="at least 3 datasets"):
        gain_correlation(frame([0.1, 0.2], [0.0, 0.1]))
    with pytest.raises(ValueError, match="at least 4 datasets"):
        gain_prediction(frame([0.1, 0.2, 0.3], [0.0, 0.1, 0.3], probe_accuracy=[0.5, 0.6, 0.9]), probe="probe_accuracy")
    with pytest.raises(ValueError, match="more than once"):
        gain_prediction(pd.DataFrame({"dataset": ["a", "a", "b", "c"], "ntps": [0.1, 0.2, 0.3, 0.4],
                                      "gain": [0, 0.1, 0.2, 0.3]}))
    with pytest.raises(ValueError, match="NaN"):
        gain_prediction(frame([0.1, np.nan, 0.3], [0.0, 0.1, 0.3]))
    with pytest.raises(ValueError, match="no column"):
        gain_prediction(frame([0.1, 0.2, 0.3], [0.0, 0.1, 0.3]), probe="probe_accuracy")
