# A point estimate moved to the bound (a pretest estimator, the Hodges kind), measured on session 67's frames and not
# adopted: on each reliable row, every principal angle the stationary widening reaches (cos^2 within c = 3.42
# jackknife SEs of 0 or 1) is set to that bound in the point too, not only in the interval:
#     pretest = estimate + (stationary_upper - estimate) - (estimate - stationary_lower), clipped to [0, 1].
# Prints, for each cell of at least 10 reliable rows, the bias of the estimate and of the pretest point, |bias| / the
# cell's mean widened width, and the bias test's z (|bias| against a quarter of that width; z > 1.96 is biased), with
# the report's own cell table (unseen_family_check.cells).
# Run in this folder with the project's python: python pretest_point.py > pretest_point.txt
import sys
import numpy as np
import pandas as pd
sys.path.insert(0, "../../../../")
from rotation_flag_report import BIAS_Z
from unseen_family_check import cells, stationary_widened

FRAMES = ["edge_d16", "edge_d64", "edge_d256", "map_d16_lds", "map_d16_factor", "map_d64_lds", "map_d64_factor",
          "map_d256_lds"]
POINTS = ("estimate", "pretest")
biased = dict.fromkeys(POINTS, 0)
counted = 0
for name in FRAMES:
    frame = stationary_widened(pd.read_csv(f"../session67/{name}.csv.gz"))
    moved = (frame["stationary_upper"] - frame["estimate"]) - (frame["estimate"] - frame["stationary_lower"])
    pretest = frame.assign(estimate=np.clip(frame["estimate"] + moved, 0.0, 1.0))
    tables = {point: cells(f).query("counted").reset_index(drop=True) for point, f in zip(POINTS, (frame, pretest))}
    counted += len(tables["estimate"])
    for i, cell in tables["estimate"].iterrows():
        text = []
        for point, table in tables.items():
            row = table.loc[i]
            z = (abs(row["bias"]) - row["width"] / 4) / (row["sd"] / np.sqrt(row["size"]))
            biased[point] += int(row["biased"])
            text.append(f"{point} {row['bias']:+.4f} ({abs(row['bias']) / row['width']:.2f} of the width, z {z:+.1f})")
        print(f"{name:15s} {cell['task_family']} d={cell['task_d']} C={cell['task_n_classes']} {cell['task_gap']:9s} "
              f"seed {cell['task_seed']} k={cell['k']} truth {cell['truth']:.4f} rows {int(cell['size']):3d}: "
              + "; ".join(text))
for point in POINTS:
    print(f"{point}: {biased[point]} of {counted} counted cells biased (z > {BIAS_Z})")
