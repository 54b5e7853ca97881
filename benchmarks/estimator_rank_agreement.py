"""Do two studies' theory NTPS rank the datasets alike at configurations fixed in advance?

Reads two combined studies of the same models and datasets (default: the default study, plug-in,
and default-richardson) and, per network, at 3 layers (first, middle, last) x 5 k, prints the
Spearman rho between the two studies' NTPS across datasets and each study's rho with the held-out
probe accuracy of the last layer. The README's "why the numbers move" paragraph quotes its summary
lines. Usage:

    python benchmarks/estimator_rank_agreement.py [STUDY_A STUDY_B]
"""

from __future__ import annotations

import sys

import pandas as pd
from scipy.stats import spearmanr

KS = (1, 2, 8, 32, 128)


def agreement(a: str, b: str) -> pd.DataFrame:
    ntps_a = pd.read_csv(f"{a}/ntps.csv").query("variant == 'theory'")
    ntps_b = pd.read_csv(f"{b}/ntps.csv").query("variant == 'theory'")
    probes = pd.read_csv(f"{a}/probes.csv").query("protocol == 'heldout'")
    rows = []
    for model in ntps_b["model"].unique():
        last = int(probes.query("model == @model")["layer"].max())
        accuracy = probes.query("model == @model and layer == @last").set_index("dataset")["accuracy"]
        for layer in (0, last // 2, last):
            for k in KS:
                pick = "model == @model and layer == @layer and k == @k"
                x = ntps_a.query(pick).set_index("dataset")["ntps"]
                y = ntps_b.query(pick).set_index("dataset")["ntps"]
                common = x.index.intersection(y.index).intersection(accuracy.index)
                rows.append({"model": model, "layer": layer, "k": k, "n_datasets": len(common),
                             "rho_between": spearmanr(x[common], y[common])[0],
                             "rho_accuracy_a": spearmanr(x[common], accuracy[common])[0],
                             "rho_accuracy_b": spearmanr(y[common], accuracy[common])[0]})
    return pd.DataFrame(rows)


def main() -> None:
    a, b = sys.argv[1:3] if len(sys.argv) > 2 else ("data/results/default", "data/results/default-richardson")
    table = agreement(a, b)
    print(f"A = {a}, B = {b}")
    print(table.round(3).to_string(index=False))
    diff = (table["rho_accuracy_a"] - table["rho_accuracy_b"]).abs()
    print(f"\nrho between A and B across datasets: min {table['rho_between'].min():.2f}, "
          f"median {table['rho_between'].median():.2f}, max {table['rho_between'].max():.2f} "
          f"({len(table)} (network, layer, k) configurations)")
    print(f"|rho with accuracy, A - B|: median {diff.median():.2f}, max {diff.max():.2f}")


if __name__ == "__main__":
    main()
