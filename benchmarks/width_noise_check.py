"""How uncertain is one `width_by_n` width? Its spread over draws from a population, against 1 / sqrt(2 (G - 1)).

Notebook 00, section 4, reads `width_by_n`'s widths as a function of N and says each width is itself an estimate,
read off G = ``n_groups`` units, uncertain by at least about 1 / sqrt(2 (G - 1)) of itself (the relative standard
error of a standard deviation from G normal values). This draws ``--draws`` independent samples of 4G shards from
one population (`ntps_nb.core.simulate`), runs `width_by_n` on each (the notebook's basic bootstrap at 95%), and
prints, per N, the mean width, the relative standard deviation of the widths over the draws (the uncertainty of
one width), its Monte Carlo SE, and the same for the jackknife SE, beside 1 / sqrt(2 (G - 1)).

    python benchmarks/width_noise_check.py --d 16 --family lds --draws 200 --n-boot 50
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ntps_nb.core.intervals import width_by_n  # noqa: E402
from ntps_nb.core.simulate import factor_model, lds_model, sample_shards  # noqa: E402


def relative_sd(values: np.ndarray) -> tuple[float, float]:
    """The relative standard deviation of ``values`` and its Monte Carlo SE (delta method, normal values)."""
    values = np.asarray(values, dtype=np.float64)
    cv = values.std(ddof=1) / values.mean()
    return cv, cv * np.sqrt(1 / (2 * (len(values) - 1)) + cv ** 2 / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--family", choices=("lds", "factor"), default="lds")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=8.0, help="N / d of the smallest subsample")
    parser.add_argument("--groups", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=50)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make = lds_model if args.family == "lds" else factor_model
    model = make(d=args.d, n_classes=args.classes, n_tokens=8, seed=args.seed)
    n_shards = 4 * args.groups
    n_texts = int(round(args.ratio * args.d)) * 4  # the smallest subsample (a quarter) holds ratio * d texts
    rng = np.random.default_rng(args.seed + 1)
    frames = []
    for draw in range(args.draws):
        shards = sample_shards(model, n_texts, n_shards, rng)
        frames.append(width_by_n(shards, args.k, n_groups=args.groups, n_boot=args.n_boot, seed=draw).assign(draw=draw))
    table = pd.concat(frames, ignore_index=True)
    print(f"{args.family}, d = {args.d}, C = {args.classes}, k = {args.k}, {args.draws} draws of {n_shards} shards, "
          f"{args.groups} groups, n_boot = {args.n_boot}; "
          f"1 / sqrt(2 (G - 1)) = {1 / np.sqrt(2 * (args.groups - 1)):.3f}")
    print("   n_texts  mean width  rel. SD of width (MC SE)  rel. SD of jackknife SE (MC SE)")
    for n, rows in table.groupby("n_texts"):
        w, w_se = relative_sd(rows["width"])
        j, j_se = relative_sd(rows["se_jackknife"])
        print(f"  {n:8d}  {rows['width'].mean():10.4f}  {w:14.3f} ({w_se:.3f})  {j:20.3f} ({j_se:.3f})")


if __name__ == "__main__":
    main()
