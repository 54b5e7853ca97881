"""Which sampled moments make an NTPS estimator biased? `ntps_nb.core.simulate.bias_decomposition`
on a few generators, printed as one markdown table per hidden size.

    python benchmarks/bias_decomposition.py --d 16 64 --ratio 4 --draws 30
(the run quoted in docs/estimator.md).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pandas as pd  # noqa: E402

from ntps_nb.core.simulate import bias_decomposition, factor_model, lds_model  # noqa: E402

GENERATORS = [("lds", lds_model, 2, "separated"), ("lds", lds_model, 6, "separated"), ("lds", lds_model, 2, "tied"),
              ("factor", factor_model, 2, "separated"), ("factor", factor_model, 6, "separated")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[16])
    parser.add_argument("--ratio", type=float, default=4.0, help="N / d")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--estimators", nargs="+", default=["plugin", "adjusted", "wishart", "debiased", "crossfit"])
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=8, help="tokens per text T")
    args = parser.parse_args()
    for d in args.d:
        frames = []
        for family, make, C, gap in GENERATORS:
            model = make(d=d, n_classes=C, n_tokens=args.tokens, gap=gap, seed=3)
            frames.append(bias_decomposition(model, int(args.ratio * d), args.ks, estimators=args.estimators,
                                             n_draws=args.draws).assign(generator=f"{family} C={C} {gap}"))
        table = pd.concat(frames)
        wide = table.pivot_table(index=["generator", "k", "estimator"], columns="sampled", values="bias",
                                 sort=False).round(3)
        truth = table.groupby(["generator", "k"], sort=False)["truth"].first().round(3)
        wide.insert(0, "truth", [truth[(g, k)] for g, k, _ in wide.index])
        mcse = table["bias_mcse"].median()
        print(f"\nd = {d}, N = {int(args.ratio * d)} texts (N/d = {args.ratio:g}) of T = {args.tokens} tokens, {args.draws} draws; "
              f"bias = mean(estimate - population NTPS); median Monte Carlo SE {mcse:.3f}\n")
        print("| generator | k | estimator | " + " | ".join(wide.columns) + " |")
        print("|" + "---|" * (3 + wide.shape[1]))
        for (g, k, e), row in wide.iterrows():
            print(f"| {g} | {k} | {e} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
