# The edge-at-0 rows of frames (g) and (g2) (every row there has truth below 0.005): the flag's reliable rows pooled,
# their coverage without any widening, with the rotation widening (the frames' lower / upper) and with the stationary
# widening (applied from the rows' columns, as the report does), the exact one-sided binomial p below 0.85 and above
# 0.95, and their bias against their mean width; per population the rows kept. Run in this folder with the project's
# python: python edge0_bias.py > edge0_bias.txt
import sys
import pandas as pd
import scipy.stats
sys.path.insert(0, "../../../../")
from unseen_family_check import stationary_widened

FRAMES = {"(g)": ["edge0_d64_factor", "edge0_d64_lds"], "(g2)": ["edge0_d64_factor_1000", "edge0_d64_lds_1000"]}


def line(name: str, rows: pd.DataFrame) -> str:
    truth, n = rows["truth"], len(rows)
    bias = (rows["estimate"] - truth).mean()
    text = [f"{name}: {n} reliable rows; bias {bias:+.4f}"]
    for label, lower, upper in (("no widening", "lower_unwidened", "upper_unwidened"),
                                ("rotation widening", "lower_rotation", "upper_rotation"),
                                ("stationary widening", "lower", "upper")):
        covered = int(((rows[lower] <= truth) & (truth <= rows[upper])).sum())
        width = (rows[upper] - rows[lower]).mean()
        text.append(f"{label}: covered {covered} (p below 0.85 {scipy.stats.binom.cdf(covered, n, 0.85):.2g}, above"
                    f" 0.95 {scipy.stats.binom.sf(covered - 1, n, 0.95):.2g}), |bias| / mean width "
                    f"{abs(bias) / width:.2f}")
    return "\n  ".join(text)


parts = {}
for name, files in FRAMES.items():
    frame = pd.concat([pd.read_csv(f"{f}.csv.gz") for f in files], ignore_index=True)
    frame = frame.assign(lower_rotation=frame["lower"], upper_rotation=frame["upper"])
    widened = stationary_widened(frame)
    parts[name] = widened[widened["reliable"].astype(bool)]
    print(line(name, parts[name]))
print(line("(g) and (g2) pooled", pd.concat(parts.values())))
kept = pd.concat(parts.values()).groupby(["task_family", "task_seed"])["truth"].agg(["first", "size"])
print("rows kept per population (truth, rows):\n" + kept.to_string())
