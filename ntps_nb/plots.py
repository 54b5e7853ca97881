"""Plot functions of the notebooks: tidy frames in, a matplotlib figure out.

Every function is pure: it reads the columns it names, draws with seaborn/matplotlib on a new
figure, and returns that figure (nothing is shown or saved here). Column names follow the tidy
tables of `ntps_nb.core` and `ntps_nb.study`.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from matplotlib.figure import Figure

_PALETTE = "colorblind"


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
        the intervals are drawn as vertical bars.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(profile, ["layer", "ntps", "k", "variant", "accuracy", "kappa"], "layer_profile")
    fig, (left, right) = _figure(2)
    sns.lineplot(data=profile, x="layer", y="ntps", marker="o", ax=left)
    title = f"NTPS ({profile['variant'].iloc[0]}, k={profile['k'].iloc[0]})"
    if {"ntps_lower", "ntps_upper"} <= set(profile.columns):
        bars = profile.dropna(subset=["ntps_lower", "ntps_upper"])
        # vertical segments, not errorbar(): a "basic" bootstrap interval need not contain the estimate
        left.vlines(bars["layer"], bars["ntps_lower"], bars["ntps_upper"], color="black", lw=1.2)
        for end in ("ntps_lower", "ntps_upper"):
            left.scatter(bars["layer"], bars[end], marker="_", color="black", s=40)
        title += f"\n{bars['level'].iloc[0]:.0%} shard-bootstrap intervals" if len(bars) else ""
    left.set(title=title, ylabel="NTPS", ylim=(0, 1.02))
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
        ax.legend()
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
    ax.legend(fontsize=8)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(t["upper_bound"] > 0, t["excess_loss"] / t["upper_bound"], np.nan)
        low = np.where(t["excess_loss"] > 0, t["lower_bound"] / t["excess_loss"], np.nan)
    tight.plot(t[x], up, "o-", label=r"$\Delta L$ / upper")
    tight.plot(t[x], low, "s-", label=r"lower / $\Delta L$")
    tight.set(xlabel="1 - NTPS", ylabel="ratio (1 = tight)", ylim=(0, 1.05), title="tightness")
    tight.legend(fontsize=8)
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


def across_datasets(frame: pd.DataFrame, *, x: str = "ntps", y: str = "accuracy", hue: str = "model",
                    label: str | None = "dataset", title: str | None = None, diagonal: bool = False) -> Figure:
    """One point per dataset (and ``hue``): a score against a target, points labelled; with
    ``lower``/``upper`` columns, each point carries the score's interval as a horizontal bar.

    Parameters
    ----------
    frame : DataFrame
        One row per point, with columns ``x`` and ``y``.
    x, y : str
        Columns of the score and the target.
    hue : str
        Column that colours the points (ignored when absent).
    label : str, optional
        Column whose value annotates each point (its last "/" part, 18 characters at most).
    title : str, optional
    diagonal : bool
        Draw y = x.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(frame, [x, y], "across_datasets")
    fig, (ax,) = _figure(1, width=5.5, height=4.0)
    if {"lower", "upper"} <= set(frame.columns):  # the score's interval (e.g. study.ntps_with_intervals)
        ax.hlines(frame[y], frame["lower"], frame["upper"], color="grey", lw=1.2, zorder=1)
    sns.scatterplot(data=frame, x=x, y=y, hue=hue if hue in frame.columns else None, ax=ax, palette=_PALETTE, s=50)
    if label and label in frame.columns:
        for _, row in frame.iterrows():
            ax.annotate(str(row[label]).split("/")[-1][:18], (row[x], row[y]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if diagonal:  # y = x, for before/after comparisons
        lo = float(min(frame[x].min(), frame[y].min()))
        hi = float(max(frame[x].max(), frame[y].max()))
        ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
    if ax.get_legend() is not None:
        ax.legend(fontsize=7)
    ax.set(title=title)
    fig.tight_layout()
    return fig


def correlation_summary(summary: pd.DataFrame, *, target: str = "accuracy") -> Figure:
    """rho (``estimate``) with its interval (``lower``, ``upper``, where the row has one) per score
    and selection for one target, one panel per model (`ntps_nb.study.correlation_summary` rows).

    Parameters
    ----------
    summary : DataFrame
        Rows with ``model``, ``target``, ``score``, ``selection``, ``estimate`` (and optionally
        ``lower``, ``upper``).
    target : str
        The target whose rows are drawn.

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
    fig.tight_layout()
    return fig


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
    ax.legend()
    fig.tight_layout()
    return fig


def published_panels(frame: pd.DataFrame, *, y: str, x: str = "ntps", col: str = "model",
                     rho: pd.DataFrame | None = None, col_wrap: int = 4) -> Figure:
    """The paper's per-model scatter (Fig. 2 or 3 style): one panel per model, rho in the title.

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
            text += f"\nrho = {r.iloc[0]:+.2f}" if len(r) else ""
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
        ax.legend(fontsize=7)
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
    """
    kcol = "fraction" if variant == "reference" else "k"
    _require(ntps_table, ["model", "dataset", "variant", "layer", kcol, "ntps"], "explorer_view")
    rows = ntps_table[(ntps_table["model"] == model) & (ntps_table["variant"] == variant)]
    if rows.empty:
        raise ValueError(f"no {variant} NTPS rows for model {model!r}")
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
    c.scatter(across["ntps"], across[target], c=["tab:red" if d == dataset else "tab:blue" for d in across["dataset"]])
    for _, row in across.iterrows():
        c.annotate(row["dataset"], (row["ntps"], row[target]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    c.set(title=f"across datasets, layer {layer}", xlabel="NTPS", ylabel=f"held-out {target}")
    fig.suptitle(f"{model} · {variant}", fontsize=10)
    fig.tight_layout()
    return fig


def diagnostics_bands(diag: pd.DataFrame, published: pd.DataFrame | None = None) -> Figure:
    """Left: NTPS of each variant and configuration across datasets (one point per dataset), with
    the paper's published per-model ranges (min-max over its 12 datasets) as shaded bands. Right:
    the label-permutation z-score of the same values (dashed: z = 2); a score that follows the
    task's labels sits well above the line.

    ``diag``: `ntps_nb.study.diagnostics_summary`; ``published``: `ntps_nb.load_published("fig2_accuracy")`.

    Parameters
    ----------
    diag : DataFrame
        Rows with ``variant``, ``config`` ("name=value"), ``ntps``, ``perm_z``, ``dataset``.
    published : DataFrame, optional
        Rows with ``model`` and ``ntps``; their per-model min-max are the bands.

    Returns
    -------
    Figure
        A new matplotlib figure, closed in pyplot (it is shown only where the caller displays it).
    """
    _require(diag, ["variant", "config", "ntps", "perm_z", "dataset"], "diagnostics_bands")
    fig, (left, right) = _figure(2, width=6.0, height=4.2)
    numeric = diag["config"].str.split("=").str[-1].astype(float)
    order = list(dict.fromkeys(diag.assign(_n=numeric).sort_values(["variant", "_n"])["config"]))
    if published is not None and not published.empty:
        bands = published.groupby("model")["ntps"].agg(["min", "max"])
        for i, (model, row) in enumerate(bands.iterrows()):
            left.axhspan(row["min"], row["max"], color="grey", alpha=0.12, lw=0)
            left.annotate(model.split("/")[-1], (len(order) - 0.5, row["max"]), fontsize=6, color="dimgrey",
                          ha="right", va="bottom")
    for ax, column, title in ((left, "ntps", "NTPS (grey: the paper's per-model ranges)"),
                              (right, "perm_z", "label-permutation z-score")):
        sns.stripplot(data=diag, x="config", y=column, hue="variant", order=order, ax=ax, palette=_PALETTE,
                      dodge=False, size=5, jitter=0.15)
        ax.set(title=title, xlabel="configuration (theory: k, reference: fraction)")
        ax.tick_params(axis="x", labelrotation=45)
    left.set(ylim=(-0.02, 1.02))
    right.axhline(2.0, ls="--", color="black", lw=1)
    right.set_yscale("symlog", linthresh=2.0)
    fig.tight_layout()
    return fig


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
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig

