"""Does an NTPS estimate settle as texts are added? Real data, nested subsets of one extraction.

For each dataset: one pass of SmolLM2-135M over up to 2,000 train texts (last layer, 32 random
shards); the first 4, 8, 16, 32 shards are nested subsets (N ~ 250, 500, 1000, 2000). Every
estimator's value at k in {2, 8, 32} at each N, with its jackknife 90% interval (over the shards
of that subset). An estimator whose value still moves from the smallest to the largest N by more
than its interval at the smallest N is not estimating a fixed quantity at these sizes.

    python benchmarks/real_data_drift.py --datasets rt-polarity trec6 --out benchmarks/results/real_data_drift

With ``--groups G`` the extraction is cut into ``--shards`` fine shards and every nested subset
(the first G, 2G, 4G, ... fine shards, up to all of them) is regrouped into G shards of consecutive
fine shards, so that every N has its interval from the same number of shards; ``--max-train 0``
takes every train text. The largest available N:

    python benchmarks/real_data_drift.py --datasets rt-polarity trec6 --max-train 0 --shards 512 --groups 16 \
        --estimators plugin richardson --out benchmarks/results/real_data_drift/largest_n

On a GPU machine without the dataset packages (the device tool): write the train texts here with
``--export-texts DIR``, carry DIR, and run there with ``--texts DIR --device cuda`` (the forward pass
and the estimates on the GPU; every row records its device).
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ntps_nb.core.estimators import ntps_estimate  # noqa: E402
from ntps_nb.core.intervals import layer_shards, nested_groups  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--datasets", nargs="+", default=["rt-polarity", "trec6"])
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--groups", type=int, default=0,
                        help="regroup each nested subset into this many shards (0: the subsets are the first "
                             "4, 8, 16, 32 shards as extracted)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--estimators", nargs="+", default=["plugin", "adjusted", "wishart"])
    parser.add_argument("--interval", choices=["jackknife", "rotation", "quadratic"], default="jackknife",
                        help="ntps_estimate's interval; with rotation the rows keep the jackknife-t bounds too "
                             "(lower_jackknife, upper_jackknife) and the summary gives the drift against both")
    parser.add_argument("--out", default="benchmarks/results/real_data_drift")
    parser.add_argument("--from-csv", nargs="+", metavar="CSV",
                        help="summarise earlier runs' drift.csv files (together) instead of running")
    parser.add_argument("--gap-scan", type=int, default=0, metavar="K",
                        help="with --shard-cache: print, per dataset, the k <= K whose next-token and perception "
                             "eigengap ratios (all shards) reach GAP_MIN, whose subspace noise is at most NOISE_MAX "
                             "and which the default estimate flags reliable, then stop")
    parser.add_argument("--compare", nargs=2, metavar=("CSV_A", "CSV_B"),
                        help="two runs' drift.csv files of the same texts: the largest difference of the estimate "
                             "and of the jackknife-t bounds per dataset and N, then stop")
    parser.add_argument("--min-n", type=int, default=0,
                        help="the drift is measured from the smallest N at or above this (default: the smallest)")
    parser.add_argument("--figure", help="with --from-csv: draw estimate against N per dataset and k to this PNG")
    parser.add_argument("--series", nargs="+", metavar="ESTIMATOR:INTERVAL",
                        help="with --from-csv: keep only these (estimator, interval) pairs, e.g. plugin:jackknife "
                             "richardson:quadratic (rows of runs before --interval count as jackknife)")
    parser.add_argument("--shard-cache", help="folder keeping each dataset's last-layer shard moments (pickle): "
                        "written after its forward pass, read instead of the pass when present")
    parser.add_argument("--device", default="cpu",
                        help="torch device of the forward pass and of the estimates (e.g. cuda)")
    parser.add_argument("--texts", metavar="DIR",
                        help="read each dataset's train texts from DIR/<dataset>.parquet (written by --export-texts) "
                             "instead of its package (the texts --export-texts selected: --max-train is not applied again)")
    parser.add_argument("--export-texts", metavar="DIR",
                        help="write each dataset's train texts (text, label) to DIR/<dataset>.parquet, its "
                             "provenance to DIR/<dataset>.json, and stop")
    args = parser.parse_args()
    out = Path(args.out)
    if args.export_texts:
        export_texts(args)
        return
    if args.compare:
        compare_runs(*args.compare)
        return
    if args.from_csv:
        out.mkdir(parents=True, exist_ok=True)
        frame = pd.concat([pd.read_csv(path) for path in args.from_csv], ignore_index=True)
        frame = with_interval(frame)
        if args.series:
            kept = frame["estimator"] + ":" + frame["interval"]
            missing = sorted(set(args.series) - set(kept))
            if missing:
                raise SystemExit(f"--series {missing}: no such rows (the files hold {sorted(set(kept))})")
            frame = frame[kept.isin(args.series)]
        duplicated = frame.duplicated(["dataset", "estimator", "interval", "k", "n_texts"])
        if duplicated.any():
            raise SystemExit(f"{int(duplicated.sum())} rows appear in more than one file (same dataset, estimator, "
                             "interval, k and N): pick one run per series with --series or fewer files")
        summarise(frame, out, args.min_n)
        if args.figure:
            figure(frame, args.figure)
        return

    if args.gap_scan:
        gap_scan(args)
        return

    import torch

    from ntps_nb.datasets import load_dataset
    from ntps_nb.extract import extract
    from ntps_nb.models import load_model

    torch.set_num_threads(1)
    model, tok, info = load_model(args.model, device=args.device)
    print(f"{args.model}: weights sha256 {info.weights_sha256}, device {args.device}", flush=True)
    last = model.config.num_hidden_layers
    rows = []
    for name in args.datasets:
        cached = shard_cache_path(args, name) if args.shard_cache else None
        if cached is not None and cached.exists():
            with cached.open("rb") as handle:
                shards = pickle.load(handle)
        else:
            data = (pd.read_parquet(Path(args.texts) / f"{name}.parquet") if args.texts
                    else load_dataset(name, max_train=args.max_train or None, max_test=10)["train"])
            ex = extract(model, tok, data, layers=[last], max_length=args.max_length, shards=args.shards,
                         shard_layers=[last], progress=False)
            shards = layer_shards(ex.shards)[last]
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                with cached.with_suffix(".tmp").open("wb") as handle:  # streamed: hundreds of shards are GBs
                    pickle.dump(shards, handle, protocol=pickle.HIGHEST_PROTOCOL)
                cached.with_suffix(".tmp").replace(cached)
        for n_used, subset in nested_subsets(shards, args.groups):
            for estimator in args.estimators:
                table = ntps_estimate(subset, args.ks, estimator=estimator, level=0.90, interval=args.interval,
                                      device=None if args.device == "cpu" else args.device)
                rows.append(table.assign(dataset=name, model=args.model, layer=last, n_shards_used=n_used,
                                         max_length=args.max_length, device=args.device))
        print(name, "done", flush=True)
    frame = pd.concat(rows, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "drift.csv", index=False)
    summarise(with_interval(frame), out, args.min_n)


def export_texts(args) -> None:
    """Each dataset's train texts and labels as ``--max-train`` selects them (the order the forward
    pass shards them in), to ``<dir>/<dataset>.parquet``, with the dataset's provenance beside."""
    import json

    from ntps_nb.datasets import load_dataset

    folder = Path(args.export_texts)
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        data = load_dataset(name, max_train=args.max_train or None, max_test=10)["train"]
        data.to_pandas()[["text", "label"]].to_parquet(folder / f"{name}.parquet", index=False)
        (folder / f"{name}.json").write_text(json.dumps(json.loads(data.info.description), indent=1) + "\n")
        print(f"{name}: {len(data)} train texts -> {folder / f'{name}.parquet'}", flush=True)


def compare_runs(path_a: str, path_b: str) -> None:
    """Print, per dataset and N, the largest absolute difference between two runs of the same texts
    (rows matched on dataset, estimator, k and N) of the estimate and of the jackknife-t bounds (a run
    with ``--interval rotation`` keeps those as lower_jackknife / upper_jackknife)."""
    frames = []
    for path in (path_a, path_b):
        f = pd.read_csv(path)
        if "lower_jackknife" in f:
            f = f.assign(lower=f["lower_jackknife"], upper=f["upper_jackknife"])
        frames.append(f[["dataset", "estimator", "k", "n_texts", "estimate", "lower", "upper"]])
    both = frames[0].merge(frames[1], on=["dataset", "estimator", "k", "n_texts"], suffixes=("_a", "_b"))
    for column in ("estimate", "lower", "upper"):
        both[column] = (both[f"{column}_a"] - both[f"{column}_b"]).abs()
    table = both.groupby(["dataset", "n_texts"])[["estimate", "lower", "upper"]].max()
    print(f"largest |difference| over estimators and k, {path_a} against {path_b} ({len(both)} rows matched):")
    print(table.to_string(float_format=lambda x: f"{x:.5f}"))


def shard_cache_path(args, name: str) -> Path:
    """Where a dataset's last-layer shard moments are kept (``--shard-cache``)."""
    return Path(args.shard_cache) / f"{args.model}__{name}__{args.max_train}_{args.max_length}_{args.shards}.pkl"


def gap_scan(args) -> None:
    """The k <= ``--gap-scan`` at which each eigengap ratio of the cached shards (all of them) reaches
    `GAP_MIN`, per dataset: where V_k (next-token) and U_k (perception) are resolved by the sample;
    and the k whose subspace noise is at most `NOISE_MAX` and whose row the default estimate flags
    reliable (every condition of `ntps_estimate`)."""
    from ntps_nb.core.estimators import GAP_MIN, NOISE_MAX, ntps_estimate

    ks = np.arange(1, args.gap_scan + 1)
    print(f"k <= {args.gap_scan} with eigengap ratio >= GAP_MIN = {GAP_MIN} ({args.model}, last layer, "
          f"max_train {args.max_train}, {args.shards} shards)")
    for name in args.datasets:
        with shard_cache_path(args, name).open("rb") as handle:
            table = ntps_estimate(pickle.load(handle), ks)
        for side in ("V", "U"):
            resolved = [int(k) for k in table["k"][table[f"gap_ratio_{side}"] >= GAP_MIN]]
            print(f"{name}: gap_ratio_{side} resolved at k = {resolved}", flush=True)
        print(f"{name}: subspace noise <= NOISE_MAX = {NOISE_MAX} at k = "
              f"{[int(k) for k in table['k'][table['subspace_noise'] <= NOISE_MAX]]}; reliable at k = "
              f"{[int(k) for k in table['k'][table['reliable']]]}", flush=True)


def nested_subsets(shards: list, groups: int):
    """(fine shards used, the subset's shards) for each nested subset: the first 4, 8, 16, 32 shards
    (``groups`` 0), or the first G, 2G, 4G, ... fine shards regrouped into G shards of consecutive
    fine shards, up to all of them (their number must be G times a power of two)."""
    if not groups:
        yield from ((n, shards[:n]) for n in (4, 8, 16, 32) if n <= len(shards))
        return
    per_group = len(shards) // groups
    if len(shards) % groups or per_group & (per_group - 1):
        raise SystemExit(f"--shards ({len(shards)}) must be --groups ({groups}) times a power of two")
    yield from nested_groups(shards, groups)  # the package's scheme (estimate_by_n's): up to every shard here


def with_interval(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with an ``interval`` column on every row (runs before ``--interval``, and the jackknife-t
    interval, leave it empty: "jackknife")."""
    return frame.assign(interval=frame["interval"].fillna("jackknife") if "interval" in frame else "jackknife")


def summarise(frame: pd.DataFrame, out: Path, min_n: int = 0) -> None:
    """Drift from the smallest N (at least ``min_n``) where the estimator is defined to the largest,
    against the interval at that smallest N (runs with ``--interval rotation``: against the rotation
    interval, and against the jackknife-t interval the same rows keep in ``drift_inside_jackknife``). ``frame``
    has its interval on every row (`with_interval`)."""
    summary = []
    for (dataset, estimator, interval, k), g in frame.groupby(["dataset", "estimator", "interval", "k"]):
        g = g[np.isfinite(g["estimate"]) & (g["n_texts"] >= min_n)].sort_values("n_texts")
        if len(g) < 2:
            continue
        first, final = g.iloc[0], g.iloc[-1]
        record = {"dataset": dataset, "estimator": estimator, "interval": interval, "k": k,
                  "n_small": first["n_texts"], "n_large": final["n_texts"], "at_small": first["estimate"],
                  "at_large": final["estimate"], "drift": final["estimate"] - first["estimate"],
                  "half_width_small": (first["upper"] - first["lower"]) / 2,
                  "drift_inside": bool(first["lower"] <= final["estimate"] <= first["upper"])}
        if interval == "rotation":
            record["drift_inside_jackknife"] = bool(
                first["lower_jackknife"] <= final["estimate"] <= first["upper_jackknife"])
        summary.append(record)
    summary = pd.DataFrame(summary)
    summary.to_csv(out / ("drift_summary.csv" if not min_n else f"drift_summary_from_{min_n}.csv"), index=False)
    print(summary.round(3).to_string(index=False))


def figure(frame: pd.DataFrame, path: str) -> None:
    """Estimate against N with its 90% interval, one panel per (dataset, k), one colour per (estimator,
    interval); filled markers where the row is flagged reliable, hollow where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    datasets, ks = sorted(frame["dataset"].unique()), sorted(frame["k"].unique())
    fig, axes = plt.subplots(len(datasets), len(ks), figsize=(3.6 * len(ks), 2.9 * len(datasets)), squeeze=False,
                             sharex="row")
    colours = {("plugin", "jackknife"): "tab:blue", ("richardson", "quadratic"): "tab:red",
               ("richardson", "jackknife"): "tab:orange"}
    for i, dataset in enumerate(datasets):
        for j, k in enumerate(ks):
            ax = axes[i, j]
            panel = frame[(frame["dataset"] == dataset) & (frame["k"] == k)]
            for n, ((estimator, interval), g) in enumerate(panel.groupby(["estimator", "interval"])):
                g = g.sort_values("n_texts")
                x = g["n_texts"] * (1 + 0.04 * (n - 0.5))  # side by side
                colour = colours.get((estimator, interval), f"C{n + 2}")
                ax.errorbar(x, g["estimate"], yerr=[g["estimate"] - g["lower"], g["upper"] - g["estimate"]],
                            color=colour, capsize=2, lw=1, label=f"{estimator}, {interval}")
                for reliable, face in ((True, colour), (False, "white")):
                    sel = g["reliable"].astype(str) == str(reliable)
                    ax.scatter(x[sel], g["estimate"][sel], color=colour, facecolors=face, zorder=3, s=24)
            ax.set_xscale("log")
            sizes = sorted(frame.loc[frame["dataset"] == dataset, "n_texts"].unique())  # each dataset's own N
            ax.set_xticks(sizes, [str(v) for v in sizes])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_title(f"{dataset}, k = {k}", fontsize=9)
            if j == 0:
                ax.set_ylabel("NTPS (theory)")
            if i == len(datasets) - 1:
                ax.set_xlabel("N texts (nested shard subsets)")
    axes[0, 0].legend(title="estimator, interval", fontsize=8, title_fontsize=8)
    device = frame["device"].fillna("cpu") if "device" in frame else pd.Series("cpu", index=frame.index)  # runs before --device: cpu
    devices = device.groupby(frame["dataset"]).agg(lambda d: "/".join(sorted(set(d))))
    fig.text(0.01, 0.005, "SmolLM2-135M, last layer; bars: 90% intervals over the subset's shards (jackknife-t, or "
             "the default quadratic interval); hollow markers: flagged unreliable (the rows' `reliable`);\n"
             "forward pass and estimates on " + ", ".join(f"{name}: {device}" for name, device in devices.items()), fontsize=7)
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
