"""The explorer of notebook 05: ipywidgets controls driving `ntps_nb.plots.explorer_view`.

The widgets only choose; the figure comes from the pure plot function over the study's tables,
so everything the explorer shows can be reproduced by one call of `explorer_view` with the same
selection.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ntps_nb import plots


def explorer_options(ntps_table: pd.DataFrame) -> dict[str, list]:
    """The choices the explorer offers: models, datasets, layers, theory k, reference fractions.

    Parameters
    ----------
    ntps_table : DataFrame
        The study's NTPS table (columns model, dataset, layer, variant, and k or fraction).

    Returns
    -------
    dict of str to list
        Sorted choices under keys ``model``, ``dataset``, ``layer``, ``k`` (of the non-reference
        rows), ``fraction`` (of the reference rows, rounded to 4 decimals) and ``variant``.
    """
    theory = ntps_table[ntps_table["variant"] != "reference"]
    reference = ntps_table[ntps_table["variant"] == "reference"]
    return {
        "model": sorted(ntps_table["model"].unique()),
        "dataset": sorted(ntps_table["dataset"].unique()),
        "layer": sorted(int(v) for v in ntps_table["layer"].unique()),
        "k": sorted(int(v) for v in theory["k"].dropna().unique()) if "k" in theory else [],
        "fraction": sorted(float(round(v, 4)) for v in reference["fraction"].dropna().unique()) if "fraction" in reference else [],
        "variant": sorted(ntps_table["variant"].unique()),
    }


def default_choice(ntps_table: pd.DataFrame, **initial: Any) -> dict[str, Any]:
    """The explorer's starting selection (model, dataset, variant, layer, k), overridable by ``initial``.

    Parameters
    ----------
    ntps_table : DataFrame
        The study's NTPS table, as for `explorer_options`.
    **initial
        Any of model, dataset, variant, layer, k to start from instead of the default.

    Returns
    -------
    dict
        Keys model, dataset, variant, layer, k; by default the first model and dataset, the
        ``theory`` variant, the middle layer and the smallest k.
    """
    options = explorer_options(ntps_table)
    layers, ks = options["layer"], options["k"] or [1]
    return {"model": initial.get("model", options["model"][0]), "dataset": initial.get("dataset", options["dataset"][0]),
            "variant": initial.get("variant", "theory"), "layer": initial.get("layer", layers[len(layers) // 2]),
            "k": initial.get("k", ks[0])}


def explorer(ntps_table: pd.DataFrame, probes: pd.DataFrame, *, target: str = "accuracy", **initial: Any):
    """An ipywidgets box: dropdowns (model, dataset, variant), sliders (layer, k or fraction) and
    the figure of `ntps_nb.plots.explorer_view` for the current choice, redrawn on every change.

    ``initial`` may set any of model, dataset, layer, k, variant. Returns the ``VBox``; its
    ``.controls`` dict holds the widgets (for scripted changes and tests).

    Parameters
    ----------
    ntps_table : DataFrame
        The study's NTPS table.
    probes : DataFrame
        The study's probe table (the measured gains plotted against NTPS).
    target : str
        Probe column shown against NTPS.
    **initial
        Starting selection, as for `default_choice`.

    Returns
    -------
    ipywidgets.VBox
        The controls above the figure, with a ``.controls`` dict of the widgets.
    """
    import ipywidgets as w
    from IPython.display import display

    options = explorer_options(ntps_table)
    start = default_choice(ntps_table, **initial)
    controls = {
        "model": w.Dropdown(options=options["model"], value=start["model"], description="model"),
        "dataset": w.Dropdown(options=options["dataset"], value=start["dataset"], description="dataset"),
        "variant": w.ToggleButtons(options=options["variant"], value=start["variant"], description="variant"),
        "layer": w.SelectionSlider(options=options["layer"], value=start["layer"], description="layer"),
        "k": w.SelectionSlider(options=options["k"] or [1], value=start["k"], description="k"),
    }
    output = w.Output()

    def scale_options(change=None) -> None:
        # the k slider means the fraction for the reference variant and k for the others
        reference = controls["variant"].value == "reference"
        choices = options["fraction"] if reference else options["k"]
        current = controls["k"].value
        nearest = choices[int(np.argmin([abs(np.log(c / current)) if current > 0 else c for c in choices]))]
        controls["k"].options = choices
        controls["k"].value = nearest
        controls["k"].description = "fraction" if reference else "k"

    def redraw(change=None) -> None:
        with output:
            output.clear_output(wait=True)
            try:
                fig = plots.explorer_view(ntps_table, probes, model=controls["model"].value,
                                          dataset=controls["dataset"].value, layer=controls["layer"].value,
                                          k=controls["k"].value, variant=controls["variant"].value, target=target)
                display(fig)
            except ValueError as error:  # a selection the tables do not cover: say so in place
                print(f"nothing to show for this selection: {error}")

    controls["variant"].observe(scale_options, names="value")
    for control in controls.values():
        control.observe(redraw, names="value")
    box = w.VBox([w.HBox([controls["model"], controls["dataset"]]), controls["variant"],
                  w.HBox([controls["layer"], controls["k"]]), output])
    box.controls = controls
    redraw()
    return box
