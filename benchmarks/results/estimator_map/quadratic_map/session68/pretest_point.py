# A point estimate moved to the bound (a pretest estimator, the Hodges kind), measured on session 67's frames and not
# adopted: on each reliable row, every principal angle the stationary widening reaches (cos^2 within c = 3.42
# jackknife SEs of 0 or 1) is set to that bound in the point too, not only in the interval:
#     pretest = estimate + (stationary_upper - estimate) - (estimate - stationary_lower), clipped to [0, 1].
# Prints, for each cell of at least 10 reliable rows, the bias of the estimate and of the pretest point, |bias| / the
# cell's mean widened width, and the bias test's z (|bias| against a quarter of that width; z > 1.96 is biased).
# Run in this folder with the project's python: python pretest_point.py > pretest_point.txt
import sys
import numpy as np
import pandas as pd
sys.path.insert(0, "../../../../")
from unseen_family_check import stationary_widened

FRAMES = ["edge_d16", "edge_d64", "edge_d256", "map_d16_lds", "map_d16_factor", "map_d64_lds", "map_d64_factor",
          "map_d256_lds"]
KEYS = ["task_family", "task_d", "task_n_classes", "task_gap", "task_seed", "n_over_d", "k"]
biased = {"estimate": [], "pretest": []}
for name in FRAMES:
    frame = stationary_widened(pd.read_csv(f"../session67/{name}.csv.gz"))
    rows = frame[frame["reliable"].astype(bool)].copy()
    moved = (rows["stationary_upper"] - rows["estimate"]) - (rows["estimate"] - rows["stationary_lower"])
    rows["pretest"] = np.clip(rows["estimate"] + moved, 0.0, 1.0)
    width = rows["upper"] - rows["lower"]
    for key, cell in rows.groupby(KEYS, dropna=False):
        if len(cell) < 10:
            continue
        truth, w = cell["truth"].iloc[0], width[cell.index].mean()
        text = []
        for column in biased:
            error = cell[column] - truth
            z = (abs(error.mean()) - w / 4) / (error.std(ddof=1) / np.sqrt(len(cell)))
            biased[column].append(z > 1.96)
            text.append(f"{column} {error.mean():+.4f} ({abs(error.mean()) / w:.2f} of the width, z {z:+.1f})")
        family, d, classes, gap, seed, _, k = key
        print(f"{name:15s} {family} d={d} C={classes} {gap:9s} seed {seed} k={k} truth {truth:.4f} "
              f"rows {len(cell):3d}: " + "; ".join(text))
for column, flags in biased.items():
    print(f"{column}: {sum(flags)} of {len(flags)} counted cells biased (z > 1.96)")
