"""The analysis of a study's combined tables: correlation summaries with honest and in-sample
selection, baselines, structure controls, views of intervals, diagnostics and LoRA, and their
Markdown. Pure pandas on top of `ntps_nb.core.stats`: the statistics themselves live there."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ntps_nb.study.runner import load_results

#: (target column of the probe table, the direction a good score correlates with it)
TARGETS = {"accuracy": "positive", "kappa": "positive", "mse": "negative"}


def probe_targets(probes: pd.DataFrame, *, protocol: str = "heldout", layer: str | int = "last") -> pd.DataFrame:
    """One target row per (model, dataset): the probe at the model's last layer (or a given layer)."""
    table = probes[probes["protocol"] == protocol]
    if table.empty:
        raise ValueError(f"no probe rows of protocol {protocol!r}")
    if layer == "last":
        last = table.groupby("model")["layer"].transform("max")
        table = table[table["layer"] == last]
    else:
        table = table[table["layer"] == int(layer)]
    return table[["model", "dataset", "n_classes", "majority_rate", *TARGETS, "layer"]].rename(
        columns={"layer": "target_layer"}).reset_index(drop=True)


def _config_text(values) -> str:
    """"layer/k" with integers printed as integers (CSV round trips turn k into floats)."""
    out = []
    for value in values:
        value = float(value)
        out.append(str(int(value)) if value.is_integer() else f"{value:g}")
    return "/".join(out)


def _ci(x, y, method: str, n_boot: int, seed: int) -> tuple[float, float]:
    from ntps_nb.core.stats import DegenerateSampleWarning, bootstrap_ci

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateSampleWarning)  # resamples left out: the CI is still one
        ci = bootstrap_ci(x, y, method=method, n_boot=n_boot, seed=seed)
    return ci["low"], ci["high"]


def _selection_rows(frame: pd.DataFrame, base: dict, *, target: str, name: str, cfg_cols: list[str], direction: str,
                    method: str, n_boot: int, n_perm: int, seed: int) -> list[dict]:
    """The rows of one score against one target: leave-one-dataset-out selection (needs 4
    datasets) with its bootstrap CI and selection-redone permutation p-value, and the paper's
    in-sample selection with the selection-aware p-value of `ntps_nb.core.stats.selection_null`.
    ``frame`` has columns dataset, ``cfg_cols``, ``ntps`` and ``target``."""
    from ntps_nb.core.stats import (DegenerateSampleWarning, leave_one_dataset_out_null, select_in_sample,
                                    select_leave_one_dataset_out, selection_null)

    rows = []
    n = frame["dataset"].nunique()
    with warnings.catch_warnings():
        # constant configurations or resamples: the rows carry NaN or fewer configurations instead
        warnings.simplefilter("ignore", DegenerateSampleWarning)
        if n >= 4:
            lodo = select_leave_one_dataset_out(frame, score="ntps", target=target, configs=cfg_cols,
                                                method=method, direction=direction)
            chosen = lodo["chosen"]
            low, high = (_ci(chosen["held_out_score"], chosen["target"], method, n_boot, seed)
                         if np.isfinite(lodo["rho"]) else (np.nan, np.nan))
            p = leave_one_dataset_out_null(frame, score="ntps", target=target, configs=cfg_cols, method=method,
                                           direction=direction, n_perm=n_perm, seed=seed,
                                           observed=lodo["rho"])["pvalue"]
            configs = chosen[cfg_cols].apply(_config_text, axis=1)
            rows.append({**base, "target": target, "score": name, "selection": "leave_one_dataset_out",
                         "rho": lodo["rho"], "ci_low": low, "ci_high": high, "p_value": p,
                         "p_kind": "permutation, selection redone", "config": ", ".join(configs.mode()[:1]),
                         "n_distinct_configs": lodo["n_distinct_configs"],
                         "n_configs": len(frame.drop_duplicates(cfg_cols))})
        best = select_in_sample(frame, score="ntps", target=target, configs=cfg_cols, method=method,
                                direction=direction)
        null = selection_null(frame, score="ntps", target=target, configs=cfg_cols, method=method,
                              direction=direction, n_perm=max(n_perm, 1000), seed=seed)
        chosen_rows = frame.merge(pd.DataFrame([best["config"]]), on=cfg_cols).sort_values("dataset")
        low, high = _ci(chosen_rows["ntps"], chosen_rows[target], method, n_boot, seed)
    rows.append({**base, "target": target, "score": name, "selection": "in_sample", "rho": best["rho"],
                 "ci_low": low, "ci_high": high, "p_value": null["pvalue"],
                 "p_kind": "selection_null (max over configs)",
                 "config": _config_text(best["config"].values()),
                 "n_configs": best["n_configs"], "null_q95": null["null_q95"]})
    return rows


def _baseline_rows(baselines: dict[str, Any], y: np.ndarray, base: dict, *, target: str, method: str, n_boot: int,
                   seed: int) -> list[dict]:
    """rho of each dataset-level baseline (no selection) with the target, CI and permutation p."""
    rows = []
    for name, values in baselines.items():
        rows.append({**base, "target": target, "score": name, "selection": "none",
                     **_rho_ci_p(np.asarray(values, dtype=float), y, method, n_boot, 10_000, seed),
                     "p_kind": "permutation", "config": "last layer" if name.startswith("peer:") else "dataset only"})
    return rows


def correlation_summary(
    tables: dict[str, pd.DataFrame], *, method: str = "spearman", protocol: str = "heldout",
    n_boot: int = 1000, n_perm: int = 200, seed: int = 0, targets: Sequence[str] = (*TARGETS, "lora_gain"),
    variants: Sequence[str] = ("theory", "reference"),
) -> pd.DataFrame:
    """Per model and target: how NTPS ranks the datasets, under honest and in-sample selection,
    beside the dataset-only baselines and the random-initialised control.

    One row per (model, target, score, selection):

    - score ``ntps_theory`` / ``ntps_reference``, selection ``leave_one_dataset_out``: the
      configuration (layer, k or fraction) chosen on the other datasets, rho of the held-out
      scores with the targets, a bootstrap CI over datasets (given the chosen configurations) and
      a permutation p-value that redoes the selection under shuffled targets;
    - same scores, selection ``in_sample`` (the paper's): the best configuration over all
      datasets, rho, and the selection-aware p-value of `ntps_nb.core.stats.selection_null`;
    - scores ``-C`` and ``majority_rate`` (no selection): dataset-only baselines (SPEC section 10);
    - peers at the last layer (no selection), when the peers table is present.

    Target ``lora_gain`` (when the tables hold a ``lora`` table): the gain of LoRA over the
    held-out probe against the theory NTPS *before* LoRA at the layer LoRA was scored at, k
    selected as above with direction "negative" (the paper: lower NTPS, larger gain); baselines
    -C, majority rate and the probe accuracy itself (headroom: a weak probe leaves more to gain).

    Targets come from the ``protocol`` probes at each model's last layer. ``pretrained`` tells
    pretrained models from their ``:random`` controls; `pretraining_contrast` pairs them.
    """
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
            for variant in variants:
                cfg_cols = ["layer", "k"] if variant == "theory" else ["layer", "fraction"]
                scores = ntps_table[(ntps_table["model"] == model) & (ntps_table["variant"] == variant)]
                frame = scores[["dataset", *cfg_cols, "ntps"]].merge(targets_m[["dataset", target]], on="dataset")
                frame = frame.dropna(subset=["ntps"])
                if frame["dataset"].nunique() < 3:  # scores of too few datasets (e.g. units still running)
                    continue
                rows += _selection_rows(frame, base, target=target, name=f"ntps_{variant}", cfg_cols=cfg_cols,
                                        direction=TARGETS[target], method=method, n_boot=n_boot, n_perm=n_perm,
                                        seed=seed)
            baselines = {"-C": -targets_m["n_classes"].astype(float), "majority_rate": targets_m["majority_rate"]}
            if "peers" in tables:
                peers = tables["peers"]
                peers = peers[peers["model"] == model]
                peers = peers[peers["layer"] == peers["layer"].max()].set_index("dataset")
                for peer in ("logme", "h_score", "h_score_lw", "knn_accuracy", "rankme"):
                    if peer in peers.columns:
                        baselines[f"peer:{peer}"] = targets_m["dataset"].map(peers[peer])
            rows += _baseline_rows(baselines, targets_m[target].to_numpy(dtype=float), base, target=target,
                                   method=method, n_boot=n_boot, seed=seed)
        if "lora_gain" in targets and "lora" in tables:
            rows += _gain_rows(tables["lora"], targets_m, base, method=method, n_boot=n_boot, n_perm=n_perm, seed=seed)
    return pd.DataFrame(rows)


def _gain_rows(lora: pd.DataFrame, targets_m: pd.DataFrame, base: dict, *, method: str, n_boot: int, n_perm: int,
               seed: int) -> list[dict]:
    """`correlation_summary`'s ``lora_gain`` rows of one model (none with fewer than 3 datasets)."""
    rows_m = lora[(lora["model"] == base["model"]) & (lora["variant"] == "theory")].dropna(subset=["ntps_before"])
    if rows_m["dataset"].nunique() < 3:
        return []
    gains = rows_m.groupby("dataset")[["lora_gain", "lora_probe_accuracy"]].first()
    frame = rows_m[["dataset", "layer", "k", "ntps_before"]].rename(columns={"ntps_before": "ntps"})
    frame = frame.merge(gains["lora_gain"], left_on="dataset", right_index=True)
    base = {**base, "n_datasets": int(gains.shape[0]), "target_layer": int(rows_m["layer"].max())}
    out = _selection_rows(frame, base, target="lora_gain", name="ntps_theory_before", cfg_cols=["layer", "k"],
                          direction="negative", method=method, n_boot=n_boot, n_perm=n_perm, seed=seed)
    meta = targets_m.set_index("dataset").reindex(gains.index)
    baselines = {"-C": -meta["n_classes"].astype(float), "majority_rate": meta["majority_rate"],
                 "probe_accuracy": gains["lora_probe_accuracy"]}
    return out + _baseline_rows(baselines, gains["lora_gain"].to_numpy(dtype=float), base, target="lora_gain",
                                method=method, n_boot=n_boot, seed=seed)


def pretraining_contrast(tables: dict[str, pd.DataFrame], *, protocol: str = "heldout") -> pd.DataFrame:
    """Per dataset and (pretrained model, its ``:random`` control): last-layer probe targets and the
    median NTPS (theory, over layers and k) of both, and their differences. Does pretraining move
    NTPS and the probes the same way across datasets?"""
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
            for col in ("accuracy", "kappa", "mse", "ntps_theory_median"):
                row[f"{col}_pretrained"] = a.loc[dataset, col]
                row[f"{col}_random"] = b.loc[dataset, col]
                row[f"{col}_diff"] = a.loc[dataset, col] - b.loc[dataset, col]
            rows.append(row)
    return pd.DataFrame(rows)


def fixed_ntps(tables: dict[str, pd.DataFrame], *, k: int = 8, variant: str = "theory") -> pd.DataFrame:
    """Theory NTPS of every (model, dataset) at one pre-specified configuration: each model's last
    layer and ``k`` (no selection, so no selection bias), beside the held-out probe targets of
    that layer. Columns: model, pretrained, dataset, n_classes, majority_rate, accuracy, kappa,
    mse, layer, k, ntps."""
    scores = tables["ntps"]
    scores = scores[(scores["variant"] == variant) & (scores["k"] == k)]
    if scores.empty:
        raise ValueError(f"no {variant} NTPS rows at k = {k}")
    last = scores.groupby("model")["layer"].transform("max")
    scores = scores[scores["layer"] == last][["model", "pretrained", "dataset", "layer", "k", "ntps"]]
    targets = probe_targets(tables["probes"]).drop(columns=["target_layer"])
    return scores.merge(targets, on=["model", "dataset"]).reset_index(drop=True)


def structure_controls(
    tables: dict[str, pd.DataFrame], *, k: int = 8, targets: Sequence[str] = ("accuracy", "kappa"),
    method: str = "spearman", n_boot: int = 1000, n_perm: int = 2000, seed: int = 0,
) -> pd.DataFrame:
    """What NTPS says beyond the datasets' own structure (SPEC section 10), at one pre-specified
    configuration (`fixed_ntps`: last layer, ``k``). One row per (analysis, model, target):

    - ``pretrained_minus_random``: per pretrained model with a ``:random`` control, rho across
      datasets of NTPS(pretrained) - NTPS(random) with target(pretrained) - target(random): what
      pretraining adds to the score against what it adds to the probe. CI by bootstrapping
      datasets, two-sided permutation p;
    - ``partial_given_C``: per model, the rank partial correlation of NTPS with the target
      controlling for the number of classes (`ntps_nb.core.stats.partial_correlation`), with a
      bootstrap CI (no p-value: a permutation null for a partial correlation needs a model of
      how C drives both);
    - ``across_models``: the other axis, same dataset and different models. For every dataset and
      every pair of models, is the model with the higher NTPS also the one with the better probe?
      ``rho`` is then the share of concordant pairs minus the share of discordant ones (Kendall's
      tau over pairs, ties count as neither; signed so that positive means "higher NTPS, better
      probe" for MSE too), ``n_pairs`` how many pairs, and ``p_value`` a two-sided permutation p
      that shuffles the target across models within each dataset.
      The model is ``"all"``; rows for pretrained models only (``"pretrained"``) come beside it.
    """
    from ntps_nb.core.stats import partial_correlation_ci, stratified_concordance

    fixed = fixed_ntps(tables, k=k)
    rows = []
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
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
                   "n_datasets": int(len(part)), "n_pairs": np.nan, "p_value": np.nan}
            x, y, c = (part[col].to_numpy(float) for col in ("ntps", target, "n_classes"))
            ci = partial_correlation_ci(x, y, c, method=method, n_boot=n_boot, seed=seed)
            rows.append({**row, "rho": ci["estimate"], "ci_low": ci["low"], "ci_high": ci["high"]})
        for who in ("all", "pretrained"):
            part = fixed if who == "all" else fixed[fixed["pretrained"].astype(bool)]
            agree = stratified_concordance(part["ntps"], sign * part[target].to_numpy(float), part["dataset"],
                                           n_perm=n_perm, seed=seed)
            if agree["n_pairs"] == 0:  # a single model (of that kind): no pairs to compare
                continue
            rows.append({"analysis": "across_models", "model": who, "target": target, "k": k,
                         "n_datasets": agree["n_groups"], "n_pairs": agree["n_pairs"], "rho": agree["tau"],
                         "ci_low": np.nan, "ci_high": np.nan, "p_value": agree["pvalue"]})
    columns = ["analysis", "model", "target", "k", "n_datasets", "n_pairs", "rho", "ci_low", "ci_high", "p_value"]
    return pd.DataFrame(rows, columns=columns)


def _rho_ci_p(x: np.ndarray, y: np.ndarray, method: str, n_boot: int, n_perm: int, seed: int) -> dict[str, float]:
    """rho, bootstrap CI and two-sided permutation p of one score with one target (all NaN when a
    sample is constant, e.g. -C when every task is binary)."""
    from ntps_nb.core.stats import correlate, permutation_pvalue

    try:
        rho = correlate(x, y, method)
        low, high = _ci(x, y, method, n_boot, seed)
        p = permutation_pvalue(x, y, method=method, n_perm=n_perm, seed=seed)["pvalue"]
    except ValueError:  # constant differences
        rho, low, high, p = np.nan, np.nan, np.nan, np.nan
    return {"rho": rho, "ci_low": low, "ci_high": high, "p_value": p}


def ntps_with_intervals(tables: dict[str, pd.DataFrame], *, model: str, k: int, variant: str = "theory",
                        layer: str | int = "last", protocol: str = "heldout") -> pd.DataFrame:
    """One row per dataset: NTPS with its shard-bootstrap interval (``intervals.csv``) at ``layer``
    (an index, or "last": the deepest layer with intervals) and ``k``, beside the probe targets of
    that model at its last layer. Raises if the study kept no interval there."""
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


def diagnostics_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The diagnostics a study recorded, one row per (model, dataset, layer, variant, configuration):
    NTPS, its spread under 1e-6 relative perturbations of the moments, and the label-permutation
    null (p-value, z-score). ``config`` names the configuration: "k=8" (theory), "f=0.5" (reference)."""
    diag = tables.get("diagnostics")
    if diag is None or diag.empty:
        raise ValueError("this study recorded no diagnostics (set diagnostics = true)")
    config = np.where(diag["variant"] == "theory", "k=" + diag["k"].astype("Int64").astype(str),
                      "f=" + diag["fraction"].round(2).astype(str))
    keep = ["model", "dataset", "n_classes", "layer", "variant", "ntps", "perturb_max_dev", "perm_mean", "perm_p",
            "perm_z", "solver_max_dev", "n_permutations"]
    return diag.assign(config=config)[keep[:5] + ["config"] + keep[5:]].reset_index(drop=True)


def lora_summary(lora: pd.DataFrame, *, k: int) -> pd.DataFrame:
    """One row per (model, dataset) of a study's LoRA table (``lora.csv``) at ``k`` (theory NTPS of
    the layer LoRA was scored at): NTPS before and after LoRA, the held-out probe and LoRA test
    accuracies, the gain (LoRA - probe) and the training budget, so gains are read with it."""
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
    return out.sort_values(["model", "dataset"]).reset_index(drop=True)


def summary_markdown(summary: pd.DataFrame, *, targets: Sequence[str] | None = None,
                     scores: Sequence[str] | None = None) -> str:
    """`correlation_summary` rows as a Markdown table (the form README's Results section quotes),
    pretrained models first, then their random controls; rho, 95% CI and p to two decimals, and
    the configuration (layer/k or layer/fraction; the most frequent one under leave-one-out).

    ``targets`` / ``scores`` keep only those values (None: all)."""
    _require_columns(summary, ["model", "pretrained", "n_datasets", "target", "score", "selection", "rho", "ci_low",
                               "ci_high", "p_value"], "summary_markdown")
    rows = summary
    if targets is not None:
        rows = rows[rows["target"].isin(list(targets))]
    if scores is not None:
        rows = rows[rows["score"].isin(list(scores))]
    if rows.empty:
        raise ValueError("no summary rows to show (check targets= and scores=)")
    order = {name: i for i, name in enumerate(dict.fromkeys(rows.sort_values("pretrained", ascending=False,
                                                                              kind="stable")["model"]))}
    rows = rows.assign(_order=rows["model"].map(order)).sort_values("_order", kind="stable")

    rows = rows.assign(selection=rows["selection"].astype(str).str.replace("_", " "))
    return _markdown(rows, {"model": "model", "n_datasets": "datasets", "target": "target", "score": "score",
                            "selection": "selection", "rho": "rho", "ci": "95% CI", "p_value": "p",
                            "config": "configuration"})


def structure_markdown(controls: pd.DataFrame) -> str:
    """`structure_controls` rows as a Markdown table (rho is Kendall's tau over model pairs for the
    ``across_models`` rows)."""
    _require_columns(controls, ["analysis", "model", "target", "k", "n_datasets", "n_pairs", "rho", "ci_low",
                                "ci_high", "p_value"], "structure_markdown")
    rows = controls.assign(analysis=controls["analysis"].str.replace("_", " "))
    return _markdown(rows, {"analysis": "analysis", "model": "model", "target": "target", "k": "k",
                            "n_datasets": "datasets", "n_pairs": "model pairs", "rho": "rho / tau", "ci": "95% CI",
                            "p_value": "p"})


def _markdown(rows: pd.DataFrame, columns: dict[str, str]) -> str:
    """A Markdown table of ``columns`` (frame column -> header); floats to two decimals, missing
    values as "-", ``ci`` built from ci_low/ci_high."""
    def cell(row: dict, column: str) -> str:
        if column == "ci":
            low, high = row["ci_low"], row["ci_high"]
            return "-" if not (np.isfinite(low) and np.isfinite(high)) else f"[{low:.2f}, {high:.2f}]"
        value = row.get(column, "")
        if isinstance(value, (float, np.floating)):
            if not np.isfinite(value):
                return "-"
            return f"{int(value)}" if column in ("n_pairs", "k", "n_datasets") else f"{value:.2f}"
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
    """
    tables = cfg_or_tables if isinstance(cfg_or_tables, dict) else load_results(cfg_or_tables)
    return correlation_summary(tables, **kwargs)
