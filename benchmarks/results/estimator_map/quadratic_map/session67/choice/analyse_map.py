import sys, numpy as np, pandas as pd
from scipy import stats
f = pd.concat([pd.read_pickle(p) for p in sys.argv[1:]], ignore_index=True)
f = f[f.reliable.astype(bool)].reset_index(drop=True)
W = max(len(x) for x in f.cos2)
pad = lambda col: np.array([list(x) + [np.nan] * (W - len(x)) for x in f[col]])
c2, se = pad("cos2"), pad("cos2_se")
ku = np.sum(~np.isnan(c2), axis=1)
assert np.allclose(np.nanmean(c2, axis=1), f.estimate, atol=1e-9)
D_up, D_lo = (1 - c2) / se, c2 / se
thr = lambda a, df=9, s=2.0: stats.t(df).isf(a * stats.t(df).sf(s))
cells = ["task_family", "task_d", "task_n_classes", "task_gap", "n_over_d", "k"]
for name, c in [("none", -np.inf), ("t9 a=.1", thr(0.1))]:
    up = np.nansum(np.where(D_up < c, np.maximum(0, 1 - c2), 0), axis=1) / ku
    lo = np.nansum(np.where(D_lo < c, np.maximum(0, c2), 0), axis=1) / ku
    U = np.maximum(f.upper, f.estimate + up); L = np.minimum(f.lower, f.estimate - lo)
    g = f.assign(cov=(L <= f.truth) & (f.truth <= U), w=U - L, moved=(U > f.upper + 1e-12) | (L < f.lower - 1e-12))
    t = g.groupby(cells).agg(n=("cov", "size"), cov=("cov", "mean"), truth=("truth", "first"), w=("w", "mean"),
                             moved=("moved", "mean"))
    t["p_hi"] = [stats.binom.sf(round(r.cov * r.n) - 1, r.n, 0.95) for r in t.itertuples()]
    print(f"== {name} c={c:.2f}: pooled {g['cov'].mean():.3f} of {len(g)}; rows moved {g.moved.mean():.3f}; mean width {g.w.mean():.4f}")
    print(t[t.n >= 10].round(3).to_string())
