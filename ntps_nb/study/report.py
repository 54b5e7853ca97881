"""The analysis of a study's combined tables: correlation summaries with honest and in-sample
selection, baselines, structure controls, views of intervals, diagnostics and LoRA, and their
Markdown. Pure pandas on top of `ntps_nb.core.stats`: the statistics themselves live there."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ntps_nb.core.peers import h_score_saturated
from ntps_nb.core.rotation import interval_description, widened_rows
from ntps_nb.core.score import integer_ranges
from ntps_nb.study.runner import load_results

#: (target column of `probe_targets`, the direction a good score correlates with it). ``accuracy``,
#: ``kappa_chance`` ((accuracy - 1/C) / (1 - 1/C), chance from the number of classes only) and
#: ``mse`` come from the probes of the chosen protocol; ``balanced_accuracy`` and ``cohen_kappa``
#: (chance from the class marginals) from the cross-validated probe (protocol "heldout_cv") where
#: the study computed it.
TARGETS = {"accuracy": "positive", "kappa_chance": "positive", "balanced_accuracy": "positive",
           "cohen_kappa": "positive", "mse": "negative"}
#: Names accepted for a target and what they mean now: "kappa" was the 1/C-corrected accuracy.
TARGET_ALIASES = {"kappa": "kappa_chance"}
#: The targets that come from the cross-validated probe (protocol "heldout_cv").
CV_TARGETS = ("balanced_accuracy", "cohen_kappa")
#: Permutations of the baselines' p-values (no selection: cheap, so more than ``n_perm``).
BASELINE_N_PERM = 10_000
#: The result columns of every correlation row (`ntps_nb.core.selection.RhoResult`).
RESULT_COLUMNS = ("estimate", "lower", "upper", "se", "p_value", "p_side", "p_redone", "p_mc_se", "n_perm", "exact",
                  "interval", "n_boot_valid", "held_out")


def resolve_targets(targets: Sequence[str]) -> list[str]:
    """``targets`` with the aliases of `TARGET_ALIASES` replaced ("kappa" -> "kappa_chance");
    raises for a name that is neither a target, an alias nor "lora_gain".

    Parameters
    ----------
    targets : sequence of str
        Target names, aliases allowed.

    Returns
    -------
    list of str
        The targets under their current names, in the given order.
    """
    out = []
    for name in targets:
        name = TARGET_ALIASES.get(name, name)
        if name not in TARGETS and name != "lora_gain":
            raise ValueError(f"target must be one of {[*TARGETS, *TARGET_ALIASES, 'lora_gain']}, got {name!r}")
        if name not in out:
            out.append(name)
    return out


def _with_kappa_chance(probes: pd.DataFrame) -> pd.DataFrame:
    """Tables written before the rename call the 1/C-corrected accuracy "kappa"."""
    if "kappa" in probes.columns:
        if "kappa_chance" in probes.columns:
            return probes.assign(kappa_chance=probes["kappa_chance"].fillna(probes["kappa"])).drop(columns="kappa")
        return probes.rename(columns={"kappa": "kappa_chance"})
    return probes


def _at_layer(table: pd.DataFrame, layer: str | int) -> pd.DataFrame:
    if layer == "last":
        return table[table["layer"] == table.groupby("model")["layer"].transform("max")]
    return table[table["layer"] == int(layer)]


def probe_targets(probes: pd.DataFrame, *, protocol: str = "heldout", layer: str | int = "last") -> pd.DataFrame:
    """One target row per (model, dataset): the probe at the model's last layer (or a given layer).

    Columns model, dataset, n_classes, majority_rate, accuracy, kappa_chance, mse (of the
    ``protocol`` probes; a table's old "kappa" column is read as kappa_chance), target_layer, and
    balanced_accuracy and cohen_kappa of the cross-validated probe (protocol "heldout_cv") at the
    same layer where the table holds it (NaN for a (model, dataset) without; absent when no row
    has it). With ``protocol="heldout_cv"`` every target is the cross-validated probe's (mse NaN).

    Parameters
    ----------
    probes : DataFrame
        A study's probes table, one row per (model, dataset, layer, protocol).
    protocol : str
        The probe protocol the targets come from ("heldout" or "heldout_cv").
    layer : int or "last"
        The layer of the probes ("last": each model's deepest).

    Returns
    -------
    DataFrame
        One row per (model, dataset) with the columns above.
    """
    probes = _with_kappa_chance(probes)
    table = probes[probes["protocol"] == protocol]
    if table.empty:
        raise ValueError(f"no probe rows of protocol {protocol!r}; protocols: {sorted(probes['protocol'].unique())}")
    table = _at_layer(table, layer)
    if "mse" not in table.columns:
        table = table.assign(mse=np.nan)
    keep = ["model", "dataset", "n_classes", "majority_rate", "accuracy", "kappa_chance", "mse", "layer"]
    if protocol == "heldout_cv":
        keep[-1:-1] = list(CV_TARGETS)
    out = table[keep]
    cv = probes[probes["protocol"] == "heldout_cv"]
    if protocol != "heldout_cv" and not cv.empty and set(CV_TARGETS) <= set(cv.columns):
        out = out.merge(cv[["model", "dataset", "layer", *CV_TARGETS]], on=["model", "dataset", "layer"], how="left")
    return out.rename(columns={"layer": "target_layer"}).reset_index(drop=True)


def _config_text(values) -> str:
    """"layer/k" with integers printed as integers (CSV round trips turn k into floats)."""
    out = []
    for value in values:
        value = float(value)
        out.append(str(int(value)) if value.is_integer() else f"{value:g}")
    return "/".join(out)


def _result(result) -> dict[str, Any]:
    """The `RESULT_COLUMNS` of a `ntps_nb.core.selection.RhoResult` (or its row)."""
    row = result if isinstance(result, dict) else result.row()
    return {name: row[name] for name in RESULT_COLUMNS}


def _fold_configs(chosen: pd.DataFrame, cfg_cols: list[str]) -> tuple[str, str]:
    """The most often chosen configuration (folds weighted 1 / number of tied configurations;
    ties: the first in sorted order) and every fold's choice, "dataset: 29/2, 30/2 | ..."."""
    text = chosen.assign(_config=chosen[cfg_cols].apply(_config_text, axis=1))
    weight = text.groupby("_config", sort=False)["weight"].sum()
    order = text.drop_duplicates("_config").sort_values(cfg_cols)["_config"]
    weight = weight.reindex(order)
    mode = str(weight.index[int(np.argmax(weight.to_numpy() >= weight.max() - 1e-12))])
    folds = " | ".join(f"{dataset}: {', '.join(group['_config'])}" for dataset, group in text.groupby("dataset"))
    return mode, folds


def _selection_rows(frame: pd.DataFrame, base: dict, *, target: str, name: str, cfg_cols: list[str], direction: str,
                    method: str, n_boot: int, n_perm: int, seed: int) -> list[dict]:
    """The rows of one score against one target (``frame``: columns dataset, ``cfg_cols``, ntps and
    ``target``), every one with `RESULT_COLUMNS`:

    - ``leave_one_dataset_out`` (needs 4 datasets): `ntps_nb.core.selection.lodo_rho`, each
      held-out dataset scored by its rank among all datasets under the configuration(s) its fold
      chose (ties between configurations averaged), a one-sided permutation p-value and a
      bootstrap interval that both redo the selection; ``config`` the configuration chosen most
      often, ``fold_configs`` every fold's, ``n_distinct_configs`` how many differ;
    - ``leave_one_dataset_out_pooled_raw``: the earlier statistic, for comparison only: raw NTPS
      values of the folds' different configurations ranked together (first tied configuration),
      with the same permutation and bootstrap machinery;
    - ``in_sample`` (the paper's): `ntps_nb.core.selection.in_sample_rho`, the best
      configuration over all datasets with the selection-aware p-value and no interval.
    """
    from ntps_nb.core.selection import in_sample_rho, leave_one_dataset_out, lodo_rho
    from ntps_nb.core.stats import DegenerateSampleWarning, select_in_sample

    rows = []
    n = frame["dataset"].nunique()
    common = {**base, "target": target, "score": name, "n_configs": len(frame.drop_duplicates(cfg_cols))}
    options = dict(score="ntps", target=target, configs=cfg_cols, method=method, direction=direction)
    with warnings.catch_warnings():
        # constant configurations or resamples: the rows carry NaN or fewer configurations instead
        warnings.simplefilter("ignore", DegenerateSampleWarning)
        if n >= 4:
            for selection, held_out, ties in (("leave_one_dataset_out", "rank", "average"),
                                              ("leave_one_dataset_out_pooled_raw", "pooled_raw", "first")):
                chosen = leave_one_dataset_out(frame, held_out=held_out, ties=ties, **options)
                result = lodo_rho(frame, held_out=held_out, ties=ties, n_perm=n_perm, n_boot=n_boot, seed=seed,
                                  **options)
                config, folds = _fold_configs(chosen.chosen, cfg_cols)
                rows.append({**common, "selection": selection, **_result(result), "config": config,
                             "fold_configs": folds, "n_distinct_configs": chosen.n_distinct_configs})
        result = in_sample_rho(frame, n_perm=n_perm, seed=seed, **options)
        best = select_in_sample(frame, **options)
    rows.append({**common, "selection": "in_sample", **_result(result), "config": _config_text(best["config"].values()),
                 "fold_configs": "", "n_distinct_configs": 1})
    return rows


def _baseline_rows(baselines: dict[str, Any], y: np.ndarray, base: dict, *, target: str, method: str, n_boot: int,
                   seed: int, notes: dict[str, str] | None = None) -> list[dict]:
    """rho of each dataset-level baseline (no selection) with the target: bootstrap interval and a
    two-sided permutation p (`_rho_ci_p`); ``notes`` says what a baseline's rho does not remove."""
    rows = []
    for name, values in baselines.items():
        rows.append({**base, "target": target, "score": name, "selection": "none",
                     **_rho_ci_p(np.asarray(values, dtype=float), y, method, n_boot, BASELINE_N_PERM, seed),
                     "config": "last layer" if name.startswith("peer:") else "dataset only",
                     **({"note": notes[name]} if notes and name in notes else {})})
    return rows


def _score_frame(ntps_table: pd.DataFrame, targets: pd.DataFrame, *, model: str, variant: str,
                 target: str) -> pd.DataFrame:
    """One model's NTPS of ``variant`` per (dataset, configuration) beside the dataset's ``target``:
    columns dataset, layer, k (theory) or fraction (reference), ntps, ``target``; NaN NTPS dropped."""
    cfg_cols = ["layer", "k"] if variant == "theory" else ["layer", "fraction"]
    scores = ntps_table[(ntps_table["model"] == model) & (ntps_table["variant"] == variant)]
    frame = scores[["dataset", *cfg_cols, "ntps"]].merge(targets[["dataset", target]], on="dataset")
    return frame.dropna(subset=["ntps"])


def correlation_summary(
    tables: dict[str, pd.DataFrame], *, method: str = "spearman", protocol: str = "heldout",
    n_boot: int = 1000, n_perm: int = 2000, seed: int = 0, targets: Sequence[str] = (*TARGETS, "lora_gain"),
    variants: Sequence[str] = ("theory", "reference"),
) -> pd.DataFrame:
    """Per model and target: how NTPS ranks the datasets, under honest and in-sample selection,
    beside the dataset-only baselines and the random-initialised control.

    One row per (model, target, score, selection), each with ``estimate`` (rho), ``lower``,
    ``upper`` (95% interval, NaN where no interval respects the selection), ``se``, ``p_value``,
    ``p_side`` (one-sided in the expected direction, or two-sided), ``p_redone`` (what every
    permutation redid), ``p_mc_se`` (the p-value's Monte Carlo standard error, 0 when exact),
    ``n_perm``, ``exact`` and ``interval`` (how the interval was made):

    - score ``ntps_theory`` / ``ntps_reference``, selection ``leave_one_dataset_out``: the
      configuration (layer, k or fraction) chosen on the other datasets and the held-out
      dataset's rank under it (`_selection_rows`); ``config`` the configuration chosen most
      often, ``fold_configs`` each fold's, ``n_distinct_configs``;
    - same scores, selection ``leave_one_dataset_out_pooled_raw``: the earlier statistic (raw
      held-out NTPS of different configurations pooled), for comparison only;
    - same scores, selection ``in_sample`` (the paper's): the best configuration over all
      datasets with its selection-aware p-value and no interval;
    - scores ``-C`` and ``majority_rate`` (no selection): dataset-only baselines (SPEC section 10),
      two-sided;
    - peers at the last layer (no selection), when the peers table is present; ``peer:h_score``'s row says so
      (``note``) where the H-score is C - 1 on every dataset (no more texts than dimensions: it counts the
      classes, `ntps_nb.core.peers.h_score`).

    Target ``lora_gain`` (when the tables hold a ``lora`` table): see `_gain_rows`.

    Targets come from the ``protocol`` probes at each model's last layer (`probe_targets`; "kappa"
    is read as "kappa_chance"); a target the tables do not have (balanced_accuracy and
    cohen_kappa of a study without the cross-validated probe) is left out. ``pretrained`` tells
    pretrained models from their ``:random`` controls; `pretraining_contrast` pairs them.

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.
    method : {"spearman", "kendall", "pearson"}
        The correlation across datasets.
    n_boot : int
        Bootstrap resamples of the datasets per interval.
    n_perm : int
        Permutations per p-value.
    seed : int
        Seed of the permutation and resampling generators.
    protocol : str
        The probe protocol of the targets (`probe_targets`).
    targets : sequence of str
        The targets to correlate with (`TARGETS` and "lora_gain").
    variants : sequence of str
        The NTPS variants scored ("theory", "reference").

    Returns
    -------
    DataFrame
        One row per (model, target, score, selection), with the columns above.
    """
    targets = resolve_targets(targets)
    target_rows = probe_targets(tables["probes"], protocol=protocol)
    ntps_table = tables["ntps"]
    rows = []
    for model, targets_m in target_rows.groupby("model", sort=False):
        pretrained = bool(ntps_table.loc[ntps_table["model"] == model, "pretrained"].iloc[0])
        n = targets_m["dataset"].nunique()
        base = {"model": model, "pretrained": pretrained, "n_datasets": n, "method": method,
                "target_protocol": protocol, "target_layer": int(targets_m["target_layer"].iloc[0])}
        if n < 3:
            continue
        for target in (t for t in targets if t in TARGETS):
            if target not in targets_m.columns or targets_m[target].notna().sum() < 3:
                continue  # e.g. the cross-validated probe's targets in a study computed without it
            targets_t = targets_m.dropna(subset=[target])
            base_t = {**base, "n_datasets": int(targets_t["dataset"].nunique())}
            for variant in variants:
                cfg_cols = ["layer", "k"] if variant == "theory" else ["layer", "fraction"]
                frame = _score_frame(ntps_table, targets_t, model=model, variant=variant, target=target)
                if frame["dataset"].nunique() < 3:  # scores of too few datasets (e.g. units still running)
                    continue
                rows += _selection_rows(frame, base_t, target=target, name=f"ntps_{variant}", cfg_cols=cfg_cols,
                                        direction=TARGETS[target], method=method, n_boot=n_boot, n_perm=n_perm,
                                        seed=seed)
            baselines = {"-C": -targets_t["n_classes"].astype(float), "majority_rate": targets_t["majority_rate"]}
            notes = {}
            if "peers" in tables:
                peers = tables["peers"]
                peers = peers[peers["model"] == model]
                peers = peers[peers["layer"] == peers["layer"].max()].set_index("dataset")
                for peer in ("logme", "h_score", "h_score_lw", "knn_accuracy", "rankme"):
                    if peer in peers.columns:
                        baselines[f"peer:{peer}"] = targets_t["dataset"].map(peers[peer])
                if "peer:h_score" in baselines and h_score_saturated(baselines["peer:h_score"], targets_t["n_classes"]):
                    notes["peer:h_score"] = SATURATED_H_SCORE_NOTE
            rows += _baseline_rows(baselines, targets_t[target].to_numpy(dtype=float), base_t, target=target,
                                   method=method, n_boot=n_boot, seed=seed, notes=notes)
        if "lora_gain" in targets and "lora" in tables:
            rows += _gain_rows(tables["lora"], targets_m, base, method=method, n_boot=n_boot, n_perm=n_perm, seed=seed,
                               ntps_table=ntps_table, predictions=tables.get("lora_predictions"))
    if not rows:
        lora = "" if "lora" in tables else "; lora_gain needs the LoRA stage (lora = true), which this study has not"
        raise ValueError(f"no correlation to summarise for the targets {list(targets)}{lora}")
    return pd.DataFrame(rows)


#: What the H-score baseline is where it equals C - 1 on every dataset (its row's ``note``).
SATURATED_H_SCORE_NOTE = ("h_score = C - 1 on every dataset: with no more texts than dimensions the class indicators "
                          "are fitted exactly, so this row ranks the datasets by their class count, not by the "
                          "features (ntps_nb.core.peers.h_score; peer:h_score_lw does not saturate so)")
#: What the naive probe-accuracy baseline of the LoRA gain does not remove (its row's ``note``).
NAIVE_PROBE_NOTE = ("probe accuracy and gain (LoRA - probe accuracy) measured on the same test texts: the gain "
                    "shares the probe's noise, so regression to the mean is NOT removed and rho is pushed negative "
                    "by construction; compare the probe_accuracy_crossfit row where the LoRA stage kept per-text "
                    "predictions")
#: What the cross-fitted probe-accuracy baseline of the LoRA gain does (its row's ``note``).
CROSSFIT_PROBE_NOTE = ("probe accuracy on one half of each test split (stratified by label), gain (LoRA - probe "
                       "accuracy) on the other half, and the halves swapped; rho averaged over the two folds: "
                       "the baseline shares no test text with the gain, so regression to the mean cannot make the "
                       "correlation (ntps_nb.core.gain.crossfit_gain_correlation)")


def _before_lora(rows_m: pd.DataFrame, ntps_table: pd.DataFrame | None,
                 model: str) -> tuple[pd.DataFrame, str | None, list[str]]:
    """NTPS before LoRA per (dataset, layer, k): the LoRA table's ``ntps_before`` (the plug-in's,
    computed by the LoRA stage), or, where the study's ntps table holds another estimator's theory
    NTPS at the LoRA layer (the same base model and texts), that estimator's values; a note saying
    so (None for the LoRA table's own) and the estimators used (empty for the LoRA table's own)."""
    frame = rows_m[["dataset", "layer", "k", "ntps_before"]].rename(columns={"ntps_before": "ntps"})
    if ntps_table is None or "estimator" not in ntps_table.columns:
        return frame, None, []
    theory = ntps_table[(ntps_table["model"] == model) & (ntps_table["variant"] == "theory")
                        & (ntps_table["estimator"] != "plugin") & ntps_table["layer"].isin(frame["layer"].unique())]
    if theory.empty:
        return frame, None, []
    estimators = sorted(theory["estimator"].unique())
    keys = ["dataset", "layer", "k"]
    study = frame[keys].merge(theory[[*keys, "ntps"]], on=keys)
    return study, (f"NTPS before LoRA by the study's estimator ({', '.join(estimators)}) from the ntps table at the "
                   "LoRA layer; the LoRA table's ntps_before is the plug-in's"), estimators


def _gain_rows(lora: pd.DataFrame, targets_m: pd.DataFrame, base: dict, *, method: str, n_boot: int, n_perm: int,
               seed: int, ntps_table: pd.DataFrame | None = None,
               predictions: pd.DataFrame | None = None) -> list[dict]:
    """`correlation_summary`'s ``lora_gain`` rows of one model (none with fewer than 3 datasets).

    NTPS *before* LoRA (theory, at the layer LoRA was scored at; by the study's estimator where the
    ``ntps_table`` holds it there, else the LoRA table's plug-in ``ntps_before``: `_before_lora`,
    and the rows' ``note`` says which) against the gain of LoRA over
    the held-out probe, k selected with direction "negative" (the paper: lower NTPS, larger
    gain): `_selection_rows` (leave-one-dataset-out on held-out ranks, its pooled comparison and
    the in-sample maximum). Baselines, two-sided: -C, the majority rate, and the probe accuracy
    itself as ``probe_accuracy_naive_same_test_set``: the probe accuracy and the gain from the
    same test texts, whose ``note`` says that regression to the mean is not removed; and, where
    the ``predictions`` table (the LoRA stage's per-text predictions, version 2 on) covers at least
    3 of the model's datasets, ``probe_accuracy_crossfit``: the baseline and the gain from disjoint
    halves of each test split (`_crossfit_row`).
    """
    rows_m = lora[(lora["model"] == base["model"]) & (lora["variant"] == "theory")].dropna(subset=["ntps_before"])
    if rows_m["dataset"].nunique() < 3:
        return []
    gains = rows_m.groupby("dataset")[["lora_gain", "lora_probe_accuracy"]].first()
    frame, note, _ = _before_lora(rows_m, ntps_table, base["model"])
    frame = frame.dropna(subset=["ntps"]).merge(gains["lora_gain"], left_on="dataset", right_index=True)
    base = {**base, "n_datasets": int(gains.shape[0]), "target_layer": int(rows_m["layer"].max())}
    out = _selection_rows(frame, base, target="lora_gain", name="ntps_theory_before", cfg_cols=["layer", "k"],
                          direction="negative", method=method, n_boot=n_boot, n_perm=n_perm, seed=seed)
    if note is not None:
        out = [{**row, "note": note} for row in out]
    meta = targets_m.set_index("dataset").reindex(gains.index)
    baselines = {"-C": -meta["n_classes"].astype(float), "majority_rate": meta["majority_rate"],
                 "probe_accuracy_naive_same_test_set": gains["lora_probe_accuracy"]}
    out += _baseline_rows(baselines, gains["lora_gain"].to_numpy(dtype=float), base, target="lora_gain",
                          method=method, n_boot=n_boot, seed=seed,
                          notes={"probe_accuracy_naive_same_test_set": NAIVE_PROBE_NOTE})
    if predictions is not None:
        out += _crossfit_row(predictions[predictions["model"] == base["model"]], base, method=method, n_boot=n_boot,
                             n_perm=n_perm, seed=seed)
    return out


def _crossfit_row(predictions: pd.DataFrame, base: dict, *, method: str, n_boot: int, n_perm: int,
                  seed: int) -> list[dict]:
    """The ``probe_accuracy_crossfit`` row of one model's LoRA gain (none with predictions of fewer
    than 3 datasets): per dataset, `ntps_nb.core.gain.crossfit_gain` of its per-text predictions
    (halves drawn with ``seed``), and across datasets `ntps_nb.core.gain.crossfit_gain_correlation`
    (two-sided permutation p, percentile bootstrap over datasets). ``n_datasets`` counts the
    datasets with predictions, ``datasets`` names them; ``naive_same_datasets`` is the naive rho
    (probe accuracy and gain on the whole test split) of those same datasets, for a like-for-like
    comparison, and ``rho_fold_0`` / ``rho_fold_1`` the two folds' rho."""
    from ntps_nb.core.gain import crossfit_gain, crossfit_gain_correlation, whole_split_gain
    from ntps_nb.core.stats import correlate

    groups = list(predictions.sort_values("text_index").groupby("dataset", sort=True))
    if len(groups) < 3:
        return []
    frames = [crossfit_gain(group["label"], group["probe_prediction"], group["lora_prediction"], seed=seed)
              .assign(dataset=dataset) for dataset, group in groups]
    result = crossfit_gain_correlation(pd.concat(frames, ignore_index=True), method=method, n_perm=n_perm,
                                       n_boot=n_boot, seed=seed).iloc[0]
    probe, gain = zip(*(whole_split_gain(g["label"], g["probe_prediction"], g["lora_prediction"]) for _, g in groups))
    return [{**base, "n_datasets": len(frames), "target": "lora_gain", "score": "probe_accuracy_crossfit",
             "selection": "none", **_result(result.to_dict()), "config": "dataset only",
             "datasets": ", ".join(name for name, _ in groups),
             "naive_same_datasets": correlate(list(probe), list(gain), method),
             "rho_fold_0": float(result["rho_fold_0"]), "rho_fold_1": float(result["rho_fold_1"]),
             "note": CROSSFIT_PROBE_NOTE}]


def pretraining_contrast(tables: dict[str, pd.DataFrame], *, protocol: str = "heldout") -> pd.DataFrame:
    """Per dataset and (pretrained model, its ``:random`` control): last-layer probe targets and the
    median NTPS (theory, over layers and k) of both, and their differences. Does pretraining move
    NTPS and the probes the same way across datasets?

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.
    protocol : str
        The probe protocol of the targets (`probe_targets`).

    Returns
    -------
    DataFrame
        One row per (dataset, pretrained model): targets and median NTPS of the model and of its
        random control, and their differences.
    """
    targets = probe_targets(tables["probes"], protocol=protocol)
    ntps_table = tables["ntps"]
    theory = ntps_table[ntps_table["variant"] == "theory"].groupby(["model", "dataset"])["ntps"].median()
    targets = targets.assign(ntps_theory_median=[theory.get((m, d), np.nan) for m, d in zip(targets.model, targets.dataset)])
    rows = []
    for model in targets["model"].unique():
        control = f"{model}:random"
        if model.endswith(":random") or control not in set(targets["model"]):
            continue
        a = targets[targets["model"] == model].set_index("dataset")
        b = targets[targets["model"] == control].set_index("dataset")
        for dataset in a.index.intersection(b.index):
            row = {"model": model, "control": control, "dataset": dataset, "n_classes": int(a.loc[dataset, "n_classes"])}
            for col in ("accuracy", "kappa_chance", "mse", "ntps_theory_median"):
                row[f"{col}_pretrained"] = a.loc[dataset, col]
                row[f"{col}_random"] = b.loc[dataset, col]
                row[f"{col}_diff"] = a.loc[dataset, col] - b.loc[dataset, col]
            rows.append(row)
    return pd.DataFrame(rows)


def fixed_ntps(tables: dict[str, pd.DataFrame], *, k: int = 8, variant: str = "theory") -> pd.DataFrame:
    """Theory NTPS of every (model, dataset) at one pre-specified configuration: each model's last
    layer and ``k`` (no selection, so no selection bias), beside the held-out probe targets of
    that layer. Columns: model, pretrained, dataset, n_classes, majority_rate, accuracy, kappa_chance,
    mse (and balanced_accuracy, cohen_kappa where the study has the cross-validated probe), layer, k, ntps.

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.
    k : int
        The number of directions of the pre-specified configuration.
    variant : str
        The NTPS variant ("theory").

    Returns
    -------
    DataFrame
        One row per (model, dataset), with the columns above.
    """
    scores = tables["ntps"]
    of_variant = scores[scores["variant"] == variant]
    scores = of_variant[of_variant["k"] == k]
    if scores.empty:
        ks = integer_ranges(of_variant["k"].dropna())
        raise ValueError(f"no {variant} NTPS rows at k = {k}" + (f"; the study has k = {ks}" if ks else ""))
    last = scores.groupby("model")["layer"].transform("max")
    scores = scores[scores["layer"] == last][["model", "pretrained", "dataset", "layer", "k", "ntps"]]
    targets = probe_targets(tables["probes"]).drop(columns=["target_layer"])
    return scores.merge(targets, on=["model", "dataset"]).reset_index(drop=True)


def structure_controls(
    tables: dict[str, pd.DataFrame], *, k: int = 8, targets: Sequence[str] = ("accuracy", "kappa_chance"),
    method: str = "spearman", n_boot: int = 1000, n_perm: int = 2000, seed: int = 0,
) -> pd.DataFrame:
    """What NTPS says beyond the datasets' own structure (SPEC section 10), at one pre-specified
    configuration (`fixed_ntps`: last layer, ``k``). One row per (analysis, model, target):

    - ``pretrained_minus_random``: per pretrained model with a ``:random`` control, rho across
      datasets of NTPS(pretrained) - NTPS(random) with target(pretrained) - target(random): what
      pretraining adds to the score against what it adds to the probe. Interval by bootstrapping
      datasets, two-sided permutation p (`ntps_nb.core.selection.fixed_rho`);
    - ``partial_given_C``: per model, the rank partial correlation of NTPS with the target
      controlling for the number of classes (`ntps_nb.core.stats.partial_correlation`), with a
      bootstrap CI (no p-value: a permutation null for a partial correlation needs a model of
      how C drives both);
    - ``across_models``: the other axis, same dataset and different models. For every dataset and
      every pair of models, is the model with the higher NTPS also the one with the better probe?
      ``estimate`` is then the share of concordant pairs minus the share of discordant ones (Kendall's
      tau over pairs, ties count as neither; signed so that positive means "higher NTPS, better
      probe" for MSE too), ``n_pairs`` how many pairs, and ``p_value`` a two-sided permutation p
      that shuffles the target across models within each dataset.
      The model is ``"all"``; rows for pretrained models only (``"pretrained"``) come beside it.

    Columns: analysis, model, target, k, n_datasets, n_pairs, estimate, lower, upper, se,
    p_value, p_side, p_redone, p_mc_se. ``targets`` accepts "kappa" for "kappa_chance". Datasets whose
    NTPS is NaN there (an estimator undefined at their size) are left out, as in `correlation_summary`,
    and ``n_datasets`` counts the rest.

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.
    k : int
        The number of directions of the pre-specified configuration (`fixed_ntps`).
    targets : sequence of str
        The probe targets.
    method : {"spearman", "kendall", "pearson"}
        The correlation across datasets.
    n_boot : int
        Bootstrap resamples of the datasets per interval.
    n_perm : int
        Permutations per p-value.
    seed : int
        Seed of the permutation and resampling generators.

    Returns
    -------
    DataFrame
        One row per (analysis, model, target), with the columns above.
    """
    from ntps_nb.core.selection import monte_carlo_se
    from ntps_nb.core.stats import DegenerateSampleWarning, partial_correlation_ci, stratified_concordance

    fixed = fixed_ntps(tables, k=k).dropna(subset=["ntps"])  # an estimator undefined there: left out
    rows = []
    for target in resolve_targets(targets):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        if target not in fixed.columns:
            continue  # the cross-validated probe's targets in a study computed without it
        sign = 1.0 if TARGETS[target] == "positive" else -1.0
        for model in fixed.loc[fixed["pretrained"].astype(bool), "model"].unique():
            control = f"{model}:random"
            a = fixed[fixed["model"] == model].set_index("dataset")
            b = fixed[fixed["model"] == control].set_index("dataset")
            common = a.index.intersection(b.index)
            if control not in set(fixed["model"]) or common.size < 3:
                continue
            x = (a.loc[common, "ntps"] - b.loc[common, "ntps"]).to_numpy(float)
            y = (a.loc[common, target] - b.loc[common, target]).to_numpy(float)
            row = {"analysis": "pretrained_minus_random", "model": model, "target": target, "k": k,
                   "n_datasets": int(common.size), "n_pairs": np.nan}
            rows.append({**row, **_rho_ci_p(x, y, method, n_boot, n_perm, seed)})
        for model, part in fixed.groupby("model", sort=False):
            if len(part) < 4:  # one control needs 4 datasets (e.g. a study still running)
                continue
            row = {"analysis": "partial_given_C", "model": model, "target": target, "k": k,
                   "n_datasets": int(len(part)), "n_pairs": np.nan, "p_value": np.nan,
                   "p_side": "none (no p-value)", "p_redone": "", "p_mc_se": np.nan}
            x, y, c = (part[col].to_numpy(float) for col in ("ntps", target, "n_classes"))
            ci = partial_correlation_ci(x, y, c, method=method, n_boot=n_boot, seed=seed)
            rows.append({**row, "estimate": ci["estimate"], "lower": ci["lower"], "upper": ci["upper"], "se": np.nan})
        for who in ("all", "pretrained"):
            part = fixed if who == "all" else fixed[fixed["pretrained"].astype(bool)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DegenerateSampleWarning)  # no pair: the row is left out below
                agree = stratified_concordance(part["ntps"], sign * part[target].to_numpy(float), part["dataset"],
                                               n_perm=n_perm, seed=seed)
            if agree["n_pairs"] == 0:  # a single model (of that kind): no pairs to compare
                continue
            rows.append({"analysis": "across_models", "model": who, "target": target, "k": k,
                         "n_datasets": agree["n_groups"], "n_pairs": agree["n_pairs"], "estimate": agree["estimate"],
                         "lower": np.nan, "upper": np.nan, "se": np.nan, "p_value": agree["p_value"],
                         "p_side": "two-sided", "p_redone": "target shuffled across models within each dataset",
                         "p_mc_se": monte_carlo_se(agree["p_value"], agree["n_perm"], False)})
    columns = ["analysis", "model", "target", "k", "n_datasets", "n_pairs", "estimate", "lower", "upper", "se",
               "p_value", "p_side", "p_redone", "p_mc_se"]
    return pd.DataFrame(rows, columns=columns)


def _rho_ci_p(x: np.ndarray, y: np.ndarray, method: str, n_boot: int, n_perm: int, seed: int) -> dict[str, Any]:
    """`ntps_nb.core.selection.fixed_rho` of one score with one target (no selection): estimate,
    percentile bootstrap interval, se and a two-sided permutation p, with p_side, p_redone,
    p_mc_se, n_perm, exact, interval; all NaN when a sample is constant (e.g. -C when every task
    is binary)."""
    from ntps_nb.core.selection import fixed_rho
    from ntps_nb.core.stats import DegenerateSampleWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateSampleWarning)  # resamples left out: still an interval
            result = fixed_rho(x, y, method=method, direction=None, n_perm=n_perm, n_boot=n_boot, seed=seed)
        return _result(result)
    except ValueError as error:  # constant values
        return {**dict.fromkeys(RESULT_COLUMNS, np.nan), "p_side": "two-sided", "p_redone": "none (no selection)",
                "exact": False, "interval": f"none: {error}", "held_out": "none"}


def ntps_with_intervals(tables: dict[str, pd.DataFrame], *, model: str, k: int, variant: str = "theory",
                        layer: str | int = "last", protocol: str = "heldout") -> pd.DataFrame:
    """One row per dataset: NTPS with its shard-bootstrap interval (``intervals.csv``) at ``layer``
    (an index, or "last": the deepest layer with intervals) and ``k``, beside the probe targets of
    that model at its last layer. Raises if the study kept no interval there.

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.
    model : str
        The model.
    k : int
        The number of directions.
    variant : str
        The NTPS variant ("theory").
    layer : int or "last"
        The layer of the intervals.
    protocol : str
        The probe protocol of the targets (`probe_targets`).

    Returns
    -------
    DataFrame
        One row per dataset: dataset, layer, k, variant, ntps, lower, upper, se_jackknife,
        n_shards, n_boot, level, the probe targets and model.
    """
    intervals = tables.get("intervals")
    if intervals is None or intervals.empty:
        raise ValueError("this study has no intervals table (run it with shards and interval_layers)")
    rows = intervals[(intervals["model"] == model) & (intervals["variant"] == variant)
                     & (intervals["statistic"] == "ntps")]
    if rows.empty:
        raise ValueError(f"no {variant} intervals for model {model!r}; models: {sorted(intervals['model'].unique())}")
    chosen = int(rows["layer"].max()) if layer == "last" else int(layer)
    rows = rows[(rows["layer"] == chosen) & (rows["k"] == k)]
    if rows.empty:
        raise ValueError(f"no interval at layer {chosen}, k {k}; interval layers {sorted(intervals['layer'].unique())}")
    keep = ["dataset", "layer", "k", "variant", "ntps", "lower", "upper", "se_jackknife", "n_shards", "n_boot", "level"]
    targets = probe_targets(tables["probes"], protocol=protocol)
    targets = targets[targets["model"] == model].drop(columns=["layer"], errors="ignore")
    return rows[keep].merge(targets, on="dataset").assign(model=model).reset_index(drop=True)


#: Provenance columns `interval_points` and `headline_points` carry from the study's rows.
PROVENANCE_COLUMNS = ("study", "pretrained", "n_train", "n_test", "max_length", "seed", "package_version",
                      "config_hash")


def _centre(rows: pd.DataFrame) -> np.ndarray:
    """The centre of each shard-bootstrap interval: estimate - bootstrap bias for "basic" (the
    interval reflects the replicates around the estimate), estimate + bias for "percentile", NaN
    for "bca" (no single centre)."""
    method = rows["method"].astype(str).to_numpy() if "method" in rows else np.full(len(rows), "basic")
    bias = rows["bias_bootstrap"].to_numpy(float) if "bias_bootstrap" in rows else np.full(len(rows), np.nan)
    ntps = rows["ntps"].to_numpy(float)
    return np.where(method == "basic", ntps - bias, np.where(method == "percentile", ntps + bias, np.nan))


def interval_points(tables: dict[str, pd.DataFrame], *, model: str, k: int, layer: str | int = "last",
                    protocol: str = "heldout") -> pd.DataFrame:
    """One row per dataset: the theory NTPS of ``model`` at (``layer``, ``k``) with the interval
    that belongs to it, beside the probe targets (at the model's last layer).

    - From the ``estimates`` table when the study has it there (the estimates stage): the point is
      the study estimator's estimate (`ntps_nb.core.estimators.ntps_estimate`), the interval its
      delete-one-shard jackknife interval, centred on that estimate (``centred`` True), with the
      estimator's ``reliable`` flag; ``source`` "estimates".
    - Otherwise from the ``intervals`` table (`ntps_with_intervals`): the point is the plug-in NTPS,
      the interval its shard-bootstrap interval, which is centred on the bootstrap's own centre
      (``centre``: estimate - bootstrap bias for the "basic" method), not on the point, and can
      exclude it where the bias is large (``centred`` False, ``reliable`` NaN); ``source``
      "intervals".

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.
    model : str
        The model.
    k : int
        The number of directions.
    layer : int or "last"
        The layer ("last": the model's deepest layer with estimates, else with intervals).
    protocol : str
        The probe protocol of the targets (`probe_targets`).

    Returns
    -------
    DataFrame
        One row per dataset: model, dataset, layer, k, estimator, ntps (the point), lower, upper,
        level, interval (how it was made), centre (the interval's own centre), centred, reliable,
        source, the `PROVENANCE_COLUMNS` and the probe targets (n_classes, accuracy, ...).

    Raises
    ------
    ValueError
        When the study kept neither estimates nor intervals for the model at that layer and k.
    """
    estimates = tables.get("estimates")
    rows = None
    if estimates is not None and not estimates.empty:
        rows = estimates[(estimates["model"] == model) & (estimates.get("variant", "theory") == "theory")]
        if not rows.empty:
            chosen = int(rows["layer"].max()) if layer == "last" else int(layer)
            rows = rows[(rows["layer"] == chosen) & np.isclose(rows["k"].astype(float), k)]
        if rows.empty:
            rows = None
    if rows is not None:
        keep = ["dataset", "layer", "k", "estimator", "estimate", "lower", "upper", "level", "reliable",
                *[c for c in PROVENANCE_COLUMNS if c in rows.columns]]
        kinds = (rows["interval"].fillna("jackknife") if "interval" in rows.columns
                 else pd.Series("jackknife", index=rows.index))
        # the widening's sets' level, named where the table has it (tables written before session 65 do not)
        set_levels = rows.get("widening_level", pd.Series(np.nan, index=rows.index))
        # the stationary widening's rows (tables written before session 67 have no column)
        reached = rows.get("stationary_widened", pd.Series(False, index=rows.index))
        out = rows[keep].rename(columns={"estimate": "ntps"})
        out = out.assign(reliable=_flags(out["reliable"]), centre=out["ntps"], centred=True, source="estimates",
                         interval=[f"{level:.0%} {interval_description(kind, widened, sets, moved)}, "
                                   f"around the {estimator} estimate" for level, estimator, kind, widened, sets, moved
                                   in zip(out["level"], out["estimator"], kinds, widened_rows(rows), set_levels,
                                          reached)])
    else:
        intervals = tables.get("intervals")
        if intervals is None or intervals.empty:
            raise ValueError("this study has neither an estimates nor an intervals table "
                             "(run it with shards and interval_layers)")
        base = ntps_with_intervals(tables, model=model, k=k, layer=layer, protocol=protocol)
        rows = intervals[(intervals["model"] == model) & (intervals["variant"] == "theory")
                         & (intervals["statistic"] == "ntps") & (intervals["layer"] == int(base["layer"].iloc[0]))
                         & np.isclose(intervals["k"].astype(float), k)]
        rows = rows.assign(estimator=rows["estimator"] if "estimator" in rows else "plugin")
        keep = ["dataset", "layer", "k", "estimator", "ntps", "lower", "upper", "level",
                *[c for c in PROVENANCE_COLUMNS if c in rows.columns]]
        method = rows["method"].astype(str) if "method" in rows else pd.Series("basic", index=rows.index)
        out = rows[keep].assign(
            reliable=np.nan, centre=_centre(rows), centred=False, source="intervals",
            interval=[f"{level:.0%} shard-bootstrap ({m}) interval of the {e} NTPS"
                      for level, m, e in zip(rows["level"], method, rows["estimator"])])
    targets = probe_targets(tables["probes"], protocol=protocol)
    targets = targets[targets["model"] == model].drop(columns=["model"])
    out = out.merge(targets, on="dataset").assign(model=model)
    first = ["model", "dataset", "layer", "k", "estimator", "ntps", "lower", "upper", "level", "interval", "centre",
             "centred", "reliable", "source"]
    return out[first + [c for c in out.columns if c not in first]].reset_index(drop=True)


#: The selections `headline_points` draws, in the order of the headline figure's rows.
HEADLINE_SELECTIONS = ("leave_one_dataset_out", "fixed")


@dataclasses.dataclass(frozen=True)
class Headline:
    """The headline figure's numbers (`headline_points`).

    ``points``: one row per (selection, model, dataset) with x (what is drawn on the x axis), y
    (the target), lower / upper / centre of x's interval (NaN without one), centred, reliable,
    estimator, and the provenance columns. ``rho``: one row per (selection, model) with the
    correlation result (`ntps_nb.core.selection.RhoResult` columns estimate, lower, upper,
    p_value, p_side, p_mc_se, exact, n_datasets), the configuration and ``x_label``. ``target``
    names y; ``k`` is the fixed configuration's k.
    """

    points: pd.DataFrame
    rho: pd.DataFrame
    target: str
    k: int


def _summary_row(summary: pd.DataFrame | None, model: str, target: str) -> dict | None:
    if summary is None or summary.empty:
        return None
    rows = summary[(summary["model"] == model) & (summary["target"] == target) & (summary["score"] == "ntps_theory")
                   & (summary["selection"] == "leave_one_dataset_out")]
    return rows.iloc[0].to_dict() if len(rows) else None


def headline_points(
    tables: dict[str, pd.DataFrame], *, summary: pd.DataFrame | None = None, target: str = "accuracy", k: int = 8,
    method: str = "spearman", n_boot: int = 1000, n_perm: int = 2000, seed: int = 0, protocol: str = "heldout",
) -> Headline:
    """The numbers of the series' headline figure: out-of-sample NTPS against the probe target
    across datasets, per model (pretrained models and their random-initialised controls), in two
    selections:

    - ``leave_one_dataset_out``: each dataset's configuration (layer, k) chosen on the other
      datasets (`ntps_nb.core.selection.leave_one_dataset_out`, ranks, ties averaged, as in
      `correlation_summary`); x is the held-out dataset's rank of NTPS under it (scale-free, so
      folds that chose different configurations are comparable), no per-point interval. rho,
      its interval and p-value: the ``summary`` row (`correlation_summary`, score ntps_theory)
      when given, else `ntps_nb.core.selection.lodo_rho` with the same settings;
    - ``fixed``: a configuration fixed in advance, the deepest interval layer and ``k``, with the
      interval that belongs to each point (`interval_points`: the estimates table's estimate and
      jackknife interval, else the plug-in NTPS and its bootstrap interval, centred elsewhere).
      rho: `ntps_nb.core.selection.fixed_rho`, one-sided in the target's direction; without
      estimates or intervals, the last layer's theory NTPS (`fixed_ntps`) and no intervals.

    A selection needs its datasets (4 for leave-one-out, 3 for a fixed rho); models with fewer
    have no rows there.

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.
    summary : DataFrame, optional
        `correlation_summary` rows of these tables (reused, not recomputed).
    target : str
        The probe target on the y axis (`TARGETS`; "kappa" means "kappa_chance").
    k : int
        The fixed configuration's number of directions.
    method : {"spearman", "kendall", "pearson"}
        The correlation across datasets.
    n_boot : int
        Bootstrap resamples of the datasets per interval.
    n_perm : int
        Permutations per p-value.
    seed : int
        Seed of the permutation and resampling generators.
    protocol : str
        The probe protocol of the targets (`probe_targets`).

    Returns
    -------
    Headline
        Its ``points`` and ``rho`` frames.
    """
    from ntps_nb.core.selection import MIN_DATASETS, fixed_rho, leave_one_dataset_out, lodo_rho
    from ntps_nb.core.stats import DegenerateSampleWarning

    target = resolve_targets([target])[0]
    if target not in TARGETS:
        raise ValueError(f"the headline's target must be one of {list(TARGETS)}, got {target!r}")
    direction = TARGETS[target]
    targets_all = probe_targets(tables["probes"], protocol=protocol)
    ntps_table = tables["ntps"]
    provenance = [c for c in PROVENANCE_COLUMNS if c in ntps_table.columns]
    meta = ntps_table.drop_duplicates(["model", "dataset"]).set_index(["model", "dataset"])[provenance]
    points, rhos = [], []
    for model, targets_m in targets_all.groupby("model", sort=False):
        targets_m = targets_m.dropna(subset=[target])
        pretrained = bool(ntps_table.loc[ntps_table["model"] == model, "pretrained"].iloc[0])
        common = {"model": model, "pretrained": pretrained, "target": target}
        frame = _score_frame(ntps_table, targets_m, model=model, variant="theory", target=target)
        estimator = ", ".join(sorted(ntps_table.loc[ntps_table["model"] == model].get(
            "estimator", pd.Series(["plugin"])).dropna().astype(str).unique())) or "plugin"
        if frame["dataset"].nunique() >= MIN_DATASETS + 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DegenerateSampleWarning)
                chosen = leave_one_dataset_out(frame, score="ntps", target=target, configs=["layer", "k"],
                                               method=method, direction=direction)
                row = _summary_row(summary, model, target)
                if row is None:
                    row = lodo_rho(frame, score="ntps", target=target, configs=["layer", "k"], method=method,
                                   direction=direction, n_perm=n_perm, n_boot=n_boot, seed=seed).row()
            if not np.isclose(row["estimate"], chosen.rho, equal_nan=True):
                raise ValueError(f"the summary's leave-one-dataset-out rho of {model} ({row['estimate']:+.3f}) is not "
                                 f"these tables' ({chosen.rho:+.3f}): pass the summary of the same tables")
            folds = chosen.folds
            points.append(pd.DataFrame({**common, "selection": "leave_one_dataset_out", "dataset": folds["dataset"],
                                        "x": folds["held_out_score"], "y": folds["target"], "lower": np.nan,
                                        "upper": np.nan, "centre": np.nan, "centred": np.nan, "reliable": np.nan,
                                        "estimator": estimator, "interval": "", "layer": np.nan, "k": np.nan}))
            rhos.append({**common, "selection": "leave_one_dataset_out", **{c: row[c] for c in (
                "estimate", "lower", "upper", "p_value", "p_side", "p_mc_se", "exact")},
                "level": 0.95 if np.isfinite(row["lower"]) else np.nan, "n_datasets": int(chosen.n_datasets),
                "config": f"chosen per fold ({chosen.n_distinct_configs} distinct of {chosen.n_configs})",
                "x_label": "held-out rank of NTPS (layer, k chosen on the other datasets)"})
        try:
            fixed = interval_points(tables, model=model, k=k, protocol=protocol)
        except ValueError:  # no intervals: the last layer's NTPS at k, without intervals
            fixed = fixed_ntps(tables, k=k).query("model == @model").assign(
                lower=np.nan, upper=np.nan, centre=np.nan, centred=np.nan, reliable=np.nan, estimator=estimator,
                interval="")
        fixed = fixed.dropna(subset=["ntps", target])
        if fixed["dataset"].nunique() < MIN_DATASETS:
            continue
        result = fixed_rho(fixed["ntps"], fixed[target], method=method, direction=direction, n_perm=n_perm,
                           n_boot=n_boot, seed=seed)
        layer_k = f"layer {int(fixed['layer'].iloc[0])}, k = {k}"
        points.append(pd.DataFrame({**common, "selection": "fixed", "dataset": fixed["dataset"], "x": fixed["ntps"],
                                    "y": fixed[target], **{c: fixed[c] for c in (
                                        "lower", "upper", "centre", "centred", "reliable", "estimator", "interval",
                                        "layer", "k")}}))
        rhos.append({**common, "selection": "fixed", **{c: getattr(result, c) for c in (
            "estimate", "lower", "upper", "p_value", "p_side", "p_mc_se", "exact", "level")},
            "n_datasets": int(result.n_datasets), "config": layer_k,
            "x_label": f"NTPS at {layer_k} ({fixed['estimator'].iloc[0]})"})
    if not points:
        raise ValueError(f"no model has enough datasets for the headline: {MIN_DATASETS} with a defined NTPS and "
                         f"{target} at the last layer, k = {k} (an estimator can be undefined, NaN, at a dataset's "
                         "size)")
    out = pd.concat(points, ignore_index=True)
    out = out.join(meta.drop(columns=["pretrained"], errors="ignore"), on=["model", "dataset"])
    return Headline(points=out, rho=pd.DataFrame(rhos), target=target, k=int(k))


def diagnostics_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The diagnostics a study recorded, one row per (model, dataset, layer, variant, configuration):
    NTPS, its spread under 1e-6 relative perturbations of the moments, and the label-permutation
    null (p-value, z-score). ``config`` names the configuration: "k=8" (theory), "f=0.5" (reference).

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.

    Returns
    -------
    DataFrame
        One row per recorded configuration: model, dataset, n_classes, layer, variant, config, ntps,
        perturb_max_dev, perm_mean, p_value (of the label-permutation null; tables of version 1 of
        the diagnostics stage call it perm_p), p_side ("one-sided greater": real NTPS above the null), perm_z, solver_max_dev,
        n_permutations.
    """
    diag = tables.get("diagnostics")
    if diag is None or diag.empty:
        raise ValueError("this study recorded no diagnostics (set diagnostics = true)")
    config = np.where(diag["variant"] == "theory", "k=" + diag["k"].astype("Int64").astype(str),
                      "f=" + diag["fraction"].round(2).astype(str))
    from ntps_nb.core.diagnostics import label_null_p_value

    diag = label_null_p_value(diag)
    keep = ["model", "dataset", "n_classes", "layer", "variant", "ntps", "perturb_max_dev", "perm_mean", "p_value",
            "p_side", "perm_z", "solver_max_dev", "n_permutations"]
    return diag.assign(config=config)[keep[:5] + ["config"] + keep[5:]].reset_index(drop=True)


#: The columns of `estimates_summary`.
ESTIMATES_SUMMARY_COLUMNS = ("model", "pretrained", "estimator", "n_datasets", "layers", "n_rows", "n_defined",
                             "n_reliable", "share_reliable")


def _flags(values: pd.Series) -> np.ndarray:
    """A ``reliable`` column as booleans, whether it was read as booleans or as their text."""
    text = values.astype(str).str.strip().str.lower()
    return text.isin(["true", "1", "1.0"]).to_numpy()


def estimates_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """How many of a study's NTPS estimates (the estimates stage, ``estimates.csv``) its
    estimator's reliability flag accepts, per model and estimator: where the flag says
    unreliable, the estimate and its interval are not to be read as the population NTPS.

    Parameters
    ----------
    tables : dict of str to DataFrame
        A study's combined tables (`ntps_nb.study.runner.load_results`), keyed by table name.
        Studies computed before the estimates stage have no ``estimates`` table: the summary is
        then empty.

    Returns
    -------
    DataFrame
        One row per (model, estimator), columns `ESTIMATES_SUMMARY_COLUMNS`: pretrained (where
        the table has it), the datasets and layers estimated, n_rows (estimate rows: dataset x
        layer x k), n_defined (rows with a finite estimate), n_reliable (rows flagged reliable)
        and share_reliable = n_reliable / n_rows. No rows when there is no estimates table.
    """
    estimates = tables.get("estimates")
    if estimates is None or estimates.empty:
        return pd.DataFrame(columns=list(ESTIMATES_SUMMARY_COLUMNS))
    _require_columns(estimates, ["model", "estimator", "dataset", "layer", "estimate", "reliable"], "estimates_summary")
    rows = []
    for (model, estimator), group in estimates.groupby(["model", "estimator"], sort=False):
        reliable = _flags(group["reliable"])
        rows.append({"model": model,
                     "pretrained": bool(group["pretrained"].iloc[0]) if "pretrained" in group else np.nan,
                     "estimator": estimator, "n_datasets": int(group["dataset"].nunique()),
                     "layers": "/".join(str(int(v)) for v in sorted(group["layer"].unique())),
                     "n_rows": len(group), "n_defined": int(np.isfinite(group["estimate"].to_numpy(float)).sum()),
                     "n_reliable": int(reliable.sum()), "share_reliable": float(reliable.mean())})
    return pd.DataFrame(rows, columns=list(ESTIMATES_SUMMARY_COLUMNS))


def estimates_markdown(summary: pd.DataFrame) -> str:
    """`estimates_summary` rows as a Markdown table (counts as integers, the share to two decimals).

    Parameters
    ----------
    summary : DataFrame
        Rows of `estimates_summary`.

    Returns
    -------
    str
        The Markdown table.
    """
    _require_columns(summary, list(ESTIMATES_SUMMARY_COLUMNS), "estimates_markdown")
    rows = summary.assign(**{name: summary[name].astype(int).astype(str)
                             for name in ("n_datasets", "n_rows", "n_defined", "n_reliable")})
    return _markdown(rows, {"model": "model", "estimator": "estimator", "n_datasets": "datasets", "layers": "layers",
                            "n_rows": "estimates", "n_defined": "defined", "n_reliable": "flagged reliable",
                            "share_reliable": "share reliable"})


def lora_summary(lora: pd.DataFrame, *, k: int, ntps: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (model, dataset) of a study's LoRA table (``lora.csv``) at ``k`` (theory NTPS of
    the layer LoRA was scored at): NTPS before and after LoRA, the held-out probe and LoRA test
    accuracies, the gain (LoRA - probe) and the training budget, so gains are read with it.

    ``ntps_before`` / ``ntps_after`` are the LoRA stage's plug-in values. With the study's ``ntps``
    table of a study whose estimator is not the plug-in, a column ``ntps_before_<estimator>`` adds
    that estimator's NTPS of the base model at the LoRA layer (the values `correlation_summary`'s
    gain rows use).

    Parameters
    ----------
    lora : DataFrame
        A study's LoRA table, one row per (model, dataset, layer, k, variant).
    k : int
        The number of directions of the NTPS shown.
    ntps : DataFrame, optional
        The study's ntps table.

    Returns
    -------
    DataFrame
        One row per (model, dataset).
    """
    needed = ["model", "dataset", "k", "ntps_before", "ntps_after", "lora_gain"]
    missing = [c for c in needed if c not in lora.columns]
    if missing:
        raise ValueError(f"the LoRA table lacks columns {missing}")
    rows = lora[lora["k"] == k]
    if rows.empty:
        raise ValueError(f"no LoRA rows at k = {k}; k values: {sorted(lora['k'].unique().tolist())}")
    keep = ["model", "dataset", "n_classes", "layer", "k", "ntps_before", "ntps_after", "delta",
            "lora_probe_accuracy", "lora_lora_accuracy", "lora_gain", "lora_budget_steps", "lora_budget_batch_size",
            "lora_budget_lr", "lora_budget_max_length", "n_train", "n_test"]
    out = rows[[c for c in keep if c in rows.columns]].rename(columns={
        "lora_probe_accuracy": "probe_accuracy", "lora_lora_accuracy": "lora_accuracy", "lora_gain": "gain",
        "lora_budget_steps": "steps", "lora_budget_batch_size": "batch_size", "lora_budget_lr": "lr",
        "lora_budget_max_length": "lora_max_length"})
    out = out.reset_index(drop=True)
    if ntps is not None and "layer" in out.columns:
        theory = rows[rows["variant"] == "theory"] if "variant" in rows.columns else rows
        found = []
        for model, rows_m in theory.groupby("model"):
            before, note, estimators = _before_lora(rows_m, ntps, model)
            if note is not None:
                found.append(before.assign(model=model, column=f"ntps_before_{'_'.join(estimators)}"))
        if found:  # one column per estimator, every model's values in it
            keys = ["model", "dataset", "layer", "k"]
            wide = pd.concat(found).pivot_table(index=keys, columns="column", values="ntps", aggfunc="first")
            out = out.merge(wide.rename_axis(columns=None).reset_index(), on=keys, how="left")
            placed = list(wide.columns)
            at = list(out.columns).index("ntps_before") + 1
            rest = [c for c in out.columns if c not in placed]
            out = out[rest[:at] + placed + rest[at:]]
    return out.sort_values(["model", "dataset"]).reset_index(drop=True)


#: How `summary_markdown` and `structure_markdown` abbreviate a p-value's side.
_SIDE = {"one-sided greater": "one-sided >", "one-sided less": "one-sided <", "two-sided": "two-sided"}


def summary_markdown(summary: pd.DataFrame, *, targets: Sequence[str] | None = None,
                     scores: Sequence[str] | None = None) -> str:
    """`correlation_summary` rows as a Markdown table (the form README's Results section quotes),
    pretrained models first, then their random controls. Its column "rho [95% interval] (p, side)"
    reads e.g. "0.52 [0.05, 0.88] (p = 0.040 ± 0.004, one-sided >)": the estimate and interval to
    two decimals ("-" for no interval: the in-sample maximum), the p-value with its Monte Carlo
    standard error ("exact" when every permutation was enumerated; a column ``exact`` says so)
    and side; then the
    configuration (layer/k or layer/fraction; under leave-one-out the one chosen most often) and
    the number of distinct configurations the folds chose.

    ``targets`` / ``scores`` keep only those values (None: all; "kappa" means "kappa_chance").

    Parameters
    ----------
    summary : DataFrame
        Rows of `correlation_summary`.
    targets, scores : sequence of str, optional
        Keep only these targets / scores (None: all).

    Returns
    -------
    str
        The Markdown table.
    """
    _require_columns(summary, ["model", "pretrained", "n_datasets", "target", "score", "selection", "estimate", "lower",
                               "upper", "p_value", "p_side", "p_mc_se"], "summary_markdown")
    rows = summary
    if targets is not None:
        rows = rows[rows["target"].isin([TARGET_ALIASES.get(t, t) for t in targets])]
    if scores is not None:
        rows = rows[rows["score"].isin(list(scores))]
    if rows.empty:
        raise ValueError("no summary rows to show (check targets= and scores=)")
    order = {name: i for i, name in enumerate(dict.fromkeys(rows.sort_values("pretrained", ascending=False,
                                                                              kind="stable")["model"]))}
    rows = rows.assign(_order=rows["model"].map(order)).sort_values("_order", kind="stable")

    rows = rows.assign(selection=rows["selection"].astype(str).str.replace("_", " "))
    return _markdown(rows, {"model": "model", "n_datasets": "datasets", "target": "target", "score": "score",
                            "selection": "selection", "result": "rho [95% interval] (p, side)",
                            "config": "configuration", "n_distinct_configs": "distinct configurations"})


def structure_markdown(controls: pd.DataFrame) -> str:
    """`structure_controls` rows as a Markdown table (the estimate is Kendall's tau over model
    pairs for the ``across_models`` rows), in `summary_markdown`'s form.

    Parameters
    ----------
    controls : DataFrame
        Rows of `structure_controls`.

    Returns
    -------
    str
        The Markdown table.
    """
    _require_columns(controls, ["analysis", "model", "target", "k", "n_datasets", "n_pairs", "estimate", "lower",
                                "upper", "p_value", "p_side", "p_mc_se"], "structure_markdown")
    rows = controls.assign(analysis=controls["analysis"].str.replace("_", " "))
    return _markdown(rows, {"analysis": "analysis", "model": "model", "target": "target", "k": "k",
                            "n_datasets": "datasets", "n_pairs": "model pairs",
                            "result": "rho / tau [95% interval] (p, side)"})


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None or not np.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _result_text(row: dict) -> str:
    """"estimate [lower, upper] (p = p ± mc se, side)"; "-" for what is missing."""
    text = _number(row["estimate"])
    if text == "-":
        return "-"
    if np.isfinite(row["lower"]) and np.isfinite(row["upper"]):
        text += f" [{row['lower']:.2f}, {row['upper']:.2f}]"
    p = row["p_value"]
    if p is not None and np.isfinite(p):
        mc = row.get("p_mc_se", np.nan)
        if row.get("exact") is True or row.get("exact") is np.True_:
            error = " exact"
        elif mc is not None and np.isfinite(mc):
            error = f" ± {mc:.3f}" if mc >= 0.0005 else " ± < 0.001"
        else:
            error = ""
        value = f"= {p:.3f}" if p >= 0.001 else "< 0.001"
        side = _SIDE.get(row.get("p_side"), row.get("p_side"))
        text += f" (p {value}{error}, {side})"
    return text


def _markdown(rows: pd.DataFrame, columns: dict[str, str]) -> str:
    """A Markdown table of ``columns`` (frame column -> header); floats to two decimals, missing
    values as "-", ``result`` built by `_result_text`."""
    def cell(row: dict, column: str) -> str:
        if column == "result":
            return _result_text(row)
        value = row.get(column, "")
        if isinstance(value, (float, np.floating, int, np.integer)) and not isinstance(value, bool):
            if not np.isfinite(value):
                return "-"
            if column in ("n_pairs", "k", "n_datasets", "n_distinct_configs"):
                return f"{int(value)}"
            return f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows.to_dict("records")]
    return "\n".join(lines)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; the frame has {list(frame.columns)}")


def summarise(cfg_or_tables: Any, **kwargs: Any) -> pd.DataFrame:
    """The tidy summary README and notebooks print: `correlation_summary` of a study's combined tables.

    Accepts a config path, a `StudyConfig`, a results folder or the tables dict.

    Parameters
    ----------
    cfg_or_tables : str, Path, StudyConfig or dict of str to DataFrame
        Where the study's tables come from.
    **kwargs
        Passed to `correlation_summary`.

    Returns
    -------
    DataFrame
        `correlation_summary`'s rows.
    """
    tables = cfg_or_tables if isinstance(cfg_or_tables, dict) else load_results(cfg_or_tables)
    return correlation_summary(tables, **kwargs)
