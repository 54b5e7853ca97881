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


#: The k the explorer opens at: k = 1 is the fragile setting (the top next-token directions can
#: nearly tie, and one rounding-sized change swaps them: notebook 03, section 8).
DEFAULT_K = 8


def explorer_options(ntps_table: pd.DataFrame, model: str | None = None) -> dict[str, list]:
    """The choices the explorer offers: models, datasets, layers, theory k, reference fractions.

    Parameters
    ----------
    ntps_table : DataFrame
        The study's NTPS table (columns model, dataset, layer, variant, and k or fraction).
    model : str, optional
        Offer only what this model has (its own datasets, layers and k): models differ in depth
        (Gemma-3-270M has 18 layers, SmolLM2-135M 30), and a layer a model lacks would draw
        empty panels. ``model`` is still listed with all models.

    Returns
    -------
    dict of str to list
        Sorted choices under keys ``model``, ``dataset``, ``layer``, ``k`` (of the non-reference
        rows), ``fraction`` (of the reference rows, rounded to 4 decimals) and ``variant``.

    Raises
    ------
    ValueError
        When ``model`` has no rows in the table.
    """
    models = sorted(ntps_table["model"].unique())
    if model is not None:
        if model not in models:
            raise ValueError(f"model {model!r} has no NTPS rows; the table has {models}")
        ntps_table = ntps_table[ntps_table["model"] == model]
    theory = ntps_table[ntps_table["variant"] != "reference"]
    reference = ntps_table[ntps_table["variant"] == "reference"]
    return {
        "model": models,
        "dataset": sorted(ntps_table["dataset"].unique()),
        "layer": sorted(int(v) for v in ntps_table["layer"].unique()),
        "k": sorted(int(v) for v in theory["k"].dropna().unique()) if "k" in theory else [],
        "fraction": sorted(float(round(v, 4)) for v in reference["fraction"].dropna().unique()) if "fraction" in reference else [],
        "variant": sorted(ntps_table["variant"].unique()),
    }


#: What the explorer's selection is made of (`default_choice`'s keys).
CHOICES = ("model", "dataset", "variant", "layer", "k")


def scale_choices(options: dict[str, list], variant: str) -> list:
    """What the explorer's second slider offers: the reference variant's fractions, or the k of the others.

    Parameters
    ----------
    options : dict
        `explorer_options` of one model.
    variant : str
        The chosen variant.

    Returns
    -------
    list
        The fractions for "reference", else the ks (``[1]`` where the table has none).
    """
    return (options["fraction"] if variant == "reference" else options["k"]) or [1]


def _check_choice(name: str, value: Any, choices: list, model: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not among {model}'s: {choices}")


def default_choice(ntps_table: pd.DataFrame, **initial: Any) -> dict[str, Any]:
    """The explorer's starting selection (model, dataset, variant, layer, k), overridable by ``initial``.

    Parameters
    ----------
    ntps_table : DataFrame
        The study's NTPS table, as for `explorer_options`.
    **initial
        Any of `CHOICES` to start from instead of the default; a negative layer counts from the
        model's last, and for the reference variant ``k`` is the fraction.

    Returns
    -------
    dict
        Keys model, dataset, variant, layer, k; by default the first model and its first
        dataset, the ``theory`` variant, that model's middle layer and the k of its grid nearest
        to ``DEFAULT_K`` (in log scale), or for the reference variant its middle fraction.

    Raises
    ------
    ValueError
        On an empty table, a key not in `CHOICES`, or a value the chosen model's rows do not have.
    """
    unknown = sorted(set(initial) - set(CHOICES))
    if unknown:
        raise ValueError(f"unknown choice(s) {unknown}; the explorer starts from any of {list(CHOICES)}")
    if ntps_table.empty:
        raise ValueError("the NTPS table is empty: nothing to explore")
    model = initial.get("model", sorted(ntps_table["model"].unique())[0])
    options = explorer_options(ntps_table, model)
    layers = options["layer"]
    choice = {"model": model, "dataset": initial.get("dataset", options["dataset"][0]),
              "variant": initial.get("variant", "theory"), "layer": initial.get("layer", layers[len(layers) // 2])}
    if isinstance(choice["layer"], (int, np.integer)) and -len(layers) <= choice["layer"] < 0:
        choice["layer"] = layers[choice["layer"]]
    for name in ("dataset", "variant", "layer"):
        _check_choice(name, choice[name], options[name], model)
    scale = scale_choices(options, choice["variant"])
    reference = choice["variant"] == "reference"
    choice["k"] = initial.get("k", scale[len(scale) // 2] if reference else _nearest(scale, DEFAULT_K))
    _check_choice("fraction" if reference else "k", choice["k"], scale, model)
    return choice


def _nearest(choices: list, value: float) -> Any:
    """The choice nearest to ``value`` in log scale (k and fractions are positive)."""
    return choices[int(np.argmin([abs(np.log(c / value)) if value > 0 else c for c in choices]))]


def same_depth(layers: list[int], layer: int, previous: list[int]) -> int:
    """The layer of ``layers`` at the same relative depth as ``layer`` among ``previous``.

    Parameters
    ----------
    layers : list of int
        The new model's layers, sorted.
    layer : int
        The layer chosen for the previous model.
    previous : list of int
        The previous model's layers, sorted.

    Returns
    -------
    int
        Embeddings stay embeddings and the last layer stays the last (SmolLM2's 15 of 0-30 is
        Gemma-3's 9 of 0-18).
    """
    depth = previous.index(layer) / max(len(previous) - 1, 1) if layer in previous else 0.5
    return layers[int(round(depth * (len(layers) - 1)))]


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

    start = default_choice(ntps_table, **initial)
    options = explorer_options(ntps_table, start["model"])
    if not probes.empty and target not in probes.columns:
        raise ValueError(f"the probes table has no column {target!r} to show against NTPS")
    reference = start["variant"] == "reference"
    controls = {
        "model": w.Dropdown(options=options["model"], value=start["model"], description="model"),
        "dataset": w.Dropdown(options=options["dataset"], value=start["dataset"], description="dataset"),
        "variant": w.ToggleButtons(options=options["variant"], value=start["variant"], description="variant"),
        "layer": w.SelectionSlider(options=options["layer"], value=start["layer"], description="layer"),
        "k": w.SelectionSlider(options=scale_choices(options, start["variant"]), value=start["k"],
                               description="fraction" if reference else "k"),
    }
    output = w.Output()
    state = {"options": options, "updating": False}

    def set_choices(control: Any, choices: list, value: Any) -> None:
        control.options = choices
        control.value = value

    def model_options(change=None) -> None:
        # each model offers its own datasets, layers and k, at the same relative depth
        previous, new = state["options"], explorer_options(ntps_table, controls["model"].value)
        state["options"], state["updating"] = new, True
        try:
            dataset = controls["dataset"].value
            set_choices(controls["dataset"], new["dataset"], dataset if dataset in new["dataset"] else new["dataset"][0])
            set_choices(controls["layer"], new["layer"], same_depth(new["layer"], controls["layer"].value, previous["layer"]))
            scale_options()
        finally:
            state["updating"] = False
        redraw()

    def scale_options(change=None) -> None:
        # the k slider means the fraction for the reference variant and k for the others
        reference = controls["variant"].value == "reference"
        choices = scale_choices(state["options"], controls["variant"].value)
        was_updating, state["updating"] = state["updating"], True
        try:
            set_choices(controls["k"], choices, _nearest(choices, controls["k"].value))
            controls["k"].description = "fraction" if reference else "k"
        finally:
            state["updating"] = was_updating

    def redraw(change=None) -> None:
        if state["updating"]:
            return
        with output:
            output.clear_output(wait=True)
            try:
                fig = plots.explorer_view(ntps_table, probes, model=controls["model"].value,
                                          dataset=controls["dataset"].value, layer=controls["layer"].value,
                                          k=controls["k"].value, variant=controls["variant"].value, target=target)
                display(fig)
            except ValueError as error:  # a selection the tables do not cover: say so in place
                print(f"nothing to show for this selection: {error}")

    controls["model"].observe(model_options, names="value")
    controls["variant"].observe(scale_options, names="value")
    for name, control in controls.items():
        if name != "model":  # model_options redraws once, after the other controls follow the model
            control.observe(redraw, names="value")
    box = w.VBox([w.HBox([controls["model"], controls["dataset"]]), controls["variant"],
                  w.HBox([controls["layer"], controls["k"]]), output])
    box.controls = controls
    redraw()
    return box
