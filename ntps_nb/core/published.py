"""The paper's published per-dataset values (Figures 1-3 of arXiv 2505.17169) and their correlations.

The CSVs in ``ntps_nb/data/reference/`` were converted from the figure data released with the
authors' code (MIT, Copyright (c) 2025 Yu-Ang Cheng, github.com/Yu-AngCheng/NTPS commit 0f877f7;
see the README and LICENSE there). They ship as package data and are read with
``importlib.resources``, so an installed wheel finds them as a source checkout does. Reading them
is the only file input of the pure-math core.

Sign conventions, as computed by `published_correlations`:

- Fig. 2 accuracy: rho(ntps, train_accuracy), expected positive (higher NTPS, better probe);
- Fig. 2 MSE: rho(ntps, train_mse), expected negative (higher NTPS, lower probe MSE);
- Fig. 3 LoRA: rho(ntps, -gain) with gain = lora_test_accuracy - linear_probe_test_accuracy,
  expected positive (lower NTPS, larger LoRA gain).

Each figure's ntps column comes from its own in-sample (layer, fraction) selection, so these
correlations are the optimistic in-sample statistics of the paper (see `stats.selection_null`).
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from ntps_nb.core.stats import Method, correlate

#: The packaged reference folder (an ``importlib.resources`` Traversable: ``/``, ``is_file``,
#: ``open``, ``read_text``), inside the installed package or the source checkout alike.
REFERENCE_DIR = resources.files("ntps_nb") / "data" / "reference"
#: Where the files live relative to the repository root (the ``source`` column).
REFERENCE_SOURCE = "ntps_nb/data/reference"

#: figure name -> (file, columns it must have)
FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fig1_projections": ("paper_fig1_projections.csv", ("space", "group", "word_index", "axis1", "axis2")),
    "fig2_accuracy": ("paper_fig2_accuracy.csv", ("model", "dataset", "ntps", "train_accuracy")),
    "fig2_mse": ("paper_fig2_mse.csv", ("model", "dataset", "ntps", "train_mse")),
    "fig3_lora": ("paper_fig3_lora.csv", ("model", "dataset", "ntps", "linear_probe_test_accuracy", "lora_test_accuracy")),
}

#: figure -> (target column correlated with ntps, expected sign of rho, what the target is, probe protocol)
CORRELATIONS: dict[str, tuple[str, int, str, str]] = {
    "fig2_accuracy": ("train_accuracy", +1, "in-sample accuracy of a logistic-regression probe", "paper_in_sample"),
    "fig2_mse": ("train_mse", -1, "in-sample MSE of a least-squares probe on one-hot targets", "paper_in_sample"),
    "fig3_lora": ("minus_lora_gain", +1, "-(LoRA test accuracy - linear-probe test accuracy)", "test"),
}


def _figure_key(figure: str) -> str:
    key = str(figure).removeprefix("paper_").removesuffix(".csv")
    if key not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; expected one of {sorted(FIGURES)}")
    return key


def load_published(figure: str) -> pd.DataFrame:
    """The published values behind one figure, as a tidy frame.

    Parameters
    ----------
    figure : "fig2_accuracy", "fig2_mse", "fig3_lora" or "fig1_projections" (the file stem
        ``paper_fig2_accuracy`` is accepted too).

    Returns
    -------
    The CSV's columns unchanged, plus for "fig3_lora" the derived ``lora_gain`` =
    lora_test_accuracy - linear_probe_test_accuracy and ``minus_lora_gain`` = -lora_gain, and a
    ``figure`` column.
    """
    key = _figure_key(figure)
    filename, columns = FIGURES[key]
    resource = REFERENCE_DIR / filename
    if not resource.is_file():
        raise FileNotFoundError(f"{filename} is missing from the package data {REFERENCE_SOURCE}/ "
                                f"(looked in {REFERENCE_DIR}); reinstall ntps_nb")
    with resource.open("r", encoding="utf-8") as handle:
        frame = pd.read_csv(handle)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{filename} lacks column(s) {missing}; found {list(frame.columns)}")
    if key == "fig3_lora":
        frame["lora_gain"] = frame["lora_test_accuracy"] - frame["linear_probe_test_accuracy"]
        frame["minus_lora_gain"] = -frame["lora_gain"]
    frame.insert(0, "figure", key)
    return frame


def published_correlations(method: Method = "spearman") -> pd.DataFrame:
    """Per-model correlation across datasets of the published ntps with each figure's target.

    Parameters
    ----------
    method : correlation passed to `ntps_nb.core.stats.correlate` (default "spearman").

    Returns
    -------
    DataFrame, one row per (figure, model): ``figure``, ``model``, ``target``, ``target_description``, ``rho``, ``n_datasets``,
    ``expected_sign``, ``direction`` (a sentence), ``protocol`` (of the target), ``method``,
    ``source``.
    """
    rows = []
    for key, (target, expected, what, protocol) in CORRELATIONS.items():
        frame = load_published(key)
        for model, group in frame.groupby("model", sort=True):
            rho = correlate(group["ntps"].to_numpy(), group[target].to_numpy(), method)
            rel = "higher" if rho > 0 else "lower"
            rows.append({
                "figure": key, "model": model, "target": target, "target_description": what, "rho": rho, "n_datasets": len(group),
                "expected_sign": expected,
                "direction": f"rho(ntps, {target}) {rho:+.2f}: higher NTPS goes with {rel} {target}",
                "protocol": protocol, "method": method, "source": f"{REFERENCE_SOURCE}/{FIGURES[key][0]}",
            })
    return pd.DataFrame(rows)
