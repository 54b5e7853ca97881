# the edge cells' reliable rows (frames a-c, k = 2): bias and |bias| / mean width without and with the stationary
# widening (the estimate does not move; the width does), and their coverage with it, with the exact one-sided binomial
# p above 0.95
import sys
import pandas as pd
import scipy.stats
sys.path.insert(0, "../../../../")
from unseen_family_check import stationary_widened
for name in ("edge_d16", "edge_d64", "edge_d256"):
    frame = pd.read_csv(f"{name}.csv.gz")
    frame = frame[frame["k"] == 2]
    widened = stationary_widened(frame)
    before, after = frame[frame["reliable"].astype(bool)], widened[widened["reliable"].astype(bool)]
    bias, covered = (after["estimate"] - after["truth"]).mean(), int(after["covered"].sum())
    print(f"{name}: {len(after)} reliable rows, bias {bias:+.4f}; |bias| / mean width "
          f"{abs(bias) / (before['upper'] - before['lower']).mean():.3f} without, "
          f"{abs(bias) / (after['upper'] - after['lower']).mean():.3f} with; covered with it {covered}"
          f" (p above 0.95: {scipy.stats.binom.sf(covered - 1, len(after), 0.95):.3f})")
