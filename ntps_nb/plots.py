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
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(r"whitened coordinates $z = S_{xx}^{-1/2}\bar x$: perception (blue), next-token (red)", fontsize=10)
    fig.tight_layout()
    return fig
