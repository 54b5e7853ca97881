"""A probe baseline independent of the LoRA gain: the halves, and the null it is built for."""

import numpy as np
import pandas as pd
import pytest

from ntps_nb.core.gain import CROSSFIT_CONSTRUCTION, crossfit_gain, crossfit_gain_correlation
from ntps_nb.core.stats import correlate


def test_crossfit_halves_partition_the_test_split_by_label_and_swap_roles(rng):
    labels = rng.integers(0, 3, 101)
    probe = np.where(rng.random(101) < 0.7, labels, (labels + 1) % 3)
    lora = np.where(rng.random(101) < 0.8, labels, (labels + 2) % 3)
    rows = crossfit_gain(labels, probe, lora, seed=4).set_index("fold")
    assert rows["n_baseline"].sum() == 101 and (rows["n_baseline"] + rows["n_gain"] == 101).all()
    assert abs(rows.loc[0, "n_baseline"] - rows.loc[1, "n_baseline"]) <= 1
    # fold 1's baseline half is fold 0's gain half, and vice versa
    assert rows.loc[1, "probe_accuracy_baseline"] == rows.loc[0, "probe_accuracy"]
    assert rows.loc[0, "probe_accuracy_baseline"] == rows.loc[1, "probe_accuracy"]
    total_correct = rows.loc[0, "probe_accuracy_baseline"] * rows.loc[0, "n_baseline"] \
        + rows.loc[0, "probe_accuracy"] * rows.loc[0, "n_gain"]
    assert total_correct == pytest.approx(np.sum(probe == labels))
    assert (rows["gain"] == rows["lora_accuracy"] - rows["probe_accuracy"]).all()
    assert (rows["construction"] == CROSSFIT_CONSTRUCTION).all()


def test_crossfit_halves_are_stratified():
    labels = np.repeat([0, 1, 2], [40, 10, 6])
    probe = lora = labels
    out = crossfit_gain(labels, probe, lora, seed=1)
    assert out["n_baseline"].tolist() == [28, 28]
    with pytest.raises(ValueError, match="one non-zero length"):
        crossfit_gain(labels, probe[:-1], lora)


def test_crossfit_removes_the_negative_rho_that_the_shared_probe_noise_manufactures():
    """Null: on every dataset the probe and LoRA are right with the same probability 0.75,
    independently per text (200 test texts), so the gain carries no information about the probe.
    Naively (same texts) rho(probe accuracy, gain) is about -1/sqrt(2); cross-fitted it is 0. Mean
    over 100 replications of 12 datasets: a cross-fit rho has SD about 0.27 here, so the mean has
    SE about 0.027 and |mean| < 0.08 is 3 SE (this seed: 0.017); the naive mean (this seed: -0.63)
    must be below -0.5."""
    rng = np.random.default_rng(7)
    naive, crossfit = [], []
    for _ in range(100):
        frames, probe_acc, gain = [], [], []
        for d in range(12):
            labels = rng.integers(0, 2, 200)
            probe = np.where(rng.random(200) < 0.75, labels, 1 - labels)
            lora = np.where(rng.random(200) < 0.75, labels, 1 - labels)
            probe_acc.append(np.mean(probe == labels))
            gain.append(np.mean(lora == labels) - probe_acc[-1])
            frames.append(crossfit_gain(labels, probe, lora, seed=d).assign(dataset=f"d{d:02d}"))
        naive.append(correlate(probe_acc, gain))
        crossfit.append(crossfit_gain_correlation(pd.concat(frames), n_perm=10, n_boot=0)["estimate"].iloc[0])
    assert np.mean(naive) < -0.5
    assert abs(np.mean(crossfit)) < 0.08


def test_crossfit_correlation_averages_the_folds_and_labels_its_side(rng):
    rows = []
    for d in range(8):
        for fold in (0, 1):
            rows.append({"dataset": f"d{d}", "fold": fold, "probe_accuracy_baseline": rng.random(),
                         "gain": rng.random()})
    frame = pd.DataFrame(rows)
    out = crossfit_gain_correlation(frame, n_perm=500, n_boot=200).iloc[0]
    folds = [correlate(frame.loc[frame.fold == f, "probe_accuracy_baseline"], frame.loc[frame.fold == f, "gain"])
             for f in (0, 1)]
    assert out["estimate"] == pytest.approx(np.mean(folds))
    assert out["rho_fold_0"] == pytest.approx(folds[0]) and out["n_folds"] == 2
    assert out["p_side"] == "two-sided" and 0 < out["p_value"] <= 1 and out["lower"] <= out["upper"]
    with pytest.raises(ValueError, match="at least two folds"):
        crossfit_gain_correlation(frame[frame.fold == 0])
    with pytest.raises(ValueError, match="fold 1 has datasets"):
        crossfit_gain_correlation(frame[(frame.fold == 0) | (frame.dataset != "d3")])


def test_whole_split_gain_is_the_text_weighted_mean_of_the_two_halves():
    """The naive (whole test split) probe accuracy and gain equal the halves' values of
    `crossfit_gain` weighted by their sizes; mismatched inputs are refused."""
    from ntps_nb.core.gain import crossfit_gain, whole_split_gain

    rng = np.random.default_rng(11)
    labels = rng.integers(0, 3, 101)
    probe = np.where(rng.random(101) < 0.7, labels, (labels + 1) % 3)
    lora = np.where(rng.random(101) < 0.8, labels, (labels + 2) % 3)
    accuracy, gain = whole_split_gain(labels, probe, lora)
    halves = crossfit_gain(labels, probe, lora, seed=3)
    weights = halves["n_gain"].to_numpy(float)
    assert accuracy == pytest.approx(np.average(halves["probe_accuracy"], weights=weights), abs=1e-12)
    assert gain == pytest.approx(np.average(halves["gain"], weights=weights), abs=1e-12)
    with pytest.raises(ValueError, match="one non-zero length"):
        whole_split_gain(labels, probe[:-1], lora)


def test_predictions_of_another_kind_than_the_labels_are_refused():
    """Class names beside integer labels never compare equal: every prediction counted wrong, accuracy 0, silently."""
    from ntps_nb.core.gain import crossfit_gain, whole_split_gain

    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    probe, lora = np.array([0, 1, 1, 1, 0, 0, 0, 1]), np.array([0, 1, 0, 1, 0, 1, 1, 1])
    for bad, message in ((probe.astype(str), "probe_predictions must be integers 0..C-1, got dtype <U"),
                         (probe - 1, "probe_predictions must lie in 0..C-1"),
                         (np.where(probe == 0, np.nan, probe), "probe_predictions must be integers 0..C-1; got")):
        for gain in (lambda: crossfit_gain(labels, bad, lora), lambda: whole_split_gain(labels, bad, lora)):
            with pytest.raises(ValueError, match=message):
                gain()
    with pytest.raises(ValueError, match="test_labels must be integers"):
        whole_split_gain(labels.astype(str), probe, lora)
    assert whole_split_gain(labels.astype(float), probe, lora) == whole_split_gain(labels, probe, lora)
