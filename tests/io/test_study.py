"""The study runner: units are written atomically, skipped when complete, never mixed across
settings, and one committed unit regenerates to the committed numbers."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ntps_nb.extract
from ntps_nb import study
from ntps_nb.core.threads import PROCESSES_ENV, analysis_processes, available_cores, default_threads
from ntps_nb.extract import EXTRACT_VERSION
from ntps_nb.main_job import REFERENCE_KERNELS

ROOT = Path(__file__).resolve().parents[2]
STUDIES = ROOT / "studies"


@pytest.fixture
def counted_extract(monkeypatch):
    """Count the real extractions (cache hits do not call `extract`)."""
    calls = []
    real = ntps_nb.extract.extract

    def counting(*args, **kwargs):
        calls.append(kwargs.get("layers"))
        assert kwargs.get("precision") in ("float32", "float64"), kwargs.get("precision")  # the study's, never "auto"
        return real(*args, **kwargs)

    monkeypatch.setattr(ntps_nb.extract, "extract", counting)
    return calls


def _smoke(tmp_path, **overrides):
    """The smoke study, two datasets, results and extraction cache under tmp_path."""
    settings = dict(results_dir=str(tmp_path / "results"), datasets=["trec6", "sms-spam"], diagnostics=False)
    return study.load_config(STUDIES / "smoke.toml", **{**settings, **overrides})


def test_configs_parse():
    for path in sorted(STUDIES.glob("*.toml")):
        cfg = study.load_config(path)
        assert cfg.units() and len(cfg.config_hash) == 12, path
    with pytest.raises(study.StudySettingsError, match="unknown key"):
        study.load_config(STUDIES / "smoke.toml", n_bootstrap=3)


@pytest.mark.parametrize("override, message", [
    ({"max_train": "forty"}, "max_train must be a positive integer or absent, got 'forty'"),
    ({"max_train": True}, "max_train must be a positive integer or absent, got True"),
    ({"max_test": 0}, "max_test must be a positive integer or absent, got 0"),
    ({"max_length": 32.5}, "max_length must be a positive integer, got 32.5"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"n_boot": 0}, "n_boot must be a positive integer, got 0"),
    ({"n_permutations": -2}, "n_permutations must be an integer >= 0"),
    ({"torch_threads": 0}, "torch_threads must be a positive integer or absent"),
    ({"shards": 1}, "shards must be 0 .no intervals. or an integer >= 2"),
    ({"shards": "ten"}, "shards must be 0"),
    ({"peers": "yes"}, "peers must be true or false, got 'yes'"),
    ({"k": "many"}, "k must be 'all' or a non-empty list of integers >= 1, got 'many'"),
    ({"k": [0, 2]}, "k must be 'all' or a non-empty list"),
    ({"k": []}, "k must be 'all' or a non-empty list"),
    ({"layers": "middle"}, "layers = 'middle': a string must be 'all', 'last' or 'grid:N'"),
    ({"probe_layers": "grid:0"}, "probe_layers = 'grid:0': a string must be"),
    ({"interval_layers": [-1, "last"]}, "interval_layers = .*a list must hold hidden-state indices"),
    ({"diagnostic_k": [1, 0]}, "diagnostic_k must be a list of integers >= 1"),
    ({"diagnostic_fractions": [0.5, 1.5]}, r"diagnostic_fractions must be a list of numbers in \(0, 1\]"),
    ({"name": "../elsewhere"}, "name must be a folder name .the results go to data/results/<name>., got '../"),
    ({"name": ""}, "name must be a folder name"),
    ({"probes": ["heldot"]}, r"unknown probe protocol\(s\) \[.heldot.\]; known: \[.heldout., .paper_in_sample.\]"),
])
def test_a_setting_of_the_wrong_kind_is_refused_when_the_config_is_read(override, message):
    """Not when a unit meets it, hours into a study: each value is checked for its kind and range on reading."""
    with pytest.raises(study.StudySettingsError, match=message):
        study.load_config(STUDIES / "smoke.toml", **override)


def test_a_config_that_is_not_toml_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nname = "x"\n[[[\n')
    with pytest.raises(study.StudySettingsError, match=f"{re.escape(str(bad))} is not a valid TOML file"):
        study.load_config(bad)
    extends = tmp_path / "extends.toml"
    extends.write_text('[study]\nextends = "bad.toml"\n')
    with pytest.raises(study.StudySettingsError, match="bad.toml is not a valid TOML file"):
        study.load_config(extends)


def test_settings_of_the_right_kind_are_taken():
    cfg = study.load_config(STUDIES / "smoke.toml", max_train=None, shards=0, layers="grid:3", k=[1, 2],
                            probe_layers=[-1, 0], peer_layers="last", interval_layers=None, diagnostic_fractions=[1])
    assert (cfg.max_train, cfg.shards, cfg.layers, cfg.k, cfg.probe_layers) == (None, 0, "grid:3", (1, 2), (-1, 0))


def test_precision_enters_the_hash_only_away_from_float32():
    cfg = study.load_config(STUDIES / "default.toml")
    assert cfg.precision == "float32"
    assert cfg.config_hash == "1cedd9f67410"  # the hash the committed default units were computed under
    assert study.load_config(STUDIES / "default.toml", precision="float64").config_hash != cfg.config_hash
    # where a unit runs is provenance (unit.json), not a setting: a GPU's units join a CPU's study
    on_gpu = study.load_config(STUDIES / "default.toml", device="cuda", analysis_threads=4, torch_threads=8)
    assert on_gpu.config_hash == cfg.config_hash and on_gpu.device == "cuda"
    with pytest.raises(study.StudySettingsError, match="precision"):
        study.load_config(STUDIES / "default.toml", precision="auto")


def test_estimator_is_validated_and_enters_the_hash_only_away_from_the_plugin():
    from ntps_nb.core.estimators import ESTIMATORS

    cfg = study.load_config(STUDIES / "default.toml")
    assert "estimator" not in cfg.settings() and "interval_estimator" not in cfg.settings()
    assert cfg.config_hash == "1cedd9f67410"  # the hash of the units computed before either setting
    adjusted = study.load_config(STUDIES / "default.toml", estimator="adjusted")
    assert adjusted.settings()["estimator"] == "adjusted"
    hashes = {study.load_config(STUDIES / "default.toml", estimator=name).config_hash for name in ESTIMATORS}
    assert len(hashes) == len(ESTIMATORS) and cfg.config_hash in hashes  # every estimator its own hash
    with pytest.raises(study.StudySettingsError, match="estimator must be one of plugin, richardson, .*got 'ridge'"):
        study.load_config(STUDIES / "default.toml", estimator="ridge")
    with pytest.raises(study.StudySettingsError, match="interval_estimator must be one of plugin, estimator"):
        study.load_config(STUDIES / "default.toml", interval_estimator="richardson")
    both = study.load_config(STUDIES / "default.toml", estimator="adjusted", interval_estimator="estimator")
    assert both.settings()["interval_estimator"] == "estimator" and both.config_hash != adjusted.config_hash
    # a unit recorded without the setting was the plug-in's: its settings map back to this config
    recorded = {key: value for key, value in adjusted.settings().items() if key != "estimator"}
    assert study.stages.config_from_settings(adjusted, recorded).estimator == "plugin"


def test_tables_written_before_the_estimator_setting_are_read_as_the_plugins(tmp_path):
    """Unit tables without the estimator column (the committed ones) were computed by the plug-in."""
    from ntps_nb.study.config import with_estimator

    old = pd.DataFrame({"variant": ["theory", "reference"], "k": [1.0, np.nan], "ntps": [0.2, 0.3]})
    filled = with_estimator(old, "ntps")
    assert list(filled.columns) == ["variant", "estimator", "k", "ntps"] and (filled["estimator"] == "plugin").all()
    assert "estimator" not in old.columns  # the table read is left as it is
    mixed = pd.concat([old, old.assign(estimator="adjusted")], ignore_index=True)
    assert with_estimator(mixed, "intervals")["estimator"].tolist() == ["plugin", "plugin", "adjusted", "adjusted"]
    assert with_estimator(old, "probes") is old  # a table without estimators
    folder = ROOT / "data" / "results" / "fast_lora"
    if (folder / "ntps.csv").is_file():  # a plug-in study (its units' tables were first written before the setting)
        tables = study.load_results(folder)
        for name in ("ntps", "intervals", "diagnostics"):
            if name in tables:
                assert (tables[name]["estimator"] == "plugin").all(), name


def test_resolve_layers():
    assert study.resolve_layers("all", range(5)) == [0, 1, 2, 3, 4]
    assert study.resolve_layers([-1, 0], range(31)) == [0, 30]
    assert study.resolve_layers("grid:3", range(31)) == [0, 15, 30]
    with pytest.raises(study.StudySettingsError, match="does not exist"):
        study.resolve_layers([40], range(31))


def test_run_skip_interrupt_and_combine(tmp_path, counted_extract, monkeypatch, tiny_llama):
    cfg = _smoke(tmp_path)
    cache = tmp_path / "cache"
    first = study.run_study(cfg, cache=cache, log=lambda _: None)
    assert list(first["status"]) == ["done", "done"]
    assert len(counted_extract) == 4  # train and test split of each unit
    for model, dataset in cfg.units():
        meta = json.loads((cfg.unit_folder(model, dataset) / "unit.json").read_text())
        assert meta["complete"] and meta["config_hash"] == cfg.config_hash
        env = meta["environment"]
        assert env["device"] == "cpu" and env["torch"] == importlib.metadata.version("torch")
        # no analysis_threads in the config: this process's share of its cores
        assert env["analysis_threads"] == default_threads() and env["torch_threads"] >= 1
        assert env["analysis_processes"] == analysis_processes() and env["cores"] == available_cores()
        # the extraction rules the moments were formed under: the smoke units' few token pairs, float64
        assert meta["extract_version"] == EXTRACT_VERSION
        assert meta["token_precision_train"] == "float64" and cfg.precision == "float32"
    assert (study.study_status(cfg)["extract_version"] == EXTRACT_VERSION).all()
    provenance = json.loads((cfg.folder / "provenance.json").read_text())["units"]
    assert {unit["token_precision_train"] for unit in provenance.values()} == {"float64"}
    assert all(unit["float64_layers_train"] == [] for unit in provenance.values())  # float64 pass: none again
    tables = study.load_results(cfg)
    for name in ("ntps", "probes", "peers", "intervals"):
        frame = tables[name]
        assert set(frame["dataset"]) == {"trec6", "sms-spam"}
        assert (frame["config_hash"] == cfg.config_hash).all()
        for column in ("model", "pretrained", "quantized", "n_train", "n_test", "n_classes", "max_length",
                       "drop_bos", "seed", "package_version"):
            assert column in frame.columns, (name, column)
    ntps = tables["ntps"]
    assert set(ntps["variant"]) == {"theory", "reference", "pca_overlap"}
    assert ntps["ntps"].dropna().between(-1e-9, 1 + 1e-9).all()
    for name, columns in (("ntps", study.stages.NTPS_COLUMNS), ("intervals", study.stages.INTERVALS_COLUMNS),
                          ("estimates", study.stages.ESTIMATES_COLUMNS)):
        assert (tables[name]["estimator"] == "plugin").all(), name  # the default estimator, named on every row
        written = [c for c in tables[name].columns if c not in study.stages.PROVENANCE]
        assert written[:3] == list(columns[:3]) and set(columns) <= set(written), name
    estimates = tables["estimates"]  # the plug-in's jackknife interval at every k of the last layer, per unit
    assert set(estimates["dataset"]) == {"trec6", "sms-spam"} and (estimates["n_shards"] == cfg.shards).all()
    assert (estimates["lower"] <= estimates["estimate"]).all() and (estimates["estimate"] <= estimates["upper"]).all()
    probes = tables["probes"]
    assert set(probes["protocol"]) == {"heldout", "paper_in_sample", "heldout_cv"}
    assert "kappa" not in probes.columns  # the 1/C-corrected accuracy is kappa_chance
    cv = probes[probes["protocol"] == "heldout_cv"]
    # the cross-validated probe: one row per unit whose train split has 2 texts of every class
    # present (the smoke splits are tiny), at the last probe layer
    assert len(cv) >= 1 and (cv["layer"] == probes["layer"].max()).all() and not cv["dataset"].duplicated().any()
    assert cv[["balanced_accuracy", "cohen_kappa", "kappa_chance", "logreg_C"]].notna().all().all()
    assert [c for c in probes.columns if c not in study.stages.PROVENANCE] == list(study.stages.PROBES_COLUMNS)

    # a second run recomputes nothing
    second = study.run_study(cfg, cache=tmp_path / "other-cache", log=lambda _: None)
    assert list(second["status"]) == ["skipped", "skipped"]
    assert len(counted_extract) == 4

    # a unit that fails midway leaves no complete-looking folder; a rerun completes it
    import ntps_nb.core.peers

    wider = _smoke(tmp_path, datasets=["trec6", "sms-spam", "bbc-news"])

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ntps_nb.core.peers, "peer_scores", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        study.run_study(wider, cache=cache, log=lambda _: None)
    folder = wider.unit_folder("tiny-llama", "bbc-news")
    assert not folder.exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no partial left behind
    assert study.unit_status(wider, "tiny-llama", "bbc-news") == "missing"
    monkeypatch.undo()
    third = study.run_study(wider, cache=cache, log=lambda _: None)
    assert dict(zip(third["dataset"], third["status"])) == {"trec6": "skipped", "sms-spam": "skipped", "bbc-news": "done"}
    assert set(study.load_results(wider)["probes"]["dataset"]) == {"trec6", "sms-spam", "bbc-news"}

    # units of one config hash extracted under different rules combine, and combine says which are which
    said = []
    study.combine(wider, log=said.append)
    assert not [line for line in said if "extraction versions" in line]  # all three of this package's version
    unit = wider.unit_folder("tiny-llama", "bbc-news")
    meta = json.loads((unit / "unit.json").read_text())
    (unit / "unit.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "extract_version"}))
    study.combine(wider, log=said.append)
    assert [line for line in said if "extraction versions" in line] == [
        "the units were extracted under different extraction versions (ntps_nb.extract.EXTRACT_VERSION; README, "
        f"'study status'): version {EXTRACT_VERSION}: tiny-llama x trec6, tiny-llama x sms-spam; "
        "not recorded: tiny-llama x bbc-news"]
    (unit / "unit.json").write_text(json.dumps(meta))

    # other settings: the runner refuses to treat old units as current, and combine refuses to mix
    changed = _smoke(tmp_path, datasets=["trec6", "sms-spam", "bbc-news"], n_boot=21)
    assert changed.config_hash != wider.config_hash
    with pytest.raises(study.StudySettingsError, match="other settings"):
        study.run_study(changed, cache=cache, log=lambda _: None)
    unit = wider.unit_folder("tiny-llama", "sms-spam")
    meta = json.loads((unit / "unit.json").read_text())
    meta["config_hash"] = "0123456789ab"
    (unit / "unit.json").write_text(json.dumps(meta))
    with pytest.raises(study.StudySettingsError, match="different settings"):
        study.combine(wider, log=lambda _: None)

    # the analysis runs on the combined tables (3 datasets: in-sample rows and baselines only)
    summary = study.correlation_summary(study.load_results(wider), n_boot=50, n_perm=20)
    assert {"in_sample", "none"} <= set(summary["selection"])
    assert summary["estimate"].dropna().between(-1, 1).all()
    # the cross-validated targets need 3 datasets with a heldout_cv row: tiny splits leave some out
    with_cv = study.load_results(wider)["probes"].query("protocol == 'heldout_cv'")["dataset"].nunique()
    assert ({"balanced_accuracy", "cohen_kappa"} <= set(summary["target"])) == (with_cv >= 3)
    assert "kappa_chance" in set(summary["target"])


def test_run_restricted_to_part_of_the_grid(tmp_path, counted_extract, tiny_llama):
    cfg = _smoke(tmp_path)
    with pytest.raises(study.StudySettingsError, match="not in study"):
        study.run_study(cfg, datasets=["imdb-pl"], cache=tmp_path / "cache", log=lambda _: None)
    part = study.run_study(cfg, datasets=["sms-spam"], cache=tmp_path / "cache", log=lambda _: None)
    assert list(zip(part["dataset"], part["status"])) == [("sms-spam", "done")]
    assert study.unit_status(cfg, "tiny-llama", "trec6") == "missing"
    assert not (cfg.folder / "provenance.json").exists()  # half a grid is not combined
    with pytest.raises(FileNotFoundError, match="no combined tables"):
        study.load_results(cfg)
    interim = study.load_units(cfg)  # an interim look reads the complete units without writing
    assert set(interim["probes"]["dataset"]) == {"sms-spam"}
    assert not (cfg.folder / "probes.csv").exists()
    rest = study.run_study(cfg, models=["tiny-llama"], datasets=["trec6"], cache=tmp_path / "cache", log=lambda _: None)
    assert list(rest["status"]) == ["done"]
    assert set(study.load_results(cfg)["ntps"]["dataset"]) == {"trec6", "sms-spam"}  # the last part combines


def test_a_stage_says_each_interpolation_warning_once_with_how_often_it_arose(tmp_path, tiny_llama):
    """The smoke unit has no more texts than Sxx's rank on any layer: the ntps stage's sweep warned once
    a layer, the same paragraph each time."""
    import re

    from ntps_nb.core.score import InterpolationWarning

    cfg = _smoke(tmp_path, datasets=["trec6"], peers=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)
    stage = "the ntps stage of tiny-llama x trec6"
    said = [str(w.message) for w in caught if issubclass(w.category, InterpolationWarning) and stage in str(w.message)]
    layers = json.loads((cfg.unit_folder("tiny-llama", "trec6") / "unit.json").read_text())["layers"]
    assert said and len(set(said)) == len(said), said  # each distinct paragraph once
    times = [int(re.search(r"said once for the (\d+) times it arose", message).group(1)) for message in said]
    assert sum(times) == len(layers) > 1  # one sweep a layer, each warned


def test_a_units_stages_show_no_core_progress_bar(tmp_path, tiny_llama, core_bars):
    """The intervals, estimates and diagnostics stages call the core's long loops with progress=False (the unit's log
    says where it is): no bar is enabled even where every bar would show at once."""
    cfg = _smoke(tmp_path, datasets=["trec6"], peers=False, diagnostics=True)
    study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)
    tables = study.load_results(cfg.results_dir)
    assert len(tables["intervals"]) and len(tables["diagnostics"])  # the stages that call them ran
    assert {"ntps_interval_sweep", "ntps_diagnostics", "ntps_estimate"} <= {bar.given_desc for bar in core_bars}
    assert not any(bar.enabled for bar in core_bars), [bar.given_desc for bar in core_bars if bar.enabled]


#: Agreement of a whole smoke unit's tables between the backends. The functions agree to 1e-9 on
#: well-conditioned problems (tests/core); at 40 texts nearly tied eigenvalues at small k amplify
#: rounding (NTPS moved by 7e-9 at k = 1 of the embedding layer).
UNIT_BACKEND_RTOL = 1e-6


def test_a_unit_analysed_by_the_torch_backend_equals_the_numpy_unit(tmp_path, tiny_llama, monkeypatch):
    """analysis_device="cpu" runs every analysis stage on the torch backend (here on the CPU):
    the same tables as the numpy core, the theory numbers to `UNIT_BACKEND_RTOL`; the reference variant, which the
    two backends solve alike only where it is well-posed (float32, as released), on the same grid; each unit says
    where its analysis ran. "auto" on a model on the CPU is the numpy core. The torch unit sums no shards on the
    host (`Moments.combine`): its stages pool them on the device, where the numpy unit's combine them many times
    (no row of this unit is reliable, so no rotation set is computed: `tests/core/test_estimators_torch.py` pins
    those on a device)."""
    from ntps_nb.core.moments import Moments
    from ntps_nb.study.stages import resolve_analysis_device

    combine, combined = Moments.combine, []

    def counting(parts, weights=None):
        combined.append(len(list(parts)))
        return combine(parts, weights)

    monkeypatch.setattr(Moments, "combine", staticmethod(counting))

    # 280 texts: no part of richardson's jackknife (a half less a shard: 70 texts) is at or below d = 64, where the
    # labels are fitted exactly and classes of equal size are tied, an order each backend's rounding decides
    cfg = _smoke(tmp_path, datasets=["trec6"], diagnostics=True, probes=["heldout"], estimator="richardson",
                 max_train=280)
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    numpy_unit = study.run_unit(dataclasses.replace(cfg, analysis_device="numpy"), "tiny-llama", "trec6",
                                tiny_llama, **quiet)
    assert len(combined) >= 10  # the pools, halves and leave-one-out pools of the numpy stages
    combined.clear()
    torch_unit = study.run_unit(dataclasses.replace(cfg, analysis_device="cpu", results_dir=str(tmp_path / "t")),
                                "tiny-llama", "trec6", tiny_llama, **quiet)
    assert combined == []
    assert numpy_unit["unit"]["environment"]["analysis_device"] == "numpy"
    assert torch_unit["unit"]["environment"]["analysis_device"] == "cpu"
    assert all(torch_unit["unit"]["stages"][name]["computed"] for name in ("ntps", "intervals", "probes"))
    assert resolve_analysis_device("auto", "cpu") is None and resolve_analysis_device("auto", "cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="device"):
        resolve_analysis_device("tpu", "cpu")
    for name in ("ntps", "intervals", "estimates", "diagnostics", "probes", "peers"):
        want, got = numpy_unit[name], torch_unit[name]
        assert list(got.columns) == list(want.columns) and len(got) == len(want), name
        theory = (want["variant"] != "reference").to_numpy() if "variant" in want else np.ones(len(want), bool)
        # the held-out logistic probes are fitted by Newton-CG on the device: the same optimum, its own
        # iteration count, and a solver column that says so
        numbers = [c for c in want.select_dtypes("number").columns if c not in ("seconds", "n_iter")]
        if name == "probes":
            heldout = want["protocol"].isin(["heldout", "heldout_cv"]).to_numpy()
            assert set(got.loc[heldout, "solver"]) == {"torch-newton-cg"} and set(want.loc[heldout, "solver"]) == {
                "lbfgs"}
        # the reference rows: the same grid (its float32 rank decisions may differ between LAPACKs)
        grid = [c for c in ("fraction", "layer") if c in want]
        np.testing.assert_array_equal(got.loc[~theory, grid].to_numpy(float), want.loc[~theory, grid].to_numpy(float),
                                      err_msg=name)
        np.testing.assert_allclose(got.loc[theory, numbers].to_numpy(float), want.loc[theory, numbers].to_numpy(float),
                                   rtol=UNIT_BACKEND_RTOL, atol=UNIT_BACKEND_RTOL, err_msg=name)


def test_the_command_line_says_a_users_error_in_one_line(tmp_path, capsys, monkeypatch):
    """A setting, file or table the command cannot use: its message and where it was raised, exit status 2;
    NTPS_NB_TRACEBACK=1 gives the traceback."""
    from ntps_nb.cli import TRACEBACK_ENV, main

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    missing = tmp_path / "missing.toml"
    assert main(["study", "status", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"python -m ntps_nb study: error: no study config at {missing}\n  (raised at config.py:" in err
    assert "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nname = "x"\nmodels = ["smollm2-135m"]\ndatasets = ["trec6"]\nk = "many"\n')
    assert main(["study", "status", str(bad)]) == 2
    assert "k must be 'all' or a non-empty list of integers >= 1, got 'many'" in capsys.readouterr().err
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(FileNotFoundError, match="no study config"):
        main(["study", "status", str(missing)])


def test_a_unit_record_or_table_that_cannot_be_read_is_named(tmp_path, capsys):
    """A merge conflict in a committed unit.json (or a damaged file) was a JSONDecodeError without a path."""
    from ntps_nb.cli import main

    source = ROOT / "data" / "results" / "fast"
    if not (source / "units").is_dir():
        pytest.skip("data/results/fast is not committed")
    results = tmp_path / "fast"
    shutil.copytree(source, results)
    cfg = study.load_config(STUDIES / "fast.toml", results_dir=str(results))
    record = cfg.unit_folder(*cfg.units()[0]) / "unit.json"
    record.write_text("<<<<<<< HEAD\n" + record.read_text())
    with pytest.raises(study.StudySettingsError, match=f"{re.escape(str(record))} is not valid JSON .* merge conflict"):
        study.study_status(cfg)
    with pytest.raises(study.StudySettingsError, match="is not valid JSON"):
        study.load_units(cfg)
    config = tmp_path / "fast.toml"
    config.write_text((STUDIES / "fast.toml").read_text() + f'results_dir = "{results}"\n')
    assert main(["study", "status", str(config)]) == 2 and "is not valid JSON" in capsys.readouterr().err
    # the same in a table: a combined one, and a unit's
    # a table with a merge conflict: pandas reads its marker lines as rows of NaN, without a word
    combined = results / "ntps.csv"
    lines = combined.read_text().splitlines(keepends=True)
    combined.write_text("".join(lines[:3] + ["<<<<<<< HEAD\n", lines[3], "=======\n", lines[3], ">>>>>>> other\n"]
                                + lines[4:]))
    assert pd.read_csv(combined).iloc[:, 0].astype(str).str.startswith("<<<<<<<").any()
    with pytest.raises(study.StudySettingsError, match=f"{re.escape(str(combined))} holds a git merge-conflict "
                                                       "marker at line 4"):
        study.load_results(results)
    record.write_text(record.read_text().removeprefix("<<<<<<< HEAD\n"))
    probes = record.parent / "probes.csv"
    probes.write_text("".join(probes.read_text().splitlines(keepends=True)[:2]) + "1,2,3," + "9," * 200 + "\n")
    with pytest.raises(study.StudySettingsError, match=f"{re.escape(str(probes))} cannot be read as a table "
                                                       r"\(ParserError"):
        study.study_status(cfg)


def test_cli_run_passes_device_and_threads(monkeypatch):
    import argparse

    seen = {}

    def fake_run(cfg, **kwargs):
        seen["cfg"], seen["kwargs"] = cfg, kwargs
        return pd.DataFrame({"status": []})

    monkeypatch.setattr(study, "run_study", fake_run)
    parser = argparse.ArgumentParser()
    study.register_cli(parser.add_subparsers())
    args = parser.parse_args(["study", "run", str(STUDIES / "default.toml"), "--device", "cuda:1",
                              "--analysis-threads", "4", "--torch-threads", "2", "--processes", "3",
                              "--analysis-device", "numpy"])
    assert args.func(args) == 0
    cfg = seen["cfg"]
    assert (cfg.device, cfg.analysis_threads, cfg.torch_threads, seen["kwargs"]["processes"]) == ("cuda:1", 4, 2, 3)
    assert cfg.analysis_device == "numpy"
    assert cfg.config_hash == study.load_config(STUDIES / "default.toml").config_hash
    args = parser.parse_args(["study", "run", str(STUDIES / "default.toml")])
    args.func(args)
    # the config's own values: no analysis_threads (this process's share of its cores), one process
    assert (seen["cfg"].device, seen["cfg"].analysis_threads, seen["kwargs"]["processes"]) == ("cpu", None, 1)
    assert seen["cfg"].analysis_device == "auto"
    for bad in (0, 2.5, True):
        with pytest.raises(study.StudySettingsError, match="analysis_threads must be a positive integer"):
            study.load_config(STUDIES / "default.toml", analysis_threads=bad)


def _pools() -> list[tuple[str, str, int]]:
    """(library file, "blas" or "openmp", threads) of every thread pool loaded in this process."""
    from threadpoolctl import threadpool_info

    return [(pool["filepath"], pool["user_api"], pool["num_threads"]) for pool in threadpool_info()]


@pytest.mark.parametrize("setting", [None, 1])
def test_the_analysis_stages_run_under_the_thread_bound(tmp_path, monkeypatch, tiny_llama, setting):
    """Without analysis_threads the analysis gets the cores this process may use divided among the
    processes analysing (12 cores, 3 processes: 4 threads); with it, the setting. numpy's, scipy's
    and scikit-learn's pools are bounded inside a stage, torch's (the forward passes') is not, and
    every pool is as it was after the unit; the unit records the bound."""
    import torch

    import ntps_nb.core.threads

    monkeypatch.setattr(ntps_nb.core.threads, "available_cores", lambda: 12)
    monkeypatch.setattr(study.stages, "available_cores", lambda: 12)
    monkeypatch.setenv(PROCESSES_ENV, "3")
    torch_threads = torch.get_num_threads()
    before = _pools()
    inside = {}

    def peers_stage(u):
        inside["pools"], inside["torch"] = _pools(), torch.get_num_threads()
        return None, {}

    monkeypatch.setitem(study.stages._COMPUTE, "peers", peers_stage)
    cfg = _smoke(tmp_path, datasets=["trec6"], analysis_threads=setting, shards=0, probes=["heldout"])
    tables = study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache", log=lambda _: None)
    bound = 4 if setting is None else setting
    analysis = [(api, threads) for path, api, threads in inside["pools"] if "/torch/lib/" not in path]
    assert {api for api, _ in analysis} == {"blas", "openmp"}  # numpy's and scipy's BLAS, scikit-learn's OpenMP
    assert {threads for _, threads in analysis} == {bound}
    torch_pools = [pool for pool in inside["pools"] if "/torch/lib/" in pool[0]]
    assert inside["torch"] == torch_threads and torch_pools == [pool for pool in before if "/torch/lib/" in pool[0]]
    assert _pools() == before
    env = tables["unit"]["environment"]
    assert env["analysis_threads"] == bound and env["cores"] == 12
    assert env["analysis_processes"] == (3 if setting is None else None)


def test_worker_processes_share_the_grid_and_the_cores(tmp_path):
    """`run_study(processes=2)` starts two worker processes: every unit is computed once, each under
    the cores this process may use // 2 analysis threads, and the study is combined."""
    cfg = _smoke(tmp_path, diagnostics=False, peers=False, shards=0, probes=["heldout"])
    with pytest.raises(study.StudySettingsError, match="processes must be a positive integer, got 0"):
        study.run_study(cfg, processes=0)
    rows = study.run_study(cfg, processes=2, cache=tmp_path / "cache", log=lambda _: None)
    assert list(zip(rows["dataset"], rows["status"])) == [("trec6", "done"), ("sms-spam", "done")]
    for model, dataset in cfg.units():
        env = json.loads((cfg.unit_folder(model, dataset) / "unit.json").read_text())["environment"]
        assert (env["analysis_threads"], env["analysis_processes"]) == (max(1, available_cores() // 2), 2)
    assert (cfg.folder / "provenance.json").is_file()
    assert not [p.name for p in (cfg.folder / "units").iterdir() if p.name.startswith(".")]  # no claim left
    again = study.run_study(cfg, processes=2, cache=tmp_path / "cache", log=lambda _: None)
    assert set(again["status"]) == {"skipped"}  # nothing to compute: no worker started


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_device_torch_cannot_use_is_refused_before_any_unit(tmp_path):
    cfg = _smoke(tmp_path)
    for device, message in (("cuda", "sees no CUDA GPU"), ("gpu0", "not a torch device")):
        with pytest.raises(study.StudySettingsError, match=message):
            study.run_study(dataclasses.replace(cfg, device=device), cache=tmp_path / "cache", log=lambda _: None)
    assert not (cfg.folder / "units").exists() or not any((cfg.folder / "units").iterdir())


def test_processes_sharing_a_study_claim_units(tmp_path, counted_extract):
    import os
    import platform
    import subprocess
    import sys

    cfg = _smoke(tmp_path)
    units = cfg.folder / "units"
    units.mkdir(parents=True)

    def claim(dataset, pid, host=None):
        path = units / f".{study.unit_name('tiny-llama', dataset)}.claim"
        path.write_text(json.dumps({"host": host or platform.node(), "pid": pid, "started": "earlier"}))
        return path

    # trec6 is held by a live process (our parent): passed over, the study is not combined
    held = claim("trec6", os.getppid())
    first = study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)
    assert dict(zip(first["dataset"], first["status"])) == {"trec6": "elsewhere", "sms-spam": "done"}
    assert held.exists() and not (units / f".{study.unit_name('tiny-llama', 'sms-spam')}.claim").exists()
    assert not (cfg.folder / "provenance.json").exists()
    status = study.study_status(cfg).set_index("dataset")["status"].to_dict()
    assert status == {"trec6": "running", "sms-spam": "complete"}

    # a claim from another machine is respected too
    held.unlink()
    elsewhere = claim("trec6", os.getpid(), host=platform.node() + "-other")
    again = study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)
    assert dict(zip(again["dataset"], again["status"]))["trec6"] == "elsewhere"

    # a claim whose process has exited on this machine is stale: taken over, computed, released
    elsewhere.unlink()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim("trec6", int(gone.stdout))
    last = study.run_study(cfg, cache=tmp_path / "cache", log=lambda _: None)
    assert dict(zip(last["dataset"], last["status"]))["trec6"] == "done"
    assert not [p.name for p in units.iterdir() if p.name.startswith(".")]
    assert (cfg.folder / "provenance.json").exists()  # the last unit combines the study


def test_a_terminated_run_releases_its_claim_and_leaves_no_partial_unit(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "smoke.toml"
    config.write_text((STUDIES / "smoke.toml").read_text().replace(
        "[study]\n", f'[study]\nresults_dir = "{tmp_path / "results"}"\n'))
    env = {**os.environ, "NTPS_NB_CACHE": str(tmp_path / "cache")}
    run = subprocess.Popen([sys.executable, "-m", "ntps_nb", "study", "run", str(config)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    units = tmp_path / "results" / "units"
    claim = units / ".tiny-llama__trec6.claim"
    deadline = time.monotonic() + 120
    while not claim.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert claim.exists(), run.communicate()[0]
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 128 + signal.SIGTERM, output
    assert not (units / "tiny-llama__trec6").exists()  # interrupted: no unit folder
    assert [p.name for p in units.iterdir()] == [], output  # no claim, no temporary folder left behind


def test_a_signal_between_taking_a_claim_and_computing_leaves_no_claim(tmp_path, monkeypatch):
    """The window the terminated-run test hits under load: SIGTERM (an exception here) right after
    the claim file is made, while the unit's status is checked, must still release the claim."""
    import ntps_nb.study.runner as runner

    cfg = _smoke(tmp_path, datasets=["trec6"])

    def interrupted(*args, **kwargs):
        raise SystemExit(128 + 15)

    monkeypatch.setattr(runner, "_unit_state", lambda cfg, unit, update, stages=None: (
        "missing" if not (cfg.folder / "units" / f".{study.unit_name(*unit)}.claim").exists() else interrupted()))
    with pytest.raises(SystemExit):
        study.run_study(cfg, log=lambda _: None)
    assert list((cfg.folder / "units").iterdir()) == []


def test_lora_unit_reuses_the_units_own_extraction(tmp_path, tiny_llama):
    pytest.importorskip("peft")
    import dataclasses

    cfg = _smoke(tmp_path, datasets=["trec6"], lora=True, lora_budget={"steps": 3, "batch_size": 4, "lr": 1e-3},
                 peers=False)
    model, tok, info = tiny_llama
    as_pretrained = (model, tok, dataclasses.replace(info, pretrained=True))  # LoRA runs on pretrained models only
    tables = study.run_unit(cfg, "tiny-llama", "trec6", as_pretrained, cache=tmp_path / "cache", log=lambda _: None)
    lora, probes, scores = tables["lora"], tables["probes"], tables["ntps"]
    last = probes["layer"].max()
    held = probes[(probes["protocol"] == "heldout") & (probes["layer"] == last)]
    # the gain's probe is the unit's own held-out probe at the last layer, NTPS before its own NTPS
    assert (lora["lora_probe_accuracy"] == held["accuracy"].iloc[0]).all()
    theory = scores[(scores["variant"] == "theory") & (scores["layer"] == last)].set_index("k")["ntps"]
    for _, row in lora.iterrows():
        assert row["ntps_before"] == pytest.approx(theory[row["k"]], abs=1e-12)
    # the per-text predictions (stage version 2) give back both accuracies of the LoRA table exactly
    per_text = tables["lora_predictions"]
    assert len(per_text) == lora["n_test"].iloc[0] and (per_text["config_hash"] == cfg.config_hash).all()
    assert np.mean(per_text["lora_prediction"] == per_text["label"]) == lora["lora_lora_accuracy"].iloc[0]
    assert np.mean(per_text["probe_prediction"] == per_text["label"]) == lora["lora_probe_accuracy"].iloc[0]
    # written with the unit, adopted from the folder with it, and read back unchanged
    folder = study.write_unit(tmp_path / "unit", tables)
    assert study.unit_folder_stages(cfg, "tiny-llama", "trec6", folder)["lora"] == "valid"
    store = study.StageStore(tmp_path / "adopted")
    assert "lora" in study.adopt_unit_folder(cfg, "tiny-llama", "trec6", store, folder=folder)
    entry = store.load("lora", study.stage_keys(cfg, "tiny-llama", "trec6")["lora"])
    pd.testing.assert_frame_equal(entry.extra["lora_predictions"],
                                  per_text[list(study.stages.LORA_PREDICTIONS_COLUMNS)], check_dtype=False)
    # a current LoRA result without its predictions is not a result
    (folder / "lora_predictions.csv").unlink()
    assert "lora" not in study.unit_folder_stages(cfg, "tiny-llama", "trec6", folder)


def test_status_reads_the_committed_units(tmp_path):
    status = study.study_status(STUDIES / "fast.toml")
    assert (status["status"] == "complete").all() and len(status) == 8
    probes = study.load_results(STUDIES / "fast.toml")["probes"]
    held = probes[(probes["protocol"] == "heldout") & (probes["model"] == "smollm2-135m") & (probes["dataset"] == "trec6")]
    row = status[(status["model"] == "smollm2-135m") & (status["dataset"] == "trec6")].iloc[0]
    assert row["heldout_accuracy"] == held.loc[held["layer"].idxmax(), "accuracy"]
    assert 0 <= row["ntps_theory_k8"] <= 1 and row["minutes"] > 0
    empty = study.study_status(_smoke(tmp_path))
    assert list(empty["status"]) == ["missing", "missing"]


def test_status_minutes_are_what_the_units_results_cost_not_the_last_runs():
    """The committed default-richardson study's units were last run to refresh one stage from its table (a
    second's work, `last_run`); before that was kept apart, ``study status`` gave 22 of them 0.0 minutes. Its
    minutes sum each stage where it was computed (`unit_compute_seconds`), so every unit's are at least its train
    extraction's."""
    cfg = study.load_config(STUDIES / "default-richardson.toml")
    status = study.study_status(cfg)
    metas = [json.loads((cfg.unit_folder(m, d) / "unit.json").read_text()) for m, d in cfg.units()]
    refreshed = [meta for meta in metas if not meta["stages"]["extraction"]["read"]]
    assert refreshed and all(meta["last_run"]["seconds"] < 1 for meta in refreshed)
    extraction_minutes = np.array([meta["extraction_seconds"] / 60 for meta in metas])
    assert (status["minutes"].to_numpy(float) >= np.round(extraction_minutes, 1)).all()
    # a unit written before stage records (the committed default study's) has its one run's seconds
    older = json.loads((study.load_config(STUDIES / "default.toml").unit_folder("smollm2-135m", "trec6")
                        / "unit.json").read_text())
    assert "stages" not in older and study.unit_compute_seconds(older) == older["seconds"]


def test_summary_on_committed_fast_results():
    folder = ROOT / "data" / "results" / "fast"
    if not (folder / "probes.csv").is_file():
        pytest.skip("data/results/fast is not committed")
    summary = study.summarise(folder, n_boot=100, n_perm=30, targets=["accuracy", "kappa"])
    assert set(summary["target"]) == {"accuracy", "kappa_chance"}  # old tables' "kappa" read as kappa_chance
    theory = summary[(summary["score"] == "ntps_theory") & (summary["model"] == "smollm2-135m")
                     & (summary["target"] == "accuracy")].set_index("selection")
    assert set(theory.index) == {"leave_one_dataset_out", "leave_one_dataset_out_pooled_raw", "in_sample"}
    assert np.isfinite(theory["estimate"]).all() and (theory["p_side"] == "one-sided greater").all()
    assert theory.loc["leave_one_dataset_out", "held_out"] == "rank"
    assert theory.loc["leave_one_dataset_out_pooled_raw", "held_out"] == "pooled_raw"
    assert np.isnan(theory.loc["in_sample", ["lower", "upper", "se"]].astype(float)).all()
    assert theory.loc["in_sample", "interval"].startswith("none")
    # 4 datasets, 4! <= n_perm: every permutation enumerated, so the p-values are exact
    assert (theory["exact"] & (theory["p_mc_se"] == 0) & (theory["n_perm"] == 24)).all()
    assert {"-C", "majority_rate"} <= set(summary["score"])
    assert (summary.loc[summary["selection"] == "none", "p_side"] == "two-sided").all()


def test_a_saturated_h_score_baseline_says_it_counts_the_classes():
    """The fast study has 300 texts in d = 576: every H-score is C - 1, so its baseline row is the class count, and
    its note says so; an H-score off C - 1 on one dataset and the row carries no such note."""
    from ntps_nb.study.report import SATURATED_H_SCORE_NOTE

    tables = study.load_results(ROOT / "data" / "results" / "fast")
    peers = tables["peers"]
    assert np.allclose(peers["h_score"], peers["n_classes"] - 1)
    quick = dict(targets=["accuracy"], n_boot=20, n_perm=20)
    rows = study.correlation_summary(tables, **quick)
    h = rows[rows["score"] == "peer:h_score"]
    assert len(h) == 2 and (h["note"] == SATURATED_H_SCORE_NOTE).all()
    minus_c = rows[rows["score"] == "-C"].set_index("model")["estimate"]
    assert np.allclose(h.set_index("model")["estimate"], -minus_c.loc[h["model"]])  # the class count, sign flipped
    off = peers.astype({"h_score": float})
    off.loc[off["dataset"] == "trec6", "h_score"] *= 0.9
    rows = study.correlation_summary({**tables, "peers": off}, **quick)
    assert rows[rows["score"] == "peer:h_score"].get("note", pd.Series(dtype=object)).isna().all()
    assert (rows["score"] == "peer:h_score").sum() == 2


def test_gain_rows_on_committed_fast_lora_results():
    from scipy.stats import spearmanr

    folder = ROOT / "data" / "results" / "fast_lora"
    if not (folder / "lora.csv").is_file():
        pytest.skip("data/results/fast_lora is not committed")
    tables = study.load_results(folder)
    summary = study.correlation_summary(tables, targets=["lora_gain"], n_boot=50, n_perm=30)
    assert set(summary["target"]) == {"lora_gain"}
    rows = summary.set_index(["score", "selection"])
    assert {("ntps_theory_before", "leave_one_dataset_out"), ("ntps_theory_before", "in_sample"),
            ("ntps_theory_before", "leave_one_dataset_out_pooled_raw"),
            ("probe_accuracy_naive_same_test_set", "none"), ("-C", "none")} <= set(rows.index)
    assert "regression to the mean is NOT removed" in rows.loc[("probe_accuracy_naive_same_test_set", "none"), "note"]
    assert (rows.xs("ntps_theory_before")["p_side"] == "one-sided less").all()
    # independent check with scipy: in-sample = the most negative rho over k of NTPS-before vs gain
    lora = tables["lora"]
    per_k = [spearmanr(g.sort_values("dataset")["ntps_before"], g.sort_values("dataset")["lora_gain"])[0]
             for _, g in lora.groupby("k")]
    assert rows.loc[("ntps_theory_before", "in_sample"), "estimate"] == pytest.approx(np.nanmin(per_k), abs=1e-12)
    one = lora.drop_duplicates("dataset")
    expected = spearmanr(one["lora_probe_accuracy"], one["lora_gain"])[0]
    assert rows.loc[("probe_accuracy_naive_same_test_set", "none"), "estimate"] == pytest.approx(expected, abs=1e-12)
    lodo = rows.loc[("ntps_theory_before", "leave_one_dataset_out")]
    assert -1 <= lodo["estimate"] <= 1 and 0 < lodo["p_value"] <= 1


def test_gain_rows_cross_fit_the_probe_baseline_where_the_units_kept_predictions():
    """With per-text predictions (the LoRA stage from version 2) the summary adds the cross-fitted
    probe-accuracy baseline: the same number as `crossfit_gain_correlation` on the predictions,
    beside the naive one. Planted: LoRA and probe right at random with rates unrelated across
    datasets, so only the naive baseline shares noise with the gain."""
    from scipy.stats import spearmanr

    from ntps_nb.core.gain import crossfit_gain, crossfit_gain_correlation

    folder = ROOT / "data" / "results" / "fast_lora"
    if not (folder / "lora.csv").is_file():
        pytest.skip("data/results/fast_lora is not committed")
    tables = study.load_results(folder)
    rng = np.random.default_rng(3)
    rows, frames = [], []
    for dataset in sorted(tables["lora"]["dataset"].unique()):
        labels = rng.integers(0, 2, 300)
        probe = np.where(rng.random(300) < 0.7, labels, 1 - labels)
        lora = np.where(rng.random(300) < 0.75, labels, 1 - labels)
        rows.append(pd.DataFrame({"model": "smollm2-135m", "dataset": dataset, "text_index": np.arange(300),
                                  "label": labels, "lora_prediction": lora, "probe_prediction": probe}))
        frames.append(crossfit_gain(labels, probe, lora, seed=0).assign(dataset=dataset))
    quick = dict(targets=["lora_gain"], n_boot=40, n_perm=50, seed=0)
    planted = {**tables, "lora_predictions": pd.concat(rows, ignore_index=True)}
    summary = study.correlation_summary(planted, **quick).set_index(["score", "selection"])
    row = summary.loc[("probe_accuracy_crossfit", "none")]
    expected = crossfit_gain_correlation(pd.concat(frames), n_perm=50, n_boot=40, seed=0).iloc[0]
    for column in ("estimate", "lower", "upper", "p_value"):
        assert row[column] == pytest.approx(expected[column], abs=1e-12), column
    assert row["p_side"] == "two-sided" and row["n_datasets"] == len(frames)
    by_dataset = planted["lora_predictions"].groupby("dataset")
    probe = by_dataset.apply(lambda g: np.mean(g["probe_prediction"] == g["label"]))
    gain = by_dataset.apply(lambda g: np.mean(g["lora_prediction"] == g["label"])) - probe
    assert row["naive_same_datasets"] == pytest.approx(spearmanr(probe, gain)[0], abs=1e-12)
    assert "shares no test text" in row["note"]
    assert ("probe_accuracy_naive_same_test_set", "none") in summary.index
    # predictions of fewer than 3 datasets: no cross-fitted row, and none without predictions at all
    few = {**tables, "lora_predictions": pd.concat(rows[:2], ignore_index=True)}
    assert "probe_accuracy_crossfit" not in set(study.correlation_summary(few, **quick)["score"])
    without = {name: table for name, table in tables.items() if name != "lora_predictions"}
    assert "probe_accuracy_crossfit" not in set(study.correlation_summary(without, **quick)["score"])


def test_gain_rows_score_ntps_before_lora_by_the_studys_estimator(tmp_path):
    """In a study of another estimator (default-richardson reuses plug-in LoRA tables), NTPS before
    LoRA is the ntps table's theory value at the LoRA layer, not the LoRA table's plug-in column:
    planted here so that the two order the datasets oppositely."""
    from scipy.stats import spearmanr

    folder = ROOT / "data" / "results" / "fast_lora"
    if not (folder / "lora.csv").is_file():
        pytest.skip("data/results/fast_lora is not committed")
    tables = study.load_results(folder)
    lora = tables["lora"]
    theory = lora[lora["variant"] == "theory"]
    # the "study estimator": minus the plug-in's ntps_before at the LoRA layer, on the ntps table's rows
    other = theory[["model", "pretrained", "dataset", "layer", "k"]].assign(
        variant="theory", estimator="richardson", ntps=-theory["ntps_before"].to_numpy())
    planted = {**tables, "ntps": pd.concat([tables["ntps"], other], ignore_index=True)}
    quick = dict(targets=["lora_gain"], n_boot=20, n_perm=20)
    before = study.correlation_summary(tables, **quick).set_index(["score", "selection"])
    after = study.correlation_summary(planted, **quick).set_index(["score", "selection"])
    key = ("ntps_theory_before", "in_sample")
    per_k = [spearmanr(-g.sort_values("dataset")["ntps_before"], g.sort_values("dataset")["lora_gain"])[0]
             for _, g in theory.groupby("k")]
    assert after.loc[key, "estimate"] == pytest.approx(np.nanmin(per_k), abs=1e-12)
    assert after.loc[key, "estimate"] != pytest.approx(before.loc[key, "estimate"])
    assert "the study's estimator (richardson)" in after.loc[key, "note"]
    assert pd.isna(before.loc[key].get("note", np.nan))


def test_summary_markdown_orders_models_and_marks_missing_values():
    import pandas as pd

    base = {"n_datasets": 10, "selection": "leave_one_dataset_out", "config": "30/8", "n_distinct_configs": 3,
            "p_side": "one-sided greater", "p_mc_se": 0.004}
    summary = pd.DataFrame([
        {**base, "model": "m:random", "pretrained": False, "target": "accuracy", "score": "ntps_theory",
         "estimate": 0.123, "lower": -0.5, "upper": 0.7, "p_value": 0.4},
        {**base, "model": "m", "pretrained": True, "target": "accuracy", "score": "ntps_theory",
         "estimate": 0.456, "lower": np.nan, "upper": np.nan, "p_value": 0.01, "p_mc_se": 0.0, "exact": True},
        {**base, "model": "m", "pretrained": True, "target": "kappa_chance", "score": "-C", "selection": "none",
         "estimate": np.nan, "lower": np.nan, "upper": np.nan, "p_value": np.nan, "n_distinct_configs": np.nan,
         "config": "dataset only"},
    ])
    lines = study.summary_markdown(summary).splitlines()
    assert lines[0] == ("| model | datasets | target | score | selection | rho [95% interval] (p, side) | configuration "
                        "| distinct configurations |") and len(lines) == 5
    assert lines[2] == ("| m | 10 | accuracy | ntps_theory | leave one dataset out | 0.46 (p = 0.010 exact, "
                        "one-sided >) | 30/8 | 3 |")
    assert lines[3] == "| m | 10 | kappa_chance | -C | none | - | dataset only | - |"
    assert lines[4] == ("| m:random | 10 | accuracy | ntps_theory | leave one dataset out | 0.12 [-0.50, 0.70] "
                        "(p = 0.400 ± 0.004, one-sided >) | 30/8 | 3 |")
    assert len(study.summary_markdown(summary, targets=["kappa"]).splitlines()) == 3  # kappa: kappa_chance
    # a small p-value; p = 1 with MC SE 0 is not exact unless every permutation was enumerated
    small = summary.iloc[[0]].assign(p_value=1e-4, p_mc_se=1e-4, exact=False)
    assert "(p < 0.001 ± < 0.001, one-sided >)" in study.summary_markdown(small)
    one = summary.iloc[[0]].assign(p_value=1.0, p_mc_se=0.0, exact=False, p_side="two-sided")
    assert "(p = 1.000 ± < 0.001, two-sided)" in study.summary_markdown(one)
    with pytest.raises(ValueError, match="no summary rows"):
        study.summary_markdown(summary, scores=["peer:logme"])
    with pytest.raises(ValueError, match="needs column"):
        study.summary_markdown(summary.drop(columns=["p_side"]))


def _synthetic_tables(seed=0, n_datasets=7):
    import pandas as pd

    rng = np.random.default_rng(seed)
    datasets = [f"d{i}" for i in range(n_datasets)]
    classes = rng.integers(2, 9, n_datasets)
    ntps_rows, probe_rows = [], []
    for model, pretrained, depth in (("m", True, 4), ("m:random", False, 4), ("g", True, 6)):
        for dataset, c in zip(datasets, classes):
            for layer in range(depth + 1):
                for k in (4, 8):
                    ntps_rows.append({"model": model, "pretrained": pretrained, "dataset": dataset, "variant": "theory",
                                      "layer": layer, "k": k, "ntps": rng.uniform()})
            for layer in (depth - 1, depth):
                acc = rng.uniform(0.4, 1.0)
                probe_rows.append({"model": model, "dataset": dataset, "protocol": "heldout", "layer": layer,
                                   "n_classes": c, "majority_rate": 1 / c + 0.05, "accuracy": acc,
                                   "kappa": (acc - 1 / c) / (1 - 1 / c), "mse": rng.uniform()})
    return {"ntps": pd.DataFrame(ntps_rows), "probes": pd.DataFrame(probe_rows)}


def test_structure_controls_against_independent_formulas():
    from itertools import combinations

    from scipy.stats import spearmanr

    tables = _synthetic_tables()
    out = study.structure_controls(tables, k=8, targets=["accuracy", "mse"], n_boot=200, n_perm=300)
    ntps, probes = tables["ntps"], tables["probes"]
    last = ntps[(ntps["k"] == 8) & (ntps["layer"] == ntps.groupby("model")["layer"].transform("max"))]
    score = last.set_index(["model", "dataset"])["ntps"]
    held = probes[probes["layer"] == probes.groupby("model")["layer"].transform("max")].set_index(["model", "dataset"])
    datasets = sorted(ntps["dataset"].unique())

    # pretrained minus random: Spearman of the per-dataset differences
    dx = [score["m", d] - score["m:random", d] for d in datasets]
    dy = [held.loc[("m", d), "accuracy"] - held.loc[("m:random", d), "accuracy"] for d in datasets]
    row = out.query("analysis == 'pretrained_minus_random' and target == 'accuracy'")
    assert list(row["model"]) == ["m"]  # g has no control
    assert row["estimate"].iloc[0] == pytest.approx(spearmanr(dx, dy)[0], abs=1e-12)
    assert 0 < row["p_value"].iloc[0] <= 1 and row["lower"].iloc[0] <= row["estimate"].iloc[0] <= row["upper"].iloc[0]
    assert row["p_side"].iloc[0] == "two-sided" and row["p_mc_se"].iloc[0] > 0

    # partial given C: the textbook first-order formula on Spearman correlations
    x = [score["g", d] for d in datasets]
    y = [held.loc[("g", d), "accuracy"] for d in datasets]
    c = [held.loc[("g", d), "n_classes"] for d in datasets]
    r_xy, r_xc, r_yc = spearmanr(x, y)[0], spearmanr(x, c)[0], spearmanr(y, c)[0]
    textbook = (r_xy - r_xc * r_yc) / np.sqrt((1 - r_xc**2) * (1 - r_yc**2))
    row = out.query("analysis == 'partial_given_C' and target == 'accuracy' and model == 'g'")
    assert row["estimate"].iloc[0] == pytest.approx(textbook, abs=1e-10)

    # across models: count concordant and discordant pairs by brute force
    for target, sign in (("accuracy", 1), ("mse", -1)):
        for who, models in (("all", ["m", "m:random", "g"]), ("pretrained", ["m", "g"])):
            agree = 0
            pairs = 0
            for d in datasets:
                for a, b in combinations(models, 2):
                    pairs += 1
                    agree += np.sign(score[a, d] - score[b, d]) * np.sign(held.loc[(a, d), target] - held.loc[(b, d), target])
            row = out.query("analysis == 'across_models' and target == @target and model == @who").iloc[0]
            assert row["n_pairs"] == pairs
            assert row["estimate"] == pytest.approx(sign * agree / pairs, abs=1e-12)
            assert 0 < row["p_value"] <= 1


def test_structure_controls_leave_out_datasets_whose_ntps_is_undefined():
    """An estimator undefined at a dataset's size gives NaN NTPS there (e.g. crossfit below the rank of Sxx):
    the controls are those of the tables without that dataset's rows for that model, with n_datasets one less."""
    tables = _synthetic_tables(n_datasets=8)
    ntps = tables["ntps"]
    undefined = (ntps["model"] == "g") & (ntps["dataset"] == "d3")
    with_nan = {**tables, "ntps": ntps.assign(ntps=ntps["ntps"].mask(undefined))}
    without = {**tables, "ntps": ntps[~undefined]}
    quick = dict(k=8, targets=["accuracy"], n_boot=50, n_perm=50)
    got, expected = (study.structure_controls(t, **quick) for t in (with_nan, without))
    pd.testing.assert_frame_equal(got, expected)
    partial = got.query("analysis == 'partial_given_C'").set_index("model")["n_datasets"]
    assert partial["g"] == 7 and partial["m"] == 8


def test_structure_controls_on_committed_fast_results():
    folder = ROOT / "data" / "results" / "fast"
    if not (folder / "ntps.csv").is_file():
        pytest.skip("data/results/fast is not committed")
    out = study.structure_controls(study.load_results(folder), n_boot=50, n_perm=50)
    assert set(out["analysis"]) == {"pretrained_minus_random", "partial_given_C", "across_models"}
    # one pretrained model and its control: no pretrained-only pairs, 4 datasets x 1 pair overall
    assert (out.query("analysis == 'across_models'")["n_pairs"] == 4).all()
    with pytest.raises(ValueError, match="no theory NTPS rows at k = 7; the study has k = 1-6, 8, 10"):
        study.fixed_ntps(study.load_results(folder), k=7)


def _with_cv_probe(tables, seed=1):
    """`_synthetic_tables` plus a cross-validated probe row (protocol heldout_cv) at each model's
    last layer, written the new way (kappa_chance, balanced_accuracy, cohen_kappa)."""
    rng = np.random.default_rng(seed)
    probes = tables["probes"]
    last = probes[probes["layer"] == probes.groupby("model")["layer"].transform("max")]
    cv = last.assign(protocol="heldout_cv", accuracy=rng.uniform(0.4, 1.0, len(last)),
                     balanced_accuracy=rng.uniform(0.3, 1.0, len(last)), cohen_kappa=rng.uniform(-0.1, 1.0, len(last)),
                     mse=np.nan).drop(columns="kappa")
    cv = cv.assign(kappa_chance=(cv["accuracy"] - 1 / cv["n_classes"]) / (1 - 1 / cv["n_classes"]))
    return {**tables, "probes": pd.concat([probes, cv], ignore_index=True)}


def _brute_force_lodo(frame, target, held_out):
    """Leave-one-dataset-out by loops: per fold the configurations with the best Spearman on the
    other datasets; the held-out dataset's rank among all datasets under each (held_out "rank")
    or its raw score under the first (held_out "pooled_raw"), averaged over the tied ones."""
    from scipy.stats import rankdata, spearmanr

    datasets = sorted(frame["dataset"].unique())
    scores = frame.pivot_table(index=["layer", "k"], columns="dataset", values="ntps")[datasets]
    target_of = frame.drop_duplicates("dataset").set_index("dataset")[target][datasets]
    held = []
    for j, dataset in enumerate(datasets):
        others = [d for d in datasets if d != dataset]
        rhos = np.array([spearmanr(scores.loc[c, others], target_of[others])[0] for c in scores.index])
        tied = np.flatnonzero(rhos >= np.nanmax(rhos) - 1e-12)
        if held_out == "rank":
            held.append(np.mean([rankdata(scores.iloc[c].to_numpy())[j] for c in tied]))
        else:
            held.append(scores.iloc[tied[0]].to_numpy()[j])
    return spearmanr(held, target_of)[0]


def test_summary_of_synthetic_tables_has_the_new_columns_the_pooled_row_and_cv_targets():
    tables = _with_cv_probe(_synthetic_tables())
    summary = study.correlation_summary(tables, targets=["accuracy", "kappa", "cohen_kappa", "balanced_accuracy"],
                                        n_boot=20, n_perm=40, variants=("theory",))
    for column in ("estimate", "lower", "upper", "se", "p_value", "p_side", "p_redone", "p_mc_se", "n_perm", "interval",
                   "config", "fold_configs", "n_distinct_configs"):
        assert column in summary.columns, column
    assert set(summary["target"]) == {"accuracy", "kappa_chance", "cohen_kappa", "balanced_accuracy"}
    targets = study.probe_targets(tables["probes"])
    for model in ("m", "g"):
        rows = summary[(summary["model"] == model) & (summary["score"] == "ntps_theory")]
        for target in ("accuracy", "cohen_kappa"):
            of = rows[rows["target"] == target].set_index("selection")
            assert set(of.index) == {"leave_one_dataset_out", "leave_one_dataset_out_pooled_raw", "in_sample"}
            frame = tables["ntps"].query("model == @model")[["dataset", "layer", "k", "ntps"]].merge(
                targets.query("model == @model")[["dataset", target]], on="dataset")
            for selection, held_out in (("leave_one_dataset_out", "rank"),
                                        ("leave_one_dataset_out_pooled_raw", "pooled_raw")):
                expected = _brute_force_lodo(frame, target, held_out)
                assert of.loc[selection, "estimate"] == pytest.approx(expected, abs=1e-12), (model, target, selection)
            lodo = of.loc["leave_one_dataset_out"]
            assert lodo["p_redone"] == "leave-one-dataset-out selection redone" and lodo["n_perm"] == 40
            assert lodo["p_mc_se"] == pytest.approx(np.sqrt(lodo["p_value"] * (1 - lodo["p_value"]) / 40))
            assert lodo["lower"] <= lodo["upper"] and "selection redone" in lodo["interval"]
            # every fold named with its choice; the distinct choices counted
            folds = lodo["fold_configs"].split(" | ")
            assert [f.split(":")[0] for f in folds] == sorted(frame["dataset"].unique())
            chosen = {c for f in folds for c in f.split(": ")[1].split(", ")}
            assert lodo["n_distinct_configs"] == len(chosen) and lodo["config"] in chosen
            assert np.isnan(of.loc["in_sample", "lower"]) and of.loc["in_sample", "p_redone"].startswith("in-sample")
    # the cross-validated targets come from the heldout_cv rows; kappa_chance from the old "kappa"
    cv = tables["probes"].query("protocol == 'heldout_cv'").set_index(["model", "dataset"])
    merged = targets.set_index(["model", "dataset"])
    assert np.array_equal(merged["cohen_kappa"], cv.loc[merged.index, "cohen_kappa"])
    held = tables["probes"].query("protocol == 'heldout'")
    held = held[held["layer"] == held.groupby("model")["layer"].transform("max")].set_index(["model", "dataset"])
    assert np.array_equal(merged["kappa_chance"], held.loc[merged.index, "kappa"])
    baselines = summary[summary["selection"] == "none"]
    assert (baselines["p_side"] == "two-sided").all() and (baselines["p_redone"] == "none (no selection)").all()
    # a study without the cross-validated probe: its targets are left out, not invented
    old = study.correlation_summary(_synthetic_tables(), targets=["accuracy", "cohen_kappa"], n_boot=0, n_perm=10,
                                    variants=("theory",))
    assert set(old["target"]) == {"accuracy"}
    with pytest.raises(ValueError, match="target must be one of"):
        study.correlation_summary(tables, targets=["f1"])
    # nothing to correlate (it was a KeyError on the empty frame)
    with pytest.raises(ValueError, match=r"no correlation to summarise for the targets \['lora_gain'\]; lora_gain "
                                         r"needs the LoRA stage"):
        study.correlation_summary({k: v for k, v in tables.items() if k != "lora"}, targets=["lora_gain"], n_boot=0,
                                  n_perm=10)


def test_interval_and_diagnostic_views_of_committed_fast_results():
    folder = ROOT / "data" / "results" / "fast"
    if not (folder / "intervals.csv").is_file():
        pytest.skip("data/results/fast is not committed")
    tables = study.load_results(folder)
    view = study.ntps_with_intervals(tables, model="smollm2-135m", k=8)
    raw = tables["intervals"].query("model == 'smollm2-135m' and variant == 'theory' and statistic == 'ntps' and k == 8 "
                                     "and layer == 30")
    assert sorted(view["dataset"]) == sorted(raw["dataset"])  # one row per dataset, at the deepest interval layer
    assert (view["layer"] == 30).all() and view[["lower", "upper", "accuracy"]].notna().all().all()
    merged = view.merge(raw[["dataset", "ntps", "lower"]], on="dataset", suffixes=("", "_raw"))
    np.testing.assert_array_equal(merged["ntps"], merged["ntps_raw"])
    np.testing.assert_array_equal(merged["lower"], merged["lower_raw"])
    with pytest.raises(ValueError, match="no interval at layer 30, k 7"):
        study.ntps_with_intervals(tables, model="smollm2-135m", k=7)
    with pytest.raises(ValueError, match="no theory intervals for model 'nope'"):
        study.ntps_with_intervals(tables, model="nope", k=8)

    diag = study.diagnostics_summary(tables)
    assert len(diag) == len(tables["diagnostics"])
    np.testing.assert_array_equal(diag["p_value"], tables["diagnostics"]["p_value"])
    assert (diag["p_side"] == "one-sided greater").all() and "perm_p" not in diag
    # a table of the diagnostics stage's version 1 names the p-value perm_p, without p_side: read as p_value
    legacy = tables["diagnostics"].drop(columns="p_side").rename(columns={"p_value": "perm_p"})
    read = study.diagnostics_summary({**tables, "diagnostics": legacy})
    np.testing.assert_array_equal(read["p_value"], tables["diagnostics"]["p_value"])
    assert (read["p_side"] == "one-sided greater").all() and "perm_p" not in read
    theory = diag[diag["variant"] == "theory"]
    assert set(theory["config"]) == {f"k={k}" for k in (1, 2, 4, 8, 16, 32)}
    assert set(diag.loc[diag["variant"] == "reference", "config"]) == {"f=0.1", "f=0.5", "f=0.9"}
    with pytest.raises(ValueError, match="no diagnostics"):
        study.diagnostics_summary({k: v for k, v in tables.items() if k != "diagnostics"})


#: What the regenerated unit must reproduce (the reference variant is left out on purpose: it is
#: ill-posed and moves with the LAPACK build, SPEC section 4).
REGENERATED = {
    "ntps": (["layer", "variant", "k"], ["ntps", "excess_loss", "r_V", "m"], "variant == 'theory'"),
    "probes": (["layer", "protocol"], ["accuracy", "mse"], "protocol == 'heldout'"),
    "peers": (["layer"], ["logme", "h_score", "rankme"], None),
    "intervals": (["layer", "variant", "k"], ["ntps", "lower", "upper", "se_jackknife"], "variant == 'theory'"),
}


def test_estimates_summary_counts_the_rows_the_reliability_flag_accepts(tmp_path, monkeypatch, capsys):
    estimates = pd.DataFrame({
        "model": ["a"] * 4 + ["a:random"] * 2, "pretrained": [True] * 4 + [False] * 2, "estimator": "adjusted",
        "dataset": ["x", "x", "y", "y", "x", "y"], "layer": [0, 30, 30, 30, 30, 30], "k": [1, 2, 1, 2, 1, 1],
        "estimate": [0.1, np.nan, 0.3, 0.4, 0.5, 0.6], "reliable": [True, False, True, False, False, False]})
    (tmp_path / "estimates.csv").write_text(estimates.to_csv(index=False))  # the flag read back from CSV text
    as_text = estimates.assign(reliable=estimates["reliable"].astype(str))
    for table in (estimates, pd.read_csv(tmp_path / "estimates.csv"), as_text):
        out = study.estimates_summary({"estimates": table}).set_index("model")
        assert list(out.index) == ["a", "a:random"]
        assert out.loc["a", ["n_datasets", "n_rows", "n_defined", "n_reliable"]].tolist() == [2, 4, 3, 2]
        assert out.loc["a", "share_reliable"] == 0.5 and out.loc["a", "layers"] == "0/30"
        assert out.loc["a:random", "share_reliable"] == 0.0 and not out.loc["a:random", "pretrained"]
    summary = study.estimates_summary({"estimates": estimates})
    assert study.estimates_markdown(summary).splitlines()[2] == "| a | adjusted | 2 | 0/30 | 4 | 3 | 2 | 0.50 |"
    # a study computed before the estimates stage has no such table: an empty summary, and
    # `study summary` says nothing about it
    assert study.estimates_summary({"ntps": estimates}).empty
    import argparse

    from ntps_nb.study import cli

    tables = _synthetic_tables(n_datasets=4)
    tables["ntps"] = tables["ntps"].assign(fraction=np.nan)  # theory rows only
    monkeypatch.setattr(study, "load_results", lambda cfg: dict(tables))
    args = argparse.Namespace(config=str(STUDIES / "smoke.toml"), partial=False, targets=["accuracy"], n_perm=10,
                              n_boot=0, markdown=False, output=None, k=8)
    cli._cli_summary(args)
    assert "flagged reliable" not in capsys.readouterr().out
    tables["estimates"] = estimates.assign(model="m")
    cli._cli_summary(args)
    printed = capsys.readouterr().out
    assert "flagged reliable" in printed and "adjusted" in printed


def test_the_estimates_stage_computes_on_the_units_analysis_device(monkeypatch):
    """The estimates stage passes the unit's analysis device to `ntps_estimate` for the estimators
    it computes there (the same table as numpy to 1e-9), and keeps the others on numpy."""
    from types import SimpleNamespace

    from ntps_nb.core.backends import torch as backend
    from ntps_nb.core.moments import LayerMoments
    from ntps_nb.core.simulate import lds_model, sample_shards
    from ntps_nb.study.stages import _estimates_stage, _Unit

    rng = np.random.default_rng(0)
    model = lds_model(d=8, n_classes=3, seed=1)
    by_layer = {layer: sample_shards(model, 300, 5, rng) for layer in (0, 2)}
    parts = [LayerMoments({layer: shards[i] for layer, shards in by_layer.items()}) for i in range(5)]

    on_device = []
    real = backend.ntps_estimate_torch
    monkeypatch.setattr(backend, "ntps_estimate_torch",
                        lambda *args, **kwargs: on_device.append(kwargs["device"]) or real(*args, **kwargs))

    def table(estimator, device):
        cfg = study.StudyConfig(name="t", models=("m",), datasets=("d",), estimator=estimator, shards=5, k=(1, 2, 4, 16))
        unit = _Unit(cfg, None, None, None, None, [0, 2], probe_grid=[], peer_grid=[], interval_grid=[0, 2],
                     diag_grid=[], log=print, ex=SimpleNamespace(shards=parts), analysis_device=device)
        frame, record = _estimates_stage(unit)
        # only an estimator the flag was not calibrated for gets a note on why no row is reliable
        assert set(record) == (set() if estimator == "richardson" else {"estimates_flag"})
        return frame

    want, got = table("richardson", None), table("richardson", "cpu")
    assert on_device == ["cpu", "cpu"]  # one call per interval layer
    assert list(got.columns) == list(want.columns) and list(got["k"]) == [1, 2, 4, 1, 2, 4]
    numbers = want.select_dtypes("number").columns
    np.testing.assert_allclose(got[numbers].to_numpy(float), want[numbers].to_numpy(float), rtol=0, atol=1e-9)
    pd.testing.assert_frame_equal(table("adjusted", "cpu"), table("adjusted", None))
    assert on_device == ["cpu", "cpu"]  # "adjusted" runs in numpy only: it stayed there


#: The CPU kernels the committed unit was computed with, pinned for its regeneration (torch's, OpenBLAS's
#: and MKL's; `ntps_nb.main_job.REFERENCE_KERNELS` says why each). Other kernels move the forward pass
#: and the moments by ~1e-8 relative, and at this size (40 texts, d = 576) that moves NTPS at k where U or
#: V is not well determined (tied eigenvalues: the theory rows by up to 0.12 at the tied k, by 0.07 at
#: layer 0 k = 254-283, below 1e-3 elsewhere; every reference row; docs/estimator.md's session-39
#: section). The libraries read these variables when they load, hence the separate process.
PINNED_KERNELS = REFERENCE_KERNELS

#: Run by the regeneration test in a fresh process: argv = config, results folder, report file.
_REGENERATE = """
import json, sys
import numpy, scipy.linalg, torch
from ntps_nb import study
from ntps_nb.main_job import cpu_kernels
from ntps_nb.models import ModelUnavailableError, load_model

config, results, report = sys.argv[1:4]
kernels = cpu_kernels()
try:
    loaded = load_model("smollm2-135m")
except ModelUnavailableError as error:
    json.dump({"unavailable": str(error), "kernels": kernels}, open(report, "w"))
    sys.exit(0)
cfg = study.load_config(config, results_dir=results)
torch.set_num_threads(1)  # as `run_study` does
tables = study.run_unit(cfg, "smollm2-135m", "trec6", loaded, cache=f"{results}/cache", log=lambda _: None)
study.write_unit(cfg.unit_folder("smollm2-135m", "trec6"), tables)
json.dump({"kernels": kernels}, open(report, "w"))
"""


def test_regenerate_committed_unit(tmp_path):
    """CI regenerates one small committed unit (SmolLM2, trec6, 40 texts) and checks its rows."""
    import os
    import platform
    import subprocess
    import sys

    import torch

    committed_cfg = study.load_config(STUDIES / "ci_unit.toml")
    committed = committed_cfg.unit_folder("smollm2-135m", "trec6")
    if not (committed / "unit.json").is_file():
        pytest.skip("data/results/ci_unit is not committed")
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability not in ("AVX2", "AVX512"):
        pytest.skip(f"the committed unit was computed with x86-64 AVX2 kernels; this CPU ({platform.machine()}, "
                    f"torch capability {capability}) rounds differently")
    cfg = study.load_config(STUDIES / "ci_unit.toml", results_dir=str(tmp_path))
    assert cfg.config_hash == json.loads((committed / "unit.json").read_text())["config_hash"]
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-c", _REGENERATE, str(STUDIES / "ci_unit.toml"), str(tmp_path), str(report)],
                          cwd=ROOT, env={**os.environ, **PINNED_KERNELS}, capture_output=True, text=True)
    assert done.returncode == 0 and report.is_file(), done.stderr[-3000:]
    outcome = json.loads(report.read_text())
    if "unavailable" in outcome:
        pytest.skip(f"SmolLM2 is not installed here: {outcome['unavailable']}")
    assert outcome["kernels"] == {"torch": "AVX2", "openblas": ["Haswell"],  # the pins took effect
                                  "mkl_cbwr": REFERENCE_KERNELS["MKL_CBWR"]}
    for name, (keys, values, query) in REGENERATED.items():
        old = pd.read_csv(committed / f"{name}.csv")
        new = pd.read_csv(cfg.unit_folder("smollm2-135m", "trec6") / f"{name}.csv")
        if query:
            old, new = old.query(query), new.query(query)
        merged = old.merge(new, on=keys, suffixes=("_committed", "_regenerated"), validate="one_to_one")
        assert len(merged) == len(old) == len(new) > 0, name
        for column in values:
            # both sides are read back from CSV text written at CSV_FLOAT_FORMAT (7 significant
            # digits): equal floats mean the regenerated table is the committed one to the letter
            np.testing.assert_array_equal(merged[f"{column}_regenerated"], merged[f"{column}_committed"],
                                          err_msg=f"{name}.{column}")


def test_lora_summary_picks_k_and_names_the_columns():
    lora = pd.DataFrame({"model": "m", "dataset": ["b", "a", "b", "a"], "n_classes": 2, "layer": 30, "k": [1, 1, 8, 8],
                         "ntps_before": [0.1, 0.2, 0.3, 0.4], "ntps_after": [0.5, 0.6, 0.7, 0.8],
                         "lora_probe_accuracy": [0.7, 0.8, 0.7, 0.8], "lora_lora_accuracy": [0.75, 0.9, 0.75, 0.9],
                         "lora_gain": [0.05, 0.1, 0.05, 0.1], "lora_budget_steps": 200})
    out = study.lora_summary(lora, k=8)
    assert out["dataset"].tolist() == ["a", "b"] and out["ntps_before"].tolist() == [0.4, 0.3]
    assert {"probe_accuracy", "lora_accuracy", "gain", "steps"} <= set(out.columns)
    with pytest.raises(ValueError, match=r"no LoRA rows at k = 4; k values: \[1, 8\]"):
        study.lora_summary(lora, k=4)
    with pytest.raises(ValueError, match="lacks columns"):
        study.lora_summary(lora.drop(columns=["lora_gain"]), k=8)
    # a study of another estimator: its NTPS of the base model at the LoRA layer beside the plug-in's
    ntps = pd.DataFrame({"model": "m", "dataset": ["a", "b", "a", "b"], "variant": "theory",
                         "estimator": ["richardson"] * 2 + ["plugin"] * 2, "layer": [30, 30, 29, 30], "k": 8,
                         "ntps": [0.45, 0.35, 0.9, 0.9]})
    out = study.lora_summary(lora.assign(variant="theory"), k=8, ntps=ntps)
    assert list(out.columns[:8]) == ["model", "dataset", "n_classes", "layer", "k", "ntps_before",
                                     "ntps_before_richardson", "ntps_after"]
    assert out["ntps_before_richardson"].tolist() == [0.45, 0.35] and out["ntps_before"].tolist() == [0.4, 0.3]
    plugin_only = ntps[ntps["estimator"] == "plugin"]
    assert "ntps_before_richardson" not in study.lora_summary(lora, k=8, ntps=plugin_only).columns
    # two models (a whole study): each model's rows get its own values, none is lost to the other's
    two = pd.concat([lora.assign(variant="theory"), lora.assign(variant="theory", model="n", layer=18)])
    ntps2 = pd.concat([ntps, ntps.assign(model="n", layer=18, ntps=[0.15, 0.25, 0.9, 0.9])])
    out = study.lora_summary(two, k=8, ntps=ntps2)
    assert out["model"].tolist() == ["m", "m", "n", "n"]
    assert out["ntps_before_richardson"].tolist() == [0.45, 0.35, 0.15, 0.25]


# -- stages ---------------------------------------------------------------------------------------


def test_every_setting_enters_the_key_of_a_stage():
    cfg = study.load_config(STUDIES / "default.toml")
    covered = {name for stage in study.STAGES for name in stage.settings}
    assert set(cfg.settings()) - {"study_version"} <= covered  # else a setting could change numbers unseen
    keys = study.stage_keys(cfg, "smollm2-135m", "trec6")
    assert list(keys) == ["extraction", "ntps", "probes", "peers", "intervals", "estimates", "diagnostics", "lora"]
    assert len(set(keys.values())) == len(keys)

    def changed(**overrides):
        other = study.stage_keys(dataclasses.replace(cfg, **overrides), "smollm2-135m", "trec6")
        return {name for name in keys if other[name] != keys[name]}

    assert changed(n_boot=100) == {"intervals"}
    assert changed(n_permutations=7) == {"diagnostics"}
    assert changed(k=(1, 8)) == {"ntps", "intervals", "estimates", "lora"}
    # the estimator decides the theory NTPS of these three stages, nothing else (no probe, no LoRA);
    # the intervals bootstrap the plug-in unless interval_estimator asks for the study's estimator
    assert changed(estimator="adjusted") == {"ntps", "estimates", "diagnostics"}
    assert changed(estimator="adjusted", interval_estimator="estimator") == {"ntps", "intervals", "estimates",
                                                                            "diagnostics"}
    assert changed(interval_estimator="estimator") == set()  # the study's estimator is the plug-in: the same intervals
    assert changed(estimator="plugin") == set()  # the default: the stored stages keep their keys
    # "richardson" also keeps the halves' moments on every layer: a new extraction, read by all but LoRA
    assert changed(estimator="richardson") == set(keys) - {"lora"}
    no_shards = dataclasses.replace(cfg, shards=0)  # no shards, no halves: the extraction stands
    before = study.stage_keys(no_shards, "smollm2-135m", "trec6")
    after = study.stage_keys(dataclasses.replace(no_shards, estimator="richardson"), "smollm2-135m", "trec6")
    assert {name for name in keys if after[name] != before[name]} == {"ntps", "estimates", "diagnostics"}
    assert changed(lora_budget={"steps": 5}) == {"lora"}
    # the layer grids change what is extracted and everything read from it, but not LoRA
    assert changed(probe_layers="last") == set(keys) - {"lora"}
    assert changed(max_length=128) == set(keys)
    # not settings: where results go, the study's name, the device, the threads
    assert changed(name="other", results_dir="/elsewhere", device="cuda", torch_threads=4) == set()
    assert study.stage_keys(cfg, "smollm2-135m", "hedge")["lora"] != keys["lora"]
    # a stage's version (bumped when what it computes changes) moves its key and those of its readers
    bumped = study.stage_keys(cfg, "smollm2-135m", "trec6", versions={"extraction": 2})
    assert {name for name in keys if bumped[name] != keys[name]} == set(keys) - {"lora"}
    bumped = study.stage_keys(cfg, "smollm2-135m", "trec6", versions={"ntps": 2})
    assert {name for name in keys if bumped[name] != keys[name]} == {"ntps"}


def _counting(monkeypatch, module, name, counts):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_a_changed_analysis_setting_recomputes_only_its_stages(tmp_path, monkeypatch, counted_extract, tiny_llama):
    """n_boot changes: the intervals are recomputed; no forward pass, no LoRA training, and the
    NTPS, probes and LoRA tables are the stored ones bit for bit."""
    pytest.importorskip("peft")
    import ntps_nb.core.intervals
    import ntps_nb.core.probes
    import ntps_nb.core.score
    import ntps_nb.lora

    counts: dict[str, int] = {}
    for module, name in ((ntps_nb.lora, "finetune_lora"), (ntps_nb.lora, "lora_gain"),
                         (ntps_nb.lora, "ntps_before_after"), (ntps_nb.core.probes, "probe_layers"),
                         (ntps_nb.core.score, "ntps_sweep"), (ntps_nb.core.intervals, "ntps_interval_sweep")):
        _counting(monkeypatch, module, name, counts)
    cfg = _smoke(tmp_path, datasets=["trec6"], lora=True, lora_budget={"steps": 2, "batch_size": 4, "lr": 1e-3},
                 peers=False)
    model, tok, info = tiny_llama
    as_pretrained = (model, tok, dataclasses.replace(info, pretrained=True))  # LoRA runs on pretrained models only
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    first = study.run_unit(cfg, "tiny-llama", "trec6", as_pretrained, **quiet)
    # the train and test split (and the merged model's NTPS after LoRA, unless ntps_nb.lora's cache holds it)
    forward = len(counted_extract)
    assert forward >= 2 and counts["finetune_lora"] == 1 and counts["ntps_interval_sweep"] == 2
    assert first["unit"]["lora"] == "done"

    changed = _smoke(tmp_path, datasets=["trec6"], lora=True, lora_budget={"steps": 2, "batch_size": 4, "lr": 1e-3},
                     peers=False, n_boot=cfg.n_boot + 5)
    before = dict(counts)
    second = study.run_unit(changed, "tiny-llama", "trec6", as_pretrained, **quiet)
    ran = {name: counts.get(name, 0) - before.get(name, 0) for name in counts}
    assert len(counted_extract) == forward  # no forward pass
    assert ran["finetune_lora"] == ran["lora_gain"] == ran["ntps_before_after"] == 0  # no training, no LoRA scoring
    assert ran["probe_layers"] == ran["ntps_sweep"] == 0  # the NTPS and probe stages are reused
    assert ran["ntps_interval_sweep"] == 2  # the intervals are recomputed (one layer, two variants)
    computed = {name for name, stage in second["unit"]["stages"].items() if stage.get("computed")}
    assert computed == {"intervals"}
    for name in ("ntps", "probes"):  # a reused stage says when it was computed and how long it took
        assert second["unit"]["stages"][name]["seconds"] == first["unit"]["stages"][name]["seconds"] > 0
        assert second["unit"]["stages"][name]["finished"] == first["unit"]["stages"][name]["finished"]
    assert (second["intervals"]["n_boot"] == cfg.n_boot + 5).all() and (first["intervals"]["n_boot"] == cfg.n_boot).all()
    for name in ("ntps", "probes", "lora"):
        assert (second[name]["config_hash"] == changed.config_hash).all()
        pd.testing.assert_frame_equal(second[name].drop(columns="config_hash"), first[name].drop(columns="config_hash"))
    status = study.stage_status(changed).iloc[0]
    assert status["intervals"] == "complete" and status["peers"] == "off" and status["extraction"] == "complete"
    assert study.stage_status(_smoke(tmp_path, datasets=["trec6"], n_boot=3)).iloc[0]["intervals"] == "stale"
    # the unit folder records its stage keys: another results folder recognises what is still valid in it
    folder = study.write_unit(changed.unit_folder("tiny-llama", "trec6"), second)
    elsewhere = _smoke(tmp_path / "elsewhere", datasets=["trec6"], lora=True,
                       lora_budget={"steps": 2, "batch_size": 4, "lr": 1e-3}, peers=False, n_boot=3)
    states = study.unit_folder_stages(elsewhere, "tiny-llama", "trec6", folder)
    assert states == {"extraction": "valid", "ntps": "valid", "probes": "valid", "intervals": "stale",
                      "estimates": "valid", "lora": "valid", "peers": "valid",
                      "diagnostics": "valid"}  # off then and now: no table

    # another estimator ('chance': defined at N < d, unlike 'adjusted'): the theory NTPS of the ntps,
    # intervals, estimates (and the switched-off diagnostics) stages is recomputed from the kept
    # extraction; no probe, no LoRA, no forward pass
    other = dataclasses.replace(changed, estimator="chance", interval_estimator="estimator")
    assert other.config_hash != changed.config_hash
    before = dict(counts)
    third = study.run_unit(other, "tiny-llama", "trec6", as_pretrained, **quiet)
    ran = {name: counts.get(name, 0) - before.get(name, 0) for name in counts}
    assert len(counted_extract) == forward
    assert ran["finetune_lora"] == ran["lora_gain"] == ran["ntps_before_after"] == ran["probe_layers"] == 0
    assert ran["ntps_sweep"] > 0 and ran["ntps_interval_sweep"] == 2
    computed = {name for name, stage in third["unit"]["stages"].items() if stage.get("computed")}
    assert computed == {"ntps", "intervals", "estimates", "diagnostics"}
    for name in ("ntps", "intervals"):
        table = third[name]
        assert set(table.loc[table["variant"] == "theory", "estimator"]) == {"chance"}, name
        assert set(table.loc[table["variant"] != "theory", "estimator"]) == {"plugin"}, name  # the released algorithm
    assert set(third["estimates"]["estimator"]) == {"chance"}
    for name in ("probes", "lora"):
        pd.testing.assert_frame_equal(third[name].drop(columns="config_hash"), second[name].drop(columns="config_hash"))
    # the interval sweep's estimate is the estimates table's estimate at every k
    theory = third["intervals"].query("variant == 'theory'").merge(third["estimates"], on=["layer", "k"])
    assert len(theory) > 0 and np.isfinite(theory["estimate"]).sum() >= 3
    np.testing.assert_allclose(theory["ntps"], theory["estimate"], rtol=1e-12, atol=1e-12)


def test_a_shard_estimator_runs_where_the_unit_has_shards_and_the_plugin_stands_in_elsewhere(tmp_path, tiny_llama):
    """'debiased' needs shard moments, kept on the interval layers only: there the ntps, intervals
    and estimates stages give the same estimate; the ntps table's other layers and the
    diagnostics (label permutations of pooled features) are the plug-in's, and say so."""
    cfg = _smoke(tmp_path, datasets=["trec6"], peers=False, diagnostics=True, estimator="debiased",
                 interval_estimator="estimator", max_train=280)  # above d = 64: "debiased" is defined
    assert not study.stages.keeps_halves(cfg)  # "debiased" needs every shard: no halves are kept
    tables = study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache", log=lambda _: None)
    last = max(tables["unit"]["layers"])
    assert tables["unit"]["interval_layers"] == [last]
    theory = tables["ntps"].query("variant == 'theory'")
    assert set(theory.loc[theory["layer"] == last, "estimator"]) == {"debiased"}
    assert set(theory.loc[theory["layer"] != last, "estimator"]) == {"plugin"}
    assert set(tables["diagnostics"]["estimator"]) == {"plugin"}
    keys = study.stage_keys(cfg, "tiny-llama", "trec6")
    store = study.stage_store(cfg, "tiny-llama", "trec6")
    for stage in ("ntps", "diagnostics"):
        assert "plug-in on layers" in store.load(stage, keys[stage]).record["estimator"], stage
    intervals = tables["intervals"].query("variant == 'theory'")
    assert set(intervals["estimator"]) == {"debiased"} and set(tables["estimates"]["estimator"]) == {"debiased"}
    at_last = theory[theory["layer"] == last][["k", "ntps"]]
    merged = at_last.merge(intervals[["k", "ntps"]], on="k", suffixes=("", "_iv"))
    merged = merged.merge(tables["estimates"][["k", "estimate"]], on="k")
    assert len(merged) > 0 and np.isfinite(merged["ntps"]).sum() >= 3
    np.testing.assert_allclose(merged["ntps_iv"], merged["ntps"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged["estimate"], merged["ntps"], rtol=1e-12, atol=1e-12)


def test_richardson_runs_on_every_layer_from_the_halves_and_the_shards(tmp_path, tiny_llama):
    """With "richardson" the extraction keeps the two halves' moments on the layers without shards:
    every theory row is richardson's (no stand-in), equal to richardson of per-shard moments of
    every layer (an extraction that keeps shards everywhere)."""
    from ntps_nb.core.intervals import layer_shards
    from ntps_nb.core.score import ntps_sweep
    from ntps_nb.extract import Extraction, extract
    from ntps_nb.study.config import load_unit_dataset

    cfg = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], estimator="richardson", seed=3,
                 cache_extractions=True, max_train=280)  # a half (140 texts) above d = 64: no tied classes
    tables = study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache", log=lambda _: None)
    layers, last = tables["unit"]["layers"], max(tables["unit"]["layers"])
    theory = tables["ntps"].query("variant == 'theory'")
    assert set(theory["estimator"]) == {"richardson"} and set(theory["layer"]) == set(layers)
    keys = study.stage_keys(cfg, "tiny-llama", "trec6")
    store = study.stage_store(cfg, "tiny-llama", "trec6")
    assert "estimator" not in store.load("ntps", keys["ntps"]).record  # nothing stood in
    kept = Extraction.load(store.load("extraction", keys["extraction"]).record["kept"])
    assert [half.layers for half in kept.halves] == [[x for x in layers if x != last]] * 2
    assert kept.shards[0].layers == [last]
    # independent: per-shard moments of every layer, richardson on them with the study's seed
    model, tok, _ = tiny_llama
    train = load_unit_dataset(cfg, "trec6")[0]["train"]
    every = extract(model, tok, train, shards=cfg.shards, shard_seed=cfg.seed, max_length=cfg.max_length,
                    batch_size=cfg.batch_size, precision=cfg.precision, progress=False)
    for layer, shards in layer_shards(every.shards).items():
        want = ntps_sweep(shards, estimator="richardson", seed=cfg.seed)
        got = theory[theory["layer"] == layer].merge(want[["k", "ntps"]], on="k", suffixes=("", "_shards"))
        assert len(got) == len(want) and np.isfinite(got["ntps"]).sum() >= 3, layer
        # the moments agree to 1e-12 (tests/io/test_extract.py); at or below d texts the labels are fitted
        # exactly and classes of equal size tie, an order the rounding of each summation order decides
        np.testing.assert_allclose(got["ntps"], got["ntps_shards"], rtol=0, atol=1e-6, err_msg=str(layer))


def test_a_committed_default_unit_maps_into_the_stages(tmp_path):
    """The committed default units were written before stages: every table whose settings and stage
    version did not change is taken over, read-only, and writes back the same text; their LoRA
    table (stage version 1, no per-text predictions) is stale."""
    folder = ROOT / "data" / "results" / "default" / "units" / "smollm2-135m__bbc-news"
    if not (folder / "lora.csv").is_file():
        pytest.skip("data/results/default is not committed")
    cfg = study.load_config(STUDIES / "default.toml", results_dir=str(tmp_path))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    store = study.StageStore(tmp_path / "stages")
    # the probes stage is at version 2 (the cross-validated probe), the diagnostics stage too
    # (p_value + p_side) and LoRA (per-text predictions): those committed tables are stale
    assert study.unit_folder_stages(cfg, "smollm2-135m", "bbc-news", folder) == {
        **dict.fromkeys(["extraction", "ntps", "peers", "intervals"], "valid"),
        **dict.fromkeys(["probes", "diagnostics", "lora"], "stale")}
    # a new n_boot: everything but the intervals (and the probes, diagnostics, LoRA) is still valid
    changed = dataclasses.replace(cfg, n_boot=100)
    adopted = study.adopt_unit_folder(changed, "smollm2-135m", "bbc-news", store, folder=folder)
    assert adopted == ["extraction", "ntps", "peers"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # read-only
    keys = study.stage_keys(changed, "smollm2-135m", "bbc-news")
    meta = json.loads((folder / "unit.json").read_text())
    provenance = {name: meta[name] for name in study.stages.PROVENANCE}
    for stage, table in (("ntps", "ntps"),):
        entry = store.load(stage, keys[stage])
        assert "config_hash" not in entry.table.columns and entry.record["adopted_from"] == str(folder)
        text = study.stages._with_provenance(entry.table, provenance).to_csv(index=False,
                                                                              float_format=study.CSV_FLOAT_FORMAT)
        assert text == (folder / f"{table}.csv").read_text(), stage
    assert not store.has("intervals", keys["intervals"]) and not store.has("probes", keys["probes"])
    assert not store.has("lora", keys["lora"])
    # a random-initialised control has no LoRA to take over; a changed LoRA budget invalidates it
    control = folder.parent / "smollm2-135m-random__bbc-news"
    assert study.unit_folder_stages(cfg, "smollm2-135m:random", "bbc-news", control)["lora"] == "skipped"
    retrained = dataclasses.replace(cfg, lora_budget={"steps": 10})
    assert study.unit_folder_stages(retrained, "smollm2-135m", "bbc-news", folder)["lora"] == "stale"


def test_an_adopted_stage_keeps_the_seconds_and_date_of_the_run_that_computed_it(tmp_path):
    """A unit folder written with stage records (default-richardson) records, for a stage its last
    run reused, the run that computed it; its timings_s are that last run's (milliseconds for a
    reuse). Adopting the folder on a fresh clone must keep the former, or every update run would
    overwrite the stages' computing times with reuse times."""
    folder = ROOT / "data" / "results" / "default-richardson" / "units" / "smollm2-135m__trec6"
    if not (folder / "unit.json").is_file():
        pytest.skip("data/results/default-richardson is not committed")
    cfg = study.load_config(STUDIES / "default-richardson.toml", results_dir=str(tmp_path))
    meta = json.loads((folder / "unit.json").read_text())
    store = study.StageStore(tmp_path / "stages")
    adopted = study.adopt_unit_folder(cfg, "smollm2-135m", "trec6", store, folder=folder)
    keys = study.stage_keys(cfg, "smollm2-135m", "trec6")
    reused = [name for name in adopted if name != "extraction" and not meta["stages"][name].get("computed")]
    assert "intervals" in reused  # computed in the unit's first run, reused by the LoRA update
    for name in reused:
        record = store.load(name, keys[name]).record
        assert (record["seconds"], record["finished"]) == (meta["stages"][name]["seconds"],
                                                           meta["stages"][name]["finished"]), name
    # the case this guards: the last run's timing of the reused intervals is a reuse's
    assert meta["timings_s"]["intervals"] < 1 < meta["stages"]["intervals"]["seconds"]


def test_the_stage_table_names_every_column_of_the_committed_tables():
    """The package docstring's (and README's) stage table is how a reader finds the stage behind
    a column: it must list what the stages really write."""
    import re

    folder = ROOT / "data" / "results" / "default" / "units" / "smollm2-135m__bbc-news"
    if not (folder / "lora.csv").is_file():
        pytest.skip("data/results/default is not committed")
    readme = (ROOT / "README.md").read_text()
    for stage in study.STAGES:
        if stage.table is None:
            continue
        for text, where in ((study.__doc__, "docstring"), (readme, "README")):
            for column in (*stage.columns, *(c for extra in stage.extras for c in study.stages.EXTRA_COLUMNS[extra])):
                assert re.search(rf"(?<![\w*]){re.escape(column)}(?![\w*])", text), (where, stage.name, column)
        if not (folder / f"{stage.table}.csv").is_file():  # estimates: a stage the committed units predate
            continue
        written = [c for c in pd.read_csv(folder / f"{stage.table}.csv", nrows=1).columns
                   if c not in study.stages.PROVENANCE]
        listed = [c for c in stage.columns if not c.endswith("*")]
        if "estimator" in listed and "estimator" not in written:  # committed before the estimator setting
            listed.remove("estimator")
        if stage.name == "probes" and "balanced_accuracy" not in written:  # committed by version 1 of the stage
            written = ["kappa_chance" if c == "kappa" else c for c in written]
            listed = listed[:listed.index("balanced_accuracy")]
        if stage.name == "diagnostics" and "perm_p" in written:  # committed by version 1 of the stage
            at = written.index("perm_p")
            written = written[:at] + ["p_value", "p_side"] + written[at + 1:]
        prefixes = [c[:-1] for c in stage.columns if c.endswith("*")]
        assert written[:len(listed)] == listed, stage.name
        assert all(any(c.startswith(p) for p in prefixes) for c in written[len(listed):]), stage.name


def test_without_the_extraction_cache_only_the_split_a_stage_reads_is_extracted_again(tmp_path, counted_extract,
                                                                                        tiny_llama):
    cfg = _smoke(tmp_path, datasets=["trec6"], peers=False)
    assert not cfg.cache_extractions
    study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, log=lambda _: None)
    assert len(counted_extract) == 2  # train and test split
    assert study.stage_status(cfg).iloc[0]["extraction"] == "not kept"
    again = study.run_unit(dataclasses.replace(cfg, n_boot=cfg.n_boot + 1), "tiny-llama", "trec6", tiny_llama,
                           log=lambda _: None)
    assert len(counted_extract) == 3  # the train split's shards for the intervals; the test split is not read
    assert {name for name, stage in again["unit"]["stages"].items() if stage.get("computed")} == {"intervals"}
    study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, log=lambda _: None)
    assert len(counted_extract) == 3  # every stage of the first settings is stored: no extraction at all


def test_interval_variants_bootstraps_only_the_named_variants_and_keys_only_the_intervals(tmp_path, tiny_llama):
    cfg = study.load_config(STUDIES / "default.toml")
    assert cfg.interval_variants == ("theory", "reference") and "interval_variants" not in cfg.settings()
    assert cfg.config_hash == "1cedd9f67410"  # the committed units' hash: the setting's default leaves it alone
    swapped = study.load_config(STUDIES / "default.toml", interval_variants=["reference", "theory"])
    assert swapped.interval_variants == cfg.interval_variants and swapped.config_hash == cfg.config_hash
    theory = study.load_config(STUDIES / "default.toml", interval_variants=["theory"])
    assert theory.settings()["interval_variants"] == ["theory"] and theory.config_hash != cfg.config_hash
    for bad in (["theory", "theory"], [], ["pca"], "theory", 2, [["theory"]]):
        with pytest.raises(study.StudySettingsError, match="interval_variants must be a non-empty list"):
            study.load_config(STUDIES / "default.toml", interval_variants=bad)
    keys = study.stage_keys(cfg, "smollm2-135m", "trec6")
    other = study.stage_keys(theory, "smollm2-135m", "trec6")
    assert {name for name in keys if other[name] != keys[name]} == {"intervals"}
    # a unit: only the intervals stage is computed again, without the reference rows; the theory
    # rows are the same bootstrap (the same seed, drawn per variant)
    smoke = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], diagnostics=False)
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    both = study.run_unit(smoke, "tiny-llama", "trec6", tiny_llama, **quiet)
    assert set(both["intervals"]["variant"]) == {"theory", "reference"}
    alone = study.run_unit(dataclasses.replace(smoke, interval_variants=("theory",)), "tiny-llama", "trec6",
                           tiny_llama, **quiet)
    assert {name for name, stage in alone["unit"]["stages"].items() if stage.get("computed")} == {"intervals"}
    assert set(alone["intervals"]["variant"]) == {"theory"}
    assert set(alone["intervals"]["config_hash"]) == {theory_hash := dataclasses.replace(
        smoke, interval_variants=("theory",)).config_hash} and theory_hash != smoke.config_hash
    pd.testing.assert_frame_equal(alone["intervals"].drop(columns="config_hash").reset_index(drop=True),
                                  both["intervals"][both["intervals"]["variant"] == "theory"]
                                  .drop(columns="config_hash").reset_index(drop=True),
                                  check_dtype=False)  # k is float beside the reference rows' NaN


#: The estimates stage's settings a new study takes from `ntps_estimate`'s defaults and the committed studies set to
#: what their units were computed with.
ESTIMATES_SETTINGS = ("estimate_interval", "estimate_rotation_flag", "estimate_stationary_flag",
                      "estimate_rotation_widening", "estimate_widening_level", "estimate_stationary_widening")


def _an_estimates_setting(setting: str, value, bad, message: str):
    """A setting added to the estimates stage (`stages.ADDED_TO_STAGES`): at its default it leaves the
    committed units' config hash alone, away from it the hash and the estimates stage's key alone
    change, and a bad value is refused."""
    cfg = study.load_config(STUDIES / "default.toml")
    assert setting not in cfg.settings()
    assert cfg.config_hash == "1cedd9f67410"  # the committed units' hash: the setting's default leaves it alone
    changed = study.load_config(STUDIES / "default.toml", **{setting: value})
    assert changed.settings()[setting] == value and changed.config_hash != cfg.config_hash
    with pytest.raises(study.StudySettingsError, match=message):
        study.load_config(STUDIES / "default.toml", **{setting: bad})
    keys, other = study.stage_keys(cfg, "smollm2-135m", "trec6"), study.stage_keys(changed, "smollm2-135m", "trec6")
    assert {name for name in keys if other[name] != keys[name]} == {"estimates"}


def test_estimate_interval_widens_the_estimates_table_and_keys_only_the_estimates(tmp_path, tiny_llama):
    assert study.load_config(STUDIES / "default.toml").estimate_interval == "jackknife"
    _an_estimates_setting("estimate_interval", "rotation", "bca",
                          "estimate_interval must be one of jackknife, rotation")
    # a unit: only the estimates stage is computed again; the same estimates and flags, intervals
    # that contain the jackknife ones (kept beside them)
    smoke = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], diagnostics=False)
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    plain = study.run_unit(smoke, "tiny-llama", "trec6", tiny_llama, **quiet)["estimates"]
    run = study.run_unit(dataclasses.replace(smoke, estimate_interval="rotation"), "tiny-llama", "trec6", tiny_llama,
                         **quiet)
    assert {name for name, stage in run["unit"]["stages"].items() if stage.get("computed")} == {"estimates"}
    widened = run["estimates"]
    assert (widened["interval"] == "rotation").all() and "interval" not in plain.columns
    np.testing.assert_array_equal(widened["estimate"], plain["estimate"])
    np.testing.assert_array_equal(widened["reliable"], plain["reliable"])
    np.testing.assert_allclose(widened["lower_jackknife"], plain["lower"], rtol=1e-12)
    assert (widened["lower"] <= plain["lower"] + 1e-12).all() and (widened["upper"] >= plain["upper"] - 1e-12).all()


def test_a_new_study_gets_ntps_estimates_calibrated_interval_and_flag_and_the_committed_ones_keep_theirs(tmp_path):
    """A study config that leaves ``estimate_interval`` and ``estimate_rotation_flag`` unset gets `ntps_estimate`'s
    defaults (the interval and flag chosen on the estimator map), resolved and recorded in the hash; the committed
    studies set the values their units were computed with, so their hashes stand."""
    from ntps_nb.core.estimators import resolve_interval

    new = tmp_path / "new.toml"
    new.write_text('[study]\nname = "new"\nmodels = ["smollm2-135m"]\ndatasets = ["trec6"]\nestimator = "richardson"\n')
    cfg = study.load_config(new)
    assert cfg.estimate_interval == resolve_interval(None, "richardson", cfg.shards) == "quadratic"
    assert cfg.estimate_rotation_flag is True
    assert cfg.settings()["estimate_interval"] == "quadratic" and cfg.settings()["estimate_rotation_flag"] is True
    assert study.load_config(new, estimator="plugin").estimate_interval == "jackknife"  # quadratic is richardson's
    assert study.load_config(new, shards=3).estimate_interval == "jackknife"  # too few shards for its halves
    assert "estimate_interval" not in study.load_config(new, estimator="plugin").settings()  # committed value
    assert cfg.estimate_stationary_flag is True and cfg.settings()["estimate_stationary_flag"] is True
    assert cfg.estimate_rotation_widening is True and cfg.settings()["estimate_rotation_widening"] is True
    assert cfg.estimate_stationary_widening is True and cfg.settings()["estimate_stationary_widening"] is True
    committed = study.load_config(new, estimate_interval="jackknife", estimate_rotation_flag=False,
                                  estimate_stationary_flag=False, estimate_rotation_widening=False)
    assert not set(ESTIMATES_SETTINGS) & set(committed.settings())
    programmatic = study.StudyConfig(name="t", models=("m",), datasets=("d",), estimator="richardson")
    assert programmatic.estimate_interval == "quadratic" and programmatic.estimate_rotation_flag is True
    assert programmatic.estimate_rotation_widening is True
    for path in sorted(STUDIES.glob("*.toml")):  # every committed study says what its units used
        settings = study.load_config(path).settings()
        assert not set(ESTIMATES_SETTINGS) & set(settings), path
    provenances = sorted(study.config.RESULTS_ROOT.glob("*/provenance.json"))
    assert len(provenances) >= 5
    for provenance in provenances:  # and its config hash is still the one its results were combined under
        committed = json.loads(provenance.read_text())
        assert study.load_config(ROOT / committed["config"]).config_hash == committed["config_hash"], provenance


def test_the_quadratic_estimate_interval_needs_richardson_and_narrows_its_jackknife_interval(tmp_path, tiny_llama):
    with pytest.raises(study.StudySettingsError, match="needs estimator = 'richardson'"):
        study.load_config(STUDIES / "default.toml", estimate_interval="quadratic")
    cfg = study.load_config(STUDIES / "default-richardson.toml")
    quadratic = study.load_config(STUDIES / "default-richardson.toml", estimate_interval="quadratic")
    assert quadratic.config_hash != cfg.config_hash
    keys, other = study.stage_keys(cfg, "smollm2-135m", "trec6"), study.stage_keys(quadratic, "smollm2-135m", "trec6")
    assert {name for name in keys if other[name] != keys[name]} == {"estimates"}
    # a unit: the same estimates, the jackknife interval kept beside a narrower one
    smoke = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], diagnostics=False, estimator="richardson")
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    plain = study.run_unit(smoke, "tiny-llama", "trec6", tiny_llama, **quiet)["estimates"]
    run = study.run_unit(dataclasses.replace(smoke, estimate_interval="quadratic"), "tiny-llama", "trec6",
                         tiny_llama, **quiet)
    assert {name for name, stage in run["unit"]["stages"].items() if stage.get("computed")} == {"estimates"}
    narrowed = run["estimates"]
    assert (narrowed["interval"] == "quadratic").all()
    np.testing.assert_array_equal(narrowed["estimate"], plain["estimate"])
    np.testing.assert_allclose(narrowed["se_jackknife"], plain["se"], rtol=1e-12)
    finite = np.isfinite(plain["se"])
    assert finite.any() and (narrowed["se"][finite] <= plain["se"][finite] * (1 + 1e-12)).all()


def test_the_quadratic_intervals_reading_keys_its_estimates_and_nothing_else(monkeypatch):
    # tables of the quadratic interval computed on S - 1 degrees of freedom (before session 31), or with T-hat
    # from every shard (before session 34), must not be read as the current interval's: its estimates key names
    # how the t and T-hat are read; other units' keys stand
    cfg = study.load_config(STUDIES / "default-richardson.toml")
    quadratic = dataclasses.replace(cfg, estimate_interval="quadratic")
    before = [study.stage_keys(c, "smollm2-135m", "trec6") for c in (cfg, quadratic)]
    monkeypatch.setattr(study.stages, "QUADRATIC_DF_SETTING", ("quadratic_df", "another reading"))
    after = [study.stage_keys(c, "smollm2-135m", "trec6") for c in (cfg, quadratic)]
    assert after[0] == before[0]
    assert {name for name in before[1] if after[1][name] != before[1][name]} == {"estimates"}
    # so does how many shards of each half its T-hat is read from (every shard before session 34)
    monkeypatch.setattr(study.stages, "INTERACTION_HALF", None)
    every = [study.stage_keys(c, "smollm2-135m", "trec6") for c in (cfg, quadratic)]
    assert every[0] == before[0]
    assert {name for name in after[1] if every[1][name] != after[1][name]} == {"estimates"}


def test_a_config_extends_another_and_its_own_keys_win(tmp_path):
    """``extends`` reads the named TOML's [study] table under this one: the default-richardson
    study is the default study's grid and settings but for its estimator and name."""
    base = study.load_config(STUDIES / "default.toml")
    variant = study.load_config(STUDIES / "default-richardson.toml")
    assert variant.units() == base.units() and variant.name == "default-richardson"
    differing = {key for key in set(base.settings()) | set(variant.settings())
                 if base.settings().get(key) != variant.settings().get(key)}
    assert differing == {"estimator"} and variant.interval_estimator == "plugin"
    assert variant.reuse_folder == study.config.RESULTS_ROOT / "default"
    chain = tmp_path / "chain.toml"
    chain.write_text(f'[study]\nextends = "{STUDIES / "default-richardson.toml"}"\nname = "chain"\nn_boot = 7\n')
    chained = study.load_config(chain)
    assert (chained.estimator, chained.n_boot, chained.models) == ("richardson", 7, base.models)
    missing = tmp_path / "missing.toml"
    missing.write_text('[study]\nextends = "nowhere.toml"\nname = "m"\n')
    with pytest.raises(study.StudySettingsError, match="extends 'nowhere.toml', but there is no file"):
        study.load_config(missing)
    loop = tmp_path / "loop.toml"
    loop.write_text('[study]\nextends = "loop.toml"\nname = "l"\n')
    with pytest.raises(study.StudySettingsError, match="extend one another"):
        study.load_config(loop)


def test_a_variant_study_reuses_the_lora_of_the_study_it_names(tmp_path, monkeypatch, tiny_llama):
    """A study with another estimator and ``reuse_from`` the first study's folder takes the first's
    LoRA table (no training step) and recomputes the stages the estimator decides; without
    ``reuse_from`` the same variant trains LoRA again (so the test can fail)."""
    pytest.importorskip("peft")
    import ntps_nb.lora

    counts: dict[str, int] = {}
    _counting(monkeypatch, ntps_nb.lora, "finetune_lora", counts)
    budget = {"steps": 2, "batch_size": 4, "lr": 1e-3}
    model, tok, info = tiny_llama
    as_pretrained = (model, tok, dataclasses.replace(info, pretrained=True))
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    first = _smoke(tmp_path / "first", datasets=["trec6"], lora=True, lora_budget=budget, peers=False)
    tables = study.run_unit(first, "tiny-llama", "trec6", as_pretrained, **quiet)
    study.write_unit(first.unit_folder("tiny-llama", "trec6"), tables)
    assert counts["finetune_lora"] == 1

    variant = _smoke(tmp_path / "variant", datasets=["trec6"], lora=True, lora_budget=budget, peers=False,
                     estimator="richardson", reuse_from=str(first.folder))
    assert study.stages.stage_states(variant, "tiny-llama", "trec6")["lora"] == "complete"
    again = study.run_unit(variant, "tiny-llama", "trec6", as_pretrained, **quiet)
    assert counts["finetune_lora"] == 1  # no training step
    computed = {name for name, stage in again["unit"]["stages"].items() if stage.get("computed")}
    assert "lora" not in computed and {"ntps", "estimates"} <= computed
    for name in ("lora", "lora_predictions"):  # read back from the folder's CSVs
        pd.testing.assert_frame_equal(again[name].drop(columns="config_hash"), tables[name].drop(columns="config_hash"),
                                      check_dtype=False)
    assert set(again["ntps"].query("variant == 'theory'")["estimator"]) == {"richardson"}
    assert set(again["intervals"]["estimator"]) == {"plugin"}  # the plug-in's bootstrap (interval_estimator)

    alone = _smoke(tmp_path / "alone", datasets=["trec6"], lora=True, lora_budget=budget, peers=False,
                   estimator="richardson")
    study.run_unit(alone, "tiny-llama", "trec6", as_pretrained, **quiet)
    assert counts["finetune_lora"] == 2


def _complete_lora_unit(tmp_path, monkeypatch, tiny_llama):
    """A smoke study of one unit (tiny-llama as a pretrained model, trec6) run whole with a 2-step
    LoRA whose training is counted: (cfg, run options, counts, the unit folder)."""
    pytest.importorskip("peft")
    import ntps_nb.lora
    import ntps_nb.models

    counts: dict[str, int] = {}
    _counting(monkeypatch, ntps_nb.lora, "finetune_lora", counts)
    model, tok, info = tiny_llama
    monkeypatch.setattr(ntps_nb.models, "load_model",
                        lambda *args, **kwargs: (model, tok, dataclasses.replace(info, pretrained=True)))
    cfg = _smoke(tmp_path, datasets=["trec6"], lora=True, lora_budget={"steps": 2, "batch_size": 4, "lr": 1e-3},
                 peers=False)
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    study.run_study(cfg, **quiet)
    return cfg, quiet, counts, cfg.unit_folder("tiny-llama", "trec6")


def test_update_stages_recomputes_only_the_outdated_stage_of_a_complete_unit(tmp_path, monkeypatch, tiny_llama):
    """A complete unit whose LoRA result an older stage version wrote (no per-text predictions):
    a plain run passes over it; ``update_stages`` retrains LoRA, writes its predictions, and
    computes nothing else."""
    cfg, quiet, counts, folder = _complete_lora_unit(tmp_path, monkeypatch, tiny_llama)
    assert counts["finetune_lora"] == 1 and (folder / "lora_predictions.csv").is_file()
    assert study.outdated_stages(cfg, "tiny-llama", "trec6") == []
    # make it a unit of LoRA's version 1: another recorded key, no predictions, nothing in the store
    meta = json.loads((folder / "unit.json").read_text())
    key = meta["stages"]["lora"]["key"]
    shutil.rmtree(study.stage_store(cfg, "tiny-llama", "trec6").path("lora", key))
    meta["stages"]["lora"]["key"] = study.stage_keys(cfg, "tiny-llama", "trec6", versions={"lora": 1})["lora"]
    (folder / "unit.json").write_text(json.dumps(meta))
    (folder / "lora_predictions.csv").unlink()
    assert study.outdated_stages(cfg, "tiny-llama", "trec6") == ["lora"]
    assert study.run_study(cfg, **quiet)["status"].tolist() == ["skipped"] and counts["finetune_lora"] == 1
    assert study.run_study(cfg, update_stages=True, **quiet)["status"].tolist() == ["done"]
    assert counts["finetune_lora"] == 2 and (folder / "lora_predictions.csv").is_file()
    meta = json.loads((folder / "unit.json").read_text())
    assert {name for name, stage in meta["stages"].items() if stage.get("computed")} == {"lora"}
    assert study.outdated_stages(cfg, "tiny-llama", "trec6") == []


def test_update_stages_can_update_one_outdated_stage_and_keep_the_others_as_the_folder_has_them(
        tmp_path, monkeypatch, tiny_llama):
    """Two outdated stages of a complete unit (LoRA of version 1, estimates computed under another
    key): ``stages=["estimates"]`` recomputes the estimates alone, copies lora.csv unchanged, keeps
    LoRA's recorded entry (still outdated) and trains nothing; a later plain update retrains LoRA."""
    cfg, quiet, counts, folder = _complete_lora_unit(tmp_path, monkeypatch, tiny_llama)
    store = study.stage_store(cfg, "tiny-llama", "trec6")
    meta = json.loads((folder / "unit.json").read_text())
    for name in ("lora", "estimates"):  # neither is stored under its current key any more
        shutil.rmtree(store.path(name, meta["stages"][name]["key"]))
        meta["stages"][name]["key"] = study.stage_keys(cfg, "tiny-llama", "trec6", versions={name: 99})[name]
    (folder / "unit.json").write_text(json.dumps(meta))
    (folder / "lora_predictions.csv").unlink()
    lora_before = (folder / "lora.csv").read_bytes()
    estimates_before = pd.read_csv(folder / "estimates.csv")
    assert study.outdated_stages(cfg, "tiny-llama", "trec6") == ["estimates", "lora"]
    with pytest.raises(study.StudySettingsError, match="update_stages"):
        study.run_study(cfg, stages=["estimates"], **quiet)
    with pytest.raises(study.StudySettingsError, match="unknown stage"):
        study.run_study(cfg, update_stages=True, stages=["estimate"], **quiet)

    assert study.run_study(cfg, update_stages=True, stages=["estimates"], **quiet)["status"].tolist() == ["done"]
    assert counts["finetune_lora"] == 1  # no LoRA trained
    assert (folder / "lora.csv").read_bytes() == lora_before and not (folder / "lora_predictions.csv").exists()
    after = json.loads((folder / "unit.json").read_text())
    assert {name for name, stage in after["stages"].items() if stage.get("computed")} == {"estimates"}
    assert after["stages"]["lora"]["key"] == meta["stages"]["lora"]["key"] and after["stages"]["lora"]["held"]
    assert after["held"] == ["lora"]
    assert after["lora"] == meta["lora"]
    pd.testing.assert_frame_equal(pd.read_csv(folder / "estimates.csv"), estimates_before)  # same numbers, new key
    assert study.outdated_stages(cfg, "tiny-llama", "trec6") == ["lora"]
    assert study.run_study(cfg, update_stages=True, stages=["estimates"], **quiet)["status"].tolist() == ["skipped"]

    assert study.run_study(cfg, update_stages=True, **quiet)["status"].tolist() == ["done"]
    assert counts["finetune_lora"] == 2 and (folder / "lora_predictions.csv").is_file()
    assert study.outdated_stages(cfg, "tiny-llama", "trec6") == []


def test_the_committed_default_richardson_units_reuse_the_default_studys_lora_and_controls():
    """The rerun with richardson (studies/default-richardson.toml): every committed unit has the
    config's hash, its LoRA rows are the default study's (reused, not retrained: only the provenance
    columns differ) unless the LoRA stage was brought to version 2 (`study run --update-stages`:
    retrained with the same budget, its per-text predictions giving back both accuracies exactly),
    and its random controls hold the default study's weights."""
    folder = ROOT / "data" / "results" / "default-richardson" / "units"
    if not folder.is_dir():
        pytest.skip("data/results/default-richardson is not committed")
    cfg = study.load_config(STUDIES / "default-richardson.toml")
    units = sorted(p for p in folder.iterdir() if (p / "unit.json").is_file())
    assert units
    provenance = list(study.stages.PROVENANCE)
    for unit in units:
        meta = json.loads((unit / "unit.json").read_text())
        assert meta["complete"] and meta["config_hash"] == cfg.config_hash, unit.name
        before = json.loads((ROOT / "data" / "results" / "default" / "units" / unit.name / "unit.json").read_text())
        assert meta["model_info"]["weights_sha256"] == before["model_info"]["weights_sha256"], unit.name
        theory = pd.read_csv(unit / "ntps.csv").query("variant == 'theory'")
        assert set(theory["estimator"]) == {"richardson"}, unit.name
        if meta["pretrained"]:
            new = pd.read_csv(unit / "lora.csv").drop(columns=provenance)
            old = pd.read_csv(ROOT / "data" / "results" / "default" / "units" / unit.name / "lora.csv")
            if (unit / "lora_predictions.csv").is_file():  # retrained by LoRA's stage version 2
                assert meta["stages"]["lora"]["key"] == study.stage_keys(cfg, meta["model"], meta["dataset"])["lora"]
                per_text = pd.read_csv(unit / "lora_predictions.csv")
                assert len(per_text) == meta["n_test"] and per_text["text_index"].tolist() == list(range(len(per_text)))
                for column, predicted in (("lora_lora_accuracy", "lora_prediction"),
                                          ("lora_probe_accuracy", "probe_prediction")):
                    recomputed = np.mean(per_text[predicted] == per_text["label"])  # the CSV keeps 7 digits
                    np.testing.assert_allclose(new[column], recomputed, rtol=5e-7, atol=0, err_msg=f"{unit.name} {column}")
                budget = [c for c in new.columns if c.startswith(("lora_budget_", "lora_paper_"))]
                pd.testing.assert_frame_equal(new[budget], old[budget], check_dtype=False)
                # the base model's side is the unit's own: NTPS before LoRA as before, the probe the same fit;
                # where the forward pass was run again on another CPU's kernels (AVX-512 here, AVX2 or a GPU
                # before), float32 products move NTPS in its 6th digit (up to 2.2e-6 seen)
                np.testing.assert_allclose(new["ntps_before"], old["ntps_before"], rtol=0, atol=1e-4)
                assert (new["lora_probe_accuracy"] == old["lora_probe_accuracy"]).all(), unit.name
            else:
                pd.testing.assert_frame_equal(new, old.drop(columns=provenance), check_dtype=False)
        else:
            assert str(meta["lora"]).startswith("skipped"), unit.name


def test_on_a_device_the_diagnostics_host_solvers_run_in_worker_processes_and_give_the_in_call_numbers(
        tmp_path, monkeypatch, tiny_llama):
    """With the analysis on the torch backend, the diagnostics stage computes the host eigensolver
    comparison of every (layer, variant) in worker processes that share the BLAS bound less one core
    (left to the thread driving the device), beside the device work; its solver_max_dev equals the
    one `ntps_diagnostics(..., device=, solvers=True)` computes in the call."""
    from ntps_nb.core import diagnostics

    seen, pools = [], []
    real_submit = diagnostics.HostSolverProcesses.submit

    def recording(self, moments, variant, config, **grid):
        pools.append((id(self), self.pool._max_workers, self.threads))
        seen.append((variant, moments, grid, (tuple(config),)))
        return real_submit(self, moments, variant, config, **grid)

    monkeypatch.setattr(diagnostics.HostSolverProcesses, "submit", recording)
    cfg = _smoke(tmp_path, datasets=["trec6"], diagnostics=True, probes=[], analysis_device="cpu", analysis_threads=4)
    table = study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache",
                           log=lambda _: None)["diagnostics"]
    # one factorisation per task: every (layer, variant) x its solver settings, in one pool of
    # 3 workers (4 BLAS threads less 1) of 1 BLAS thread each
    tasks = table["layer"].nunique() * sum(len(c) for c in diagnostics.SOLVER_CONFIGS.values())
    assert len(seen) == tasks and set(pools) == {(pools[0][0], 3, 1)}
    jobs: dict = {}
    for variant, moments, grid, configs in seen:
        jobs.setdefault((id(moments), variant), (moments, grid, []))[2].extend(configs)
    assert all(sorted(c) == sorted(diagnostics.SOLVER_CONFIGS[v]) for (_, v), (_, _, c) in jobs.items())
    assert table["solver_max_dev"].notna().all()
    matched = set()
    for (_, variant), (moments, grid, _) in jobs.items():  # find each job's layer by its NTPS
        in_call = diagnostics.ntps_diagnostics(moments, variant=variant, n_perturb=0, n_permutations=0, device="cpu",
                                               solvers=True, **grid)
        (layer,) = [layer for layer, rows in table[table["variant"] == variant].groupby("layer")
                    if np.allclose(rows["ntps"].to_numpy(float), in_call["ntps"].to_numpy(float), rtol=0, atol=1e-12,
                                   equal_nan=True) and (layer, variant) not in matched]
        matched.add((layer, variant))
        rows = table[(table["layer"] == layer) & (table["variant"] == variant)]
        np.testing.assert_array_equal(rows["solver_max_dev"].to_numpy(float), in_call["solver_max_dev"].to_numpy(float))


def test_on_a_gpu_the_host_solvers_start_before_the_intervals_and_give_the_same_diagnostics(tmp_path, monkeypatch,
                                                                                             tiny_llama):
    """With the analysis on a CUDA device the diagnostics' host solver comparison starts before the
    intervals stage (its worker processes run while the GPU computes the intervals and estimates); the
    diagnostics table is the one the stage computes when it starts them itself. The CUDA condition
    is stood in for on the CPU torch backend."""
    from ntps_nb.study import stages

    events = []
    intervals = stages._COMPUTE["intervals"]
    enter = stages._HostSolvers.__enter__

    def recording_intervals(u):
        events.append("intervals")
        return intervals(u)

    def recording_enter(self):
        if self.pool is None and self.computing:
            events.append("host solvers start")
        return enter(self)

    monkeypatch.setitem(stages._COMPUTE, "intervals", recording_intervals)
    monkeypatch.setattr(stages._HostSolvers, "__enter__", recording_enter)
    tables = {}
    for early in (False, True):
        monkeypatch.setattr(stages, "_starts_host_solvers_early", lambda u, early=early: early and bool(u.diag_grid))
        events.clear()
        cfg = _smoke(tmp_path / str(early), datasets=["trec6"], diagnostics=True, probes=[], analysis_device="cpu",
                     analysis_threads=2)
        tables[early] = study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache",
                                       log=lambda _: None)["diagnostics"]
        assert events == (["host solvers start", "intervals"] if early else ["intervals", "host solvers start"])
    assert tables[True]["solver_max_dev"].notna().all()
    pd.testing.assert_frame_equal(tables[True], tables[False])


def test_host_solvers_started_early_are_stopped_at_once_when_a_later_stage_fails(tmp_path, monkeypatch, tiny_llama):
    """If the intervals stage fails after the host solver comparison started early, the unit's error
    propagates and the workers are closed with cancel (their values would never be read), not
    waited for."""
    from ntps_nb.core import diagnostics
    from ntps_nb.study import stages

    closes = []
    close = diagnostics.HostSolverProcesses.close

    def recording_close(self, cancel=False):
        closes.append(cancel)
        return close(self, cancel=cancel)

    def failing_intervals(u):
        raise RuntimeError("interval stage failed")

    monkeypatch.setattr(diagnostics.HostSolverProcesses, "close", recording_close)
    monkeypatch.setitem(stages._COMPUTE, "intervals", failing_intervals)
    monkeypatch.setattr(stages, "_starts_host_solvers_early", lambda u: bool(u.diag_grid))
    cfg = _smoke(tmp_path, datasets=["trec6"], diagnostics=True, probes=[], analysis_device="cpu", analysis_threads=2)
    with pytest.raises(RuntimeError, match="interval stage failed"):
        study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache", log=lambda _: None)
    assert closes == [True]


def test_only_a_cuda_analysis_starts_the_host_solvers_early():
    from types import SimpleNamespace

    import torch

    from ntps_nb.study.stages import _starts_host_solvers_early

    for device, grid, want in (("cuda", [3], True), (torch.device("cuda", 1), [3], True), ("cuda", [], False),
                               ("cpu", [3], False), (None, [3], False)):
        assert _starts_host_solvers_early(SimpleNamespace(analysis_device=device, diag_grid=grid)) is want, device


def test_a_unit_keeps_its_moments_on_the_gpu_only_where_they_fit(monkeypatch):
    """The extraction keeps its moments on the analysis GPU when that is the model's and they take at
    most RESIDENT_MEMORY_SHARE of its memory (counted over the unit's layers, shards and halves); never
    for numpy or CPU analysis, nor for a GPU other than the model's."""
    from types import SimpleNamespace

    import torch

    from ntps_nb.extract import RESIDENT_MEMORY_SHARE
    from ntps_nb.study.stages import _keeps_moments_on_device

    d = 4096
    settings = dict(layers=list(range(33)), shards=20, shard_layers=[0, 16, 32], half_layers=list(range(1, 31)))
    nbytes = 8 * d * d * (4 * 33 + 3 * 60 + 3 * 2 * 30)
    model = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda", 0))]))
    unit = SimpleNamespace(loaded=(model, None, SimpleNamespace(hidden_size=d)), analysis_device=None)
    assert not _keeps_moments_on_device(unit, settings)
    unit.analysis_device = "cpu"
    assert not _keeps_moments_on_device(unit, settings)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two CUDA devices
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    unit.analysis_device = "cuda:0"
    for total, keeps in ((nbytes / RESIDENT_MEMORY_SHARE * 1.01, True), (nbytes / RESIDENT_MEMORY_SHARE * 0.99, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, total=total: SimpleNamespace(
            total_memory=total))
        assert _keeps_moments_on_device(unit, settings) is keeps
    unit.analysis_device = "cuda:1"  # the resident copies would sit on cuda:0, where the analysis never reads them
    assert not _keeps_moments_on_device(unit, settings)


def test_a_pooled_estimators_diagnostics_run_in_numpy_beside_a_torch_analysis(tmp_path, tiny_llama):
    """With the analysis on the torch backend (plug-in only) and a pooled estimator ("adjusted"),
    the diagnostics stage computes that estimator's theory rows with numpy and the reference rows on
    the device: the same table as a numpy unit (it used to stop with the backend's ValueError)."""
    cfg = _smoke(tmp_path, datasets=["trec6"], diagnostics=True, probes=[], estimator="adjusted")
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    numpy_unit = study.run_unit(dataclasses.replace(cfg, analysis_device="numpy"), "tiny-llama", "trec6",
                                tiny_llama, **quiet)
    torch_unit = study.run_unit(dataclasses.replace(cfg, analysis_device="cpu", results_dir=str(tmp_path / "t")),
                                "tiny-llama", "trec6", tiny_llama, **quiet)
    want, got = numpy_unit["diagnostics"], torch_unit["diagnostics"]
    assert set(got.loc[got["variant"] == "theory", "estimator"]) == {"adjusted"}
    theory = (want["variant"] == "theory").to_numpy()
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    numbers = [c for c in want.select_dtypes("number").columns if c != "seconds"]
    np.testing.assert_allclose(got.loc[theory, numbers].to_numpy(float), want.loc[theory, numbers].to_numpy(float),
                               rtol=1e-12, atol=1e-12)
    assert got.loc[~theory, "solver_max_dev"].notna().all()


def test_estimates_of_version_2_are_refreshed_from_their_table_without_a_forward_pass(tmp_path, monkeypatch,
                                                                                         counted_extract, tiny_llama):
    """Estimates stage version 3 adds the flag's bound condition (`flag_at_bound`), a function of the
    table alone: a unit holding version-2 estimates, in its stage store or only in its unit folder,
    is brought up to date from that table with no forward pass and no estimator call, and the result
    is the version-3 table computed from the extraction, value for value."""
    import ntps_nb.core.estimators as estimators
    import ntps_nb.study.stages as stages

    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    older = _smoke(tmp_path / "a", datasets=["trec6"], peers=False)
    with monkeypatch.context() as then:  # the package as it was at estimates version 2
        then.setattr(stages, "STAGES", tuple(dataclasses.replace(s, version=2) if s.name == "estimates" else s
                                             for s in stages.STAGES))
        then.setattr(estimators, "flag_at_bound", lambda frame, bound_se=None: frame)
        v2 = study.run_unit(older, "tiny-llama", "trec6", tiny_llama, **quiet)
        study.write_unit(older.unit_folder("tiny-llama", "trec6"), v2)
    assert "at_bound" not in v2["estimates"].columns
    fresh = study.run_unit(_smoke(tmp_path / "b", datasets=["trec6"], peers=False), "tiny-llama", "trec6",
                           tiny_llama, **quiet)
    assert fresh["unit"]["stages"]["estimates"]["computed"] and "last_run" not in fresh["unit"]
    # a unit whose stages were computed in one run (its extraction read from the cache the first run filled: the
    # extraction's seconds are that pass's): each stage's part lies within this run's lap for it
    meta = fresh["unit"]
    extraction = meta["extraction_seconds"] + meta["extraction_seconds_test"]
    laps = sum(seconds for name, seconds in meta["timings_s"].items() if name in study.stages.ANALYSIS_STAGES)
    assert extraction < study.unit_compute_seconds(meta) <= extraction + laps

    counts: dict[str, int] = {}
    _counting(monkeypatch, estimators, "ntps_estimate", counts)
    forward = len(counted_extract)
    # from the stage store of the version-2 run, then from its unit folder alone (another results
    # folder holding a copy of it, no stage store)
    copied = _smoke(tmp_path / "c", datasets=["trec6"], peers=False)
    shutil.copytree(older.unit_folder("tiny-llama", "trec6"), copied.unit_folder("tiny-llama", "trec6"))
    for cfg in (older, copied):
        assert study.stage_states(cfg, "tiny-llama", "trec6")["estimates"] == "stale"
        refreshed = study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, **quiet)
        entry = refreshed["unit"]["stages"]["estimates"]
        assert not entry["computed"] and entry["refreshed_from"]["version"] == 2
        assert entry["refreshed_from"]["key"] == v2["unit"]["stages"]["estimates"]["key"] != entry["key"]
        assert entry["seconds"] == v2["unit"]["stages"]["estimates"]["seconds"]  # the run that computed it
        assert entry["ran_on"] == v2["unit"]["stages"]["estimates"]["ran_on"]
        assert study.stage_states(cfg, "tiny-llama", "trec6")["estimates"] == "complete"
        assert not {name for name, stage in refreshed["unit"]["stages"].items() if stage.get("computed")}
        # the unit keeps when, how long and where it was computed; the refresh is its last run
        for name in ("seconds", "timings_s", "finished", "environment"):
            assert refreshed["unit"][name] == v2["unit"][name], name
        assert set(refreshed["unit"]["last_run"]) == {"seconds", "timings_s", "finished", "environment"}
        assert "extract_train" not in refreshed["unit"]["last_run"]["timings_s"]
        assert study.unit_compute_seconds(refreshed["unit"]) == study.unit_compute_seconds(v2["unit"])
        provenance = ["config_hash", "study"]
        pd.testing.assert_frame_equal(refreshed["estimates"].drop(columns=provenance),
                                      fresh["estimates"].drop(columns=provenance))
        assert (refreshed["estimates"]["reliable"] == (v2["estimates"]["reliable"].astype(bool)
                                                       & ~refreshed["estimates"]["at_bound"])).all()
    assert len(counted_extract) == forward and counts.get("ntps_estimate", 0) == 0


def test_each_stage_records_where_it_was_computed_through_later_runs(tmp_path, monkeypatch, tiny_llama):
    """A unit's stages may come from several runs on several machines (the committed default-richardson study:
    most stages on an H200, the estimates later on a CPU). Each computed stage records its run's ``ran_on``, and
    a later run that recomputes one stage changes that stage's alone; the unit's ``environment`` is the last
    run that read the extraction."""
    import ntps_nb.study.stages as stages

    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    smoke = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], diagnostics=False)
    here = stages._ran_on(tiny_llama[0], smoke)
    assert set(here) == {"device", "device_name", "host", "analysis_device"}
    first = study.run_unit(smoke, "tiny-llama", "trec6", tiny_llama, **quiet)
    study.write_unit(smoke.unit_folder("tiny-llama", "trec6"), first)
    computed = [name for name, stage in first["unit"]["stages"].items() if stage.get("computed")]
    assert computed and all(first["unit"]["stages"][name]["ran_on"] == here for name in computed)
    version = first["unit"]["extract_version"]
    assert version is not None and all(first["unit"]["stages"][name]["extract_version"] == version
                                       for name in computed)
    assert first["unit"]["stages"]["extraction"]["ran_on"] == here
    elsewhere = {**here, "host": "another-machine", "device_name": "another GPU"}
    monkeypatch.setattr(stages, "_ran_on", lambda model, cfg: elsewhere)
    second = study.run_unit(dataclasses.replace(smoke, estimate_rotation_flag=not smoke.estimate_rotation_flag),
                            "tiny-llama", "trec6", tiny_llama, **quiet)
    meta = second["unit"]
    assert [name for name, stage in meta["stages"].items() if stage.get("computed")] == ["estimates"]
    assert meta["stages"]["estimates"]["ran_on"] == elsewhere and meta["environment"]["host"] == "another-machine"
    assert all(meta["stages"][name]["ran_on"] == here for name in computed if name != "estimates")
    # a later pass under other extraction rules: the reused stages keep the version of the moments they read
    monkeypatch.setattr(stages, "_ran_on", lambda model, cfg: here)
    from ntps_nb import extract

    monkeypatch.setattr(extract, "EXTRACT_VERSION", version + 1)
    third = study.run_unit(dataclasses.replace(smoke, estimate_interval="rotation"), "tiny-llama", "trec6", tiny_llama,
                           cache=tmp_path / "other-cache", log=lambda _: None)
    assert third["unit"]["extract_version"] == version + 1
    assert [name for name, stage in third["unit"]["stages"].items() if stage.get("computed")] == ["estimates"]
    assert third["unit"]["stages"]["estimates"]["extract_version"] == version + 1
    assert all(third["unit"]["stages"][name]["extract_version"] == version for name in computed if name != "estimates")


def test_estimates_of_version_3_keep_reliable_only_for_the_calibrated_estimators():
    """Estimates stage version 4: `reliable` only on the rows of `CALIBRATED_ESTIMATORS` (the plug-in's rows that
    meet the flag's conditions under-cover), brought from a version-3 or version-2 table's own values."""
    assert study.stages.STAGES[study.stages.STAGE_NAMES.index("estimates")].version == 4
    table = pd.DataFrame({"estimator": ["plugin", "plugin", "richardson", "richardson"],
                          "reliable": [True, False, True, False], "estimate": 0.5, "se": 0.1})
    for version in (3, 2):
        out = study.stages.REFRESHES["estimates"][version](table)
        assert out["reliable"].tolist() == [False, False, True, False]


def test_a_plugin_studys_estimates_say_why_no_row_is_reliable(tmp_path, tiny_llama):
    """A study whose estimator is not calibrated says once, in the unit's log and in unit.json
    (stages.estimates.flag), why none of its estimates rows is reliable; a richardson study's unit carries no
    such note."""
    said = []
    smoke = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], diagnostics=False, estimator="plugin")
    run = study.run_unit(smoke, "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache", log=said.append)
    # (at this size no row meets the flag's conditions anyway: the gate itself is tested on known truth in
    # tests/core/test_estimators.py; here, that the unit says why)
    note = run["unit"]["stages"]["estimates"]["flag"]
    assert "calibrated for richardson only, not for plugin" in note
    assert sum("calibrated for richardson only" in line for line in said) == 1
    other = study.run_unit(dataclasses.replace(smoke, estimator="richardson"), "tiny-llama", "trec6", tiny_llama,
                           cache=tmp_path / "cache", log=lambda _: None)
    assert "flag" not in other["unit"]["stages"]["estimates"]


def test_estimate_rotation_flag_narrows_the_estimates_flag_and_keys_only_the_estimates(tmp_path, tiny_llama):
    assert study.load_config(STUDIES / "default.toml").estimate_rotation_flag is False
    _an_estimates_setting("estimate_rotation_flag", True, "yes", "estimate_rotation_flag must be true or false")
    # a unit: only the estimates stage is computed again; the same estimates and intervals, a flag that
    # is the plain one and the rotation condition
    smoke = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], diagnostics=False)
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    plain = study.run_unit(smoke, "tiny-llama", "trec6", tiny_llama, **quiet)["estimates"]
    run = study.run_unit(dataclasses.replace(smoke, estimate_rotation_flag=True), "tiny-llama", "trec6", tiny_llama,
                         **quiet)
    assert {name for name, stage in run["unit"]["stages"].items() if stage.get("computed")} == {"estimates"}
    narrowed = run["estimates"]
    assert "rotation_stable" in narrowed.columns and "rotation_stable" not in plain.columns
    for column in ("estimate", "lower", "upper"):
        np.testing.assert_array_equal(narrowed[column], plain[column])
    np.testing.assert_array_equal(narrowed["reliable"], plain["reliable"] & narrowed["rotation_stable"])


def _estimates_without_and_with(tmp_path, tiny_llama, setting: str, **fixed) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The smoke study's estimates table (richardson, tiny-llama on trec6; the settings ``fixed``) with the boolean
    estimates ``setting`` off, then on; turning it on must recompute the estimates stage alone."""
    smoke = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], diagnostics=False, estimator="richardson",
                   **fixed)
    quiet = dict(cache=tmp_path / "cache", log=lambda _: None)
    plain = study.run_unit(dataclasses.replace(smoke, **{setting: False}), "tiny-llama", "trec6", tiny_llama,
                           **quiet)["estimates"]
    run = study.run_unit(dataclasses.replace(smoke, **{setting: True}), "tiny-llama", "trec6", tiny_llama, **quiet)
    assert {name for name, stage in run["unit"]["stages"].items() if stage.get("computed")} == {"estimates"}
    return plain, run["estimates"]


def test_estimate_stationary_flag_narrows_the_estimates_flag_and_keys_only_the_estimates(tmp_path, tiny_llama):
    """The flag's stationary condition (`ntps_estimate`'s ``stationary_flag``) as a study setting: off in the
    committed studies (their units were computed without it, so their hashes stand), on for a new study; turning
    it on recomputes the estimates stage alone, adds stationary_distance and narrows the flag by it."""
    from ntps_nb.core.estimators import STATIONARY_SE

    assert study.load_config(STUDIES / "default.toml").estimate_stationary_flag is False
    assert study.StudyConfig(name="t", models=("m",), datasets=("d",)).estimate_stationary_flag is True
    _an_estimates_setting("estimate_stationary_flag", True, 2.0, "estimate_stationary_flag must be true or false")
    plain, narrowed = _estimates_without_and_with(tmp_path, tiny_llama, "estimate_stationary_flag")
    assert "stationary_distance" in narrowed.columns and "stationary_distance" not in plain.columns
    for column in ("estimate", "lower", "upper"):
        np.testing.assert_array_equal(narrowed[column], plain[column])
    np.testing.assert_array_equal(narrowed["reliable"],
                                  plain["reliable"] & (narrowed["stationary_distance"] >= STATIONARY_SE))
    assert narrowed["stationary_distance"].notna().any()


def test_estimate_rotation_widening_widens_only_the_reliable_rows_and_keys_only_the_estimates(tmp_path, tiny_llama):
    """The reliable rows' interval widened over the rotation sets (`ntps_estimate`'s ``rotation_widening``) as a
    study setting: on unless set, as in `ntps_estimate`, off in the committed studies (their units were computed
    without it, so their hashes stand); turning it on recomputes the estimates stage alone, keeps the interval
    before it as lower_unwidened / upper_unwidened and leaves the estimates, the flag and the unreliable rows'
    intervals as they were, and each row records the rotation sets' level the study asked for (widening_level). (The
    tiny model's rows are not reliable, so no row is widened here: the widening itself is pinned in
    tests/core/test_rotation.py.)"""
    from ntps_nb.core.rotation import WIDENING_LEVEL

    assert study.load_config(STUDIES / "default.toml").estimate_rotation_widening is False
    assert study.StudyConfig(name="t", models=("m",), datasets=("d",)).estimate_rotation_widening is True
    _an_estimates_setting("estimate_rotation_widening", True, "yes", "estimate_rotation_widening must be true or false")
    plain, widened = _estimates_without_and_with(tmp_path, tiny_llama, "estimate_rotation_widening")
    assert {"lower_unwidened", "upper_unwidened"} <= set(widened.columns)
    assert "lower_unwidened" not in plain.columns
    for column in ("estimate", "reliable"):
        np.testing.assert_array_equal(widened[column], plain[column])
    np.testing.assert_array_equal(widened["lower_unwidened"], plain["lower"])
    np.testing.assert_array_equal(widened["upper_unwidened"], plain["upper"])
    refused = ~widened["reliable"].astype(bool)
    np.testing.assert_array_equal(widened.loc[refused, "lower"], plain.loc[refused, "lower"])
    np.testing.assert_array_equal(widened.loc[refused, "upper"], plain.loc[refused, "upper"])
    assert (widened["widening_level"] == WIDENING_LEVEL).all()
    # the study's level reaches ntps_estimate: another level recomputes the estimates stage alone, its rows say so
    smoke = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], diagnostics=False, estimator="richardson")
    run = study.run_unit(dataclasses.replace(smoke, estimate_rotation_widening=True, estimate_widening_level=0.5),
                         "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache", log=lambda _: None)
    assert {name for name, stage in run["unit"]["stages"].items() if stage.get("computed")} == {"estimates"}
    assert (run["estimates"]["widening_level"] == 0.5).all()


def test_estimate_widening_level_keys_only_the_estimates_and_only_where_the_widening_is_on():
    """The widening's level (`ntps_estimate`'s ``widening_level``) as a study setting: unset, `ntps_estimate`'s
    default; it decides no number without the widening, so the committed studies (widening off) keep their hash at
    any level; with the widening on a level away from 0.90 (the widening's before the setting) changes the hash and
    the estimates stage's key alone; a level outside (0, 1) is refused."""
    from ntps_nb.core.rotation import WIDENING_LEVEL

    committed = study.load_config(STUDIES / "default.toml")
    assert committed.estimate_widening_level == WIDENING_LEVEL
    other = study.load_config(STUDIES / "default.toml", estimate_widening_level=0.5)
    assert other.config_hash == committed.config_hash == "1cedd9f67410"
    assert study.stage_keys(other, "smollm2-135m", "trec6") == study.stage_keys(committed, "smollm2-135m", "trec6")
    on = study.load_config(STUDIES / "default.toml", estimate_rotation_widening=True, estimate_widening_level=0.9)
    assert "estimate_widening_level" not in on.settings()
    changed = dataclasses.replace(on, estimate_widening_level=0.5)
    assert changed.settings()["estimate_widening_level"] == 0.5 and changed.config_hash != on.config_hash
    keys, moved = study.stage_keys(on, "smollm2-135m", "trec6"), study.stage_keys(changed, "smollm2-135m", "trec6")
    assert {name for name in keys if moved[name] != keys[name]} == {"estimates"}
    for bad in (1.5, 0.0, True, "0.9"):
        with pytest.raises(study.StudySettingsError, match="estimate_widening_level must be a number in"):
            study.load_config(STUDIES / "default.toml", estimate_widening_level=bad)


def test_estimate_stationary_widening_keys_only_the_estimates_and_only_with_the_stationary_condition(tmp_path,
                                                                                                    tiny_llama):
    """The stationary widening (`ntps_estimate`'s ``stationary_widening``) as a study setting: on unless set, as in
    `ntps_estimate`; it is conditioned on the flag's stationary condition, so where that is off (the committed
    studies) it decides no number and stays out of the hash at either value; with the condition on, turning it on
    changes the hash and the estimates stage's key alone, and a run recomputes the estimates stage alone, keeps the
    estimates and the flag, and adds stationary_widened (the tiny model's rows are not reliable, so none moves: the
    widening itself is pinned in tests/core/test_estimators.py); a value that is not a boolean is refused."""
    committed = study.load_config(STUDIES / "default.toml")
    assert committed.estimate_stationary_widening is True  # unset there: the default, inert without the condition
    inert = study.load_config(STUDIES / "default.toml", estimate_stationary_widening=False)
    assert inert.config_hash == committed.config_hash == "1cedd9f67410"
    assert study.stage_keys(inert, "smollm2-135m", "trec6") == study.stage_keys(committed, "smollm2-135m", "trec6")
    flagged = study.load_config(STUDIES / "default.toml", estimate_stationary_flag=True,
                                estimate_stationary_widening=False)
    on = study.load_config(STUDIES / "default.toml", estimate_stationary_flag=True)  # unset: on, as in ntps_estimate
    assert "estimate_stationary_widening" not in flagged.settings() and on.settings()["estimate_stationary_widening"]
    assert on.config_hash != flagged.config_hash
    keys, moved = study.stage_keys(flagged, "smollm2-135m", "trec6"), study.stage_keys(on, "smollm2-135m", "trec6")
    assert {name for name in keys if moved[name] != keys[name]} == {"estimates"}
    with pytest.raises(study.StudySettingsError, match="estimate_stationary_widening must be true or false"):
        study.load_config(STUDIES / "default.toml", estimate_stationary_widening="yes")
    plain, widened = _estimates_without_and_with(tmp_path, tiny_llama, "estimate_stationary_widening",
                                                 estimate_stationary_flag=True)
    assert "stationary_widened" in widened.columns and "stationary_widened" not in plain.columns
    for column in ("estimate", "reliable", "stationary_lower", "stationary_upper"):
        np.testing.assert_array_equal(widened[column], plain[column])


def test_a_study_with_too_few_shards_for_its_estimators_interval_says_so_when_it_starts(tmp_path):
    """Richardson's jackknife interval needs 4 shards: with 3 the run says at its start that the study
    will have no estimates.csv, and each unit records why its estimates stage was skipped."""
    cfg = _smoke(tmp_path, datasets=["trec6"], peers=False, probes=[], estimator="richardson", shards=3)
    lines = []
    study.run_study(cfg, cache=tmp_path / "cache", log=lines.append)
    reason = "a jackknife interval of richardson needs at least 4 shards, the study has 3"
    assert any(reason in line for line in lines), lines
    folder = cfg.unit_folder("tiny-llama", "trec6")
    meta = json.loads((folder / "unit.json").read_text())
    skipped = meta["stages"]["estimates"]["skipped"]
    assert skipped.startswith(f"skipped: {reason}") and not (folder / "estimates.csv").exists()
    assert study.stages.estimates_shortfall(dataclasses.replace(cfg, shards=4)) is None
    assert study.stages.estimates_shortfall(dataclasses.replace(cfg, shards=0)) is None  # no shards: no stage
    assert study.stages.estimates_shortfall(dataclasses.replace(cfg, interval_layers=())) is None
    assert "needs at least 3" in study.stages.estimates_shortfall(dataclasses.replace(cfg, estimator="plugin",
                                                                                       shards=2))


def test_the_diagnostics_stage_adds_no_warning_the_ntps_stage_gives_of_the_same_moments(tmp_path, tiny_llama):
    """`ntps_diagnostics` warns of its unperturbed moments as `ntps_sweep` does; in a study the ntps stage has
    said that of every layer already, so a unit with diagnostics says exactly what the same unit without them
    says (40 texts in d = 64: every layer interpolates, so there is something to repeat)."""
    from ntps_nb.core.score import InterpolationWarning, NextTokenTieWarning, RoundedMomentsWarning

    said = (InterpolationWarning, NextTokenTieWarning, RoundedMomentsWarning)
    heard = {}
    for diagnostics in (False, True):
        cfg = _smoke(tmp_path, datasets=["trec6"], diagnostics=diagnostics, peers=False, probes=["heldout"],
                     results_dir=str(tmp_path / f"results-{diagnostics}"))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            unit = study.run_unit(cfg, "tiny-llama", "trec6", tiny_llama, cache=tmp_path / "cache",
                                  log=lambda _: None)
        assert (unit.get("diagnostics") is not None) == diagnostics
        heard[diagnostics] = sorted((w.category.__name__, str(w.message)) for w in record
                                    if issubclass(w.category, said))
    assert any(name == "InterpolationWarning" for name, _ in heard[False])
    assert heard[True] == heard[False]
