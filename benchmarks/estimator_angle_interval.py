"""The default estimator's jackknife-t interval against the same interval on the angle scale, on
estimator-map draws (per-draw frames), for the rows the reliability flag accepts.

The angle-scale interval maps estimate -/+ t se through phi = arcsin(sqrt(NTPS)) with the delta
method (se_phi = se / sin(2 phi)) and back with sin^2, so it stays inside [0, 1]. Prints, per file,
the pooled coverage of both and, over cells with at least 10 accepted draws, how many cover below
0.85 or above 0.95 by an exact one-sided binomial test at 2.5%, and the mean widths. Example:

    python benchmarks/estimator_angle_interval.py benchmarks/results/estimator_map/richardson/*draws_d*.csv.gz
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import scipy.stats

from ntps_nb.core.estimators import NOISE_MAX

CELL = ["task_family", "task_n_classes", "task_gap", "n_over_d", "k"]
#: Estimates are clipped into [CLIP, 1 - CLIP] before the angle transform.
CLIP = 1e-6


def angle_interval(estimate, se, n_shards, level: float = 0.90) -> tuple[np.ndarray, np.ndarray]:
    """sin^2 of phi -/+ t se / sin(2 phi), phi = arcsin(sqrt(estimate)), t of S - 1 degrees of freedom."""
    t = scipy.stats.t.ppf((1 + level) / 2, np.asarray(n_shards) - 1)
    phi = np.arcsin(np.sqrt(np.clip(estimate, CLIP, 1 - CLIP)))
    half = t * se / np.sin(2 * phi)
    return np.sin(np.clip(phi - half, 0, np.pi / 2)) ** 2, np.sin(np.clip(phi + half, 0, np.pi / 2)) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draws", nargs="+")
    args = parser.parse_args()
    print("| file | accepted rows | coverage t / angle | cells 10+ | below 0.85 t / angle | above 0.95 t / angle "
          "| mean width t / angle |\n|---|---|---|---|---|---|---|")
    for path in args.draws:
        f = pd.read_csv(path)
        f = f[(f["estimator"] == "richardson") & (f["subspace_noise"] <= NOISE_MAX) & np.isfinite(f["lower"])].copy()
        lo, hi = angle_interval(f["estimate"], f["se"], f["n_shards"])
        f["cov_t"] = (f["lower"] <= f["truth"]) & (f["truth"] <= f["upper"])
        f["cov_a"], f["w_t"], f["w_a"] = (lo <= f["truth"]) & (f["truth"] <= hi), f["upper"] - f["lower"], hi - lo
        g = f.groupby(CELL).agg(n=("cov_t", "size"), t=("cov_t", "sum"), a=("cov_a", "sum"))
        g = g[g["n"] >= 10]

        def count(col):
            below = scipy.stats.binom.cdf(g[col], g["n"], 0.85) < 0.025
            above = scipy.stats.binom.sf(g[col] - 1, g["n"], 0.95) < 0.025
            return int(below.sum()), int(above.sum())

        (bt, at), (ba, aa) = count("t"), count("a")
        print(f"| {path.rsplit('/', 1)[-1]} | {len(f)} | {f['cov_t'].mean():.3f} / {f['cov_a'].mean():.3f} | {len(g)} "
              f"| {bt} / {ba} | {at} / {aa} | {f['w_t'].mean():.3f} / {f['w_a'].mean():.3f} |")


if __name__ == "__main__":
    main()
