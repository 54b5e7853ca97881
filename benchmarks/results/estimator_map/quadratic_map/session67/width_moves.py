# the stationary widening's moves on the fresh interior frames (d) and (e): width ratios, k, rows at all of [0, 1]
import glob, sys
import pandas as pd
sys.path.insert(0, "../../../../")
from unseen_family_check import stationary_widened
frame = pd.concat(map(pd.read_csv, sorted(glob.glob("map_d16_*.csv.gz") + glob.glob("map_d64_*.csv.gz"))),
                  ignore_index=True)
widened = stationary_widened(frame)
kept = widened[widened["reliable"].astype(bool)]
moved = kept[kept["stationary_moved"]]
ratio = (moved["upper"] - moved["lower"]) / (frame.loc[moved.index, "upper"] - frame.loc[moved.index, "lower"])
print(f"reliable rows {len(kept)}, moved {len(moved)}")
print("width / width before, moved rows: quantiles 0.5 / 0.9 / 0.99 / max:",
      " / ".join(f"{q:.3f}" for q in ratio.quantile([0.5, 0.9, 0.99]).tolist() + [ratio.max()]))
print("moved rows by k:", moved["k"].value_counts().sort_index().to_dict())
print("reliable rows at all of [0, 1] after it:", int(((kept["lower"] <= 1e-9) & (kept["upper"] >= 1 - 1e-9)).sum()))
