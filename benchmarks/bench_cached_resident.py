"""A cached extraction analysed on a device, read from the host on every solve against made resident there once.

A rerun of a study unit or of notebook 06 with a new estimator reads its extraction from the cache. Before
`extract_cached(..., keep_on_device=True)` kept such an entry on the device, every solve of the torch backend sent
its moments there again; now it copies them once (`ntps_nb.extract.keep_moments_resident`). This script writes one
extraction of random moments at the study's layout (every layer's moments, ``--shards`` shards at
``--shard-layers`` layers, the two halves of a split of them at every other layer), loads it from disk twice per
repeat, and times on each copy what `layer_profile(..., estimator="richardson", intervals=True)` solves: the
plug-in sweep of every layer, `ntps_estimate` at the shard layers and richardson's `ntps` of the halves
elsewhere. The "resident" side counts its one copy to the device. The largest relative difference between the two
sides' numbers is printed (rounding: 0 at d = 896, 1.4e-14 at d = 4096 on an H100). The package measured is the one
on PYTHONPATH.

    python benchmarks/bench_cached_resident.py --d 896 --layers 25              # the Qwen2-0.5B shape
    python benchmarks/bench_cached_resident.py --d 4096 --layers 6 --shard-layers 1
    python benchmarks/bench_cached_resident.py --d 32 --layers 4 --device cpu   # a quick check of the script
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch

import ntps_nb
from ntps_nb.core.estimators import ntps_estimate, split_halves
from ntps_nb.core.moments import LayerMoments, Moments
from ntps_nb.core.score import ntps, ntps_sweep
from ntps_nb.extract import Extraction, keep_moments_resident


def random_moments(d: int, n_classes: int, texts: int, generator: torch.Generator, device: str) -> Moments:
    """Moments of ``texts`` random texts: Sxx and C0 from 2 d random states, C1 their cross moment, Sxy small."""
    X = torch.randn(d, 2 * d, device=device, dtype=torch.float64, generator=generator)
    Z = 0.7 * X + torch.randn(d, 2 * d, device=device, dtype=torch.float64, generator=generator)
    arrays = {"Sxx": X @ X.mT / (2 * d), "C0": Z @ Z.mT / (2 * d), "C1": X @ Z.mT / (2 * d),
              "Sxy": 0.1 * torch.randn(d, n_classes, device=device, dtype=torch.float64, generator=generator),
              "x_mean": 0.01 * torch.randn(d, device=device, dtype=torch.float64, generator=generator)}
    return Moments(Syy=np.eye(n_classes) / n_classes, n_texts=texts, n_tokens=15 * texts,
                   **{name: t.cpu().numpy() for name, t in arrays.items()})


def write_extraction(folder: str, args) -> list[int]:
    """An extraction of random moments at the study's layout, saved to ``folder``; returns its shard layers."""
    g = torch.Generator(device=args.device).manual_seed(0)
    layers = list(range(args.layers))
    shard_layers = list(np.linspace(0, args.layers - 1, args.shard_layers).round().astype(int))
    half_of = split_halves(args.shards, seed=0)
    shards = [{} for _ in range(args.shards)]
    halves = [{}, {}]
    pooled = {}
    for layer in layers:
        parts = [random_moments(args.d, args.classes, 200, g, args.device) for _ in range(args.shards)]
        pooled[layer] = Moments.combine(parts)
        if layer in shard_layers:
            for shard, part in zip(shards, parts):
                shard[layer] = part
        else:
            for half, members in zip(halves, half_of):
                half[layer] = Moments.combine([parts[i] for i in members])
    labels = np.arange(200 * args.shards) % args.classes
    Extraction(moments=LayerMoments(pooled, {}), labels=labels, class_names=[str(c) for c in range(args.classes)],
               lengths=np.full(len(labels), 16), shards=[LayerMoments(s, {}) for s in shards],
               halves=[LayerMoments(h, {}) for h in halves]).save(folder)
    return [int(layer) for layer in shard_layers]


def analyse(extraction: Extraction, shard_layers: list[int], k: int, device: str) -> list:
    """What `layer_profile(..., estimator="richardson", intervals=True)` solves, with the plug-in sweep of each layer."""
    out = []
    for layer in extraction.moments.layers:
        out.append(ntps_sweep(extraction.moments[layer], device=device)["ntps"].to_numpy())
        if layer in shard_layers:
            out.append(ntps_estimate([s[layer] for s in extraction.shards], [k], progress=False,
                                     device=device)[["estimate", "lower", "upper"]].to_numpy())
        else:
            out.append(ntps([h[layer] for h in extraction.halves], k, estimator="richardson", seed=0, device=device))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=896)
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--shard-layers", type=int, default=3)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "entry")
        start = time.perf_counter()
        shard_layers = write_extraction(folder, args)
        print(f"wrote the extraction in {time.perf_counter() - start:.1f} s")
        times: dict[str, dict[str, list[float]]] = {side: {"load": [], "copy": [], "solves": []}
                                                    for side in ("host", "resident")}
        results = {}
        for _ in range(args.repeats):
            for side in ("host", "resident"):
                start = time.perf_counter()
                extraction = Extraction.load(folder)
                times[side]["load"].append(time.perf_counter() - start)
                sync()
                start = time.perf_counter()
                if side == "resident":
                    keep_moments_resident(extraction, args.device)
                sync()
                times[side]["copy"].append(time.perf_counter() - start)
                start = time.perf_counter()
                results[side] = analyse(extraction, shard_layers, args.k, args.device)
                sync()
                times[side]["solves"].append(time.perf_counter() - start)
                del extraction
    differences = [np.max(np.abs(np.asarray(got) - np.asarray(want)) / np.maximum(np.abs(np.asarray(want)), 1e-300))
                   for got, want in zip(results["resident"], results["host"], strict=True)]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    n_matrices = 4 * args.layers + 3 * args.shards * args.shard_layers + 3 * 2 * (args.layers - args.shard_layers)
    print(f"d = {args.d}, {args.layers} layers, {args.shards} shards at layers {shard_layers}, halves elsewhere "
          f"({n_matrices} d x d matrices, {n_matrices * 8 * args.d ** 2 / 2 ** 30:.1f} GiB), k = {args.k}, on {where}, "
          f"best of {args.repeats}, the package at {os.path.relpath(os.path.dirname(ntps_nb.__file__))}; "
          f"the two sides' numbers differ by at most {max(differences):.1e} (relative)")
    best = {side: {part: min(values) for part, values in parts.items()} for side, parts in times.items()}
    for side, parts in best.items():
        print(f"  {side:9s} load {parts['load']:7.2f} s   copy to the device {parts['copy']:7.2f} s   "
              f"solves {parts['solves']:7.2f} s   copy + solves {parts['copy'] + parts['solves']:7.2f} s")
    host, kept = (best[side]["copy"] + best[side]["solves"] for side in ("host", "resident"))
    print(f"  host / resident (copy + solves): {host / kept:.2f}x")


if __name__ == "__main__":
    main()
