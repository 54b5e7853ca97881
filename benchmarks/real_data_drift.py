"""Does an NTPS estimate settle as texts are added? Real data, nested subsets of one extraction.

For each dataset: one pass of SmolLM2-135M over up to 2,000 train texts (last layer, 32 random
shards); the first 4, 8, 16, 32 shards are nested subsets (N ~ 250, 500, 1000, 2000). Every
estimator's value at k in {2, 8, 32} at each N, with its jackknife 90% interval (over the shards
of that subset). An estimator whose value still moves from the smallest to the largest N by more
than its interval at the smallest N is not estimating a fixed quantity at these sizes.

    python benchmarks/real_data_drift.py --datasets rt-polarity trec6 --out benchmarks/results/real_data_drift
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
from ntps_nb.core.intervals import layer_shards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--datasets", nargs="+", default=["rt-polarity", "trec6"])
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--estimators", nargs="+", default=["plugin", "adjusted", "wishart"])
    parser.add_argument("--out", default="benchmarks/results/real_data_drift")
    parser.add_argument("--from-csv", help="summarise an earlier run's drift.csv instead of running")
    parser.add_argument("--shard-cache", help="folder keeping each dataset's last-layer shard moments (pickle): "
                        "written after its forward pass, read instead of the pass when present")
    args = parser.parse_args()
    out = Path(args.out)
    if args.from_csv:
        out.mkdir(parents=True, exist_ok=True)
        summarise(pd.read_csv(args.from_csv), out)
        return

    import torch

    from ntps_nb.datasets import load_dataset
    from ntps_nb.extract import extract
    from ntps_nb.models import load_model

    torch.set_num_threads(1)
    model, tok, info = load_model(args.model)
    last = model.config.num_hidden_layers
    rows = []
    for name in args.datasets:
        cached = Path(args.shard_cache) / f"{args.model}__{name}__{args.max_train}_{args.max_length}_{args.shards}.pkl" \
            if args.shard_cache else None
        if cached is not None and cached.exists():
            shards = pickle.loads(cached.read_bytes())
        else:
            data = load_dataset(name, max_train=args.max_train, max_test=10)["train"]
            ex = extract(model, tok, data, layers=[last], max_length=args.max_length, shards=args.shards,
                         shard_layers=[last], progress=False)
            shards = layer_shards(ex.shards)[last]
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.with_suffix(".tmp").write_bytes(pickle.dumps(shards))
                cached.with_suffix(".tmp").replace(cached)
        for n_used in (4, 8, 16, 32):
            if n_used > len(shards):
                break
            for estimator in args.estimators:
                table = ntps_estimate(shards[:n_used], args.ks, estimator=estimator, level=0.90)
                rows.append(table.assign(dataset=name, model=args.model, layer=last, n_shards_used=n_used,
                                         max_length=args.max_length))
        print(name, "done", flush=True)
    frame = pd.concat(rows, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "drift.csv", index=False)
    summarise(frame, out)


def summarise(frame: pd.DataFrame, out: Path) -> None:
    """Drift from the smallest N where the estimator is defined to the largest, against the
    jackknife interval at that smallest N."""
    summary = []
    for (dataset, estimator, k), g in frame.groupby(["dataset", "estimator", "k"]):
        g = g[np.isfinite(g["estimate"])].sort_values("n_texts")
        if len(g) < 2:
            continue
        first, final = g.iloc[0], g.iloc[-1]
        summary.append({"dataset": dataset, "estimator": estimator, "k": k, "n_small": first["n_texts"],
                        "n_large": final["n_texts"], "at_small": first["estimate"], "at_large": final["estimate"],
                        "drift": final["estimate"] - first["estimate"],
                        "half_width_small": (first["upper"] - first["lower"]) / 2,
                        "drift_inside": bool(first["lower"] <= final["estimate"] <= first["upper"])})
    summary = pd.DataFrame(summary)
    summary.to_csv(out / "drift_summary.csv", index=False)
    print(summary.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
