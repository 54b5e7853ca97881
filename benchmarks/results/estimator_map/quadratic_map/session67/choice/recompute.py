"""Recompute the draws that hold a reliable row of unseen_family_check frames, capturing each angle's cos^2 and SE."""
import sys, warnings
import numpy as np, pandas as pd
import ntps_nb.core.estimators as E
from ntps_nb.core.simulate import estimator_map
from ntps_nb.core.score import theory_geometry
sys.path.insert(0, "/tmp/run67/benchmarks")
from unseen_family_check import population

out, part, nparts, *frames = sys.argv[1:]
all_d = "--all-d" in frames
frames = [x for x in frames if x != "--all-d"]
part, nparts = int(part), int(nparts)
f = pd.concat(map(pd.read_csv, frames), ignore_index=True)
f = f if all_d else f[f.task_d.isin([16, 64])]
keys = ["task_family", "task_d", "task_n_classes", "task_gap", "task_seed", "n_over_d", "draw"]
rel = f[f.reliable.astype(bool)][keys].drop_duplicates().sort_values(keys).reset_index(drop=True)
rel = rel.iloc[part::nparts]
from capture import captured  # installs the capture
rows = []
for _, key in rel.iterrows():
    sub = f.merge(key.to_frame().T.astype({k: f[k].dtype for k in keys}), on=keys)
    ks = sorted(sub.k.unique().tolist())
    model = population(key.task_family, int(key.task_d), int(key.task_n_classes), key.task_gap, None,
                       int(key.task_seed), None, float(sub.task_offset.iloc[0]))
    captured.clear()
    g = estimator_map([model], [float(key.n_over_d)], ks, estimators=["richardson"], n_draws=1,
                      seed=int(key.task_seed), first_draw=int(key.draw), interval="quadratic", progress=False)
    point, reps = captured[-1]
    se = E._jackknife(reps)[1]
    pop = theory_geometry(model.population_moments()).principal_cos2(np.array(ks))
    old = sub.set_index("k")
    for i, k in enumerate(ks):
        r = g.iloc[i].to_dict()
        assert abs(r["estimate"] - old.loc[k, "estimate"]) < 1e-6 * max(1, abs(r["estimate"])), (key, k)
        assert bool(r["reliable"]) == bool(old.loc[k, "reliable"]), (key, k)
        r.update(cos2=point[i].tolist(), cos2_se=se[i].tolist(), pop_cos2=pop[i].tolist())
        rows.append(r)
pd.DataFrame(rows).to_pickle(out)
print("draws", len(rel), "rows", len(rows))
