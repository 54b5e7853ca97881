"""Plot functions of the notebooks: tidy frames in, a matplotlib figure out.

Every function is pure: it reads the columns it names, draws with seaborn/matplotlib on a new
figure, and returns that figure (nothing is shown or saved here). Column names follow the tidy
tables of `ntps_nb.core` and `ntps_nb.study`.

The series draws with one visual vocabulary: a dataset has the same colour in every figure
(`dataset_color`: a fixed colour per offline dataset, a stable fallback for other names), a model
has the same marker (`model_marker`; a ``:random`` control is its base model's marker, hollow),
every legend has a title, and a figure made from study results carries a caption line with its
provenance (`provenance_caption`, placed by `add_caption`: study, models, N, estimator, ...).
Statistics are never computed here: they come in with the frame (`ntps_nb.core.selection`,
`ntps_nb.study`).
"""

from __future__ import annotations

import textwrap
import zlib
from typing import Mapping, Sequence

import matplotlib
import matplotlib.patches
import matplotlib.ticker
import matplotlib.transforms

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

_PALETTE = "colorblind"

#: One colour per offline dataset (`ntps_nb.datasets.OFFLINE`, SPEC section 8 order), the same in
#: every figure of the series (matplotlib's tab10 plus a navy; tab10's grey goes to trec50, which
#: the studies do not use, so the grey interval bars of older figures are never mistaken for a dataset).
DATASET_COLORS: dict[str, str] = {
    "rt-polarity": "#1f77b4", "imdb-pl": "#ff7f0e", "hedge": "#2ca02c", "trec6": "#d62728",
    "trec50": "#7f7f7f", "sms-spam": "#9467bd", "20ng": "#8c564b", "reuters-r8": "#e377c2",
    "bbc-news": "#bcbd22", "tweet-sentiment": "#17becf", "election-tweets": "#393b79",
}
#: Colours of dataset names outside `DATASET_COLORS` (a user's own data), picked by the CRC-32 of
#: the name: the same name gets the same colour in every process; two unknown names can share one.
FALLBACK_COLORS = ("#5254a3", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
                   "#756bb1", "#636363", "#b5cf6b", "#e7ba52", "#d6616b", "#ce6dbd", "#6baed6", "#fd8d3c")
#: One marker per model of the package's registry (`ntps_nb.models`); a ``:random`` control draws
#: its base model's marker hollow.
MODEL_MARKERS: dict[str, str] = {"smollm2-135m": "o", "gemma3-270m": "s", "tiny-llama": "D", "tiny-gpt2": "^"}
#: Markers of model names outside `MODEL_MARKERS` (a Hub id, a local folder), by CRC-32 of the name.
FALLBACK_MARKERS = ("v", "P", "X", "<", ">", "p", "h", "*")
#: The suffix of a random-initialised control (`ntps_nb.models.RANDOM_SUFFIX`).
RANDOM_SUFFIX = ":random"
#: Font size of caption lines (points).
CAPTION_FONTSIZE = 7.0


def _crc(name: str) -> int:
    return zlib.crc32(str(name).encode("utf-8"))


def dataset_color(name: str) -> str:
    """The colour of a dataset in every figure of the series (a hex string).

    Parameters
    ----------
    name : str
        A dataset name; an offline dataset's name gets its `DATASET_COLORS` entry, any other name
        a `FALLBACK_COLORS` entry chosen by the CRC-32 of the name (stable across processes).

    Returns
    -------
    str
        The colour, "#rrggbb".
    """
    name = str(name)
    return DATASET_COLORS.get(name) or FALLBACK_COLORS[_crc(name) % len(FALLBACK_COLORS)]


def dataset_palette(names: Sequence[str]) -> dict[str, str]:
    """`dataset_color` of each name, as a palette for seaborn's ``hue``.

    Parameters
    ----------
    names : sequence of str
        Dataset names (repeats allowed).

    Returns
    -------
    dict of str to str
        Name to colour, in order of first appearance.
    """
    return {str(name): dataset_color(name) for name in dict.fromkeys(names)}


def dataset_order(names: Sequence[str]) -> list[str]:
    """The datasets in the series' order: offline datasets in `DATASET_COLORS` order, then the
    other names sorted.

    Parameters
    ----------
    names : sequence of str
        Dataset names (repeats allowed).

    Returns
    -------
    list of str
        The distinct names, ordered.
    """
    known = list(DATASET_COLORS)
    distinct = {str(n) for n in names}
    return [n for n in known if n in distinct] + sorted(distinct - set(known))


def is_random_control(model: str) -> bool:
    """Whether a model name is a random-initialised control (``name:random``).

    Parameters
    ----------
    model : str
        The model name of a study's rows.

    Returns
    -------
    bool
    """
    return str(model).endswith(RANDOM_SUFFIX)


def model_marker(model: str) -> str:
    """The marker of a model in every figure of the series: `MODEL_MARKERS`, else one of
    `FALLBACK_MARKERS` by the CRC-32 of the name; a ``:random`` control takes its base model's
    marker (drawn hollow by the figures).

    Parameters
    ----------
    model : str
        The model name.

    Returns
    -------
    str
        A matplotlib marker.
    """
    base = str(model)[: -len(RANDOM_SUFFIX)] if is_random_control(model) else str(model)
    return MODEL_MARKERS.get(base) or FALLBACK_MARKERS[_crc(base) % len(FALLBACK_MARKERS)]


def _model_order(models: Sequence[str]) -> list[str]:
    """Models in order of first appearance, each pretrained model followed by its ``:random`` control."""
    distinct = list(dict.fromkeys(str(m) for m in models))
    out = []
    for model in distinct:
        if is_random_control(model) and model[: -len(RANDOM_SUFFIX)] in distinct:
            continue  # placed after its base model
        out.append(model)
        if f"{model}{RANDOM_SUFFIX}" in distinct:
            out.append(f"{model}{RANDOM_SUFFIX}")
    return out


def _scatter(ax, x, y, *, dataset: str, model: str, hollow: bool | None = None, size: float = 46, **kwargs):
    """One point in the series' vocabulary: the dataset's colour, the model's marker, hollow for a
    random control (or when ``hollow``)."""
    color = dataset_color(dataset)
    hollow = is_random_control(model) if hollow is None else hollow
    return ax.scatter(x, y, marker=model_marker(model), s=size, edgecolors=color, linewidths=1.4,
                      facecolors="none" if hollow else color, zorder=3, **kwargs)


def dataset_handles(datasets: Sequence[str]) -> list[Line2D]:
    """Legend entries of datasets: a dot in each dataset's colour, labelled with its name.

    Parameters
    ----------
    datasets : sequence of str
        The datasets of the figure.

    Returns
    -------
    list of Line2D
        One handle per dataset, in `dataset_order`.
    """
    return [Line2D([], [], ls="none", marker="o", ms=6, color=dataset_color(d), label=d) for d in dataset_order(datasets)]


def model_handles(models: Sequence[str]) -> list[Line2D]:
    """Legend entries of models: each model's marker in black (hollow for a random control).

    Parameters
    ----------
    models : sequence of str
        The models of the figure.

    Returns
    -------
    list of Line2D
        One handle per model, pretrained models each followed by their control.
    """
    return [Line2D([], [], ls="none", marker=model_marker(m), ms=6, color="black",
                   markerfacecolor="none" if is_random_control(m) else "black", label=m) for m in _model_order(models)]


def _legends(ax, datasets: Sequence[str] | None, models: Sequence[str] | None = None, *,
             extra: Sequence[Line2D] = (), extra_title: str = "marks") -> None:
    """Legends right of ``ax``, stacked top-down without overlap: the datasets (title "dataset"),
    the models (title "model", when ``models`` is given) and ``extra`` entries (title
    ``extra_title``). They are figure legends anchored to ``ax``: they move with it, and a tight
    bounding box (the notebooks' inline figures) includes them."""
    groups = []
    if datasets is not None and len(datasets):
        groups.append(("dataset", dataset_handles(datasets)))
    if models is not None and len(models):
        groups.append(("model", model_handles(models)))
    if extra:
        groups.append((extra_title, list(extra)))
    fig = ax.figure
    below = 0.0  # points from the axes' top: the stack keeps its spacing whatever the layout does to the axes
    for title, handles in groups:
        anchor = matplotlib.transforms.offset_copy(ax.transAxes, fig=fig, y=-below, units="points")
        legend = fig.legend(handles=handles, title=title, fontsize=7, title_fontsize=8, loc="upper left",
                            bbox_to_anchor=(1.03, 1.0), bbox_transform=anchor, borderaxespad=0.0, alignment="left")
        below += legend.get_window_extent().height * 72.0 / fig.dpi + 6.0


def _first(frame: pd.DataFrame, column: str):
    values = frame[column].dropna().unique() if column in frame.columns else []
    return values


def _span(values, fmt: str = "{:,}") -> str | None:
    values = [v for v in values if pd.notna(v)]
    if not values:
        return None
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def provenance(frame: pd.DataFrame | Mapping[str, pd.DataFrame], *, models: Sequence[str] | None = None) -> dict:
    """Where a figure's numbers come from, read off the provenance columns of a study's rows
    (SPEC section 9): study, models, the range of N (train texts) and test texts per dataset,
    max_length, seed, package version and the estimator of NTPS.

    Parameters
    ----------
    frame : DataFrame or dict of str to DataFrame
        Rows of a study table (ntps, intervals, estimates, lora, ...), or a study's tables (their
        ``ntps`` table is read; an ``estimates`` table adds its estimator).
    models : sequence of str, optional
        Keep only these models' rows.

    Returns
    -------
    dict
        Keys study, models, n_train, n_test, max_length, seed, package_version, estimator; a
        value is None where the rows do not say (e.g. no ``study`` column).
    """
    if isinstance(frame, Mapping):
        tables = frame
        frame = tables["ntps"]
        estimates = tables.get("estimates")
        if estimates is not None and not estimates.empty and "estimator" in estimates.columns:
            frame = pd.concat([frame, estimates[[c for c in ("model", "variant", "estimator") if c in estimates]]],
                              ignore_index=True)
    if models is not None and "model" in frame.columns:
        frame = frame[frame["model"].isin(list(models))]
    if frame.empty:
        raise ValueError("provenance: no rows (check models=)")
    out = {"study": ", ".join(map(str, _first(frame, "study"))) or None,
           "models": _model_order(frame["model"]) if "model" in frame.columns else [],
           "n_train": _span([int(v) for v in _first(frame, "n_train")]),
           "n_test": _span([int(v) for v in _first(frame, "n_test")]),
           "max_length": _span([int(v) for v in _first(frame, "max_length")]),
           "seed": _span([int(v) for v in _first(frame, "seed")]),
           "package_version": ", ".join(map(str, _first(frame, "package_version"))) or None}
    if "estimator" in frame.columns:
        theory = frame[frame["variant"] == "theory"] if "variant" in frame.columns else frame
        out["estimator"] = ", ".join(sorted(map(str, _first(theory, "estimator")))) or "plugin"
    else:  # tables written before the estimator setting: the plug-in
        out["estimator"] = "plugin"
    return out


def provenance_caption(frame: pd.DataFrame | Mapping[str, pd.DataFrame], *, models: Sequence[str] | None = None,
                       estimator: str | None = None, note: str | None = None) -> str:
    """The caption line of a figure: "study default · models a, a:random · N = 1,050-2,000 train
    texts per dataset (test 450-1,000) · estimator plugin · max_length 256 · seed 0 · ntps_nb 0.1.0",
    and ``note`` after it (what the marks mean, where that needs words).

    Parameters
    ----------
    frame : DataFrame or dict of str to DataFrame
        As in `provenance`.
    models : sequence of str, optional
        Keep only these models' rows.
    estimator : str, optional
        The estimator the figure's NTPS values come from, when it is not the rows' own (e.g. the
        estimates table's estimator drawn beside plug-in rows).
    note : str, optional
        A sentence appended to the caption.

    Returns
    -------
    str
        The caption text.
    """
    p = provenance(frame, models=models)
    parts = []
    if p["study"]:
        parts.append(f"study {p['study']}")
    if p["models"]:
        parts.append(("model " if len(p["models"]) == 1 else "models ") + ", ".join(p["models"]))
    if p["n_train"]:
        parts.append(f"N = {p['n_train']} train texts per dataset" + (f" (test {p['n_test']})" if p["n_test"] else ""))
    parts.append(f"estimator {estimator or p['estimator']}")
    for key, label in (("max_length", "max_length"), ("seed", "seed"), ("package_version", "ntps_nb")):
        if p[key]:
            parts.append(f"{label} {p[key]}")
    text = " · ".join(parts)
    return f"{text}. {note}" if note else text


def add_caption(fig: Figure, text: str, *, fontsize: float = CAPTION_FONTSIZE) -> Figure:
    """Put ``text`` in a caption band under the figure: the figure grows by the band's height and
    every axes keeps its size and place above it, so nothing is overdrawn.

    Parameters
    ----------
    fig : Figure
        A finished figure (laid out).
    text : str
        The caption (`provenance_caption`); wrapped to the figure's width.
    fontsize : float
        Font size in points.

    Returns
    -------
    Figure
        ``fig``, with a text artist whose gid is "caption".
    """
    width, height = fig.get_size_inches()
    chars = max(40, int(width * 72 / (0.55 * fontsize)))
    wrapped = "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))
    band = (wrapped.count("\n") + 1) * fontsize * 1.3 / 72 + 0.12
    scale = height / (height + band)
    for ax in fig.axes:
        x0, y0, w, h = ax.get_position().bounds
        ax.set_position([x0, band / (height + band) + y0 * scale, w, h * scale])
    for artist in fig.texts:  # suptitle and figure texts keep their distance from the top
        x, y = artist.get_position()
        artist.set_position((x, band / (height + band) + y * scale))
    fig.set_size_inches(width, height + band)
    fig.text(0.01, 0.04 / (height + band), wrapped, ha="left", va="bottom", fontsize=fontsize, color="dimgrey",
             gid="caption")
    return fig


def _finish(fig: Figure, caption: str | None) -> Figure:
    fig.tight_layout()
    return add_caption(fig, caption) if caption else fig


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; the frame has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{what}: the frame is empty")


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.6, **kwargs) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, **kwargs)
    plt.close(fig)  # returned, not shown: the caller (a notebook cell) decides
    return fig, axes[0]


def layer_profile(profile: pd.DataFrame) -> Figure:
    """NTPS per layer beside held-out probe accuracy (and kappa) per layer.

    ``profile``: one row per layer with ``layer``, ``ntps``, ``k``, ``variant``, ``accuracy``, ``kappa``
    (`ntps_nb.notebooks.layer_profile`).

    Parameters
    ----------
    profile : DataFrame
        One row per layer, as above; with ``ntps_lower``, ``ntps_upper`` and ``level`` columns
        the intervals are drawn as vertical bars (with a ``reliable`` column, an estimator's
        jackknife intervals: dotted where the flag says unreliable).

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(profile, ["layer", "ntps", "k", "variant", "accuracy", "kappa"], "layer_profile")
    fig, (left, right) = _figure(2)
    sns.lineplot(data=profile, x="layer", y="ntps", marker="o", ax=left)
    estimator = str(profile["estimator"].iloc[0]) if "estimator" in profile.columns else "plugin"
    title = f"NTPS ({profile['variant'].iloc[0]}, k={profile['k'].iloc[0]}" + (
        f", {estimator} estimate)" if estimator != "plugin" else ")")
    if {"ntps_lower", "ntps_upper"} <= set(profile.columns):
        bars = profile.dropna(subset=["ntps_lower", "ntps_upper"])
        if "reliable" in bars.columns:  # the estimator's jackknife interval, around its estimate
            for flag, style in ((True, "solid"), (False, "dotted")):
                part = bars[bars["reliable"].map(_flag) == flag]
                left.vlines(part["layer"], part["ntps_lower"], part["ntps_upper"], color="black", lw=1.2,
                            linestyles=style, label=None if flag else "flagged unreliable")
            if not bars["reliable"].map(_flag).all():
                left.legend(title="interval", loc="upper left", fontsize="small", title_fontsize="small")
            kind = "jackknife intervals (dotted: flagged unreliable)"
        else:  # vertical segments, not errorbar(): a "basic" bootstrap interval need not contain the estimate
            left.vlines(bars["layer"], bars["ntps_lower"], bars["ntps_upper"], color="black", lw=1.2)
            kind = "shard-bootstrap intervals"
        for end in ("ntps_lower", "ntps_upper"):
            left.scatter(bars["layer"], bars[end], marker="_", color="black", s=40)
        title += f"\n{bars['level'].iloc[0]:.0%} {kind}" if len(bars) else ""
    values = profile[[c for c in ("ntps", "ntps_lower", "ntps_upper") if c in profile.columns]].to_numpy(dtype=float)
    left.set(title=title, ylabel="NTPS",  # an estimator other than the plug-in is not clipped to [0, 1]
             ylim=(min(0.0, float(np.nanmin(values))) - 0.02, max(1.0, float(np.nanmax(values))) + 0.02))
    long = profile.melt(id_vars="layer", value_vars=["accuracy", "kappa"], var_name="metric", value_name="value")
    sns.lineplot(data=long, x="layer", y="value", hue="metric", marker="o", ax=right, palette=_PALETTE)
    right.set(title="held-out logistic probe", ylabel="score", ylim=(min(0, long["value"].min()), 1.02))
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def ntps_over_k(sweep: pd.DataFrame, *, hue: str | None = None, log_k: bool = True) -> Figure:
    """NTPS against k (theory sweep) with the k_U = min(k, m) knee marked.

    Parameters
    ----------
    sweep : DataFrame
        One row per k (and ``hue`` value) with ``k`` and ``ntps``; an ``m`` column (rank of
        Sxy Sxy^T) marks k = m when there is no ``hue``.
    hue : str, optional
        Column that splits the sweep into lines.
    log_k : bool
        Log scale on the k axis.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(sweep, ["k", "ntps"], "ntps_over_k")
    fig, (ax,) = _figure(1)
    sns.lineplot(data=sweep, x="k", y="ntps", hue=hue, ax=ax, palette=_PALETTE if hue else None)
    if "m" in sweep.columns and hue is None:
        ax.axvline(int(sweep["m"].iloc[0]), color="grey", ls=":", label="k = m (rank of Sxy Sxy^T)")
        ax.legend(title="marks", fontsize=8, title_fontsize=8)
    if log_k:
        ax.set_xscale("log")
    ax.set(ylabel="NTPS", ylim=(0, 1.02))
    fig.tight_layout()
    return fig


def bound_check(table: pd.DataFrame, *, x: str = "one_minus_ntps") -> Figure:
    """DeltaL against 1 - NTPS with the lower and upper bound of each row, and the tightness
    (DeltaL / upper, lower / DeltaL) on a second panel.

    ``table``: rows with ``ntps``, ``excess_loss``, ``lower_bound``, ``upper_bound`` (e.g.
    `ntps_nb.core.theory.angle_sweep`).

    Parameters
    ----------
    table : DataFrame
        As above, one row per configuration.
    x : str
        Column on the x axis (default 1 - NTPS, added here).

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(table, ["ntps", "excess_loss", "lower_bound", "upper_bound"], "bound_check")
    t = table.assign(one_minus_ntps=1.0 - table["ntps"]).sort_values(x)
    fig, (ax, tight) = _figure(2)
    ax.fill_between(t[x], t["lower_bound"], t["upper_bound"], color="tab:blue", alpha=0.15, label="bounds")
    ax.plot(t[x], t["upper_bound"], color="tab:blue", ls="--", label=r"upper: $\lambda_1 k_U (1-\mathrm{NTPS})$")
    ax.plot(t[x], t["lower_bound"], color="tab:blue", ls=":", label=r"lower: $(\lambda_{k_U}-\lambda_{k+1}) k_U (1-\mathrm{NTPS})$")
    ax.plot(t[x], t["excess_loss"], "o-", color="black", label=r"$\Delta L$ (identity)")
    ax.set(xlabel="1 - NTPS", ylabel="excess in-sample MSE", title="excess loss and its bounds")
    ax.legend(title="excess loss", fontsize=8, title_fontsize=8)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(t["upper_bound"] > 0, t["excess_loss"] / t["upper_bound"], np.nan)
        low = np.where(t["excess_loss"] > 0, t["lower_bound"] / t["excess_loss"], np.nan)
    tight.plot(t[x], up, "o-", label=r"$\Delta L$ / upper")
    tight.plot(t[x], low, "s-", label=r"lower / $\Delta L$")
    tight.set(xlabel="1 - NTPS", ylabel="ratio (1 = tight)", ylim=(0, 1.05), title="tightness")
    tight.legend(title="ratio", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return fig


def identity_check(table: pd.DataFrame) -> Figure:
    """Identity (moments only) against fitted in-sample probes, and the held-out excess loss.

    Parameters
    ----------
    table : DataFrame
        One row per k with ``k``, ``identity``, ``fitted_in_sample``, ``heldout_excess``
        (`ntps_nb.notebooks.identity_vs_fitted`).

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(table, ["k", "identity", "fitted_in_sample", "heldout_excess"], "identity_check")
    fig, (ax, right) = _figure(2)
    ax.plot(table["identity"], table["fitted_in_sample"], "o")
    lim = [min(table["identity"].min(), 0), max(table["identity"].max(), table["fitted_in_sample"].max()) * 1.05]
    ax.plot(lim, lim, color="grey", ls="--", lw=1)
    ax.set(xlabel=r"$\Delta L$ from the identity", ylabel="excess MSE of fitted probes (in-sample)",
           title="in-sample: identity = fitted")
    long = table.melt(id_vars="k", value_vars=["fitted_in_sample", "heldout_excess"], var_name="split", value_name="excess")
    sns.lineplot(data=long, x="k", y="excess", hue="split", marker="o", ax=right, palette=_PALETTE)
    right.axhline(0, color="grey", lw=0.8)
    right.set(xscale="log", ylabel="excess MSE (V_k probe - best k probe)", title="in-sample vs held-out")
    fig.tight_layout()
    return fig


def across_datasets(frame: pd.DataFrame, *, x: str = "ntps", y: str = "accuracy", title: str | None = None,
                    diagonal: bool = False, caption: str | None = None) -> Figure:
    """One point per dataset (and model): a score against a target, in the series' colours (one
    per dataset) and markers (one per model, hollow for a random control); with ``lower`` /
    ``upper`` columns each point carries the score's interval as a horizontal bar in its colour.
    The legends (titles "dataset", "model") name the points: no text is written on the axes.

    Parameters
    ----------
    frame : DataFrame
        One row per point, with columns ``dataset``, ``x`` and ``y`` (and ``model``).
    x, y : str
        Columns of the score and the target.
    title : str, optional
    diagonal : bool
        Draw y = x.
    caption : str, optional
        A caption line under the figure (`provenance_caption`).

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(frame, ["dataset", x, y], "across_datasets")
    fig, (ax,) = _figure(1, width=5.8, height=4.0)
    models = frame["model"] if "model" in frame.columns else pd.Series("", index=frame.index)
    bars = {"lower", "upper"} <= set(frame.columns)
    for (_, row), model in zip(frame.iterrows(), models):
        if bars and np.isfinite(row["lower"]) and np.isfinite(row["upper"]):
            ax.hlines(row[y], row["lower"], row["upper"], color=dataset_color(row["dataset"]), lw=1.2, zorder=2)
        _scatter(ax, row[x], row[y], dataset=row["dataset"], model=model)
    if diagonal:  # y = x, for before/after comparisons
        lo = float(min(frame[x].min(), frame[y].min()))
        hi = float(max(frame[x].max(), frame[y].max()))
        ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
    _legends(ax, frame["dataset"], models.unique() if "model" in frame.columns else None)
    ax.set(title=title, xlabel=x, ylabel=y)
    return _finish(fig, caption)


def _flag(value) -> bool | None:
    """A boolean column's value as True, False or None (missing): the flags ``centred`` and
    ``reliable`` arrive as bools, numpy bools, or 1.0 / 0.0 where a frame concatenated them with
    missing values (pandas then makes the column float)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return bool(value)


def _draw_intervals(ax, frame: pd.DataFrame, *, x: str, y: str) -> None:
    """Points with the interval of x that belongs to each (``lower``, ``upper``; ``centre`` where
    the interval is not centred on the point, marked by a tick; dotted where ``reliable`` is
    False), in the series' colours and markers."""
    for _, row in frame.iterrows():
        color = dataset_color(row["dataset"])
        if np.isfinite(row.get("lower", np.nan)) and np.isfinite(row.get("upper", np.nan)):
            dotted = _flag(row.get("reliable")) is False
            ax.hlines(row[y], row["lower"], row["upper"], color=color, lw=1.5, zorder=2, ls=":" if dotted else "-")
            centred = row.get("centred")
            if _flag(centred) is not True and np.isfinite(row.get("centre", np.nan)):
                ax.plot(row["centre"], row[y], marker="|", ms=10, mew=1.6, color=color, zorder=2)
        _scatter(ax, row[x], row[y], dataset=row["dataset"], model=row.get("model", ""))


def _interval_marks(frame: pd.DataFrame) -> tuple[list[Line2D], str]:
    """Legend entries that say what the interval bars of ``frame`` are, and a caption note."""
    handles, notes = [], []
    has = frame.dropna(subset=["lower", "upper"]) if {"lower", "upper"} <= set(frame.columns) else frame.iloc[:0]
    centred = has["centred"].map(lambda v: _flag(v) is True).astype(bool)
    for text in dict.fromkeys(has.loc[centred, "interval"]):
        handles.append(Line2D([], [], color="black", lw=1.5, label=textwrap.fill(text, 34)))
        notes.append(f"bars: {text}, centred on the point")
    if has.loc[centred, "reliable"].map(lambda v: _flag(v) is False).any():
        handles.append(Line2D([], [], color="black", lw=1.5, ls=":", label="estimate flagged unreliable\n(a condition of its flag fails)"))
        notes.append("dotted: the estimator's reliable flag is False (do not read it as the population NTPS)")
    for text in dict.fromkeys(has.loc[~centred, "interval"]):
        handles.append(Line2D([], [], color="black", lw=1.5, marker="|", ms=9,
                              label=textwrap.fill(f"{text}; | its own centre", 34)))
        notes.append(f"bars: {text}s, each centred on its own centre (tick), not on the estimate (marker), which "
                     "it can exclude: this study has no estimates table")
    return handles, "; ".join(notes)


def ntps_intervals(points: pd.DataFrame, *, y: str = "accuracy", title: str | None = None,
                   caption: str | None = None) -> Figure:
    """NTPS with the interval that belongs to each value, against a probe target, one point per
    dataset (`ntps_nb.study.interval_points`): the estimates table's estimate with its jackknife
    interval (centred on it; dotted where the estimator flags it unreliable), or, for a study
    without estimates, the plug-in NTPS with its shard-bootstrap interval, which is centred on the
    bootstrap's own centre (a tick), not on the point; the legend says which.

    Parameters
    ----------
    points : DataFrame
        Rows of `ntps_nb.study.interval_points`: dataset, ntps, lower, upper, centre, centred,
        reliable, interval, layer, k, estimator and ``y``.
    y : str
        The target column on the y axis.
    title : str, optional
    caption : str, optional
        A caption line under the figure (`provenance_caption`); the interval's note is appended.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(points, ["dataset", "ntps", "lower", "upper", "centre", "centred", "interval", "layer", "k", "estimator", y],
             "ntps_intervals")
    fig, (ax,) = _figure(1, width=6.6, height=4.0)
    _draw_intervals(ax, points, x="ntps", y=y)
    marks, note = _interval_marks(points)
    models = points["model"].unique() if "model" in points.columns else None
    _legends(ax, points["dataset"], models, extra=marks, extra_title="interval")
    estimators = ", ".join(dict.fromkeys(points["estimator"].astype(str)))
    ax.set(xlabel=f"NTPS at layer {int(points['layer'].iloc[0])}, k = {points['k'].iloc[0]:g} ({estimators})",
           ylabel=y, title=title)
    if caption is not None and note:
        caption = f"{caption}. {note}"
    return _finish(fig, caption)


def _p_text(row: Mapping) -> str:
    p = row.get("p_value", np.nan)
    if not np.isfinite(p):
        return ""
    side = {"one-sided greater": "one-sided", "one-sided less": "one-sided"}.get(row.get("p_side"), row.get("p_side"))
    return f"p {'< 0.001' if p < 0.001 else f'= {p:.3f}'} ({side})"


def _rho_text(row: Mapping) -> str:
    """"rho = +0.59 [-0.57, +0.93]" and the p-value on a second line."""
    text = f"rho = {row['estimate']:+.2f}"
    if np.isfinite(row.get("lower", np.nan)) and np.isfinite(row.get("upper", np.nan)):
        text += f" [{row['lower']:+.2f}, {row['upper']:+.2f}]"
    p = _p_text(row)
    return f"{text}\n{p}" if p else text


#: Row names of the headline figure, per selection.
_HEADLINE_ROWS = {"leave_one_dataset_out": "out of sample (leave-one-dataset-out)",
                  "fixed": "fixed configuration, with intervals"}


def headline(data, *, caption: str | bool = True) -> Figure:
    """The series' headline figure: out-of-sample NTPS against the probe target across datasets,
    each pretrained model beside its random-initialised control (one column per model), one row
    per selection (`ntps_nb.study.headline_points`): leave-one-dataset-out (x: the held-out rank,
    the configuration chosen on the other datasets) and a fixed configuration (x: NTPS with the
    interval that belongs to it). Each panel's title gives rho with its interval and p-value as
    the study computed them (nothing is computed here).

    Parameters
    ----------
    data : ntps_nb.study.Headline
        Its ``points`` (selection, model, dataset, x, y, lower, upper, centre, centred, reliable,
        interval, estimator, provenance columns) and ``rho`` (selection, model, pretrained,
        estimate, lower, upper, p_value, p_side, n_datasets, config, x_label).
    caption : str or bool
        The caption line under the figure: True builds it from the points' provenance
        (`provenance_caption`) with a note on what the rows and bars are; False: none.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    points, rho = data.points, data.rho
    _require(points, ["selection", "model", "dataset", "x", "y"], "headline")
    _require(rho, ["selection", "model", "estimate", "x_label"], "headline")
    selections = [s for s in _HEADLINE_ROWS if s in set(rho["selection"])]
    models = _model_order(rho["model"])
    fig, axes = plt.subplots(len(selections), len(models), figsize=(3.2 * len(models) + 0.4, 3.2 * len(selections)),
                             squeeze=False, sharey=True)
    plt.close(fig)
    for i, selection in enumerate(selections):
        for j, model in enumerate(models):
            ax = axes[i, j]
            found = rho[(rho["selection"] == selection) & (rho["model"] == model)]
            part = points[(points["selection"] == selection) & (points["model"] == model)]
            kind = "random-initialised" if is_random_control(model) or not bool(
                found["pretrained"].iloc[0] if len(found) and "pretrained" in found else True) else "pretrained"
            head = f"{model}\n({kind})\n" if i == 0 else ""
            if found.empty:
                ax.text(0.5, 0.5, f"no {selection.replace('_', ' ')}\n(too few datasets)", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="dimgrey")
                ax.set_title(head.strip(), fontsize=9)
                continue
            row = found.iloc[0]
            _draw_intervals(ax, part.assign(model=model), x="x", y="y")
            if selection == "leave_one_dataset_out":
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_title(f"{head}{_rho_text(row)}", fontsize=8.5)
            ax.set_xlabel(textwrap.fill(str(row["x_label"]), 40), fontsize=8)
        axes[i, 0].set_ylabel(f"{_HEADLINE_ROWS[selections[i]]}\n\nprobe {data.target} (held-out texts)", fontsize=8.5)
    marks, note = _interval_marks(points)
    if len(selections) > 1:
        _legends(axes[0, -1], points["dataset"], models)
        _legends(axes[-1, -1], None, extra=marks, extra_title="interval")
    else:
        _legends(axes[0, -1], points["dataset"], models, extra=marks, extra_title="interval")
    if caption is True:
        said = {"leave_one_dataset_out": "leave-one-dataset-out rho with its 95% bootstrap interval and permutation "
                                         "p, the selection redone in each",
                "fixed": "fixed-configuration rho with a bootstrap interval over datasets and a permutation p"}
        rows = "; ".join(said[s] for s in selections)
        caption = provenance_caption(points, models=models, estimator=", ".join(dict.fromkeys(
            points.loc[points["selection"] == "fixed", "estimator"].astype(str))) or None,
            note=f"{rows}. {note}" if note else rows)
    return _finish(fig, caption or None)


def correlation_summary(summary: pd.DataFrame, *, target: str = "accuracy", caption: str | None = None) -> Figure:
    """rho (``estimate``) with its interval (``lower``, ``upper``, where the row has one) per score
    and selection for one target, one panel per model (`ntps_nb.study.correlation_summary` rows).

    Parameters
    ----------
    summary : DataFrame
        Rows with ``model``, ``target``, ``score``, ``selection``, ``estimate`` (and optionally
        ``lower``, ``upper``).
    target : str
        The target whose rows are drawn.
    caption : str, optional
        A caption line under the figure (`provenance_caption`).

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(summary, ["model", "target", "score", "selection", "estimate"], "correlation_summary")
    s = summary[summary["target"] == target].copy()
    if s.empty:
        raise ValueError(f"no rows with target {target!r}")
    s["what"] = s["score"] + np.where(s["selection"] == "none", "", " [" + s["selection"].str.replace("_", " ") + "]")
    models = list(dict.fromkeys(s["model"]))
    fig, axes = _figure(len(models), width=5.5, height=0.35 * s["what"].nunique() + 1.5, sharex=True)
    for ax, model in zip(axes, models):
        m = s[s["model"] == model].reset_index(drop=True)
        ypos = np.arange(len(m))
        colors = sns.color_palette(_PALETTE, 3)
        col = [colors[0] if sel.startswith("leave_one_dataset_out") else colors[1] if sel == "in_sample"
               else colors[2] for sel in m["selection"]]
        if {"lower", "upper"} <= set(m.columns):
            err = np.vstack([m["estimate"] - m["lower"], m["upper"] - m["estimate"]]).clip(min=0)
            ax.errorbar(m["estimate"], ypos, xerr=np.nan_to_num(err), fmt="none", ecolor="grey", lw=1)
        ax.scatter(m["estimate"], ypos, c=col, zorder=3)
        ax.set_yticks(ypos, m["what"], fontsize=8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set(xlim=(-1.05, 1.05), xlabel=f"Spearman rho with {target}", title=model)
    labels = ("leave-one-dataset-out", "in-sample (the paper's)", "no selection / other")
    handles = [Line2D([], [], ls="none", marker="o", color=c, label=t) for c, t in zip(colors, labels)]
    handles.append(Line2D([], [], color="grey", lw=1, label="95% interval (where one exists)"))
    _legends(axes[-1], None, extra=handles, extra_title="selection")
    return _finish(fig, caption)


def selection_null(null: np.ndarray, observed: float, *, title: str = "in-sample max under shuffled targets") -> Figure:
    """Histogram of the permutation null of the in-sample maximum, with the observed value.

    Parameters
    ----------
    null : array, shape (n_perm,)
        The maximum under each permutation.
    observed : float
        The observed maximum.
    title : str

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    fig, (ax,) = _figure(1)
    ax.hist(np.asarray(null), bins=30, color="lightgrey", edgecolor="grey")
    ax.axvline(observed, color="tab:red", label=f"observed {observed:+.2f}")
    ax.set(xlabel="best rho over configurations", ylabel="permutations", title=title)
    ax.legend(title="in-sample maximum", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return fig


def published_panels(frame: pd.DataFrame, *, y: str, x: str = "ntps", col: str = "model",
                     rho: pd.DataFrame | None = None, col_wrap: int = 4, rho_label: str = "rho") -> Figure:
    """The paper's per-model scatter (Fig. 2 or 3 style): one panel per model, rho in the title.

    Say which correlation the titles show with ``rho_label`` (e.g. "rho(NTPS, gain)"): the paper
    reports Figure 3 as rho(NTPS, -gain), whose sign is the opposite of the slopes drawn against
    the gain.

    Parameters
    ----------
    frame : DataFrame
        One row per point, with columns ``x``, ``y`` and ``col``.
    y, x : str
        Columns of the target and the score.
    col : str
        Column with one panel per value.
    rho : DataFrame, optional
        Rows with ``model`` and ``rho``, shown in each panel's title.
    col_wrap : int
        Most panels per row.
    rho_label : str
        What the titles call the correlation.

    Returns
    -------
    Figure
        The seaborn FacetGrid's figure.
    """
    _require(frame, [x, y, col], "published_panels")
    grid = sns.FacetGrid(frame, col=col, col_wrap=min(col_wrap, frame[col].nunique()), height=2.6,
                         sharex=False, sharey=False)
    grid.map_dataframe(sns.regplot, x=x, y=y, ci=None, scatter_kws={"s": 18}, line_kws={"lw": 1})
    for ax, name in zip(grid.axes.flat, grid.col_names):
        text = name.split("/")[-1]
        if rho is not None:
            r = rho.loc[rho["model"] == name, "rho"]
            text += f"\n{rho_label} = {r.iloc[0]:+.2f}" if len(r) else ""
        ax.set_title(text, fontsize=9)
    plt.close(grid.figure)
    grid.figure.tight_layout()
    return grid.figure


def word_projections(frame: pd.DataFrame) -> Figure:
    """Words on the top-2 U and V directions (Figure 1 style): one panel per space.

    Parameters
    ----------
    frame : DataFrame
        One row per (space, word) with ``space``, ``group``, ``axis1``, ``axis2`` (and ``word``
        to annotate) (`ntps_nb.notebooks.word_projections`).

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(frame, ["space", "group", "axis1", "axis2"], "word_projections")
    spaces = sorted(frame["space"].unique())
    fig, axes = _figure(len(spaces), width=4.2, height=3.8)
    for ax, space in zip(axes, spaces):
        part = frame[frame["space"] == space]
        sns.scatterplot(data=part, x="axis1", y="axis2", hue="group", style="group", s=60, ax=ax, palette=_PALETTE)
        if "word" in part.columns:
            for _, row in part.iterrows():
                ax.annotate(row["word"], (row["axis1"], row["axis2"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.set(title=f"top-2 {space} directions", xlabel=f"{space} axis 1", ylabel=f"{space} axis 2")
        ax.legend(title="group", fontsize=7, title_fontsize=8)
    fig.tight_layout()
    return fig


def explorer_view(ntps_table: pd.DataFrame, probes: pd.DataFrame, *, model: str, dataset: str, layer: int,
                  k: float, variant: str = "theory", target: str = "accuracy") -> Figure:
    """The explorer's three panels for one selection: NTPS over layers at k (this dataset, the
    chosen layer marked), NTPS over k at the layer, and NTPS against the probe target across
    datasets at (layer, k).

    ``ntps_table``: study rows (model, dataset, variant, layer, k or fraction, ntps); ``probes``:
    study probe rows (model, dataset, layer, protocol, accuracy/kappa/mse). ``k`` is the fraction
    for the reference variant and k for the others (theory, pca_overlap).

    Parameters
    ----------
    ntps_table, probes : DataFrame
        As above.
    model, dataset : str
        The selection.
    layer : int
        Hidden-state index.
    k : float
        k, or the fraction for the reference variant.
    variant : str
    target : str
        Probe column (of the held-out protocol) on the third panel's y axis.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).

    Raises
    ------
    ValueError
        When the model has no rows of ``variant``, or no such layer.
    """
    kcol = "fraction" if variant == "reference" else "k"
    _require(ntps_table, ["model", "dataset", "variant", "layer", kcol, "ntps"], "explorer_view")
    rows = ntps_table[(ntps_table["model"] == model) & (ntps_table["variant"] == variant)]
    if rows.empty:
        raise ValueError(f"no {variant} NTPS rows for model {model!r}")
    if layer not in set(rows["layer"]):  # a layer the model lacks would draw empty panels
        raise ValueError(f"{model} has no layer {layer}; its layers are {sorted(int(v) for v in rows['layer'].unique())}")
    at_k = rows[np.isclose(rows[kcol], k)]
    fig, (a, b, c) = _figure(3, width=4.3, height=3.4)
    one = at_k[at_k["dataset"] == dataset].sort_values("layer")
    a.plot(one["layer"], one["ntps"], "o-", ms=3)
    a.axvline(layer, color="tab:red", ls=":")
    a.set(title=f"{dataset}: NTPS over layers ({kcol}={k:g})", xlabel="layer", ylabel="NTPS", ylim=(0, 1.02))
    over_k = rows[(rows["dataset"] == dataset) & (rows["layer"] == layer)].sort_values(kcol)
    b.plot(over_k[kcol], over_k["ntps"], "o-", ms=3)
    b.axvline(k, color="tab:red", ls=":")
    b.set(title=f"layer {layer}: NTPS over {kcol}", xlabel=kcol, ylabel="NTPS", ylim=(0, 1.02),
          xscale="linear" if variant == "reference" else "log")
    heldout = probes[(probes["model"] == model) & (probes["protocol"] == "heldout") & (probes["layer"] == layer)]
    across = at_k[at_k["layer"] == layer].merge(heldout[["dataset", target]], on="dataset")
    chosen = across["dataset"] == dataset
    c.scatter(across["ntps"], across[target], c=[dataset_color(d) for d in across["dataset"]], s=28)
    # the dataset of the first two panels, ringed (names go to the legend, none on the axes)
    c.scatter(across.loc[chosen, "ntps"], across.loc[chosen, target], s=110, facecolors="none", edgecolors="black",
              linewidths=1.2)
    c.set(title=f"across datasets, layer {layer}", xlabel="NTPS", ylabel=f"held-out {target}")
    fig.suptitle(f"{model} · {variant}", fontsize=10)
    fig.tight_layout()
    ring = Line2D([], [], marker="o", ls="none", markersize=9, markerfacecolor="none", markeredgecolor="black",
                  label=f"{dataset} (left panels)")
    _legends(c, list(across["dataset"]), extra=[ring], extra_title="shown left")
    return fig


def _dodge(datasets: Sequence[str], width: float = 0.6) -> dict[str, float]:
    """A fixed horizontal offset per dataset inside a category (no random jitter: the same dataset
    sits at the same place in every category, and no two datasets overprint)."""
    order = dataset_order(datasets)
    step = width / max(len(order), 1)
    return {name: (i - (len(order) - 1) / 2) * step for i, name in enumerate(order)}


def diagnostics_bands(diag: pd.DataFrame, published: pd.DataFrame | None = None, *,
                      caption: str | None = None) -> Figure:
    """The diagnostics per variant (one row of panels each, theory first): NTPS of each configuration
    across datasets (one point per dataset, in its colour, at a fixed offset), and the
    label-permutation z-score of the same values (dashed: z = +2 and -2; shaded: z < -2, where the
    real labels give a LOWER NTPS than shuffled ones). Beside the reference variant's NTPS, the
    paper's published NTPS per model (min-max over its 12 datasets, one labelled bar per model):
    the paper published the reference variant only, so the theory row has no such comparison.

    ``diag``: `ntps_nb.study.diagnostics_summary`; ``published``: `ntps_nb.load_published("fig2_accuracy")`.

    Parameters
    ----------
    diag : DataFrame
        Rows with ``variant``, ``config`` ("name=value"), ``ntps``, ``perm_z``, ``dataset`` (and
        ``model``).
    published : DataFrame, optional
        Rows with ``model`` and ``ntps``; their per-model min-max are the bars.
    caption : str, optional
        A caption line under the figure (`provenance_caption`).

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(diag, ["variant", "config", "ntps", "perm_z", "dataset"], "diagnostics_bands")
    variants = [v for v in ("theory", "reference") if v in set(diag["variant"])]
    variants += sorted(set(diag["variant"]) - set(variants))
    fig = plt.figure(figsize=(12.5, 3.3 * len(variants)))
    plt.close(fig)
    grid = fig.add_gridspec(len(variants), 3, width_ratios=[3.0, 1.1, 3.0])
    offsets = _dodge(diag["dataset"])
    models = diag["model"] if "model" in diag.columns else pd.Series("", index=diag.index)
    diag = diag.assign(_model=models.to_numpy(), _value=diag["config"].str.split("=").str[-1].astype(float))
    z_axes = []
    for row, variant in enumerate(variants):
        part = diag[diag["variant"] == variant]
        order = list(dict.fromkeys(part.sort_values("_value")["config"]))
        left, right = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 2])
        for ax, column in ((left, "ntps"), (right, "perm_z")):
            for _, r in part.iterrows():
                _scatter(ax, order.index(r["config"]) + offsets[r["dataset"]], r[column], dataset=r["dataset"],
                         model=r["_model"], size=30)
            ax.set_xticks(range(len(order)), order)
            ax.set_xlim(-0.6, len(order) - 0.4)
            ax.set_xlabel(f"configuration ({'k' if variant == 'theory' else 'fraction f' if variant == 'reference' else 'setting'})")
        left.set(ylim=(-0.02, 1.02), ylabel="NTPS", title=f"{variant}: NTPS on real labels (a point per dataset, layer)")
        right.axhspan(-1e6, -2.0, color="tab:red", alpha=0.07, lw=0)
        for level in (2.0, -2.0):
            right.axhline(level, ls="--", color="black", lw=1)
        right.set_yscale("symlog", linthresh=2.0)
        right.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([-1000, -100, -10, -2, 0, 2, 10, 100, 1000]))
        right.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        right.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        low, high = float(np.nanmin(part["perm_z"])), float(np.nanmax(part["perm_z"]))
        right.set_ylim(min(low * 1.3, -3.0), max(high * 1.3, 3.0))
        right.set(ylabel="z (null standard deviations)", title=f"{variant}: label-permutation z-score")
        z_axes.append(right)
        middle = fig.add_subplot(grid[row, 1], sharey=left)
        if variant == "reference" and published is not None and not published.empty:
            bands = published.groupby("model", sort=False)["ntps"].agg(["min", "max"])
            positions = np.arange(len(bands))
            middle.vlines(positions, bands["min"], bands["max"], color="dimgrey", lw=3)
            middle.set_xticks(positions, [m.split("/")[-1] for m in bands.index], rotation=90, fontsize=7)
            middle.set_xlim(-0.8, len(bands) - 0.2)
            middle.set_title("the paper (Fig. 2):\nreference NTPS per model", fontsize=9)
            middle.tick_params(axis="y", labelleft=False)
        else:
            middle.set_axis_off()
            if variant == "theory":
                middle.text(0.5, 0.5, "the paper published\nthe reference variant\nonly: nothing to\ncompare the theory\n"
                            "values with", ha="center", va="center", fontsize=8, color="dimgrey",
                            transform=middle.transAxes)
    extra = [Line2D([], [], ls="--", color="black", lw=1, label="z = +2 / -2"),
             matplotlib.patches.Patch(color="tab:red", alpha=0.15, label="z < -2: real labels give lower\nNTPS than shuffled ones")]
    if published is not None and not published.empty and "reference" in variants:
        extra.append(Line2D([], [], color="dimgrey", lw=3, label="paper: min-max over its\n12 datasets (in-sample f)"))
    if len(z_axes) > 1:
        _legends(z_axes[0], diag["dataset"], models.unique() if "model" in diag.columns else None)
        _legends(z_axes[-1], None, extra=extra)
    else:
        _legends(z_axes[0], diag["dataset"], models.unique() if "model" in diag.columns else None, extra=extra)
    if caption and {"n_permutations", "layer"} <= set(diag.columns):
        caption += (f". Diagnostic layers {', '.join(str(int(v)) for v in sorted(diag['layer'].unique()))}; "
                    f"z from {_span([int(v) for v in diag['n_permutations'].dropna().unique()])} label permutations "
                    "per point")
    return _finish(fig, caption)


def interval_width(table: pd.DataFrame) -> Figure:
    """Interval width against the number of texts, log-log, with the 1/sqrt(N) slope of a mean
    drawn through the first point (`ntps_nb.width_by_n`). Left: the intervals themselves.

    Parameters
    ----------
    table : DataFrame
        One row per subsample size with ``n_texts``, ``ntps``, ``lower``, ``upper``, ``width``
        and ``level``.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(table, ["n_texts", "ntps", "lower", "upper", "width"], "interval_width")
    fig, (left, right) = _figure(2, width=5.0, height=3.6)
    left.vlines(table["n_texts"], table["lower"], table["upper"], color="black", lw=1.5)
    left.scatter(table["n_texts"], table["ntps"], color="C0", zorder=3)
    left.set(xscale="log", xlabel="texts N", ylabel="NTPS", title=f"NTPS and its {table['level'].iloc[0]:.0%} interval")
    right.loglog(table["n_texts"], table["width"], "o-", label="measured")
    n0, w0 = table["n_texts"].iloc[0], table["width"].iloc[0]
    right.loglog(table["n_texts"], w0 * np.sqrt(n0 / table["n_texts"]), "--", color="grey", label="1/sqrt(N)")
    right.set(xlabel="texts N", ylabel="interval width", title="interval width against N")
    right.legend(title="width", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return fig



def estimate_by_n(table: pd.DataFrame) -> Figure:
    """Does the estimate settle as texts are added? Estimate and interval against N, one panel per k.

    Each estimator of ``table`` (`ntps_nb.core.estimators.estimate_by_n` rows, several estimators
    concatenated) gets a colour; its points are filled where the row is flagged reliable and hollow
    where not, and a band of its colour spans its interval at its ``n_first`` (the smallest N where it has one). How to
    read an estimate that leaves or keeps to its band: `ntps_nb.core.estimators.estimate_by_n`.

    Parameters
    ----------
    table : DataFrame
        Rows with ``k``, ``estimator``, ``n_texts``, ``estimate``, ``lower``, ``upper``, ``reliable``,
        ``level`` and ``n_first`` (NaN where no N has an interval).

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(table, ["k", "estimator", "n_texts", "estimate", "lower", "upper", "reliable", "level", "n_first"],
             "estimate_by_n")
    ks = sorted(table["k"].unique())
    estimators = list(dict.fromkeys(table["estimator"]))
    fig, axes = _figure(len(ks), width=4.2, height=3.4, sharey=True)
    for ax, k in zip(axes, ks):
        for i, name in enumerate(estimators):
            rows = table[(table["k"] == k) & (table["estimator"] == name)].sort_values("n_texts")
            colour = f"C{i}"
            x = rows["n_texts"].to_numpy(float) * (1 + 0.05 * (i - (len(estimators) - 1) / 2))  # side by side
            y = rows["estimate"].to_numpy(float)
            ax.errorbar(x, y, yerr=[y - rows["lower"].to_numpy(float), rows["upper"].to_numpy(float) - y], fmt="none",
                        ecolor=colour, elinewidth=1.2, capsize=2)
            reliable = rows["reliable"].map(_flag).eq(True).to_numpy()
            ax.scatter(x[reliable], y[reliable], color=colour, zorder=3, s=28)
            ax.scatter(x[~reliable], y[~reliable], facecolors="white", edgecolors=colour, zorder=3, s=28)
            first = rows[rows["n_texts"] == rows["n_first"]]
            if not first.empty:
                ax.axhspan(first["lower"].iloc[0], first["upper"].iloc[0], color=colour, alpha=0.12, lw=0)
            ax.plot([], [], "o-", color=colour, label=name)
        sizes = sorted(table["n_texts"].unique())
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(int(n)) for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set(xlabel="texts N (nested subsamples)", title=f"k = {k}")
    axes[0].set_ylabel(f"NTPS, {table['level'].iloc[0]:.0%} interval")
    axes[0].plot([], [], "o", color="grey", label="reliable")
    axes[0].plot([], [], "o", markerfacecolor="white", markeredgecolor="grey", label="not reliable")
    right = 0.86 if len(ks) == 1 else 0.9  # the panels' right edge; the legend stands beyond it
    fig.legend(*axes[0].get_legend_handles_labels(), title="estimator\n(band: its interval\nat the smallest N)",
               fontsize=8, title_fontsize=8, loc="center left", bbox_to_anchor=(right, 0.5))
    fig.tight_layout(rect=(0, 0, right, 1))
    return fig


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _arc(ax, a: np.ndarray, b: np.ndarray, radius: float, label: str) -> None:
    """The arc from unit vector a to unit vector b (angle < 90 degrees) at ``radius``, labelled."""
    angle = np.arccos(np.clip(a @ b, -1.0, 1.0))
    ortho = _unit(b - (a @ b) * a) if angle > 1e-9 else a
    t = np.linspace(0, angle, 30)
    points = radius * (np.outer(np.cos(t), a) + np.outer(np.sin(t), ortho))
    ax.plot(*points.T, color="black", lw=1.2)
    ax.text(*(1.35 * points[len(t) // 2]), label, fontsize=10)


def _line(ax, direction: np.ndarray, color: str, label: str) -> None:
    """A one-dimensional span: the line through the origin, with an arrow on the direction."""
    ax.plot(*np.outer([-1, 1], direction).T, color=color, lw=1, alpha=0.6)
    ax.quiver(0, 0, 0, *direction, color=color, lw=2.2, arrow_length_ratio=0.12, label=label)


def _disk(ax, basis: np.ndarray, color: str, label: str) -> None:
    """The unit disk of the plane spanned by the orthonormal columns of ``basis`` (3, 2)."""
    r, t = np.meshgrid(np.linspace(0, 1, 2), np.linspace(0, 2 * np.pi, 73))
    points = r[..., None] * (np.cos(t)[..., None] * basis[:, 0] + np.sin(t)[..., None] * basis[:, 1])
    ax.plot_surface(points[..., 0], points[..., 1], points[..., 2], color=color, alpha=0.22, linewidth=0, shade=False)
    ax.plot(*points[:, -1].T, color=color, lw=1.2, label=label)


def _view_from(ax, direction: np.ndarray, turn: float = 25.0) -> None:
    """Look at the origin from ``direction``, turned by ``turn`` degrees of azimuth (depth cue)."""
    x, y, z = _unit(direction)
    ax.view_init(elev=float(np.degrees(np.arcsin(z))), azim=float(np.degrees(np.arctan2(y, x))) + turn)


def whitened_subspaces(perception: np.ndarray, next_token: np.ndarray, *, ks: Sequence[int] = (1, 2)) -> Figure:
    """NTPS as geometry in a 3-d whitened space: one panel per k, the perception subspace
    span(u_1..u_kU) (blue) against the next-token subspace span(Sxx^{1/2} v_1..v_k) (red); a
    line is drawn with an arrow, a plane as a disk, and the angle between them is marked (for two
    planes: the angle between them across their common line, which the view looks along).

    With kU = min(k, m), NTPS(k) is the mean of cos^2 of the principal angles between the two
    spans over the kU perception directions: cos^2(theta) for two lines, (1 + cos^2(phi)) / 2 for
    two planes (they always share a line in 3-d). The panel titles give the angle.

    Parameters
    ----------
    perception : (3, m) ndarray
        Orthonormal perception directions u_1, u_2, ... in whitened coordinates (descending
        eigenvalues), m = 1 or 2.
    next_token : (3, r) ndarray
        Next-token directions Sxx^{1/2} v_1, ... in whitened coordinates (descending; any
        scale), r >= max(ks).
    ks : sequence of int
        The k of each panel, each 1 or 2.

    Returns
    -------
    Figure
        A new matplotlib figure with one 3-d panel per k, closed in pyplot.

    Raises
    ------
    ValueError
        On arrays that are not 3 x something, or a k outside 1..min(2, r).
    """
    from scipy.linalg import subspace_angles

    perception, next_token = np.asarray(perception, float), np.asarray(next_token, float)
    if perception.ndim != 2 or next_token.ndim != 2 or perception.shape[0] != 3 or next_token.shape[0] != 3:
        raise ValueError(f"whitened_subspaces draws 3-d spaces: got perception {perception.shape}, next_token {next_token.shape}")
    if not all(1 <= k <= min(2, next_token.shape[1]) for k in ks):
        raise ValueError(f"each k must be 1 or 2 and at most r = {next_token.shape[1]}, got {list(ks)}")
    fig = plt.figure(figsize=(4.8 * len(ks), 4.6))
    plt.close(fig)
    for panel, k in enumerate(ks, start=1):
        ax = fig.add_subplot(1, len(ks), panel, projection="3d")
        k_u = min(k, perception.shape[1])
        U = perception[:, :k_u]
        V, _ = np.linalg.qr(next_token[:, :k])
        angle = float(np.degrees(subspace_angles(U, V).max()))
        if k_u == 1:
            _line(ax, _unit(U[:, 0]), "tab:blue", r"span($u_1$)")
        else:
            _disk(ax, U, "tab:blue", r"span($u_1, u_2$)")
        if k == 1:
            _line(ax, _unit(V[:, 0]), "tab:red", r"span($\tilde v_1$)")
        else:
            _disk(ax, V, "tab:red", r"span($\tilde v_1, \tilde v_2$)")
        if k_u == 1 and k == 1:
            a, b = _unit(U[:, 0]), _unit(V[:, 0])
            b = b if a @ b >= 0 else -b  # a span is a line: the angle between lines is at most 90 degrees
            _arc(ax, a, b, 0.5, rf"$\theta$ = {angle:.0f}°")
            _view_from(ax, np.cross(a, b))
            title = f"k = 1: NTPS = cos²θ, θ = {angle:.1f}°"
        elif k_u == 2 and k == 2:
            common = _unit(np.cross(np.cross(U[:, 0], U[:, 1]), np.cross(V[:, 0], V[:, 1])))
            ax.plot(*np.outer([-1.1, 1.1], common).T, color="black", ls="--", lw=1, label="common line")
            a = _unit(np.cross(common, np.cross(U[:, 0], U[:, 1])))  # in span(U), orthogonal to the common line
            b = _unit(np.cross(common, np.cross(V[:, 0], V[:, 1])))
            b = b if a @ b >= 0 else -b
            for vector, color in ((a, "tab:blue"), (b, "tab:red")):
                ax.plot(*np.outer([0, 1], vector).T, color=color, lw=1, ls=":")
            _arc(ax, a, b, 0.7, rf"$\varphi$ = {angle:.0f}°")
            normals = _unit(np.cross(U[:, 0], U[:, 1])), _unit(np.cross(V[:, 0], V[:, 1]))
            normal = normals[0] + (normals[1] if normals[0] @ normals[1] >= 0 else -normals[1])
            _view_from(ax, _unit(normal) + 1.5 * common, turn=0.0)  # obliquely along the common line: the angle opens
            title = f"k = 2: NTPS = (1 + cos²φ)/2, φ = {angle:.1f}°"
        else:
            title = f"k = {k}: largest principal angle {angle:.1f}°"
        # the coordinate axes as short grey arrows instead of a box: the views are oblique
        for axis in range(3):
            ax.quiver(0, 0, 0, *(0.8 * np.eye(3)[axis]), color="grey", lw=0.8, arrow_length_ratio=0.1)
            ax.text(*(0.9 * np.eye(3)[axis]), f"$z_{axis + 1}$", color="grey", fontsize=9)
        ax.set(xlim=(-0.9, 0.9), ylim=(-0.9, 0.9), zlim=(-0.9, 0.9))
        ax.set_box_aspect((1, 1, 1))
        ax.set_axis_off()
        ax.set_title(title, fontsize=10)
        ax.legend(title="subspace", fontsize=8, title_fontsize=8, loc="upper left")
    fig.suptitle(r"whitened coordinates $z = S_{xx}^{-1/2}\bar x$: perception (blue), next-token (red)", fontsize=10)
    fig.tight_layout()
    return fig


def known_truth(frame: pd.DataFrame, *, caption: str | None = None) -> Figure:
    """Estimates and their intervals over independent draws from a population whose NTPS is known
    (`ntps_nb.core.simulate.estimator_map`), one panel per estimator.

    Draws are sorted by estimate; each interval is drawn at its draw's rank, blue where it contains the
    population value (the horizontal line), red where it misses it; a filled dot marks a row the
    reliability flag accepts, a hollow one a row it does not. The title gives the mean error (the
    bias), the share of intervals that cover, and the same among the reliable rows.

    Parameters
    ----------
    frame : DataFrame
        One row per (draw, estimator) at a single k: ``estimator``, ``estimate``, ``lower``,
        ``upper``, ``reliable``, ``truth`` (as `estimator_map` writes them).
    caption : str, optional
        Provenance printed under the panels.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(frame, ["estimator", "estimate", "lower", "upper", "reliable", "truth"], "known_truth")
    if "k" in frame and frame["k"].nunique() > 1:
        raise ValueError(f"known_truth draws one k at a time; the frame has k = {sorted(frame['k'].unique())}")
    estimators = list(dict.fromkeys(frame["estimator"]))
    fig, axes = _figure(len(estimators), width=4.6, height=3.6, sharey=True)
    for ax, name in zip(axes, estimators):
        rows = frame[(frame["estimator"] == name) & np.isfinite(frame["estimate"])].sort_values("estimate")
        truth = float(rows["truth"].iloc[0])
        rank = np.arange(len(rows))
        covered = ((rows["lower"] <= truth) & (truth <= rows["upper"])).to_numpy()
        reliable = rows["reliable"].astype(bool).to_numpy()
        ax.vlines(rank, rows["lower"], rows["upper"], colors=np.where(covered, "C0", "C3"), lw=1.2)
        ax.scatter(rank[reliable], rows["estimate"].to_numpy()[reliable], color="black", s=12, zorder=3,
                   label="reliable")
        ax.scatter(rank[~reliable], rows["estimate"].to_numpy()[~reliable], facecolors="white", edgecolors="black",
                   s=12, zorder=3, label="not reliable")
        ax.axhline(truth, color="grey", ls="--", lw=1, label="population NTPS")
        among = f"{covered[reliable].mean():.0%} of {reliable.sum()} reliable" if reliable.any() else "none reliable"
        ax.set(xlabel="draw (sorted by estimate)", ylabel="NTPS",
               title=f"{name}: bias {(rows['estimate'] - truth).mean():+.3f}\ncovers {covered.mean():.0%}; {among}")
        ax.title.set_fontsize(9)
    axes[0].legend(title="draws", fontsize=7, title_fontsize=7, loc="best")
    return _finish(fig, caption)
