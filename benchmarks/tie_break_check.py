"""Why the flag fails at d = 64, LDS, C = 2, moderate gaps, k = 1: a near-tie of the perception problem.

For each population (seed) of that design: the population's two perception eigenvalues and the
share of each perception direction inside the population's V_1 (``projected``: NTPS at k = 1 is the
first; a sample that swaps u_1 and u_2 reads the second); then over ``--draws`` samples of N = 32 d
texts in 10 shards (seeded as `ntps_nb.core.simulate.estimator_map` seeds them) the perception gap
at k_U = 1 (lambda_1 - lambda_2): its mean and SD across draws against its median delete-one-shard
jackknife SE, the population gap over that SD (the ratio the flag's eigengap condition estimates, to
compare with `GAP_MIN`), how often the sample ratio passes `GAP_MIN` against how often it would if the
SE in its denominator were exact (a normal sample gap), and the draws the flag accepts with their
coverage. Example
(docs/estimator.md):

    python benchmarks/tie_break_check.py --seeds 15 23 24 25 26 --draws 100
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import scipy.stats
from threadpoolctl import threadpool_limits

from ntps_nb.core.estimators import GAP_MIN, ntps_estimate
from ntps_nb.core.score import theory_geometry
from ntps_nb.core.simulate import lds_model, sample_shards

D = 64
RATIO = 32


def one_population(seed: int, draws: int) -> dict:
    """The population facts and the draws' summary for one seed of the design."""
    model = lds_model(d=D, n_classes=2, n_tokens=8, signal=0.5, gap="moderate", seed=seed)
    geometry = theory_geometry(model.population_moments())
    rows = []
    for draw in range(draws):
        # as estimator_map seeds a draw: [seed, model index 0, round(ratio * 1000), draw]
        shards = sample_shards(model, RATIO * D, 10, np.random.default_rng([seed, 0, RATIO * 1000, draw]))
        rows.append(ntps_estimate(shards, [1], seed=draw, interval="jackknife").iloc[0])
    t = pd.DataFrame(rows)
    truth = geometry.projected[0, 0]
    covered = (t["lower"] <= truth) & (truth <= t["upper"])
    accepted = t["reliable"].astype(bool)
    gap = geometry.eigenvalues[0] - geometry.eigenvalues[1]
    return {"seed": seed, "lambda_1": geometry.eigenvalues[0], "lambda_2": geometry.eigenvalues[1],
            "u1_in_V1 (truth)": truth, "u2_in_V1": geometry.projected[0, 1], "draws": draws,
            "gap_mean": t["gap_U"].mean(), "gap_sd": t["gap_U"].std(),
            "gap_median_se": (t["gap_U"] / t["gap_ratio_U"]).median(),
            "population_gap_ratio": gap / t["gap_U"].std(),
            # how often the sample ratio passes GAP_MIN, against a normal sample gap over a known SE
            "share_ratio_ge_gap_min": float(np.mean(t["gap_ratio_U"] >= GAP_MIN)),
            "normal_share": float(scipy.stats.norm.sf(GAP_MIN - gap / t["gap_U"].std())),
            "accepted": int(accepted.sum()),
            "accepted_coverage": covered[accepted].mean() if accepted.any() else np.nan,
            "accepted_gap_ratio_median": t.loc[accepted, "gap_ratio_U"].median() if accepted.any() else np.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[15, 23, 24, 25, 26])
    parser.add_argument("--draws", type=int, default=100)
    args = parser.parse_args()
    with threadpool_limits(1):
        table = pd.DataFrame([one_population(s, args.draws) for s in args.seeds])
    pd.set_option("display.width", 250)
    print(f"d = {D}, LDS, C = 2, moderate gaps, N/d = {RATIO}, k = 1; GAP_MIN = {GAP_MIN:g}\n")
    print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
