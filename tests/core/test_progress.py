"""Progress bars of the core's long loops: each counts its own steps, appears only after the delay,
and is off with progress=False or TQDM_DISABLE."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import ntps_nb.core.progress as progress_module
from ntps_nb import (
    Moments,
    estimate_by_n,
    excess_loss_interval,
    ntps_diagnostics,
    ntps_difference,
    ntps_interval,
    ntps_estimate,
    ntps_interval_sweep,
    split_into_shards,
    synthetic_linear_task,
    width_by_n,
)
from ntps_nb.core.intervals import coverage_study
from ntps_nb.core.probes import probe_layers
from tests.core.torch_device import DEVICE

N_BOOT = 6
N_SHARDS = 8
CALLS = 21  # the entries of `_calls`


@pytest.fixture(scope="module")
def task():
    return synthetic_linear_task(n_texts=800, d=12, n_classes=3, n_predictable=4, seed=5)


@pytest.fixture(scope="module")
def shards(task):
    return split_into_shards(task, N_SHARDS, seed=0)


def _calls(task, shards):
    """(name on the bar, the call, the steps it must count): each step one replicate, perturbed copy,
    permutation, subsample, sample, part of an estimate or probe fit, as the function's docstring says; `CALLS`
    of them."""
    full = Moments.combine(shards)
    layers = {layer: (task.features[:600] * layer, task.features[600:] * layer) for layer in (1, 2, 3)}
    n_subsamples = 2  # nested_groups of 8 shards in groups of 4: the first 4, then all 8
    calls = [
        ("ntps_interval", lambda **kw: ntps_interval(shards, k=2, n_boot=N_BOOT, **kw), N_BOOT + N_SHARDS),
        ("excess_loss_interval", lambda **kw: excess_loss_interval(shards, k=2, n_boot=N_BOOT, **kw),
         N_BOOT + N_SHARDS),
        ("ntps_interval_sweep", lambda **kw: ntps_interval_sweep(shards, n_boot=N_BOOT, **kw), N_BOOT + N_SHARDS),
        ("ntps_difference", lambda **kw: ntps_difference(shards, shards[::-1], k=2, n_boot=N_BOOT, **kw),
         2 * (N_BOOT + N_SHARDS)),
        ("width_by_n", lambda **kw: width_by_n(shards, 2, n_groups=4, n_boot=N_BOOT, **kw), n_subsamples),
        ("estimate_by_n", lambda **kw: estimate_by_n(shards, [2], n_groups=4, **kw), n_subsamples),
        # the pooled and S leave-one-out solves, the estimate, its S replicates, the quadratic part, the rotation check
        ("ntps_estimate", lambda **kw: ntps_estimate(shards, [1, 2], **kw), 1 + N_SHARDS + 1 + N_SHARDS + 1 + 1),
        ("ntps_estimate", lambda **kw: ntps_estimate(shards, [1, 2], interval="jackknife", **kw),
         1 + N_SHARDS + 1 + N_SHARDS + 1),
        ("ntps_diagnostics", lambda **kw: ntps_diagnostics(full, task.features, task.labels, k=[2], n_perturb=3,
                                                           n_permutations=4, solvers=False, **kw), 3 + 4),
        ("coverage_study", lambda **kw: coverage_study(3, n_texts=200, n_shards=4, n_boot=N_BOOT,
                                                       population_n_texts=400, truth_shards=0, d=12, **kw), 3),
        # one fit per (layer, protocol), here and in worker processes
        ("probe_layers", lambda **kw: probe_layers(layers, task.labels[:600], task.labels[600:], n_classes=3,
                                                   protocol=["heldout", "paper_in_sample"], **kw), 3 * 2),
        ("probe_layers", lambda **kw: probe_layers(layers, task.labels[:600], task.labels[600:], n_classes=3,
                                                   n_jobs=2, **kw), 3),
        # the torch backend (on the CPU here): its replicates and copies solved a block at a time, its parts
        ("ntps_interval_sweep", lambda **kw: _torch().interval_sweep_torch(shards, n_boot=N_BOOT, batch_size=4, **kw),
         N_BOOT + N_SHARDS),
        ("ntps_interval_sweep", lambda **kw: _torch().interval_sweep_torch(shards, variant="reference", n_boot=N_BOOT,
                                                                           batch_size=4, **kw), N_BOOT + N_SHARDS),
        ("interval_replicates_torch", lambda **kw: _torch().interval_replicates_torch(shards, np.ones((5, N_SHARDS)),
                                                                                      [1, 2], batch_size=2, **kw), 5),
        ("ntps_diagnostics", lambda **kw: ntps_diagnostics(full, task.features, task.labels, k=[2], n_perturb=3,
                                                           n_permutations=4, solvers=False, device=DEVICE,
                                                           batch_size=2, **kw), 3 + 4),
        # the combinations solved: all shards, the two halves, S left out of all and S of their half; the
        # quadratic part's contrasts between the halves' shards (4 x 4); the rotation sets' pooled solve
        ("ntps_estimate", lambda **kw: ntps_estimate(shards, [1, 2], device=DEVICE, batch_size=3, **kw),
         1 + 2 + 2 * N_SHARDS + (N_SHARDS // 2) ** 2 + 1),
        ("ntps_estimate", lambda **kw: ntps_estimate(shards, [1, 2], interval="jackknife", device=DEVICE,
                                                     batch_size=3, **kw), 1 + 2 + 2 * N_SHARDS + 1),
        ("ntps_interval", lambda **kw: ntps_interval(shards, k=2, n_boot=N_BOOT, device=DEVICE, **kw),
         N_BOOT + N_SHARDS),
        ("ntps_difference", lambda **kw: ntps_difference(shards, shards[::-1], k=2, n_boot=N_BOOT, device=DEVICE, **kw),
         2 * (N_BOOT + N_SHARDS)),
        ("width_by_n", lambda **kw: width_by_n(shards, 2, n_groups=4, n_boot=N_BOOT, device=DEVICE, **kw),
         n_subsamples),
    ]
    assert len(calls) == CALLS
    return calls


def _torch():
    """The torch backend, imported only by the calls that use it."""
    import ntps_nb.core.backends.torch as backend

    return backend


def _totals(text: str, name: str) -> set[int]:
    """The totals the bar named ``name`` showed ("name: ... | i/total [")."""
    return {int(total) for total in re.findall(rf"{name}:[^|\r\n]*\|[^|]*\|\s*\d+/(\d+)", text)}


@pytest.mark.parametrize("index", range(CALLS))
def test_a_bar_counts_the_steps_of_its_call_once_the_delay_has_passed(task, shards, index, core_bars, capsys):
    desc, call, steps = _calls(task, shards)[index]
    call()
    assert _totals(capsys.readouterr().err, desc) == {steps}  # shown, with its total
    [bar] = [b for b in core_bars if b.enabled]  # one bar a call: inner calls keep theirs off
    assert (bar.desc, bar.total, bar.n, bar.disable) == (desc, steps, steps, True)  # every step counted, closed


@pytest.mark.parametrize("index", range(CALLS))
def test_no_bar_with_progress_false(task, shards, index, core_bars, capsys):
    desc, call, _ = _calls(task, shards)[index]
    call(progress=False)
    assert desc + ":" not in capsys.readouterr().err
    assert core_bars and not any(b.enabled for b in core_bars)


def test_no_bar_where_the_environment_sets_tqdm_disable():
    # tqdm reads TQDM_* variables when it is imported: the variable is set before Python starts
    script = (
        "import ntps_nb.core.progress as p; p.PROGRESS_DELAY_S = 0.0\n"
        "from ntps_nb import ntps_interval, split_into_shards, synthetic_linear_task\n"
        "task = synthetic_linear_task(n_texts=200, d=8, n_classes=2, n_predictable=2, seed=0)\n"
        "ntps_interval(split_into_shards(task, 4, seed=0), k=1, n_boot=3)\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("TQDM_")}
    shown = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert "ntps_interval:" in shown.stderr  # the script does show a bar without the variable
    off = subprocess.run([sys.executable, "-c", script], env={**env, "TQDM_DISABLE": "1"}, capture_output=True,
                         text=True, check=True)
    assert "ntps_interval:" not in off.stderr


def test_a_call_quicker_than_the_delay_shows_no_bar(shards, capsys):
    assert progress_module.PROGRESS_DELAY_S >= 1.0  # far above the call below (a few hundredths of a second)
    ntps_interval(shards, k=2, n_boot=N_BOOT)
    assert "ntps_interval:" not in capsys.readouterr().err
