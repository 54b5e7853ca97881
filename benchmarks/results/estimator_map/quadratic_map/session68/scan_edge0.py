# population NTPS at k = 1 and 2 of the factor and LDS designs with C = 20 (separated, moderate) for seeds 682-699,
# which no frame had used: the population values frame (g) chooses its populations by. python scan_edge0.py 64
import sys, numpy as np
sys.path.insert(0, "../../../../..")
from ntps_nb.core.simulate import FAMILIES
d = int(sys.argv[1])
for fam in ("factor", "lds"):
    for gap in ("separated", "moderate"):
        for seed in range(682, 700):
            m = FAMILIES[fam](d=d, n_classes=20, n_tokens=8, gap=gap, seed=seed, offset=0.0)
            t = m.population_ntps(np.array([1, 2]))
            print(fam, d, gap, seed, np.round(t, 5), flush=True)
