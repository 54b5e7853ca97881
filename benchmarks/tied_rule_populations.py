"""Which populations are like the nearly tied one? (issue 21, item 4's lower side; docs/estimator.md, "Fresh
populations like the nearly tied one", sessions 61 and 62.)

Session 59's population below the band (LDS, d = 16, C = 2, "separated", seed 341, k = 1: the flag's rows cover 61
of 83) has the perception problem's first two eigenvalues a relative gap of 0.30 apart and its truth at k = 1 (0.547)
mid-range, where a rotation of u_1 in that nearly tied plane moves NTPS the most. The rule picks populations of the
same kind from their population values alone, before any draw: the first relative gap (u_1 - u_2) / u_1 at most
``--max-gap`` (0.32) and the truth at k = 1 in ``--truth`` (0.25 0.75). This script tables each seed's values and
prints the seeds the rule keeps, for `unseen_family_check.py --seeds` (session 61 ran the same rule as a one-off loop,
its runs.txt).

    python benchmarks/tied_rule_populations.py --family lds --d 16 --classes 2 --gap separated --seeds 430 470
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntps_nb.core.score import theory_geometry  # noqa: E402
from ntps_nb.core.simulate import FAMILIES  # noqa: E402


def rule_values(family: str, d: int, n_classes: int, gap: str, seed: int) -> tuple[float, float]:
    """(the perception problem's first relative eigengap, the population NTPS at k = 1) of one population."""
    model = FAMILIES[family](d=d, n_classes=n_classes, gap=gap, seed=seed)
    u = theory_geometry(model.population_moments()).eigenvalues
    return float((u[0] - u[1]) / u[0]), float(model.population_ntps(np.array([1]))[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="lds", choices=sorted(FAMILIES))
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--gap", default="separated")
    parser.add_argument("--seeds", type=int, nargs=2, default=[430, 470], metavar=("FIRST", "STOP"),
                        help="population seeds FIRST .. STOP - 1")
    parser.add_argument("--max-gap", type=float, default=0.32)
    parser.add_argument("--truth", type=float, nargs=2, default=[0.25, 0.75], metavar=("LOW", "HIGH"))
    args = parser.parse_args()
    kept = []
    for seed in range(*args.seeds):
        gap, truth = rule_values(args.family, args.d, args.classes, args.gap, seed)
        chosen = gap <= args.max_gap and args.truth[0] <= truth <= args.truth[1]
        kept += [seed] if chosen else []
        print(f"{args.family} d={args.d} C={args.classes} {args.gap} seed {seed}: first relative gap {gap:.3f}, "
              f"truth at k = 1 {truth:.3f}{'  kept' if chosen else ''}")
    print(f"kept ({len(kept)} of {args.seeds[1] - args.seeds[0]}):", " ".join(map(str, kept)))


if __name__ == "__main__":
    main()
