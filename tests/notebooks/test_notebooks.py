"""The notebook series: clean metadata, a parameters cell each, smoke runs through papermill,
and nbval (lax mode) on the cells that print rounded key numbers.

The smoke runs and nbval carry the ``notebooks`` marker (deselect with ``-m "not notebooks"``).
Notebooks 03 and 05 read study results: the fixture runs the smoke study (tiny model, seconds)
into a temporary folder when `ntps_nb.study` is available, else they run on their "no results"
path.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from ntps_nb import notebooks as nbs
from ntps_nb.core.rotation import INTERVAL_DESCRIPTIONS

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: Notebooks whose NBVAL_CHECK_OUTPUT cells nbval re-executes and compares (the others read
#: study results through relative paths or only show figures).
NBVAL_NOTEBOOKS = ("00_quickstart", "01_theory_derivation", "02_bound_checks", "04_lora_gain_prediction")


# -- metadata (fast) ---------------------------------------------------------------------------


def test_committed_notebooks_are_clean():
    report = nbs.check_notebooks()
    assert set(report) == set(nbs.NOTEBOOKS)
    assert not any(report.values())


def test_every_notebook_has_smoke_parameters_it_declares():
    for name in nbs.NOTEBOOKS:
        nb = nbformat.read(nbs.notebook_path(name), as_version=4)
        source = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        declared = {line.split("=")[0].strip() for line in source.splitlines() if "=" in line and not line.startswith("#")}
        assert set(nbs.SMOKE_PARAMETERS[name]) <= declared | {"results_dir"}, name


def _noisy_notebook():
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("x = 1", metadata={"tags": ["parameters"], "papermill": {"duration": 1.0},
                                                              "execution": {"iopub.status.busy": "t"}}),
                             new_code_cell("x", execution_count=7,
                                           outputs=[nbformat.v4.new_output("display_data", data={
                                               nbs.WIDGET_MIME: {"model_id": "abc"}, "text/plain": "VBox()"})])])
    nb.metadata.update({"papermill": {"duration": 3.0}, "widgets": {"state": {}},
                        "kernelspec": {"name": "venv-kernel", "display_name": "x", "language": "python"},
                        "language_info": {"name": "python", "version": "3.11.9"}})
    return nb


def test_check_finds_noise_and_clean_removes_it():
    nb = _noisy_notebook()
    problems = " ".join(nbs.notebook_problems(nb))
    for word in ("papermill", "widgets", "venv-kernel", "language_info", "cell 0 metadata", "widget-view"):
        assert word in problems
    cleaned = nbs.clean_notebook(nb)
    assert nbs.notebook_problems(cleaned) == []
    assert cleaned.cells[1].execution_count == 1
    assert cleaned.cells[1].outputs == []


def test_hidden_solution_cells_keep_only_their_hidden_source():
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                             new_code_cell("solution", metadata={"jupyter": {"source_hidden": True, "outputs_hidden": True},
                                                                 "collapsed": True})])
    nb.metadata.update({"kernelspec": dict(nbs.KERNELSPEC), "language_info": {"name": "python"}})
    problems = " ".join(nbs.notebook_problems(nb))
    assert "cell 1 metadata has ['collapsed']" in problems and "outputs_hidden" in problems
    cleaned = nbs.clean_notebook(nb)
    assert cleaned.cells[1].metadata == {"jupyter": {"source_hidden": True}}
    assert nbs.notebook_problems(cleaned) == []


def test_every_notebook_ends_with_exercises_and_hidden_solutions():
    for name in nbs.NOTEBOOKS:
        nb = nbformat.read(nbs.notebook_path(name), as_version=4)
        exercises, solutions = nb.cells[-2], nb.cells[-1]
        assert exercises.cell_type == "markdown" and exercises.source.startswith("## Exercises"), name
        numbered = [line for line in exercises.source.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. ")]
        assert 2 <= len(numbered) <= 3, (name, numbered)
        assert solutions.cell_type == "code" and solutions.metadata.get("jupyter") == nbs.HIDDEN_SOURCE, name


def test_committed_notebooks_quote_only_printed_numbers():
    """The committed copies carry their default run's outputs: their markdown quotes no number those
    outputs do not print (no execution here)."""
    report = nbs.check_quoted_numbers(nbs.NOTEBOOKS)
    assert len(report) == len(nbs.NOTEBOOKS)
    assert {path: [str(f) for f in found] for path, found in report.items() if found} == {}


def test_check_requires_one_parameters_cell(tmp_path):
    nb = nbs.clean_notebook(_noisy_notebook())
    nb.cells[0].metadata = {}
    assert any("parameters" in p for p in nbs.notebook_problems(nb))
    path = tmp_path / "00_quickstart.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(nbs.NotebookCheckError, match="parameters"):
        nbs.check_notebooks(["00_quickstart"], folder=tmp_path)


def test_names_resolve():
    assert nbs.notebook_path("00").name == "00_quickstart.ipynb"
    assert nbs.notebook_path("explorer").name == "05_explorer.ipynb"
    with pytest.raises(ValueError, match="unknown notebook"):
        nbs.notebook_path("99")


def test_cli_parses_run_and_check():
    from ntps_nb.cli import build_parser

    args = build_parser().parse_args(["notebooks", "run", "00", "-p", "max_train", "50", "--smoke", "--out", "x"])
    assert (args.name, args.smoke, args.out, args.parameter) == ("00", True, "x", [["max_train", "50"]])
    assert nbs._parse_value("50") == 50 and nbs._parse_value("trec6") == "trec6"
    assert build_parser().parse_args(["notebooks", "check"]).func is nbs._cli_check


def test_a_parameter_the_notebook_does_not_have_is_refused_before_it_runs(tmp_path, capsys):
    """papermill injects any name and runs on the defaults a misspelt one was meant to replace."""
    from ntps_nb.cli import build_parser

    assert nbs.declared_parameters("00")[:3] == list(nbs.notebook_parameters("00"))[:3]
    assert set(nbs.declared_parameters("00")) == set(nbs.notebook_parameters("00"))  # all literals there
    with pytest.raises(ValueError, match=r"00_quickstart has no parameter\(s\) \['max_trian'\]; its parameters"):
        nbs.run_notebook("00", {"max_trian": 50}, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing ran
    parse = build_parser().parse_args
    args = parse(["notebooks", "run", "--all", "-p", "max_trian", "50", "--out", str(tmp_path)])
    assert args.func(args) == 2 and "has parameter(s) ['max_trian']" in capsys.readouterr().err
    args = parse(["notebooks", "run", "00", "--in-place", "-p", "max_train", "50"])
    assert args.func(args) == 2 and "--in-place writes the committed notebooks" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# -- smoke runs (papermill) and nbval ---------------------------------------------------------


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory):
    """Combined tables of the smoke study (tiny model) in a temporary folder, or None."""
    try:
        from ntps_nb import study
    except ModuleNotFoundError:
        return None
    config = REPO / "studies" / "smoke.toml"
    if not config.is_file():
        return None
    folder = tmp_path_factory.mktemp("smoke_results")
    study.run_study(study.load_config(config, results_dir=str(folder)), log=lambda *_: None)
    return folder


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, smoke_results):
    out = tmp_path_factory.mktemp("notebooks")
    runs = {}
    for name in nbs.NOTEBOOKS:
        params = {"results_dir": str(smoke_results)} if smoke_results is not None and name in (
            "03_per_model_correlation", "05_explorer") else {}
        # a per-cell limit: a stuck kernel fails this test in minutes instead of holding CI
        runs[name] = nbs.run_notebook(name, params, out, smoke=True, timeout=300)
    return runs


@pytest.mark.notebooks
@pytest.mark.parametrize("name", nbs.NOTEBOOKS)
def test_smoke_run(smoke_runs, name):
    run = smoke_runs[name]
    nb = nbformat.read(run.notebook, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert run.html.is_file() and run.html.stat().st_size > 10_000
    assert nbs.notebook_problems(nbs.clean_notebook(nb, keep_injected=False)) == []
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    if run.parameters:  # papermill injects a cell only when there is something to inject
        assert injected and all(f"{key} = " in injected[0].source for key in run.parameters)


@pytest.mark.notebooks
@pytest.mark.parametrize("name", nbs.NOTEBOOKS)
def test_smoke_runs_quote_only_printed_numbers(smoke_runs, name):
    """Every number a notebook's markdown quotes is printed by the smoke run too: the prose holds
    whatever the data (reuses the smoke runs; no extra execution)."""
    nb = nbformat.read(smoke_runs[name].notebook, as_version=4)
    assert [str(f) for f in nbs.unprinted_numbers(nb)] == []


@pytest.mark.notebooks
def test_nbval_lax_on_key_numbers(smoke_runs):
    """Re-execute the smoke-executed notebooks with nbval; cells marked NBVAL_CHECK_OUTPUT must
    print the same rounded numbers (determinism of the key results)."""
    paths = [str(smoke_runs[name].notebook) for name in NBVAL_NOTEBOOKS]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         "--nbval-sanitize-with", str(HERE / "sanitize.cfg"), "--rootdir", str(Path(paths[0]).parent), *paths],
        cwd=str(HERE.parents[1] / "notebooks"), capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_loo_gain_prediction_recovers_a_line_and_beats_the_mean():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 0.9, 12)
    frame = pd.DataFrame({"model": "m", "dataset": [f"d{i}" for i in range(12)], "ntps": x,
                          "lora_gain": 0.3 - 0.3 * x + 1e-3 * rng.standard_normal(12)})
    row = nbs.loo_gain_prediction(frame).iloc[0]
    assert abs(row.slope + 0.3) < 0.01 and row.mae < 0.01 < row.mae_mean and row.skill > 0.8
    assert row.rho_heldout > 0.9
    with pytest.raises(ValueError, match="at least 4"):
        nbs.loo_gain_prediction(frame.head(3))


def test_layer_profile_intervals_are_ntps_interval_at_the_shard_layers():
    import numpy as np

    from ntps_nb.core.intervals import layer_shards, ntps_interval

    # 160 texts in d = 64: at or below d the labels are fitted exactly and classes of equal size tie, an order the
    # rounding of each summation order (the pooled moments, the shards added up) decides
    run = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=160, max_test=20, max_length=32,
                                       shards=5, interval_layers=[0, 2])
    layer_profile = nbs.layer_profile(run, k=2, intervals=True, n_boot=20).set_index("layer")
    assert layer_profile["ntps_lower"].notna().tolist() == [True, False, True]
    iv = ntps_interval(layer_shards(run.train.shards)[2], k=2, n_boot=20)
    assert (layer_profile.loc[2, "ntps_lower"], layer_profile.loc[2, "ntps_upper"]) == (iv.lower, iv.upper)
    assert np.isclose(layer_profile.loc[2, "ntps"], iv.estimate, rtol=1e-9)  # the shards add up to the full moments
    plain = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=40, max_test=20, max_length=32)
    with pytest.raises(ValueError, match="intervals need shard moments"):
        nbs.layer_profile(plain, k=2, intervals=True)


@pytest.mark.parametrize("estimator", ["plugin", "richardson"])
def test_layer_profile_solves_on_the_device_it_is_given(estimator, monkeypatch):
    """``device=`` reaches the probes and every layer's NTPS, interval or estimate (counted on the torch backend,
    on its CPU device here), and the profile is the host's to rounding; an estimator the backend does not solve is
    refused before anything is fitted."""
    pytest.importorskip("torch")
    from ntps_nb.core.backends import torch as backend
    from tests.core.test_backend_torch import assert_frames_agree

    run = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=160, max_test=40, max_length=32,
                                       shards=5, interval_layers=[0, 2], halves=True, progress=False)
    options = dict(k=2, intervals=True, estimator=estimator, n_boot=20, progress=False)
    want = nbs.layer_profile(run, **options)
    solved = []
    for name in ("ntps_torch", "interval_replicates_torch", "ntps_estimate_torch", "least_squares_predictions_torch"):
        original = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _f=original, _n=name, **kw: solved.append(_n) or _f(*a, **kw))
    got = nbs.layer_profile(run, device="cpu", **options)
    assert_frames_agree(got, want)
    assert solved.count("least_squares_predictions_torch") >= 1  # the probes, batched over the 3 layers
    if estimator == "plugin":  # 3 layers' values, the 2 shard layers' intervals
        assert (solved.count("ntps_torch"), solved.count("interval_replicates_torch")) == (3, 2)
    else:  # the 2 shard layers' estimates, the halves' value at layer 1
        assert (solved.count("ntps_estimate_torch"), solved.count("ntps_torch")) == (2, 1)
    solved.clear()
    monkeypatch.setattr("ntps_nb.core.probes.probe_layers", lambda *a, **kw: solved.append("probe_layers"))
    with pytest.raises(ValueError, match="device='cpu' solves the plug-in's and richardson's layer profiles; "
                                         "estimator='pca' runs on"):
        nbs.layer_profile(run, k=2, estimator="pca", device="cpu")
    assert solved == []  # neither the probes nor any NTPS


def test_extract_model_on_dataset_loads_on_its_device_and_shows_the_extraction(tiny_llama, monkeypatch, tmp_path,
                                                                               capsys):
    import ntps_nb.models

    asked = []

    def recording_load_model(name, **kwargs):
        asked.append(kwargs.get("device"))
        return tiny_llama

    monkeypatch.setattr(ntps_nb.models, "load_model", recording_load_model)
    monkeypatch.setenv("NTPS_NB_CACHE", str(tmp_path))  # nothing cached: both splits are extracted
    options = dict(max_train=24, max_test=12, max_length=16)
    nbs.extract_model_on_dataset("tiny-llama", "trec6", progress=False, **options)
    assert "extract:" not in capsys.readouterr().err
    monkeypatch.setenv("NTPS_NB_CACHE", str(tmp_path / "fresh"))
    nbs.extract_model_on_dataset("tiny-llama", "trec6", device="cuda:7", **options)  # the stand-in loads on the CPU
    finished = set(re.findall(r"extract: 100%\|[^|]*\| (\d+/\d+)", capsys.readouterr().err))
    assert finished == {"24/24", "12/12"}  # the train split's bar, then the test split's
    assert asked == ["cpu", "cuda:7"]  # the default, then the device given


def test_the_helper_keeps_the_train_moments_where_the_analysis_solves_them(tiny_llama, monkeypatch, tmp_path):
    """`extract_model_on_dataset(analysis_device=...)` asks `keeps_moments_on_device` (the study's rule) about the
    model's device and the train split's layers, shards and halves, and passes its answer to the extraction: where it
    says yes the train moments are resident (here on the CPU, standing in for the GPU), fresh or from the cache; the
    test split's pooled features are never kept. A study's "auto" and "numpy" are resolved against the model's
    device before the rule is asked (before, "auto" reached it as is and kept nothing, even on the model's GPU)."""
    import ntps_nb.extract
    import ntps_nb.models
    from ntps_nb.core.backends import torch as backend

    asked = []

    def rule(analysis_device, model_device, d, n_layers, settings):
        asked.append((analysis_device, str(model_device), d, n_layers, settings.get("shards")))
        return analysis_device is not None

    monkeypatch.setattr(ntps_nb.models, "load_model", lambda name, **kwargs: tiny_llama)
    monkeypatch.setattr(ntps_nb.extract, "keeps_moments_on_device", rule)
    monkeypatch.setenv("NTPS_NB_CACHE", str(tmp_path))
    options = dict(max_train=24, max_test=12, max_length=16, shards=4, interval_layers=[1], halves=True, progress=False)
    info = tiny_llama[2]
    for analysis_device in (None, "cuda:0", "cuda:0"):  # extracted, then read from the cache twice
        run = nbs.extract_model_on_dataset("tiny-llama", "trec6", analysis_device=analysis_device, **options)
        parts = [run.train.moments, *run.train.shards, *run.train.halves]
        kept = [backend.resident(part[layer].C0) is not None for part in parts for layer in part.layers]
        assert len(kept) == info.n_hidden_states + 4 + 2 * (info.n_hidden_states - 1)
        assert all(kept) if analysis_device else not any(kept), analysis_device
    want = [(device, "cpu", info.hidden_size, info.n_hidden_states, 4) for device in (None, "cuda:0", "cuda:0")]
    assert asked == want
    # a study's settings are resolved against the model's device first: "auto" with the model on the CPU is numpy
    for setting in ("auto", "numpy"):
        nbs.extract_model_on_dataset("tiny-llama", "trec6", analysis_device=setting, **options)
    assert asked[-2:] == [(None, "cpu", info.hidden_size, info.n_hidden_states, 4)] * 2


def test_word_projections_load_the_model_on_its_device(tiny_llama, monkeypatch):
    """`word_projections` loads the model where it is asked to (notebook 05's ``device``); before, it always loaded
    it on the CPU."""
    import ntps_nb.models

    asked = []
    monkeypatch.setattr(ntps_nb.models, "load_model", lambda name, **kw: asked.append(kw.get("device")) or tiny_llama)
    run = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=60, max_test=12, max_length=16,
                                       loaded=tiny_llama, progress=False)
    groups = {"a": ["happy", "glad"], "b": ["sad", "gloomy"], "c": ["is", "was"]}
    layer = run.layers[-1]
    for device in (None, "cuda:7"):  # the stand-in runs on the CPU
        options = {} if device is None else {"device": device}
        frame = nbs.word_projections("tiny-llama", groups, run.train.moments[layer], layer=layer, **options)
        assert len(frame) == 2 * 6 and set(frame.space) == {"U", "V"}
    assert asked == ["cpu", "cuda:7"]  # the default, then the device given


@pytest.mark.parametrize("estimator", ["plugin", "richardson"])
def test_layer_profile_shows_a_bar_over_its_probe_fits_then_one_over_its_layers(estimator, core_bars, capsys):
    run = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=40, max_test=20, max_length=32,
                                       shards=6, interval_layers=[0, 2], halves=True)
    nbs.layer_profile(run, k=2, intervals=True, estimator=estimator, n_boot=5, progress=False)
    assert core_bars and not any(bar.enabled for bar in core_bars)
    nbs.layer_profile(run, k=2, intervals=True, estimator=estimator, n_boot=5)
    made = [(bar.given_desc, bar.total, bar.n) for bar in core_bars if bar.enabled]
    assert made == [("probe_layers", 3, 3), ("layer_profile", 3, 3)]  # 3 layers: each fitted, then each scored
    assert "layer_profile:" in capsys.readouterr().err


def test_layer_profile_with_richardson_is_that_estimator_on_every_layer():
    """estimator="richardson": on the shard layers `ntps_estimate`'s estimate, jackknife interval and
    flag; on the other layers the halves' value, checked against the Richardson formula from the
    plug-ins of the full sample and the two halves (computed here independently). A k beyond every layer's
    rank gives NaN, and each layer says so by name."""
    import warnings

    import numpy as np

    from ntps_nb.core.estimators import ntps_estimate
    from ntps_nb.core.intervals import layer_shards
    from ntps_nb.core.moments import Moments
    from ntps_nb.core.score import BeyondRankWarning, ntps

    run = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=40, max_test=20, max_length=32,
                                       shards=6, interval_layers=[0, 2], halves=True)
    profile = nbs.layer_profile(run, k=2, intervals=True, estimator="richardson", level=0.9).set_index("layer")
    assert (profile["estimator"] == "richardson").all() and profile["ntps_lower"].notna().tolist() == [True, False, True]
    est = ntps_estimate(layer_shards(run.train.shards)[2], [2], level=0.9, seed=0).iloc[0]
    for column, value in (("ntps", "estimate"), ("ntps_lower", "lower"), ("ntps_upper", "upper"), ("ntps_se", "se")):
        assert profile.loc[2, column] == est[value], column
    assert profile.loc[2, "reliable"] == est["reliable"]
    assert profile.loc[2, "interval"].startswith(INTERVAL_DESCRIPTIONS["quadratic"]) and est["interval"] == "quadratic"
    finite = profile.dropna(subset=["ntps_lower"])
    assert ((finite["ntps_lower"] <= finite["ntps"]) & (finite["ntps"] <= finite["ntps_upper"])).all()  # centred
    half_a, half_b = (half[1] for half in run.train.halves)
    full = Moments.combine([half_a, half_b])
    h = np.mean([1 / half_a.n_texts, 1 / half_b.n_texts])
    w = h / (h - 1 / full.n_texts)
    by_hand = w * ntps(full, k=2) + (1 - w) * np.mean([ntps(half_a, k=2), ntps(half_b, k=2)])
    assert profile.loc[1, "ntps"] == pytest.approx(by_hand, abs=1e-12)
    beyond = full.d + 1  # more next-token directions than any layer has (r_V <= d): undefined, NaN on every layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert nbs.layer_profile(run, k=beyond, intervals=True, estimator="richardson")["ntps"].isna().all()
    said = [str(w.message) for w in caught if w.category is BeyondRankWarning]  # each layer says why, by name
    assert sorted(said) == sorted(set(said)) and len(said) == len(run.layers)
    assert {m.split(",")[0] for m in said} == {f"layer {layer}" for layer in run.layers}
    assert all(f"k = {beyond} is beyond the retained rank of C0" in m for m in said)
    with pytest.raises(ValueError, match="beyond the retained rank"):  # the plug-in's profile refuses it
        nbs.layer_profile(run, k=beyond)
    with pytest.raises(ValueError, match="neither"):  # no halves: layer 1 has nothing richardson can read
        nbs.layer_profile(nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=40, max_test=20, max_length=32,
                                                       shards=6, interval_layers=[0, 2]), k=2, estimator="richardson")
    with pytest.raises(ValueError, match="needs shards"):
        nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=40, max_test=20, halves=True)


def test_layer_profile_with_other_estimators_reads_what_each_needs():
    """An estimator of the pooled moments alone is computed from them on the layers without shards (the
    value `estimate_ntps` gives those moments); a shard estimator other than richardson needs shards on
    every layer, says how to get them, and then gives its own value everywhere."""
    from ntps_nb.core.estimators import estimate_ntps
    from ntps_nb.core.intervals import layer_shards

    run = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=40, max_test=20, max_length=32,
                                       shards=5, interval_layers=[0, 2])
    profile = nbs.layer_profile(run, k=2, intervals=True, estimator="pca", level=0.9).set_index("layer")
    assert (profile["estimator"] == "pca").all() and profile["ntps_lower"].notna().tolist() == [True, False, True]
    for layer in (0, 1, 2):  # the shards add up to the pooled moments, so every layer is that estimator's value
        value = estimate_ntps(run.train.moments[layer], [2], estimator="pca").estimate[0]
        assert profile.loc[layer, "ntps"] == pytest.approx(value, abs=1e-12), layer
    with pytest.raises(ValueError, match='interval_layers="all"'):
        nbs.layer_profile(run, k=2, estimator="jackknife")
    every = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=40, max_test=20, max_length=32,
                                         shards=5, interval_layers="all")
    profile = nbs.layer_profile(every, k=2, estimator="jackknife").set_index("layer")
    value = estimate_ntps(layer_shards(every.train.shards)[1], [2], estimator="jackknife").estimate[0]
    assert (profile["estimator"] == "jackknife").all() and profile.loc[1, "ntps"] == pytest.approx(value, abs=1e-12)


def test_layer_profile_says_interpolation_once_with_its_layers():
    """Fewer texts than the rank of Sxx at every layer: one InterpolationWarning for the whole profile (not
    one a layer), naming every layer, whichever estimator and whether or not it has the interval columns;
    other warnings are not swallowed."""
    import warnings

    from ntps_nb.core.score import InterpolationWarning, integer_ranges

    assert integer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and integer_ranges([4]) == "4"
    run = nbs.extract_model_on_dataset("tiny-llama", "trec6", max_train=40, max_test=20, max_length=32,
                                       shards=5, interval_layers=[0, 2], halves=True)
    every = f"NTPS at {len(run.layers)} of {len(run.layers)} layers ({integer_ranges(run.layers)}) "
    # richardson's layer without shards (1) reads the halves: said too, with or without the interval columns
    for estimator, intervals in (("plugin", True), ("plugin", False), ("richardson", True), ("richardson", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nbs.layer_profile(run, k=2, intervals=intervals, estimator=estimator, n_boot=10)
        said = [w for w in caught if issubclass(w.category, InterpolationWarning)]
        assert len(said) == 1, [str(w.message)[:80] for w in said]
        message = str(said[0].message)
        assert message.startswith(every) and "Layer 0: the pooled moments: 40 texts" in message, message[:80]
        assert said[0].filename == __file__  # said at the caller's line
    gathered = nbs._GatheredInterpolation()
    with pytest.warns(RuntimeWarning, match="passes through"):
        with gathered.at(3):
            warnings.warn("passes through", RuntimeWarning)
    assert not gathered.messages


def test_profile_headline_leaves_out_layers_without_a_defined_ntps():
    import numpy as np
    import pandas as pd
    from scipy.stats import spearmanr

    profile = pd.DataFrame({"layer": [0, 1, 2, 3, 4], "ntps": [0.2, 0.5, 0.3, 0.4, 0.1],
                            "accuracy": [0.6, 0.7, 0.9, 0.8, 0.5]})
    rho = spearmanr(profile["ntps"], profile["accuracy"])[0]
    assert nbs.profile_headline(profile).splitlines() == [
        "highest NTPS: layer 1 (0.50); best held-out probe: layer 2 (accuracy 0.90)",
        f"Spearman rho over layers, NTPS vs held-out accuracy: {rho:+.2f}"]
    undefined = profile.assign(ntps=profile["ntps"].mask(profile["layer"] == 1))
    kept = undefined.dropna()
    lines = nbs.profile_headline(undefined).splitlines()
    assert lines[0].startswith("highest NTPS: layer 3 (0.40)")
    assert lines[1].endswith(f"{spearmanr(kept['ntps'], kept['accuracy'])[0]:+.2f}")
    assert lines[2] == "(1 of 5 layers left out: NTPS undefined there)"
    none = nbs.profile_headline(profile.assign(ntps=np.nan))
    assert none.startswith("NTPS is defined at 0 of 5 layers") and "layer 2 (accuracy 0.90)" in none


def test_diagnostics_digest_counts_against_the_rows():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = [{"model": m, "dataset": d, "variant": v, "config": c, "perturb_max_dev": rng.uniform(0, 0.1),
             "perm_z": rng.normal(0, 5), "n_permutations": 10}
            for m in ("a", "a:random") for d in ("x", "y", "z")
            for v, configs in (("theory", ("k=1", "k=2", "k=8")), ("reference", ("f=0.1", "f=0.5")))
            for c in configs]
    diag = pd.DataFrame(rows)
    digest = nbs.diagnostics_digest(diag).set_index(["model", "variant"])
    for (model, variant), group in diag.groupby(["model", "variant"]):
        row = digest.loc[(model, variant)]
        assert row.n_pairs == len(group) and row.above_null == (group.perm_z > 2).sum()
        assert row.below_null == (group.perm_z < -2).sum() and row.z_min == group.perm_z.min()
        worst = group.loc[group.perturb_max_dev.idxmax()]
        assert row.max_perturbation_at == f"{worst.dataset}, {worst.config}"
        k2 = group[group.config.isin(["k=2", "k=8"])]
        if variant == "theory":
            assert (row.n_pairs_k2, row.above_null_k2) == (len(k2), (k2.perm_z > 2).sum())
        else:
            assert np.isnan(row.n_pairs_k2)
    assert digest.smallest_p.iloc[0] == 1 / 11
    with pytest.raises(ValueError, match="missing"):
        nbs.diagnostics_digest(diag.drop(columns="perm_z"))
