"""Per-angle capture on an edge population: each draw's extrapolated cos^2, their jackknife SEs, the row."""
import sys, warnings
import numpy as np, pandas as pd
import ntps_nb.core.estimators as E
from ntps_nb.core.simulate import lds_model, estimator_map
from ntps_nb.core.score import theory_geometry

d, seed, first, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gap = sys.argv[5] if len(sys.argv) > 5 else "tied"
C = int(sys.argv[6]) if len(sys.argv) > 6 else 2
ks = [int(x) for x in sys.argv[7].split(",")] if len(sys.argv) > 7 else [2]
out = sys.argv[8] if len(sys.argv) > 8 else f"/tmp/s67/angles_d{d}_{seed}_{first}.pkl"
model = lds_model(d=d, n_classes=C, n_tokens=8, gap=gap, seed=seed)
pop = theory_geometry(model.population_moments()).principal_cos2(np.array(ks))
from capture import captured  # installs the capture
rows = []
for draw in range(first, first + n):
    captured.clear()
    f = estimator_map([model], [32], ks, estimators=["richardson"], n_draws=1, seed=seed, first_draw=draw,
                      interval="quadratic", progress=False)
    point, reps = captured[-1]
    se = E._jackknife(reps)[1]
    for i, k in enumerate(ks):
        r = f.iloc[i].to_dict()
        r["cos2"] = point[i].tolist(); r["cos2_se"] = se[i].tolist(); r["pop_cos2"] = pop[i].tolist()
        rows.append(r)
pd.DataFrame(rows).to_pickle(out)
