# the edge cells' reliable rows (frames a-c, k = 2): bias and |bias| / mean width without and with the stationary
# widening (the estimate does not move; the width does)
import sys
import pandas as pd
sys.path.insert(0, "../../../../")
from unseen_family_check import stationary_widened
for name in ("edge_d16", "edge_d64", "edge_d256"):
    frame = pd.read_csv(f"{name}.csv.gz")
    frame = frame[frame["k"] == 2]
    widened = stationary_widened(frame)
    before, after = frame[frame["reliable"].astype(bool)], widened[widened["reliable"].astype(bool)]
    bias = (after["estimate"] - after["truth"]).mean()
    print(f"{name}: {len(after)} reliable rows, bias {bias:+.4f}; |bias| / mean width "
          f"{abs(bias) / (before['upper'] - before['lower']).mean():.3f} without, "
          f"{abs(bias) / (after['upper'] - after['lower']).mean():.3f} with")
