"""What the version-2 reliability flag changes in a committed study.

The estimates stage of a study records ``reliable`` as the flag stood when the unit ran. Version 2
of the stage also asks both eigengaps at k to be resolved (`ntps_nb.core.estimators.GAP_MIN`,
`eigengap_ratios`) and the interval to meet [0, 1]. Rerunning the stage needs each unit's
per-shard moments; where the unit's extraction is still in the extraction cache, this script reads
them and computes, for every row the committed table flags reliable, the eigengap ratios and
whether the new flag keeps the row (the interval condition needs only the committed row).
Units whose extraction is not cached are counted and named, not guessed; with ``--extract-missing
CONFIG`` the train split of each such unit with a reliable row is read first (the study's own
extraction of the unit, `ntps_nb.study.stages.run_unit` with only the estimates stage, so the
extraction lands in the cache under the key the unit recorded; nothing under the results folder is
written). Example:

    python benchmarks/flag_gap_on_study.py data/results/default-richardson \
        --extract-missing studies/default-richardson.toml \
        --out benchmarks/results/estimator_map/richardson/flag_gap_default_richardson.csv
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ntps_nb.cache import cache_dir  # noqa: E402
from ntps_nb.core.estimators import GAP_MIN, eigengap_ratios  # noqa: E402
from ntps_nb.core.intervals import layer_shards  # noqa: E402
from ntps_nb.extract import Extraction  # noqa: E402


def reliable_rows(meta: dict, estimates: pd.DataFrame) -> pd.DataFrame:
    """The committed reliable rows of the unit whose ``unit.json`` is ``meta``."""
    return estimates[(estimates["model"] == meta["model"]) & (estimates["dataset"] == meta["dataset"])
                     & estimates["reliable"]]


def unit_rows(unit: Path, estimates: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """The eigengap ratios of the unit's committed reliable rows, or None and why not."""
    meta = json.loads((unit / "unit.json").read_text())
    mine = reliable_rows(meta, estimates)
    if mine.empty:
        return None, "no reliable row"
    folder = cache_dir("extractions", str(meta.get("extraction_key")))
    if not (folder / "extraction.json").is_file():
        return None, "extraction not cached"
    ex = Extraction.load(folder)
    if not ex.shards:
        return None, "cached extraction has no shards"
    shards = layer_shards(ex.shards)
    out = []
    for layer, rows in mine.groupby("layer"):
        ks = np.sort(rows["k"].to_numpy(dtype=np.int64))
        gaps = eigengap_ratios(shards[int(layer)], ks)
        out.append(rows.merge(gaps.assign(layer=layer), on=["layer", "k"]))
    return pd.concat(out, ignore_index=True), "computed"


def extract_missing(results: Path, config: str, estimates: pd.DataFrame) -> None:
    """Read the train split of every unit with a committed reliable row whose extraction is not
    cached (forward passes: minutes to tens of minutes a unit on a CPU)."""
    import torch

    from ntps_nb.study.config import load_config
    from ntps_nb.study.stages import run_unit

    cfg = load_config(config, results_dir=str(results))
    torch.set_num_threads(1)  # the study's default for forward passes
    for unit in sorted(p for p in (results / "units").iterdir() if (p / "unit.json").is_file()):
        meta = json.loads((unit / "unit.json").read_text())
        key = str(meta.get("extraction_key"))
        if reliable_rows(meta, estimates).empty or (cache_dir("extractions", key) / "extraction.json").is_file():
            continue
        t0 = time.time()
        print(f"{unit.name}: reading the train split (extraction {key} not cached)", flush=True)
        run_unit(cfg, meta["model"], meta["dataset"], only=["estimates"],
                 log=lambda line: print(line, flush=True))
        cached = (cache_dir("extractions", key) / "extraction.json").is_file()
        print(f"{unit.name}: {time.time() - t0:.0f} s; extraction under the recorded key: {cached}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a committed study folder (estimates.csv and units/)")
    parser.add_argument("--out", help="CSV of the reliable rows with their eigengap ratios")
    parser.add_argument("--extract-missing", metavar="CONFIG", default=None,
                        help="the study's TOML: first read the train split of the units whose extraction is not "
                             "cached (only those with a committed reliable row)")
    args = parser.parse_args()
    results = Path(args.results)
    estimates = pd.read_csv(results / "estimates.csv")
    start = time.time()
    if args.extract_missing:
        extract_missing(results, args.extract_missing, estimates)
    frames, states = [], {}
    for unit in sorted(p for p in (results / "units").iterdir() if (p / "unit.json").is_file()):
        frame, state = unit_rows(unit, estimates)
        states[unit.name] = state
        if frame is not None:
            frames.append(frame)
    joined = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    n_reliable = int(estimates["reliable"].sum())
    print(f"{results}: {len(estimates)} estimate rows, {n_reliable} flagged reliable by the committed flag")
    for state in ("computed", "extraction not cached", "no reliable row"):
        names = [name for name, s in states.items() if s == state]
        print(f"  units {state}: {len(names)}" + (f" ({', '.join(names)})" if state != "no reliable row" else ""))
    reliable = estimates[estimates["reliable"]]
    outside = reliable[(reliable["lower"] > 1) | (reliable["upper"] < 0)]
    print(f"reliable rows whose interval misses [0, 1] (unreliable by version 2 from the committed row alone): "
          f"{len(outside)}" + "".join(f"\n  {r.model} {r.dataset} layer {r.layer} k {r.k}: {r.estimate:.3f} "
                                      f"[{r.lower:.3f}, {r.upper:.3f}]" for r in outside.itertuples()))
    if not joined.empty:
        joined["reliable_with_gap"] = joined["gap_ratio"] >= GAP_MIN
        joined["reliable_v2"] = joined["reliable_with_gap"] & (joined["lower"] <= 1) & (joined["upper"] >= 0)
        print(f"reliable rows whose moments were read: {len(joined)} of {n_reliable}; the eigengap condition "
              f"(gap_ratio >= {GAP_MIN:g}) keeps {int(joined['reliable_with_gap'].sum())}, version 2's whole flag "
              f"{int(joined['reliable_v2'].sum())}")
        columns = ["model", "dataset", "layer", "k", "estimate", "lower", "upper", "gap_ratio_U", "gap_ratio_V",
                   "gap_ratio", "reliable_with_gap", "reliable_v2"]
        print(joined[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if args.out:
            joined.to_csv(args.out, index=False)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
