"""The series' figures: one colour per dataset and one marker per model, stable across processes;
the headline figure draws exactly the held-out values of the selection functions; interval bars
from the estimates table contain their own estimate; every legend has a title, legends do not
overlap, and figures from study results carry their provenance caption."""

import os
import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PathCollection

from ntps_nb import plots, study
from ntps_nb.core.selection import fixed_rho, leave_one_dataset_out

matplotlib.use("Agg")

DATASETS = ["rt-polarity", "trec6", "sms-spam", "20ng", "bbc-news", "my-own-data"]
MODELS = {"smollm2-135m": True, "smollm2-135m:random": False}
PROVENANCE = {"study": "synthetic", "n_train": 900, "n_test": 300, "max_length": 64, "seed": 0,
              "package_version": "0.1.0", "config_hash": "abc"}


def _tables(*, estimates: bool, intervals: bool = True) -> dict[str, pd.DataFrame]:
    """Combined study tables of two models on six datasets: NTPS over a (layer, k) grid, probe
    targets, and at the last layer either estimates (jackknife intervals around the estimate,
    one flagged unreliable) or shard-bootstrap intervals centred away from the plug-in value."""
    rng = np.random.default_rng(1)
    ntps, probes, est, ivs = [], [], [], []
    for model, pretrained in MODELS.items():
        quality = rng.uniform(0.2, 0.9, len(DATASETS))
        for d, (dataset, q) in enumerate(zip(DATASETS, quality)):
            common = {"model": model, "pretrained": pretrained, "dataset": dataset, **PROVENANCE}
            accuracy = 0.5 + 0.4 * q + 0.01 * d  # distinct targets: a point is found by its y
            for layer in (0, 1, 2):
                probes.append({**common, "layer": layer, "protocol": "heldout", "accuracy": accuracy,
                               "kappa": accuracy - 0.1, "n_classes": 2 + d, "majority_rate": 0.5, "mse": 1 - accuracy})
                for k in (1, 2, 4, 8):
                    ntps.append({**common, "variant": "theory", "layer": layer, "k": float(k),
                                 "ntps": float(np.clip(q * (0.5 + 0.2 * layer) + 0.05 * rng.normal(), 0, 1))})
            value = ntps[-1]["ntps"]  # layer 2, k = 8
            est.append({**common, "variant": "theory", "estimator": "richardson", "layer": 2, "k": 8.0,
                        "estimate": value + 0.01, "lower": value - 0.03, "upper": value + 0.05, "level": 0.9,
                        "reliable": d != 2})
            ivs.append({**common, "variant": "theory", "statistic": "ntps", "layer": 2, "k": 8.0, "ntps": value,
                        "lower": value + 0.02, "upper": value + 0.08, "se_jackknife": 0.01, "n_shards": 10,
                        "n_boot": 50, "level": 0.95, "method": "basic", "bias_bootstrap": -0.05})
    tables = {"ntps": pd.DataFrame(ntps), "probes": pd.DataFrame(probes)}
    if intervals:
        tables["intervals"] = pd.DataFrame(ivs)
    if estimates:
        tables["estimates"] = pd.DataFrame(est)
    return tables


def _points(ax) -> np.ndarray:
    """(x, y) of every scatter point drawn on ``ax``."""
    offsets = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    return np.vstack(offsets) if offsets else np.empty((0, 2))


def _bars(ax) -> np.ndarray:
    """(x0, x1, y) of every horizontal bar drawn on ``ax``."""
    segments = [s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()]
    return np.array([[min(s[0, 0], s[1, 0]), max(s[0, 0], s[1, 0]), s[0, 1]] for s in segments])


def _legends(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _check_legends_and_caption(fig, *words: str) -> None:
    legends = _legends(fig)
    assert legends, "the figure has no legend"
    assert all(legend.get_title().get_text().strip() for legend in legends)
    fig.canvas.draw()
    boxes = [legend.get_window_extent() for legend in legends]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "two legends overprint"
    caption = [t for t in fig.texts if t.get_gid() == "caption"]
    assert len(caption) == 1
    for word in words:
        assert word in caption[0].get_text().replace("\n", " ")
    top = caption[0].get_window_extent()
    assert all(top.y1 < ax.get_tightbbox().y0 for ax in fig.axes if ax.get_visible())


def test_dataset_colours_are_fixed_distinct_and_stable_across_processes():
    from ntps_nb.datasets import OFFLINE

    assert list(plots.DATASET_COLORS) == list(OFFLINE)
    colours = [plots.dataset_color(name) for name in OFFLINE]
    assert len(set(colours)) == len(colours)
    assert not set(colours) & set(plots.FALLBACK_COLORS)
    assert plots.dataset_palette(["trec6", "my-own-data", "trec6"]) == {
        "trec6": plots.DATASET_COLORS["trec6"], "my-own-data": plots.dataset_color("my-own-data")}
    names = ["my-own-data", "customer-emails", "x"]
    code = f"from ntps_nb import plots; print([plots.dataset_color(n) for n in {names!r}])"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})  # a hash() palette would differ
    assert child.stdout.strip() == str([plots.dataset_color(n) for n in names])
    assert all(c in plots.FALLBACK_COLORS for c in (plots.dataset_color(n) for n in names))


def test_model_markers_one_per_model_hollow_controls_share_it():
    assert plots.model_marker("smollm2-135m:random") == plots.model_marker("smollm2-135m")
    assert plots.model_marker("smollm2-135m") != plots.model_marker("gemma3-270m")
    assert plots.model_marker("owner/some-model") in plots.FALLBACK_MARKERS
    # pretrained models in order of first appearance, each followed by its control
    assert plots._model_order(["b:random", "a", "b", "a:random", "c:random"]) == ["a", "a:random", "b", "b:random",
                                                                                  "c:random"]


def test_headline_draws_the_selection_functions_held_out_values():
    tables = _tables(estimates=True)
    data = study.headline_points(tables, k=8, n_boot=40, n_perm=40)
    fig = plots.headline(data)
    axes = np.array(fig.axes[:4]).reshape(2, 2)  # rows: leave-one-dataset-out, fixed; columns: the two models
    targets = study.probe_targets(tables["probes"])
    for column, model in enumerate(MODELS):
        frame = tables["ntps"].query("model == @model")[["dataset", "layer", "k", "ntps"]].merge(
            targets.query("model == @model")[["dataset", "accuracy"]], on="dataset")
        folds = leave_one_dataset_out(frame, configs=["layer", "k"]).folds  # independent call
        expected = folds[["held_out_score", "target"]].to_numpy()
        drawn = _points(axes[0, column])
        assert drawn.shape == expected.shape
        np.testing.assert_allclose(drawn[np.lexsort(drawn.T[::-1])], expected[np.lexsort(expected.T[::-1])])
        rho = leave_one_dataset_out(frame, configs=["layer", "k"]).rho
        assert f"rho = {rho:+.2f}" in axes[0, column].get_title()
        fixed = tables["estimates"].query("model == @model").merge(targets.query("model == @model"), on="dataset")
        result = fixed_rho(fixed["estimate"], fixed["accuracy"], direction="positive", n_boot=40, n_perm=40)
        assert f"rho = {result.estimate:+.2f} [{result.lower:+.2f}, {result.upper:+.2f}]" in axes[1, column].get_title()
    _check_legends_and_caption(fig, "study synthetic", "smollm2-135m, smollm2-135m:random", "N = 900",
                               "estimator richardson", "jackknife", "centred on the point", "reliable flag is False")
    # the fixed row's flags survive the concatenation with the leave-one-out rows (which made them
    # floats): jackknife bars are centred on their estimate, the unreliable one is dotted
    caption = next(t for t in fig.texts if t.get_gid() == "caption").get_text().replace("\n", " ")
    assert "no estimates table" not in caption and "its own centre" not in caption
    dotted = [c for ax in axes[1] for c in ax.collections
              if isinstance(c, LineCollection) and c.get_linestyle()[0][1] is not None]
    assert len(dotted) >= 1
    assert not any(line.get_marker() == "|" for ax in axes[1] for line in ax.lines)  # no separate centre ticks


def test_headline_takes_rho_from_the_summary_and_refuses_another_study():
    tables = _tables(estimates=False)
    summary = study.correlation_summary(tables, targets=["accuracy"], variants=["theory"], n_boot=20, n_perm=20)
    data = study.headline_points(tables, summary=summary, n_boot=20, n_perm=20)
    row = summary.query("model == 'smollm2-135m' and score == 'ntps_theory' and selection == 'leave_one_dataset_out'")
    got = data.rho.query("model == 'smollm2-135m' and selection == 'leave_one_dataset_out'")
    assert got[["estimate", "lower", "upper", "p_value"]].to_numpy().tolist() == \
        row[["estimate", "lower", "upper", "p_value"]].to_numpy().tolist()
    other = summary.assign(estimate=summary["estimate"] + 0.5)
    with pytest.raises(ValueError, match="same tables"):
        study.headline_points(tables, summary=other, n_boot=20, n_perm=20)


def test_interval_bars_from_the_estimates_table_contain_their_own_estimate():
    tables = _tables(estimates=True)
    points = study.interval_points(tables, model="smollm2-135m", k=8)
    assert (points["source"] == "estimates").all() and points["centred"].all()
    fig = plots.ntps_intervals(points, caption=plots.provenance_caption(tables, models=["smollm2-135m"]))
    ax = fig.axes[0]
    drawn, bars = _points(ax), _bars(ax)
    assert len(bars) == len(drawn) == len(DATASETS)
    for x0, x1, y in bars:
        (x,) = drawn[np.isclose(drawn[:, 1], y), 0]
        assert x0 <= x <= x1
    np.testing.assert_allclose(np.sort(drawn[:, 0]), np.sort(tables["estimates"].query(
        "model == 'smollm2-135m'")["estimate"]))
    dotted = [c for c in ax.collections if isinstance(c, LineCollection) and c.get_linestyle()[0][1] is not None]
    assert len(dotted) == 1  # the one estimate flagged unreliable
    _check_legends_and_caption(fig, "study synthetic", "estimator richardson", "jackknife", "reliable flag is False")


def test_interval_points_name_the_widened_rows_of_a_study_with_the_rotation_widening():
    # a study run with estimate_rotation_widening (a new study's default) keeps the interval before it and the
    # rotation kept; the rows the flag accepted are named widened, the others as the interval they have
    from ntps_nb.core.rotation import INTERVAL_DESCRIPTIONS, WIDENED_DESCRIPTION

    tables = _tables(estimates=True)
    est = tables["estimates"]
    tables["estimates"] = est.assign(lower_unwidened=est["lower"], upper_unwidened=est["upper"],
                                     rotation_U=np.where(est["reliable"], 0.1, np.nan))
    points = study.interval_points(tables, model="smollm2-135m", k=8)
    plain = f"90% {INTERVAL_DESCRIPTIONS['jackknife']}, around the richardson estimate"
    widened = f"90% {INTERVAL_DESCRIPTIONS['jackknife']}, {WIDENED_DESCRIPTION}, around the richardson estimate"
    assert points["interval"].tolist() == [widened if flag else plain for flag in points["reliable"]]
    assert set(points["interval"]) == {plain, widened}
    assert set(study.interval_points(_tables(estimates=True), model="smollm2-135m", k=8)["interval"]) == {plain}
    # a table written since session 65 carries the widening's sets' level on every row: the widened rows name it
    tables["estimates"] = tables["estimates"].assign(widening_level=0.6)
    named = study.interval_points(tables, model="smollm2-135m", k=8)
    assert named["interval"].tolist() == [f"{widened[:-len(', around the richardson estimate')]} (rotation sets at "
                                          "60%), around the richardson estimate" if flag else plain
                                          for flag in named["reliable"]]


def test_bootstrap_intervals_are_drawn_around_their_own_centre_and_the_caption_says_so():
    tables = _tables(estimates=False)
    points = study.interval_points(tables, model="smollm2-135m", k=8)
    assert (points["source"] == "intervals").all() and not points["centred"].any()
    np.testing.assert_allclose(points["centre"], points["ntps"] + 0.05)  # estimate - bootstrap bias ("basic")
    fig = plots.ntps_intervals(points, caption=plots.provenance_caption(tables, models=["smollm2-135m"]))
    ax = fig.axes[0]
    drawn, bars = _points(ax), _bars(ax)
    for x0, x1, y in bars:  # these synthetic bars exclude their point, as real basic-bootstrap bars can
        (x,) = drawn[np.isclose(drawn[:, 1], y), 0]
        assert x < x0 <= x1
    _check_legends_and_caption(fig, "estimator plugin", "not on the estimate", "no estimates table")


def test_figures_name_points_by_legend_and_keep_reference_bands_off_the_theory_panels():
    tables = _tables(estimates=False)
    fixed = study.fixed_ntps(tables, k=8)
    fig = plots.across_datasets(fixed, caption=plots.provenance_caption(tables))
    assert len(fig.axes[0].texts) == 0  # no labels written on the axes: the legends name the points
    _check_legends_and_caption(fig, "models smollm2-135m, smollm2-135m:random")
    rng = np.random.default_rng(0)
    diag = pd.DataFrame([{"model": "smollm2-135m", "dataset": d, "variant": v, "config": c, "ntps": rng.uniform(),
                          "perm_z": rng.normal(0, 20), "layer": 2, "n_permutations": 20}
                         for d in DATASETS for v, cs in (("theory", ("k=1", "k=8")), ("reference", ("f=0.5",)))
                         for c in cs])
    published = pd.DataFrame({"model": ["paper/a"] * 2 + ["paper/b"] * 2, "ntps": [0.8, 0.9, 0.2, 0.3]})
    fig = plots.diagnostics_bands(diag, published, caption=plots.provenance_caption(tables))
    theory_ntps, _, paper_theory, reference_ntps, _, paper_reference = fig.axes
    assert not paper_theory.axison and not paper_theory.collections
    assert [t.get_text() for t in paper_reference.get_xticklabels()] == ["a", "b"]
    np.testing.assert_allclose(sorted(_points(reference_ntps)[:, 1]), sorted(diag.query("variant == 'reference'").ntps))
    _check_legends_and_caption(fig, "label permutations")
    summary = study.correlation_summary(tables, targets=["accuracy"], variants=["theory"], n_boot=20, n_perm=20)
    _check_legends_and_caption(plots.correlation_summary(summary, caption=plots.provenance_caption(tables)), "N = 900")


def test_the_other_figures_of_the_series_title_their_legends():
    figures = [
        plots.ntps_over_k(pd.DataFrame({"k": [1, 2, 4, 8], "ntps": [0.2, 0.4, 0.5, 0.6], "m": 3})),
        plots.bound_check(pd.DataFrame({"ntps": [0.2, 0.5, 0.9], "excess_loss": [1, 0.5, 0.1],
                                        "lower_bound": [0.5, 0.2, 0.05], "upper_bound": [2, 1, 0.2]})),
        plots.interval_width(pd.DataFrame({"n_texts": [100, 200, 400], "ntps": 0.5, "lower": [0.4, 0.43, 0.45],
                                           "upper": [0.6, 0.57, 0.55], "width": [0.2, 0.14, 0.1], "level": 0.95})),
        plots.word_projections(pd.DataFrame({"space": ["U", "U", "V", "V"], "group": ["a", "b", "a", "b"],
                                             "axis1": [0, 1, 0, 1], "axis2": [1, 0, 1, 0]})),
        plots.selection_null(np.linspace(-1, 1, 50), 0.5),
    ]
    for fig in figures:
        legends = _legends(fig)
        assert legends and all(legend.get_title().get_text().strip() for legend in legends)


def test_known_truth_colours_each_interval_by_whether_it_covers_and_titles_the_bias():
    frame = pd.DataFrame({"estimator": ["plugin"] * 3 + ["richardson"] * 3, "k": 2, "truth": 0.5,
                          "estimate": [0.40, 0.55, 0.30, 0.52, 0.45, 0.60],
                          "lower": [0.35, 0.45, 0.20, 0.42, 0.40, 0.55], "upper": [0.45, 0.65, 0.40, 0.62, 0.55, 0.65],
                          "reliable": [True, False, False, True, True, False]})
    fig = plots.known_truth(frame, caption="3 draws")
    for ax, name in zip(fig.axes, ["plugin", "richardson"]):
        rows = frame[frame.estimator == name].sort_values("estimate")
        lines = next(c for c in ax.collections if isinstance(c, LineCollection) and len(c.get_segments()) == 3)
        spans = [tuple(np.round(seg[:, 1], 3)) for seg in lines.get_segments()]
        assert spans == [(lo, hi) for lo, hi in zip(rows.lower, rows.upper)]  # sorted by estimate
        red_rgb = tuple(np.round(matplotlib.colors.to_rgb("C3"), 3))
        red = [tuple(np.round(c[:3], 3)) == red_rgb for c in lines.get_colors()]
        assert red == list(~((rows.lower <= 0.5) & (0.5 <= rows.upper)))
        bias = (rows.estimate - 0.5).mean()
        assert f"bias {bias:+.3f}" in ax.get_title()
    assert "covers 33%; 0% of 1 reliable" in fig.axes[0].get_title()  # the reliable draw (0.40) misses
    _check_legends_and_caption(fig, "3 draws")
    with pytest.raises(ValueError, match="one k at a time"):
        plots.known_truth(frame.assign(k=[1, 2, 1, 2, 1, 2]))


def test_layer_profile_draws_an_estimators_intervals_around_it_dotted_where_unreliable():
    profile = pd.DataFrame({"layer": [0, 1, 2, 3], "k": 6, "variant": "theory", "estimator": "richardson",
                            "ntps": [0.30, 0.35, -0.05, 0.50], "ntps_lower": [0.20, np.nan, -0.30, 0.45],
                            "ntps_upper": [0.40, np.nan, 0.20, 0.58], "reliable": [True, np.nan, False, True],
                            "level": 0.9, "accuracy": 0.7, "kappa": 0.6})
    fig = plots.layer_profile(profile)
    left = fig.axes[0]
    vertical = [c for c in left.collections if isinstance(c, LineCollection)]
    drawn = {tuple(np.round(s[:, 1], 3)): c.get_linestyle() for c in vertical for s in c.get_segments()}
    assert set(drawn) == {(0.2, 0.4), (-0.3, 0.2), (0.45, 0.58)}  # one bar per interval, none on layer 1
    solid, dotted = drawn[(0.2, 0.4)], drawn[(-0.3, 0.2)]
    assert solid != dotted and drawn[(0.45, 0.58)] == solid
    assert "richardson estimate" in left.get_title() and "90% jackknife intervals (dotted" in left.get_title()
    assert left.get_ylim()[0] < -0.3  # a negative estimate or bound stays in view
    assert left.get_legend().get_title().get_text() == "interval"
    plugin = plots.layer_profile(profile.drop(columns=["estimator", "reliable"]))
    assert "shard-bootstrap intervals" in plugin.axes[0].get_title()


def test_estimate_by_n_bands_each_estimators_first_interval_and_hollows_unreliable_rows():
    frame = pd.DataFrame({"estimator": ["plugin"] * 6 + ["richardson"] * 6, "k": [1, 2] * 6,
                          "n_texts": [100, 100, 200, 200, 400, 400] * 2,
                          "estimate": [np.nan, 0.3, 0.5, 0.32, 0.6, 0.35, 0.45, 0.31, 0.52, 0.33, 0.7, 0.36],
                          "lower": [np.nan, 0.2, 0.4, 0.25, 0.55, 0.3, 0.3, 0.2, 0.45, 0.28, 0.65, 0.33],
                          "upper": [np.nan, 0.4, 0.6, 0.39, 0.65, 0.4, 0.6, 0.42, 0.59, 0.38, 0.75, 0.39],
                          "reliable": [False, False, True, False, True, True] * 2, "level": 0.9,
                          "n_first": [200, 100] + [200, 100] * 2 + [100] * 6})  # plugin at k = 1: no interval at 100
    fig = plots.estimate_by_n(frame)
    assert [ax.get_title() for ax in fig.axes] == ["k = 1", "k = 2"]
    for ax, k in zip(fig.axes, (1, 2)):
        bands = sorted((round(p.get_y(), 3), round(p.get_y() + p.get_height(), 3)) for p in ax.patches)
        first = frame[(frame.k == k)].dropna().groupby("estimator").first()  # the smallest N with an interval
        assert bands == sorted(zip(first.lower, first.upper))  # plugin at k = 1: from 200 texts, not 100
        points = [c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]
        white = [bool(np.all(c.get_facecolors()[:, :3] == 1)) for c in points]
        filled = sum(len(c.get_offsets()) for c, w in zip(points, white) if not w)
        hollow = sum(len(c.get_offsets()) for c, w in zip(points, white) if w)
        rows = frame[frame.k == k]
        assert (filled, hollow) == (int(rows.reliable.sum()), int((~rows.reliable).sum()))
    assert all(legend.get_title().get_text().strip() for legend in _legends(fig))
    with pytest.raises(ValueError, match="estimate_by_n needs column"):
        plots.estimate_by_n(frame.drop(columns=["reliable"]))
