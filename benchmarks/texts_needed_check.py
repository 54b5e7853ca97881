"""Can one sample say how many texts a reliable row needs? A scaling projection from the flag's statistics, checked.

`ntps_estimate`'s flag accepts next to nothing below N/d = 8, so a user at smaller N would like to know how many texts
would make a row reliable. The flag's two data conditions have a natural scaling: the jackknife subspace noise falls
like 1 / N and the eigengap ratio grows like sqrt(N) where the sample gap is consistent. From one row at N0 texts
that gives the projection

    N* = N0 max(subspace_noise / NOISE_MAX, (GAP_MIN / gap_ratio)^2, 1).

This checks it where the truth is known: for each population (LDS and factor families, C = 2 and 6, separated and
moderate gaps; `ntps_nb.core.simulate`), draws at N0 = 2d, 4d and 8d texts (10 shards), projects N* at k = 1, 2, 4,
then draws fresh samples of N* / 2, N* and 2 N* texts from the same population and records whether their row at
that k is reliable (the whole default flag), and at N* whether the noise and the eigengap conditions hold. A
projection above ``--cap`` d texts, or undefined (a NaN statistic), is counted as not finite and not followed.
Printed per population and k, and pooled by N0 / d: the share of finite projections, the median N* / d and the
acceptance at each multiple. A calibrated projection would have the flag accept about half the rows at N*.

    python benchmarks/texts_needed_check.py --d 16 --draws 20
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ntps_nb.core.estimators import GAP_MIN, NOISE_MAX, ntps_estimate  # noqa: E402
from ntps_nb.core.simulate import factor_model, lds_model, sample_shards  # noqa: E402

KS = [1, 2, 4]
MULTIPLES = {"half": 0.5, "at": 1.0, "twice": 2.0}


def projection(frame: pd.DataFrame, n_texts: int) -> np.ndarray:
    """N* of each row of an `ntps_estimate` frame at ``n_texts`` (NaN where a statistic is NaN)."""
    return n_texts * np.maximum.reduce([frame["subspace_noise"] / NOISE_MAX, (GAP_MIN / frame["gap_ratio"]) ** 2,
                                        np.ones(len(frame))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--cap", type=float, default=200.0, help="largest projection followed, in texts per dimension")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the small-N rows' interpolation and tie warnings, expected here
    rng = np.random.default_rng(args.seed)
    rows = []
    for family, make in (("lds", lds_model), ("factor", factor_model)):
        for C in (2, 6):
            for gap in ("separated", "moderate"):
                model = make(d=args.d, n_classes=C, n_tokens=8, gap=gap, seed=11)
                for ratio in args.ratios:
                    n0 = ratio * args.d
                    for draw in range(args.draws):
                        frame = ntps_estimate(sample_shards(model, n0, 10, rng), KS)
                        for k, projected in zip(KS, projection(frame, n0)):
                            row = dict(family=family, C=C, gap=gap, ratio=ratio, k=k, draw=draw, projected=projected)
                            if np.isfinite(projected) and projected <= args.cap * args.d:
                                for name, multiple in MULTIPLES.items():
                                    n = max(int(projected * multiple), 40)
                                    at = ntps_estimate(sample_shards(model, n, 10, rng), [k])
                                    row[name] = float(at["reliable"].iloc[0])
                                    if name == "at":
                                        row["noise_ok"] = float(at["subspace_noise"].iloc[0] <= NOISE_MAX)
                                        row["gap_ok"] = float(at["gap_ratio"].iloc[0] >= GAP_MIN)
                            rows.append(row)
    table = pd.DataFrame(rows)
    table["finite"] = table["half"].notna()
    columns = ["finite", "half", "at", "twice", "noise_ok", "gap_ok"]
    print(f"d = {args.d}, {args.draws} draws a population and N0, 10 shards, projections above {args.cap:g} d not "
          f"followed; acceptance of the whole flag at N* / 2, N*, 2 N*, and the two projected conditions at N*")
    per_cell = table.groupby(["family", "C", "gap", "k"]).agg(
        **{c: (c, "mean") for c in columns}, median_projected_per_d=("projected", lambda p: np.nanmedian(p) / args.d))
    print(per_cell.round(2).to_string())
    print("pooled by N0 / d:")
    print(table.groupby("ratio")[columns].agg("mean").round(2).to_string())
    print(f"rows followed: {int(table['finite'].sum())} of {len(table)}")


if __name__ == "__main__":
    main()
