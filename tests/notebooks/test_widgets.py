"""The explorer of notebook 05: each model's own layers, opening at k = 8 (fast, no kernel)."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from ntps_nb import plots, widgets


def _tables():
    """Theory NTPS of two models of different depth (layers 0-30 and 0-18) on two datasets, and
    their held-out probes."""
    rows, probes = [], []
    for model, depth in (("deep", 30), ("shallow", 18)):
        for dataset in ("a", "b"):
            for layer in range(depth + 1):
                probes.append({"model": model, "dataset": dataset, "layer": layer, "protocol": "heldout",
                               "accuracy": 0.5 + layer / 100})
                rows += [{"model": model, "dataset": dataset, "variant": "theory", "layer": layer, "k": k,
                          "fraction": np.nan, "ntps": min(1.0, 0.1 * k ** 0.5)} for k in (1, 2, 4, 8, 16)]
    return pd.DataFrame(rows), pd.DataFrame(probes)


def test_each_model_offers_its_own_layers_and_the_explorer_opens_at_k_8():
    ntps, _ = _tables()
    assert widgets.explorer_options(ntps, "shallow")["layer"] == list(range(19))
    assert widgets.explorer_options(ntps, "deep")["layer"] == list(range(31))
    assert widgets.explorer_options(ntps, "shallow")["model"] == ["deep", "shallow"]
    assert widgets.default_choice(ntps) == {"model": "deep", "dataset": "a", "variant": "theory", "layer": 15, "k": 8}
    assert widgets.default_choice(ntps, model="shallow")["layer"] == 9
    assert widgets.default_choice(ntps[ntps.k != 8])["k"] in (4, 16)  # the nearest in log scale
    with pytest.raises(ValueError, match="no NTPS rows"):
        widgets.explorer_options(ntps, "absent")


def test_switching_model_keeps_the_relative_depth_and_never_offers_a_missing_layer():
    ntps, probes = _tables()
    box = widgets.explorer(ntps, probes)
    controls = box.controls
    controls["layer"].value = 30
    controls["model"].value = "shallow"
    assert list(controls["layer"].options) == list(range(19)) and controls["layer"].value == 18
    assert controls["k"].value == 8
    controls["layer"].value = 0
    controls["model"].value = "deep"
    assert list(controls["layer"].options) == list(range(31)) and controls["layer"].value == 0
    assert widgets.same_depth(list(range(19)), 15, list(range(31))) == 9


def test_the_view_refuses_a_layer_the_model_lacks():
    ntps, probes = _tables()
    plots.explorer_view(ntps, probes, model="shallow", dataset="a", layer=18, k=8)
    with pytest.raises(ValueError, match="shallow has no layer 25"):
        plots.explorer_view(ntps, probes, model="shallow", dataset="a", layer=25, k=8)


def test_the_view_names_datasets_in_a_legend_not_on_the_axes():
    ntps, probes = _tables()
    fig = plots.explorer_view(ntps, probes, model="shallow", dataset="a", layer=18, k=8)
    across = fig.axes[2]
    assert not across.texts  # no dataset names written over the points
    titles = [legend.get_title().get_text() for legend in fig.legends]
    assert "dataset" in titles
    names = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert set(probes["dataset"]) <= names | {"a (left panels)"}
    plt.close(fig)


def test_whitened_subspaces_draws_the_principal_angle():
    rng = np.random.default_rng(0)
    perception, _ = np.linalg.qr(rng.standard_normal((3, 2)))
    next_token = rng.standard_normal((3, 3))
    fig = plots.whitened_subspaces(perception, next_token)
    assert len(fig.axes) == 2
    u, v = perception[:, 0], next_token[:, 0]
    theta = np.degrees(np.arccos(abs(u @ v) / np.linalg.norm(v)))
    assert f"θ = {theta:.1f}°" in fig.axes[0].get_title()
    normal_u, normal_v = np.cross(*perception.T), np.cross(*next_token[:, :2].T)
    phi = np.degrees(np.arccos(abs(normal_u @ normal_v) / np.linalg.norm(normal_u) / np.linalg.norm(normal_v)))
    assert f"φ = {phi:.1f}°" in fig.axes[1].get_title()
    with pytest.raises(ValueError, match="3-d"):
        plots.whitened_subspaces(np.eye(4)[:, :2], next_token)


def test_a_starting_choice_the_tables_lack_is_refused_by_name():
    """It was a TraitError ("Invalid selection: value not found") from the slider, or an IndexError."""
    ntps, probes = _tables()
    for initial, message in (({"dataset": "c"}, r"dataset 'c' is not among deep's: \['a', 'b'\]"),
                             ({"model": "shallow", "layer": 25}, "layer 25 is not among shallow's"),
                             ({"k": 3}, r"k 3 is not among deep's: \[1, 2, 4, 8, 16\]"),
                             ({"variant": "bogus"}, "variant 'bogus' is not among deep's"),
                             ({"modle": "deep"}, r"unknown choice\(s\) \['modle'\]")):
        with pytest.raises(ValueError, match=message):
            widgets.explorer(ntps, probes, **initial)
    with pytest.raises(ValueError, match="the NTPS table is empty"):
        widgets.explorer(ntps.iloc[:0], probes)
    with pytest.raises(ValueError, match="the probes table has no column 'f1'"):
        widgets.explorer(ntps, probes, target="f1")
    assert widgets.default_choice(ntps, model="shallow", layer=-1)["layer"] == 18  # from the model's last


def test_the_explorer_opened_on_the_reference_variant_offers_its_fractions():
    """It opened with the k slider and k = 8 passed as the fraction."""
    ntps, probes = _tables()
    places = ntps[["model", "dataset", "layer"]].drop_duplicates().itertuples(index=False)
    reference = [{"model": model, "dataset": dataset, "variant": "reference", "layer": layer, "k": np.nan,
                  "fraction": fraction, "ntps": fraction} for (model, dataset, layer) in places
                 for fraction in (0.1, 0.5, 0.9)]
    ntps = pd.concat([ntps, pd.DataFrame(reference)], ignore_index=True)
    start = widgets.default_choice(ntps, variant="reference")
    assert start["k"] == 0.5
    controls = widgets.explorer(ntps, probes, variant="reference").controls
    assert (list(controls["k"].options), controls["k"].value, controls["k"].description) == ([0.1, 0.5, 0.9], 0.5,
                                                                                            "fraction")
    controls["variant"].value = "theory"
    assert list(controls["k"].options) == [1, 2, 4, 8, 16] and controls["k"].description == "k"
    with pytest.raises(ValueError, match=r"fraction 8 is not among deep's: \[0.1, 0.5, 0.9\]"):
        widgets.default_choice(ntps, variant="reference", k=8)
    plt.close("all")
