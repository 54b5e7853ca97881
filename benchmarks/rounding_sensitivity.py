"""How far do rounding-sized changes of the moments move NTPS estimates on real data?

Runs of the same texts on different devices (or package versions) agree from N ~ 1,000 texts on and
not below it (trec6, `real_data_drift.py --compare`). This perturbs each shard's moments entrywise by
independent normal noise of SD ``--relative`` times the entry (6e-8: float32 rounding of the products),
one matrix family at a time (C0 and C1 / Sxx / Sxy), and prints the largest change of the default
estimate and of its jackknife-t lower bound over ``--repeats`` perturbations, for each nested subset of
`real_data_drift.py` (the first G, 2G, ... fine shards regrouped into G shards) up to ``--max-fine``.
Reads a shard cache written by ``real_data_drift.py --shard-cache``. Perturbing Sxx entrywise can
also lift part of its null space (rank N below d) above the range tolerance, so its column may
overstate what float32 products do there; perturbing Sxy or C0 / C1 leaves Sxx's range as it is.

    python benchmarks/rounding_sensitivity.py DIR/smollm2-135m__trec6__0_256_512.pkl --groups 16 --max-fine 128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data_drift import nested_subsets  # noqa: E402

from ntps_nb.core.estimators import _halves, _pooled, ntps_estimate  # noqa: E402
from ntps_nb.core.intervals import theory_values  # noqa: E402
from ntps_nb.core.score import theory_geometry  # noqa: E402

#: A plug-in whose NTPS changes by more than this under the perturbation is listed by ``--trace``.
MOVED = 1e-4

FAMILIES = {"C0+C1": ("C0", "C1"), "Sxx": ("Sxx",), "Sxy": ("Sxy",)}
SYMMETRIC = ("C0", "Sxx")


def perturbed(shards: list, names: tuple[str, ...], relative: float, rng: np.random.Generator) -> list:
    """The shards with each named matrix perturbed entrywise (symmetrically where it is symmetric)."""
    out = []
    for shard in shards:
        changes = {}
        for name in names:
            value = getattr(shard, name)
            noise = rng.standard_normal(value.shape) * relative * np.abs(value)
            changes[name] = value + ((noise + noise.T) / 2 if name in SYMMETRIC else noise)
        out.append(dataclasses.replace(shard, **changes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="a pickle of real_data_drift.py --shard-cache")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--max-fine", type=int, default=128, help="largest nested subset (fine shards)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--relative", type=float, default=6e-8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", action="store_true",
                        help="instead: with Sxy perturbed (no range decision changes), the plug-ins of richardson's "
                             "estimate and replicates whose value moves, with their texts, Sxx rank and perception "
                             "eigenvalues against the class counts")
    args = parser.parse_args()
    with open(args.cache, "rb") as handle:
        shards = pickle.load(handle)
    if args.trace:
        trace(shards, args)
        return
    rng = np.random.default_rng(args.seed)
    print(f"{Path(args.cache).name}: entrywise relative noise {args.relative:g}, {args.repeats} draws, k = {args.ks}, "
          "richardson; largest |change| of the estimate and of the lower bound over k and draws")
    warnings.simplefilter("ignore", RuntimeWarning)
    for n_fine, subset in nested_subsets(shards, args.groups):
        if n_fine > args.max_fine:
            break
        base = ntps_estimate(subset, args.ks, rotation_flag=False, interval="jackknife")
        cells = []
        for label, names in FAMILIES.items():
            estimate = lower = 0.0
            for _ in range(args.repeats):
                frame = ntps_estimate(perturbed(subset, names, args.relative, rng), args.ks, rotation_flag=False,
                                       interval="jackknife")
                estimate = max(estimate, float((frame["estimate"] - base["estimate"]).abs().max()))
                lower = max(lower, float((frame["lower"] - base["lower"]).abs().max()))
            cells.append(f"{label} {estimate:.1e} / {lower:.1e}")
        print(f"  {int(base['n_texts'].iloc[0]):5d} texts: " + "; ".join(cells), flush=True)


def trace(shards: list, args) -> None:
    """Per nested subset: the full sample's and each leave-one-group-out replicate's plug-ins (pooled,
    and the two halves richardson uses), those whose NTPS moves by more than `MOVED` at some k when
    Sxy is perturbed, with their number of texts, the rank of their Sxx and their perception
    eigenvalues beside the class counts (Y^T Y's diagonal): equal where the labels are fitted exactly;
    and in how many plug-ins a rank decision (rank(Sxx), m, r_V) changed."""
    print(f"{Path(args.cache).name}: Sxy perturbed entrywise by relative noise {args.relative:g} (one draw); "
          f"k = {args.ks}; plug-ins of richardson (seed 0 split) moving by more than {MOVED:g}")
    ks = np.asarray(args.ks)
    for n_fine, subset in nested_subsets(shards, args.groups):
        if n_fine > args.max_fine:
            break
        moved = perturbed(subset, ("Sxy",), args.relative, np.random.default_rng(args.seed))
        count = flips = solves = 0
        for drop in [None, *range(len(subset))]:
            parts = [("pooled", _pooled(subset, drop), _pooled(moved, drop))]
            halves = zip("ab", _halves(subset, 0, drop), _halves(moved, 0, drop))
            parts += [(f"half {side}", a, b) for side, a, b in halves]
            for name, before, after in parts:
                g, h = theory_geometry(before), theory_geometry(after)
                solves += 1
                flips += (g.r_U, g.m, g.r_V) != (h.r_U, h.m, h.r_V)
                change = np.abs(theory_values(g, ks) - theory_values(h, ks))
                if np.nanmax(change) > MOVED:
                    count += 1
                    counts = np.sort(np.diag(before.Syy))[::-1]
                    print(f"    {'full' if drop is None else f'drop {drop}'} {name}: {before.n_texts} texts, "
                          f"rank(Sxx) {g.r_U}, |change| {np.nanmax(change):.3f}; eigenvalues "
                          f"{np.round(g.eigenvalues, 6).tolist()}, class counts {counts[counts > 0].tolist()}")
        print(f"  {int(sum(s.n_texts for s in subset)):5d} texts: {count} of {solves} plug-ins moved; "
              f"rank(Sxx), m or r_V changed in {flips}", flush=True)


if __name__ == "__main__":
    main()
