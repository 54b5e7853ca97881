"""Whether the simulated populations' sample moments ever tie next-token eigenvalues (`next_token_tied_ks`).

The estimator map's rows were computed before `eigengap_ratios` set gap_ratio_V to 0 at a tied k; they stand
only if no sample the map draws has such a tie. This draws sample moments of every family of
`ntps_nb.core.simulate.FAMILIES` at d = 16 and 64, C = 2, 6 and 20, the three gap regimes and N/d = 0.5, 1 and 4
(the small N where ties could arise; 3 draws each, 4 shards pooled), and prints per family and d the number
of sample moments, how many have a tied k, and the smallest gap between neighbouring next-token eigenvalues
over the largest, against the tolerance (r_V x eps).

    python benchmarks/next_token_ties_simulated.py
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def main() -> None:
    from ntps_nb.core.moments import Moments
    from ntps_nb.core.score import next_token_tie_tolerance, next_token_tied_ks, theory_geometry
    from ntps_nb.core.simulate import FAMILIES, sample_shards

    warnings.simplefilter("ignore")  # the interpolation warnings of N <= d
    rng = np.random.default_rng(7)
    print("$ python benchmarks/next_token_ties_simulated.py")
    print("family      d  moments  with a tied k  smallest gap / mu_1  its tolerance (r_V x eps)")
    for family, make in FAMILIES.items():
        for d in (16, 64):
            count, tied, smallest, tolerance = 0, 0, np.inf, np.nan
            for gap in ("separated", "moderate", "tied"):
                for C in (2, 6, 20):
                    try:
                        model = make(d=d, n_classes=C, gap=gap, seed=3)
                    except ValueError:  # a setting the family does not take (the reflection family's C = 2)
                        continue
                    for ratio in (0.5, 1, 4):
                        for _ in range(3):
                            shards = sample_shards(model, int(ratio * d), 4, rng)
                            mu = theory_geometry(Moments.combine(shards, [s.n_texts for s in shards]))
                            mu = mu.next_token_eigenvalues
                            count += 1
                            tied += bool(next_token_tied_ks(mu))
                            low = float(np.min(mu[:-1] - mu[1:]) / mu[0])
                            if low < smallest:
                                smallest, tolerance = low, next_token_tie_tolerance(mu) / mu[0]
            print(f"{family:<10} {d:3d}  {count:7d}  {tied:13d}  {smallest:19.1e}  {tolerance:.1e}")


if __name__ == "__main__":
    main()
