"""One unit of the default protocol at the paper's shapes: extraction, then the analysis on the CPU
(numpy, every core, BLAS threads bounded) and on the GPU (the torch backend), side by side.

    PYTHONPATH=$PWD python benchmarks/bench_unit_gpu.py                       # both paper shapes
    PYTHONPATH=$PWD python benchmarks/bench_unit_gpu.py --shapes llama3-8b --parts extract,ntps,intervals
    PYTHONPATH=$PWD python benchmarks/bench_unit_gpu.py --quick               # tiny shapes, CPU, < 1 min

A random-initialised model is built from the real config of each shape (Qwen2-0.5B: d = 896,
24 layers; Llama-3-8B: d = 4096, 32 layers; no download), and N texts of random token ids with
lengths uniform in [32, 512] (C classes; a held-out split of N/2 texts for the probes) go
through `ntps_nb.extract.extract` as a unit of studies/default.toml does (every hidden state,
20 shards on the interval layers, pooled features, Shh; on a GPU the moments also stay there for
the GPU column, ``keep_on_device``, as the study keeps them). Then, as `ntps_nb.study.stages`
computes a unit:

- ntps: theory and reference sweeps of every layer, the PCA-overlap control on the peer layers;
- intervals: theory and reference interval sweeps, 200 bootstrap + 20 jackknife replicates, on
  the 3 interval layers;
- diagnostics: on the 3 diagnostic layers, the theory variant at k in (1, 2, 4, 8, 16, 32) and
  the reference variant at fractions (0.1, 0.5, 0.9), 5 perturbations, 20 label permutations
  (and the r_V sweep the stage runs first), through the study's own stage function, the
  eigensolver comparison (scipy vs numpy LAPACK, a host computation on both sides) included: on
  the GPU it runs in host worker processes beside the device work, as in the study;
- probes: the least-squares probes of every layer (held-out ridge and in-sample least squares);
  the held-out logistic probes of every layer (scikit-learn's lbfgs, one layer at a time, against
  the torch backend's Newton-CG batched over layers, `logistic_probe_torch`); the paper's
  in-sample probes as the probes stage runs them (`probe_layers(n_jobs=None)`: scikit-learn's
  saga, the released code's early-stopped solver, in host worker processes, one per thread of the
  analysis bound); the cross-validated logistic probe of the last layer (scikit-learn
  against ``cv_logistic_probe(device=...)``, folds x C in one batched solve). Each logistic row
  prints its agreement (accuracies, differing predictions, the chosen C);
- peers on the 6 peer layers (k-NN on scikit-learn on both sides);
- estimates: the estimates stage, `ntps_estimate` with the default estimator (richardson, its
  delete-one-shard jackknife interval and the subspace-noise flag) at the study's k grid (up to
  r_V) on the 3 interval layers.

Each row prints the CPU time, the GPU time and GPU/CPU. Host-only rows are measured once and
counted in both columns. Above ``--skip-cpu-above`` (hidden size), the CPU column is sampled (a
few layers, replicates or steps, timed and scaled) and marked "~ ... (extrapolated: how)"; the
same applies to the host-only rows. ``--parts`` runs a subset, and ``--interval-layers`` / ``--diagnostic-layers`` (e.g. "16") one
layer of the slow parts at a time, for runs under a per-command time limit; every line is printed (and with
``--out`` appended to a file) as soon as it is measured, so a run cut short keeps what it timed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_extract import SHAPES, IdTokenizer, random_model, reporter  # noqa: E402

from ntps_nb.core import peers as peer_module  # noqa: E402
from ntps_nb.core import probes as probe_module  # noqa: E402
from ntps_nb.core.backends import torch as backend_module  # noqa: E402
from ntps_nb.core.backends.torch import (  # noqa: E402
    CERTIFY_MARGIN,
    LOGISTIC_NEWTON_MAX_ITER,
    _certified_cholesky,
    interval_sweep_torch,
    least_squares_predictions_torch,
    logistic_probe_torch,
    ntps_sweep_torch,
    theory_geometry_torch,
)
from ntps_nb.core.diagnostics import ReferenceFactorization, TheoryFactorization, ntps_diagnostics  # noqa: E402
from ntps_nb.core.estimators import DEFAULT_ESTIMATOR, _whitened_bases, _Whitening, ntps_estimate  # noqa: E402
from ntps_nb.core.moments import Moments  # noqa: E402
from ntps_nb.core.subspaces import RANGE_RTOL  # noqa: E402
from ntps_nb.core.intervals import (  # noqa: E402
    REFERENCE_FRACTIONS,
    ShardStack,
    _Curve,
    _evaluate,
    bootstrap_counts,
    layer_shards,
    ntps_interval_sweep,
)
from ntps_nb.core.moments import one_hot  # noqa: E402
from ntps_nb.core.score import ntps_sweep, reference_geometry, theory_geometry  # noqa: E402
from ntps_nb.core.threads import analysis_threads  # noqa: E402
from ntps_nb.extract import extract  # noqa: E402
from ntps_nb.study.config import resolve_layers  # noqa: E402

PARTS = ("extract", "ntps", "intervals", "diagnostics", "probes", "peers", "estimates")
#: The default protocol's settings (studies/default.toml) that a unit's analysis reads.
DEFAULT = dict(shards=20, n_boot=200, interval_layers="grid:3", diagnostic_layers="grid:3", peer_layers="grid:6",
               diagnostic_k=[1, 2, 4, 8, 16, 32], diagnostic_fractions=[0.1, 0.5, 0.9], n_perturb=5,
               n_permutations=20, seed=0, k=[1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256,
                                               384, 512])
QUICK_SHAPES = {
    "tiny-a": dict(arch="llama", hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=96, vocab_size=500),
    "tiny-b": dict(arch="qwen2", hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=500),
}


#: Why two correct backends can disagree on a replicate: U's eigenvalues tie (with N <= d the pooled
#: features fit every one-hot target, and the eigenvalues are the class frequencies, which tie when
#: two classes have equal counts), so which u_i comes first is arbitrary there.
TIES = ("  (above 1e-9: some replicates have tied eigenvalues of U, e.g. equal class counts where the "
        "replicate's distinct texts are fewer than d; their u_i order is arbitrary and the backends pick differently)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Times calls, synchronising the device so that GPU work is counted where it is launched."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn):
        synchronize(self.device)
        start = time.perf_counter()
        result = fn()
        synchronize(self.device)
        return time.perf_counter() - start, result


def seconds(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.3f} s" if t < 10 else f"{t:.1f} s"


class Table:
    """Rows of (part, CPU, GPU); CPU may be an estimate with its label. Totals at the end."""

    def __init__(self, say):
        self.say = say
        self.rows: list[tuple[str, float | None, str, float | None]] = []

    def add(self, part: str, cpu: float | None, gpu: float | None, cpu_note: str = "", gpu_note: str = "") -> None:
        self.rows.append((part, cpu, cpu_note, gpu))
        cpu_text = ("~" if cpu_note else "") + seconds(cpu) + (f" ({cpu_note})" if cpu_note else "")
        gpu_text = seconds(gpu) + (f" ({gpu_note})" if gpu_note else "")
        ratio = f"{gpu / cpu:.3f}" if cpu and gpu is not None else "-"
        self.say(f"  {part:<52} CPU {cpu_text:<44} GPU {gpu_text:<24} GPU/CPU {ratio}")

    def totals(self, title: str) -> None:
        cpu = sum(r[1] for r in self.rows if r[1] is not None)
        gpu = sum(r[3] for r in self.rows if r[3] is not None)
        estimated = any(r[2] for r in self.rows)
        missing = [r[0] for r in self.rows if r[1] is None or r[3] is None]
        self.say(f"  {'TOTAL ' + title:<52} CPU {('~' if estimated else '') + seconds(cpu):<44} GPU {seconds(gpu):<24} "
                 f"GPU/CPU {f'{gpu / cpu:.3f}' if cpu else '-'}"
                 + (f"   (rows without both columns: {missing})" if missing else ""))


def layer_spec(text: str):
    """A study layer spec from the command line: "grid:3", "last", or indices "0,16,-1"."""
    if text in ("all", "last") or text.startswith("grid:"):
        return text
    return [int(x) for x in text.split(",") if x.strip()]


def sample_layers(layers: list[int], n: int) -> list[int]:
    """n layers spread over the list (first and last included)."""
    if len(layers) <= n:
        return list(layers)
    return sorted({layers[int(round(i))] for i in np.linspace(0, len(layers) - 1, n)})


def texts_of(n: int, min_len: int, max_len: int, vocab: int, n_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    texts = [" ".join(map(str, rng.integers(1, vocab, T))) for T in lengths]
    labels = rng.integers(0, n_classes, n)
    labels[:n_classes] = np.arange(n_classes)
    return texts, labels


# ------------------------------------------------------------------------------------------------
# Parts


def _host_copy(moments):
    """The moments with every array copied on the host: nothing of them is resident on a device."""
    return dataclasses.replace(moments, **{f.name: np.array(getattr(moments, f.name), copy=True)
                                           for f in dataclasses.fields(moments)
                                           if isinstance(getattr(moments, f.name), np.ndarray)})


def part_ntps(unit, args, table, clock, say):
    layers, moments, device = unit["layers"], unit["ex"].moments, unit["device"]
    peer_grid = unit["peer_grid"]

    per_sweep = {"theory": 0.0, "reference": 0.0, "pca": 0.0}

    def gpu_layer(layer):
        # each sweep timed on its own (the targets are per sweep), summed into the layer's time
        m = moments[layer]
        t, theory = clock(lambda: ntps_sweep_torch(m, device=device))
        per_sweep["theory"] += t
        t, reference = clock(lambda: ntps_sweep_torch(m, variant="reference", device=device))
        per_sweep["reference"] += t
        out = [theory, reference]
        if layer in peer_grid:
            t, pca = clock(lambda: peer_module.pca_overlap_sweep(m, device=device))
            per_sweep["pca"] += t
            out.append(pca)
        return out

    def cpu_layer(layer):
        m = moments[layer]
        out = [ntps_sweep(m), ntps_sweep(m, variant="reference")]
        if layer in peer_grid:
            out.append(peer_module.pca_overlap_sweep(m))
        return out

    t_gpu = 0.0
    gpu_frames = {}
    for layer in layers:
        t, gpu_frames[layer] = clock(lambda: gpu_layer(layer))
        t_gpu += t
    say(f"    GPU sweeps apart: theory {per_sweep['theory'] / len(layers):.3f} s a layer, reference "
        f"{per_sweep['reference'] / len(layers):.3f} s a layer, pca control "
        f"{per_sweep['pca'] / max(len(peer_grid), 1):.3f} s a layer ({len(peer_grid)} layers)")
    if device.type == "cuda" and args.resident_check:
        # the same sweeps on host copies of the moments (not resident: each matrix copied to the device
        # as it is read), to measure what keeping the extraction's moments on the device saves
        copies = {layer: _host_copy(moments[layer]) for layer in layers}
        t_copied = 0.0
        for layer in layers:
            m = copies[layer]
            t, _ = clock(lambda: [ntps_sweep_torch(m, device=device),
                                  ntps_sweep_torch(m, variant="reference", device=device)]
                         + ([peer_module.pca_overlap_sweep(m, device=device)] if layer in peer_grid else []))
            t_copied += t
        say(f"    resident check: the sweeps on resident moments {t_gpu:.1f} s, on host copies {t_copied:.1f} s "
            f"(copies / resident {t_copied / t_gpu:.2f})")
        del copies
    if args.gpu_only:
        table.add(f"ntps: theory+reference sweeps, {len(layers)} layers (+pca {len(peer_grid)})", None, t_gpu)
        return
    sampled = unit["sampled"]
    cpu_layers = sample_layers(layers, args.cpu_sample_layers) if sampled else layers
    t_cpu, worst, cpu_times = 0.0, 0.0, {}
    for layer in cpu_layers:
        t, frames = clock(lambda: cpu_layer(layer))
        cpu_times[layer] = t
        t_cpu += t
        theory = np.abs(frames[0]["ntps"].to_numpy() - gpu_frames[layer][0]["ntps"].to_numpy()).max()
        worst = max(worst, float(theory))
    unit["cpu_sweep_seconds"] = cpu_times
    note = ""
    if sampled:
        t_cpu *= len(layers) / len(cpu_layers)
        note = f"{len(cpu_layers)} of {len(layers)} layers timed, scaled"
    table.add(f"ntps: theory+reference sweeps, {len(layers)} layers (+pca {len(peer_grid)})", t_cpu, t_gpu, note)
    say(f"    agreement: theory NTPS max |GPU - CPU| over {len(cpu_layers)} layers {worst:.2e}")


def part_intervals(unit, args, table, clock, say):
    device, grid, n_boot = unit["device"], unit["interval_grid"], args.n_boot
    shards = layer_shards(unit["ex"].shards)
    n_shards = len(unit["ex"].shards)
    # the reference replicates whiten C0 by Cholesky where it is certified of full rank in float32 (else by eigh);
    # the certificate needs lambda_min(C0) above CERTIFY_MARGIN d eps32 ||C0||_F
    certified, relative = {}, {}
    for layer in unit["layers"]:
        C0 = torch.as_tensor(np.array(unit["ex"].moments[layer].C0), device=device)
        certified[layer] = bool(_certified_cholesky(C0.float()[None], 1e-8, 1e-10)[1][0])
        relative[layer] = float(torch.linalg.eigvalsh(C0)[0] / torch.linalg.matrix_norm(C0))
    bar = CERTIFY_MARGIN * unit["ex"].moments[grid[0]].d * float(np.finfo(np.float32).eps)
    say(f"    reference: C0 certified of full rank in float32 (Cholesky whitening) at interval layers "
        f"{ {layer: certified[layer] for layer in grid} }, at {sum(certified.values())} of {len(certified)} layers; "
        f"lambda_min(C0) / ||C0||_F (float64) {min(relative.values()):.2e} to {max(relative.values()):.2e} "
        f"(median {np.median(list(relative.values())):.2e}), the certificate's bar {bar:.2e}")
    for variant in args.interval_variants:
        t_gpu, gpu_frames = 0.0, {}
        for layer in grid:
            t, gpu_frames[layer] = clock(lambda: interval_sweep_torch(shards[layer], variant=variant, n_boot=n_boot,
                                                                      seed=args.seed, device=device))
            t_gpu += t
        if variant == "theory" and args.compare_range_basis:
            # the same sweep of the first interval layer with the replicates whitened on the whole space
            layer = grid[0]
            share, backend_module.RANGE_BASIS_MAX_SHARE = backend_module.RANGE_BASIS_MAX_SHARE, 0.0
            try:
                t_whole, whole = clock(lambda: interval_sweep_torch(shards[layer], variant=variant, n_boot=n_boot,
                                                                    seed=args.seed, device=device))
            finally:
                backend_module.RANGE_BASIS_MAX_SHARE = share
            t_range, _ = clock(lambda: interval_sweep_torch(shards[layer], variant=variant, n_boot=n_boot,
                                                           seed=args.seed, device=device))
            restricted = backend_module.TorchShardStack(shards[layer], centred=False, dtype=torch.float64,
                                                        device=device).range_basis()
            at_m = (whole["k_U"] == whole["m"]).to_numpy()
            worst = float(np.nanmax(np.abs(whole.loc[at_m, ["lower", "upper"]].to_numpy()
                                           - gpu_frames[layer].loc[at_m, ["lower", "upper"]].to_numpy())))
            say(f"    theory intervals, layer {layer}: whole-space whitening {t_whole:.1f} s, inside the shards' Sxx "
                f"range (p = {None if restricted is None else restricted[0].shape[1]} of d = {unit['ex'].moments[layer].d}) "
                f"{t_range:.1f} s, ratio {t_range / t_whole:.2f}; bounds at k >= m max |difference| {worst:.2e}")
        if args.gpu_only:
            table.add(f"intervals: {variant}, {n_boot}+{n_shards} replicates, {len(grid)} layers", None, t_gpu)
            continue
        if not unit["sampled"]:
            t_cpu, worst = 0.0, 0.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for layer in grid:
                    t, frame = clock(lambda: ntps_interval_sweep(shards[layer], variant=variant, n_boot=n_boot,
                                                                 seed=args.seed))
                    t_cpu += t
                    if variant == "theory":
                        worst = max(worst, float(np.nanmax(np.abs(frame[["lower", "upper"]].to_numpy()
                                                                  - gpu_frames[layer][["lower", "upper"]].to_numpy()))))
            note = ""
            if variant == "theory":
                say(f"    agreement: theory interval bounds max |GPU - CPU| {worst:.2e}" + (TIES if worst > 1e-6 else ""))
        else:  # a few replicates of one layer through the core's own replicate loop, scaled
            layer = grid[len(grid) // 2]
            stack = ShardStack(shards[layer])
            counts = bootstrap_counts(n_shards, args.cpu_replicates, 0)
            if variant == "theory":
                ks = np.arange(1, stack.shards[0].d + 1)  # every k up to d; NaN beyond r_V, at the same cost
                curve = _Curve("ntps", "theory", ks=ks)
                width = ks.size
            else:
                curve = _Curve("ntps", "reference", fractions=REFERENCE_FRACTIONS)
                width = REFERENCE_FRACTIONS.size
            t, _ = clock(lambda: _evaluate(curve, stack.combined(counts), counts.shape[0], width))
            del stack
            per_replicate = t / args.cpu_replicates
            t_cpu = per_replicate * (n_boot + n_shards + 1) * len(grid)
            note = f"{args.cpu_replicates} replicates of layer {layer} timed, x {n_boot + n_shards + 1} x {len(grid)}"
        table.add(f"intervals: {variant}, {n_boot}+{n_shards} replicates, {len(grid)} layers", t_cpu, t_gpu, note)


def _diagnostics_unit(unit, args, on, host_solvers=None):
    """What the study's diagnostics stage reads of a unit, with the analysis on ``on``."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(estimator="plugin", diagnostic_k=DEFAULT["diagnostic_k"],
                          diagnostic_fractions=DEFAULT["diagnostic_fractions"], n_perturb=args.n_perturb,
                          n_permutations=args.n_permutations, seed=args.seed)
    return SimpleNamespace(cfg=cfg, diag_grid=unit["diag_grid"], ex=unit["ex"], analysis_device=on,
                           host_solvers=host_solvers)


def start_host_solvers(unit, args):
    """The diagnostics' host solver comparison started now, as the study starts it before the
    intervals stage on a CUDA device (`ntps_nb.study.stages._early_host_solvers`); None elsewhere."""
    from ntps_nb.study.stages import _early_host_solvers

    return _early_host_solvers(_diagnostics_unit(unit, args, unit["device"]))


def diagnostics_stage(unit, args, on):
    """The study's diagnostics stage (`ntps_nb.study.stages._diagnostics_stage`) on ``on`` (None:
    numpy): both variants on every diagnostic layer, the host eigensolver comparison included (on a
    device, in worker processes beside the device work; started before the intervals where the run did so)."""
    from ntps_nb.study.stages import _diagnostics_stage

    early = unit.get("host_solvers") if on is not None else None
    return _diagnostics_stage(_diagnostics_unit(unit, args, on, early))[0]


def part_diagnostics(unit, args, table, clock, say):
    device, grid, ex = unit["device"], unit["diag_grid"], unit["ex"]
    early = unit.get("host_solvers") is not None
    gpu_note = ("host solver comparison in worker processes started before the intervals" if early
                else "host solver comparison in worker processes beside the device")
    t_gpu, gpu_frame = clock(lambda: diagnostics_stage(unit, args, device))
    if args.gpu_only:
        table.add(f"diagnostics stage: theory+reference with the solver comparison, {len(grid)} layers", None, t_gpu,
                  gpu_note=gpu_note)
        return
    if not unit["sampled"]:
        t_cpu, cpu_frame = clock(lambda: diagnostics_stage(unit, args, None))
        theory = (cpu_frame["variant"] == "theory").to_numpy()
        worst = 0.0
        for column in ("ntps", "perturb_max_dev", "perm_mean", "p_value", "solver_max_dev"):
            a = cpu_frame.loc[theory, column].to_numpy(float)
            b = gpu_frame.loc[theory, column].to_numpy(float)
            worst = max(worst, float(np.nanmax(np.abs(a - b))))
        note = ""
        say(f"    agreement: theory diagnostics (ntps, perturb_max_dev, perm_mean, p_value, solver_max_dev) "
            f"max |GPU - CPU| {worst:.2e}")
    else:  # the steps of one layer timed once each, the stage's counts of them summed
        layer = grid[len(grid) // 2]
        m, X, y = ex.moments[layer], ex.pooled[layer], ex.labels
        t_sweep = unit.get("cpu_sweep_seconds", {}).get(layer)
        if t_sweep is None:
            t_sweep, _ = clock(lambda: ntps_sweep(m))
        t_geo_t, _ = clock(lambda: theory_geometry(m))
        t_geo_r, _ = clock(lambda: reference_geometry(m))
        t_fac_t, factor_t = clock(lambda: TheoryFactorization.from_moments(m))
        t_fac_r, factor_r = clock(lambda: ReferenceFactorization.from_moments(m))
        rng = np.random.default_rng(0)
        Y = one_hot(y, m.n_classes)
        permuted = m.with_labels(X.T.astype(np.float64) @ Y[rng.permutation(y.size)] / y.size, m.Syy)
        t_perm_t, _ = clock(lambda: factor_t.geometry(permuted))
        t_perm_r, _ = clock(lambda: factor_r.geometry(permuted))
        n_p, n_q = args.n_perturb, args.n_permutations
        per_layer = (t_sweep + (1 + n_p) * (t_geo_t + t_geo_r) + t_fac_t + t_fac_r + n_q * (t_perm_t + t_perm_r)
                     + 2 * t_fac_t + 4 * t_fac_r)
        t_cpu = per_layer * len(grid)
        note = (f"layer {layer}'s steps timed once: sweep + {1 + n_p} x geometries + factorisations + "
                f"{n_q} x permutations + the solver comparison's 2 + 4 factorisations, x {len(grid)} layers")
    table.add(f"diagnostics stage: theory+reference with the solver comparison, {len(grid)} layers", t_cpu, t_gpu,
              note, gpu_note=gpu_note)


def part_probes(unit, args, table, clock, say):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    device, layers, ex, ex_test = unit["device"], unit["layers"], unit["ex"], unit["ex_test"]
    n_classes = unit["n_classes"]
    Ytr = one_hot(ex.labels, n_classes)
    settings = (("heldout ridge", probe_module.HELDOUT_RIDGE, lambda layer: ex_test.pooled[layer]),
                ("in-sample least squares", 0.0, lambda layer: ex.pooled[layer]))

    def gpu_least_squares():
        return [least_squares_predictions_torch([ex.pooled[layer] for layer in layers], Ytr,
                                                [evaluated(layer) for layer in layers], ridge=ridge, device=device)
                for _, ridge, evaluated in settings]

    def cpu_least_squares(layer):
        out = []
        for _, ridge, evaluated in settings:
            Xtr = np.asarray(ex.pooled[layer], dtype=np.float64)
            model = make_pipeline(StandardScaler(), Ridge(alpha=ridge) if ridge > 0 else LinearRegression())
            out.append(model.fit(Xtr, Ytr).predict(np.asarray(evaluated(layer), dtype=np.float64)))
        return out

    t_gpu, gpu_predictions = clock(gpu_least_squares)
    cpu_layers = [] if args.gpu_only else sample_layers(layers, args.cpu_sample_layers) if unit["sampled"] else layers
    t_cpu, worst = 0.0, 0.0
    for layer in cpu_layers:
        t, predictions = clock(lambda: cpu_least_squares(layer))
        t_cpu += t
        index = layers.index(layer)
        for s, p in enumerate(predictions):
            worst = max(worst, float(np.abs(p - gpu_predictions[s][index]).max()))
    note = ""
    if unit["sampled"] and cpu_layers:
        t_cpu *= len(layers) / len(cpu_layers)
        note = f"{len(cpu_layers)} of {len(layers)} layers timed, scaled"
    table.add(f"probes: least squares (ridge + in-sample), {len(layers)} layers", t_cpu if cpu_layers else None,
              t_gpu, note)
    say(f"    agreement: least-squares predictions max |GPU - CPU| {worst:.2e}")

    # held-out logistic probes: sklearn lbfgs one layer at a time against the torch fit of all layers at once
    def cpu_logistic(layer):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = make_pipeline(StandardScaler(), LogisticRegression(
                solver="lbfgs", max_iter=probe_module.LOGISTIC_MAX_ITER, tol=probe_module.LOGISTIC_TOL))
            return model.fit(ex.pooled[layer], ex.labels).predict(np.asarray(ex_test.pooled[layer], dtype=np.float64))

    def gpu_logistic():
        return logistic_probe_torch([ex.pooled[layer] for layer in layers], ex.labels,
                                    [ex_test.pooled[layer] for layer in layers], Cs=1.0, tol=probe_module.LOGISTIC_TOL,
                                    max_iter=LOGISTIC_NEWTON_MAX_ITER, device=device)

    t_gpu, fits = clock(gpu_logistic)
    logistic_layers = ([] if args.gpu_only else sample_layers(layers, args.cpu_sample_layers)
                       if unit["sampled"] else layers)
    t_cpu, worst, differing, compared = 0.0, 0.0, 0, 0
    for layer in logistic_layers:
        t, predicted = clock(lambda: cpu_logistic(layer))
        t_cpu += t
        on_gpu = fits[layers.index(layer)].eval_predictions[0]
        worst = max(worst, abs(float(np.mean(on_gpu == ex_test.labels)) - float(np.mean(predicted == ex_test.labels))))
        differing += int(np.count_nonzero(on_gpu != predicted))
        compared += predicted.size
    note = f"{len(logistic_layers)} of {len(layers)} layers timed, scaled" if unit["sampled"] else ""
    table.add(f"probes: logistic held-out (lbfgs | torch), {len(layers)} layers",
              None if args.gpu_only else t_cpu * len(layers) / len(logistic_layers), t_gpu, note)
    say(f"    agreement: held-out logistic accuracy max |GPU - CPU| {worst:.2e} over {len(logistic_layers)} layers, "
        f"{differing} of {compared} test predictions differ; GPU fits converged "
        f"{sum(bool(f.converged[0]) for f in fits)}/{len(fits)}, Newton iterations <= "
        f"{max(int(f.n_iter[0]) for f in fits)}, Hessian products <= {max(int(f.n_hessian_products[0]) for f in fits)}")

    # the paper's in-sample saga probes (and its least squares) as the probes stage runs them:
    # `probe_layers(n_jobs=None)`, scikit-learn's saga on the host in worker processes (one per BLAS
    # thread of the bound), in both columns
    def paper(on):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return probe_module.probe_layers({layer: ex.pooled[layer] for layer in layers}, ex.labels,
                                             n_classes=n_classes, protocol="paper_in_sample", seed=args.seed,
                                             device=on, n_jobs=None)

    t_paper_gpu, paper_gpu = clock(lambda: paper(device))
    if unit["sampled"] or args.gpu_only:
        t_paper_cpu, note = t_paper_gpu, "~, the same host work (saga dominates)"
    else:
        t_paper_cpu, paper_cpu = clock(lambda: paper(None))
        note = ""
        say(f"    agreement: paper in-sample accuracy max |GPU - CPU| "
            f"{float(np.abs(paper_gpu['accuracy'] - paper_cpu['accuracy']).max()):.2e}")
    table.add(f"probes: paper in-sample (saga in host worker processes + least squares), {len(layers)} layers",
              t_paper_cpu, t_paper_gpu, note)
    if args.cv_probe:
        last = layers[-1]

        def cv(on):
            return probe_module.cv_logistic_probe(ex.pooled[last], ex.labels, ex_test.pooled[last], ex_test.labels,
                                                  n_classes=n_classes, seed=args.seed, device=on)

        t_cv_gpu, gpu_cv = clock(lambda: cv(device))
        if args.gpu_only:
            table.add(f"probes: logistic cross-validated, layer {last}", None, t_cv_gpu)
            return
        t_cv, cpu_cv = clock(lambda: cv(None))
        table.add(f"probes: logistic cross-validated, layer {last}", t_cv, t_cv_gpu)
        say(f"    agreement: cross-validated logistic chose C={gpu_cv.row['logreg_C']:g} (GPU) / "
            f"C={cpu_cv.row['logreg_C']:g} (CPU), accuracy |GPU - CPU| "
            f"{abs(gpu_cv.row['accuracy'] - cpu_cv.row['accuracy']):.2e}, "
            f"{int(np.count_nonzero(gpu_cv.predictions != cpu_cv.predictions))} of {cpu_cv.predictions.size} "
            f"test predictions differ")


def part_peers(unit, args, table, clock, say):
    device, grid, ex = unit["device"], unit["peer_grid"], unit["ex"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined peers are recorded as NaN, as in the study
        t_gpu, gpu_rows = 0.0, {}
        for layer in grid:
            t, gpu_rows[layer] = clock(lambda: peer_module.peer_scores(ex.pooled[layer], ex.labels, device=device))
            t_gpu += t
        cpu_layers = ([] if args.gpu_only else sample_layers(grid, max(2, args.cpu_sample_layers - 1))
                      if unit["sampled"] else grid)
        t_cpu, worst = 0.0, 0.0
        for layer in cpu_layers:
            t, row = clock(lambda: peer_module.peer_scores(ex.pooled[layer], ex.labels))
            t_cpu += t
            for name in peer_module.PEERS:
                a, b = row[name], gpu_rows[layer][name]
                if np.isfinite(a) and np.isfinite(b):
                    worst = max(worst, abs(a - b) / max(1.0, abs(a)))
    note = ""
    if unit["sampled"] and cpu_layers:
        t_cpu *= len(grid) / len(cpu_layers)
        note = f"{len(cpu_layers)} of {len(grid)} layers timed, scaled"
    table.add(f"peers (LogME, H, H-LW, RankMe; k-NN on sklearn), {len(grid)} layers", t_cpu if cpu_layers else None,
              t_gpu, note)
    say(f"    agreement: peer scores max relative |GPU - CPU| {worst:.2e}")


def part_estimates(unit, args, table, clock, say):
    """The estimates stage (`ntps_nb.study.stages._estimates_stage`): r_V of each interval layer,
    then `ntps_estimate` (default estimator, 90% level) at the k grid up to r_V."""
    device, grid = unit["device"], unit["interval_grid"]
    shards = layer_shards(unit["ex"].shards)
    n_shards = len(unit["ex"].shards)

    def run(layer, on):
        pooled = Moments.combine(shards[layer])
        r_V = (theory_geometry(pooled) if on is None else theory_geometry_torch(pooled, device=on)).r_V
        ks = np.array([k for k in DEFAULT["k"] if k <= r_V], dtype=int)
        return ntps_estimate(shards[layer], ks, estimator=DEFAULT_ESTIMATOR, level=0.90, seed=args.seed, device=on)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t_gpu, gpu_frames = 0.0, {}
        for layer in grid:
            t, gpu_frames[layer] = clock(lambda: run(layer, device))
            t_gpu += t
        if args.gpu_only:
            t_cpu, note = None, ""
        elif not unit["sampled"]:
            t_cpu, worst, nan_cells, flags = 0.0, 0.0, 0, 0
            for layer in grid:
                t, frame = clock(lambda: run(layer, None))
                t_cpu += t
                other = gpu_frames[layer]
                for column in ("estimate", "se", "lower", "upper", "noise_U", "noise_V"):
                    a, b = frame[column].to_numpy(float), other[column].to_numpy(float)
                    nan_cells += int(np.sum(np.isnan(a) != np.isnan(b)))
                    both = np.isfinite(a) & np.isfinite(b)
                    worst = max(worst, float(np.abs(a[both] - b[both]).max(initial=0.0)))
                flags += int(np.sum(frame["reliable"].to_numpy() != other["reliable"].to_numpy()))
            note = ""
            say(f"    agreement: estimates (estimate, se, lower, upper, noise_U, noise_V) max |GPU - CPU| {worst:.2e}, "
                f"cells NaN on one side only {nan_cells}, reliable flags that differ {flags}"
                + (TIES if worst > 1e-6 else ""))
        else:  # one layer's factorisations timed once each, scaled by the counts the estimator solves
            layer = grid[len(grid) // 2]
            pooled = Moments.combine(shards[layer])
            t_geo, _ = clock(lambda: theory_geometry(pooled))
            t_white, white = clock(lambda: _Whitening.of(pooled.Sxx, RANGE_RTOL))
            t_bases, _ = clock(lambda: _whitened_bases(pooled, white, RANGE_RTOL))
            # r_V, the full sample and its two halves, and per left-out shard the rest and its halves;
            # the subspace noise: the whitening, then U and V of the full sample and of each replicate
            per_layer = (1 + 3 + 3 * n_shards) * t_geo + t_white + (1 + n_shards) * t_bases
            t_cpu = per_layer * len(grid)
            note = (f"layer {layer}: {4 + 3 * n_shards} geometries + whitening + {1 + n_shards} x U, V timed once "
                    f"each, x {len(grid)} layers")
    table.add(f"estimates: {DEFAULT_ESTIMATOR} + jackknife + noise, {len(grid)} layers", t_cpu, t_gpu, note)


# ------------------------------------------------------------------------------------------------


def bench_shape(name: str, spec: dict, args, device: torch.device, say) -> None:
    clock = Clock(device)
    d, n_layers = spec["hidden_size"], spec["num_hidden_layers"]
    say(f"\n=== {name}: d = {d}, {n_layers} layers, N = {args.n_texts} train + {args.n_texts // 2} test texts of "
        f"{args.min_len}-{args.max_len} tokens, C = {args.classes} ===")
    SHAPES.setdefault(name, spec)
    t_model, model = clock(lambda: random_model(name, device, getattr(torch, args.dtype)))
    say(f"random model from config: {t_model:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
        f"{args.dtype})")
    texts, labels = texts_of(args.n_texts, args.min_len, args.max_len, spec["vocab_size"], args.classes, seed=0)
    test_texts, test_labels = texts_of(args.n_texts // 2, args.min_len, args.max_len, spec["vocab_size"], args.classes,
                                       seed=1)
    layers = list(range(n_layers + 1))
    unit = {"device": device, "layers": layers, "n_classes": args.classes,
            "interval_grid": resolve_layers(layer_spec(args.interval_layers), layers, "interval_layers"),
            "diag_grid": resolve_layers(layer_spec(args.diagnostic_layers), layers, "diagnostic_layers"),
            "peer_grid": resolve_layers(DEFAULT["peer_layers"], layers, "peer_layers"),
            "sampled": d > args.skip_cpu_above}
    say(f"interval layers {unit['interval_grid']}, diagnostic layers {unit['diag_grid']}, peer layers "
        f"{unit['peer_grid']}; CPU column {'SAMPLED and extrapolated (d > --skip-cpu-above ' + str(args.skip_cpu_above) + ')' if unit['sampled'] else 'measured in full'}")
    tok = IdTokenizer()
    common = dict(batch_size=args.batch_size, max_length=args.max_len, drop_bos=False, device=device, progress=False)
    table = Table(say)
    # warm-up: kernels, the allocator, cuSOLVER handles
    extract(model, tok, (texts[:4], labels[:4]), layers=[0, 1], **common)
    t_train, unit["ex"] = clock(lambda: extract(model, tok, (texts, labels), layers="all", pooled_layers="all",
                                                shards=args.shards, shard_layers=unit["interval_grid"], shard_seed=0,
                                                token_moments=True, n_classes=args.classes,
                                                keep_on_device=device.type == "cuda", **common))
    t_test, unit["ex_test"] = clock(lambda: extract(model, tok, (test_texts, test_labels), layers="all",
                                                    pooled_layers="all", token_moments=False, n_classes=args.classes,
                                                    **common))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "extract" in args.parts:
        say(f"    extraction: {unit['ex'].metadata.get('precision')} products, timings {unit['ex'].metadata.get('timings_s')}")
        table.add("extraction (device; train + test split)", t_train + t_test, t_train + t_test,
                  gpu_note="the same pass, in both")
    ntps_sweep_torch(unit["ex"].moments[0], device=device)  # warm-up of the analysis kernels
    functions = {"ntps": part_ntps, "intervals": part_intervals, "diagnostics": part_diagnostics,
                 "probes": part_probes, "peers": part_peers, "estimates": part_estimates}
    with analysis_threads() as n_threads:
        say(f"analysis BLAS threads (both columns' host work): {n_threads}")
        for part in PARTS[1:]:
            if part == "intervals" and "diagnostics" in args.parts and device.type == "cuda" and not args.late_host_solvers:
                unit["host_solvers"] = start_host_solvers(unit, args)  # as the study does, before the intervals
            if part in args.parts:
                start = time.perf_counter()
                functions[part](unit, args, table, clock, say)
                say(f"    ({part}: {time.perf_counter() - start:.1f} s wall in this run)")
    table.totals(name)
    del unit
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen2-0.5b", "llama3-8b"], help="shapes of bench_extract.SHAPES")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--skip-cpu-above", type=int, default=1024,
                        help="hidden size above which the CPU column is sampled and extrapolated (labelled)")
    parser.add_argument("--interval-layers", default=DEFAULT["interval_layers"],
                        help='layers of the intervals: "grid:3" (the default protocol), "last", or indices "0,16"')
    parser.add_argument("--interval-variants", nargs="+", default=["theory", "reference"],
                        choices=["theory", "reference"],
                        help="the variants the intervals bootstrap, as the study's interval_variants setting "
                             "(default both, the released protocol)")
    parser.add_argument("--diagnostic-layers", default=DEFAULT["diagnostic_layers"],
                        help="layers of the diagnostics, as --interval-layers")
    parser.add_argument("--cpu-sample-layers", type=int, default=3, help="layers timed when the CPU column is sampled")
    parser.add_argument("--cpu-replicates", type=int, default=2, help="interval replicates timed when sampled")
    parser.add_argument("--n-texts", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shards", type=int, default=DEFAULT["shards"])
    parser.add_argument("--n-boot", type=int, default=DEFAULT["n_boot"])
    parser.add_argument("--n-perturb", type=int, default=DEFAULT["n_perturb"])
    parser.add_argument("--n-permutations", type=int, default=DEFAULT["n_permutations"])
    parser.add_argument("--seed", type=int, default=DEFAULT["seed"])
    parser.add_argument("--no-cv-probe", dest="cv_probe", action="store_false",
                        help="leave out the cross-validated logistic probe")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 160 texts of 8-40 tokens, 5 shards, 20 bootstrap replicates (a CPU check)")
    parser.add_argument("--late-host-solvers", action="store_true",
                        help="on a GPU, start the diagnostics' host solver comparison in the diagnostics part "
                             "(as before session 16) instead of before the intervals (as the study does)")
    parser.add_argument("--resident-check", action="store_true",
                        help="on a GPU, also time the sweeps on host copies of the moments (what resident moments save)")
    parser.add_argument("--compare-range-basis", action="store_true",
                        help="also time the first interval layer's theory intervals with the replicates whitened on "
                             "the whole space (RANGE_BASIS_MAX_SHARE = 0) against inside the shards' Sxx range")
    parser.add_argument("--gpu-only", action="store_true",
                        help="time the GPU column only (the CPU column is left empty: for runs that time the rest of a "
                             "shape whose CPU column an earlier run sampled)")
    parser.add_argument("--out", help="also append every line to this file")
    args = parser.parse_args()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    shapes = {name: dict(SHAPES[name]) for name in args.shapes if name in SHAPES}
    if args.quick:
        shapes = dict(QUICK_SHAPES)
        args.n_texts, args.min_len, args.max_len, args.shards, args.n_boot = 160, 8, 40, 5, 20
        args.dtype = "float32"
    missing = [name for name in args.shapes if name not in SHAPES] if not args.quick else []
    if missing:
        parser.error(f"unknown shapes {missing}; choose from {sorted(SHAPES)}")
    device = torch.device(args.device)
    say = reporter(args.out)
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "torch on the CPU"
    say(f"bench_unit_gpu {time.strftime('%Y-%m-%d %H:%M:%S')}: python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; GPU column: {name} ({device}); "
        f"CPU column: numpy/scipy on {platform.machine()}, {len(os.sched_getaffinity(0))} cores available")
    say(f"parts: {', '.join(args.parts)}; n_boot {args.n_boot}, shards {args.shards}, n_perturb {args.n_perturb}, "
        f"n_permutations {args.n_permutations}, interval variants {', '.join(args.interval_variants)}, "
        f"batch_size {args.batch_size}")
    with contextlib.ExitStack():
        for shape, spec in shapes.items():
            bench_shape(shape, spec, args, device, say)
    say(f"\ndone in {time.perf_counter() - START:.0f} s")


START = time.perf_counter()

if __name__ == "__main__":
    main()
