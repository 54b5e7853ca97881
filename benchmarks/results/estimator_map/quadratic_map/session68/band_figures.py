# The figures the docs quote about (a) and (a2) that no report prints: (a2)'s pooled exact p below 0.85, the most
# covered rows of n that is still significantly below 0.85 (one-sided exact binomial at 2.5%, the report's test) for
# the d = 576 cells' sizes, and the seconds a draw takes on one core from the timings in runs.txt (9 populations,
# 2 processes). Run in this folder: python band_figures.py > band_figures.txt
import scipy.stats

print(f"(a2) pooled: 124 of 145 covered, p below 0.85 = {scipy.stats.binom.cdf(124, 145, 0.85):.2f}")
for n in (11, 16, 32):
    most = max(x for x in range(n + 1) if scipy.stats.binom.cdf(x, n, 0.85) < 0.025)
    print(f"of {n} rows, {most} or fewer covered is significantly below 0.85")
for part, seconds, draws in (("(a) draws 0-7", 533, 8), ("(a) draws 8-15", 504, 8), ("(a2) draws 16-31", 1250, 16)):
    print(f"{part}: {seconds * 2 / (9 * draws):.1f} s a draw a core")
