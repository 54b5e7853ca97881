import sys, numpy as np, pandas as pd
from scipy import stats
f = pd.concat([pd.read_pickle(p) for p in sys.argv[1:]], ignore_index=True)
assert len(f) == len(set(zip(f.draw, f.k))), "duplicate draws"
c2 = np.array(f.cos2.tolist()); se = np.array(f.cos2_se.tolist()); pop = np.array(f.pop_cos2.tolist())
ku = np.sum(~np.isnan(c2), axis=1)
assert np.allclose(np.nanmean(c2, axis=1), f.estimate, atol=1e-9), "estimate is not the mean of the cos^2"
D_up, D_lo = (1 - c2) / se, c2 / se
def reach(c):
    up = np.nansum(np.where(D_up < c, np.maximum(0, 1 - c2), 0), axis=1) / ku
    lo = np.nansum(np.where(D_lo < c, np.maximum(0, c2), 0), axis=1) / ku
    return up, lo
def s_thresh(alpha, s=2.0, df=None):
    dist = stats.norm if df is None else stats.t(df)
    return dist.isf(alpha * dist.sf(s))
print("rows", len(f), "reliable", int(f.reliable.sum()), "covered", int(f[f.reliable].covered.sum()))
r = f.reliable.to_numpy()
for name, c in [("none", -np.inf), ("normal a=.1", s_thresh(0.1)), ("t9 a=.1", s_thresh(0.1, df=9)), ("t9 a=.05", s_thresh(.05, df=9))]:
    up, lo = reach(c)
    U = np.maximum(f.upper, f.estimate + up); L = np.minimum(f.lower, f.estimate - lo)
    cov = (L <= f.truth) & (f.truth <= U)
    w = (U - L)[r]
    bias = (f.estimate - f.truth)[r].mean()
    print(f"{name:12s} c={c:5.2f} reliable covered {cov[r].sum()}/{r.sum()} = {cov[r].mean():.3f}; all rows {cov.mean():.3f};"
          f" width {w.mean():.4f} (before {(f.upper-f.lower)[r].mean():.4f}); |bias|/width {abs(bias)/w.mean():.3f}; extended {(up[r]>0).sum()}")
