"""Does `estimate_by_n`'s drift check read right where the truth is known?

`ntps_nb.core.estimators.estimate_by_n` says an estimate that leaves its smallest-N interval has not settled.
On populations whose NTPS is known (`ntps_nb.core.simulate`), this draws one extraction of 4 G shards per draw
(``--groups`` G, default 5: 20 shards), runs `estimate_by_n` (G groups: the first G, 2 G and 4 G shards) for the
plug-in and the default estimator, and prints per (family, N/d of the smallest subsample, k, estimator):

- cover_first: how often the smallest-N interval holds the population value (all rows; and the rows the flag
  accepts, with their count), and width_first, its mean width;
- inside: how often the largest-N estimate lies in the smallest-N interval (`inside_first`);
- drift: the mean of largest-N estimate less smallest-N estimate, with its Monte Carlo SE, and the bias of the
  largest-N estimate.

For an estimator that has settled (unbiased at both sizes), the largest-N estimate differs from the smallest-N
one by noise of about sqrt(3/4) of the smallest-N SE (the smaller sample is nested in the larger), so `inside`
should be at least about the interval's coverage (a calibrated 90% interval: P(|Z| < 1.645 / sqrt(3/4)) = 0.94); a biased estimator drifts toward the truth as N grows and
leaves its first interval more often.

    python benchmarks/estimate_by_n_check.py --draws 300 --ratios 4 32 128 > benchmarks/results/estimate_by_n/d16.txt
    python benchmarks/estimate_by_n_check.py --draws 300 --ratios 4 32 128 --groups 10 \
        > benchmarks/results/estimate_by_n/d16_groups10.txt

The same texts in 40 shards instead of 20 (``--groups 10``) give every subsample twice the groups at the same N.
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ntps_nb.core.estimators import estimate_by_n  # noqa: E402
from ntps_nb.core.simulate import factor_model, lds_model, sample_shards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--ratios", type=int, nargs="+", default=[4, 32], help="N/d of the smallest subsample")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=48)
    parser.add_argument("--groups", type=int, default=5, help="groups of every subsample; the extraction has 4x")
    parser.add_argument("--families", nargs="+", choices=("lds", "factor"), default=["lds", "factor"])
    args = parser.parse_args()
    families = {"lds": lambda: lds_model(d=args.d, n_classes=3, gap="separated", seed=args.seed),
                "factor": lambda: factor_model(d=args.d, n_classes=3, seed=args.seed)}
    families = {name: families[name]() for name in args.families}
    rows = []
    for name, model in families.items():
        truth = dict(zip(args.ks, model.population_ntps(args.ks)))
        for ratio in args.ratios:
            n_texts = 4 * ratio * args.d  # the smallest subsample holds a quarter of the shards
            for draw in range(args.draws):
                shards = sample_shards(model, n_texts, 4 * args.groups, np.random.default_rng([args.seed, ratio, draw]))
                for estimator in ("plugin", "richardson"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        table = estimate_by_n(shards, args.ks, n_groups=args.groups, estimator=estimator)
                    for k, g in table.groupby("k"):
                        first, final = g.iloc[0], g.iloc[-1]
                        rows.append({"family": name, "ratio": ratio, "k": k, "estimator": estimator,
                                     "truth": truth[k], "covers_first": first["lower"] <= truth[k] <= first["upper"],
                                     "reliable_first": bool(first["reliable"]),
                                     "width_first": first["upper"] - first["lower"],
                                     "inside": first["lower"] <= final["estimate"] <= first["upper"],
                                     "drift": final["estimate"] - first["estimate"],
                                     "bias_final": final["estimate"] - truth[k]})
    frame = pd.DataFrame(rows)
    summary = []
    for key, g in frame.groupby(["family", "ratio", "k", "estimator"]):
        kept = g[g["reliable_first"]]
        summary.append(dict(zip(["family", "N/d", "k", "estimator"], key), truth=g["truth"].iloc[0],
                            cover_first=g["covers_first"].mean(), width_first=g["width_first"].mean(),
                            reliable=len(kept),
                            cover_first_reliable=kept["covers_first"].mean() if len(kept) else np.nan,
                            inside=g["inside"].mean(),
                            inside_reliable=kept["inside"].mean() if len(kept) else np.nan,
                            drift=g["drift"].mean(), drift_mcse=g["drift"].std(ddof=1) / np.sqrt(len(g)),
                            bias_final=g["bias_final"].mean()))
    print(f"d = {args.d}, 3 classes, {4 * args.groups} shards, subsamples of {args.groups} groups, {args.draws} draws "
          "a cell, 90% intervals "
          f"(binomial SE of a rate near 0.9: {np.sqrt(0.09 / args.draws):.3f})")
    print(pd.DataFrame(summary).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
