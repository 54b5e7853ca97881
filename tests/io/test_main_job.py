"""The main job's fresh-unit check: the comparison of a fresh unit with the committed one, and what
it prints (no unit is computed here: tests/io/test_study.py regenerates the committed unit)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ntps_nb import main_job, study
from ntps_nb.study.config import CSV_FLOAT_FORMAT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def committed():
    """The committed ci_unit tables, as `load_results` reads them."""
    cfg = study.load_config(ROOT / "studies" / "ci_unit.toml")
    if not (cfg.folder / "ntps.csv").is_file():
        pytest.skip("data/results/ci_unit is not committed")
    return study.load_results(cfg)


def _copy(tables):
    return {name: frame.copy() for name, frame in tables.items()}


def test_identical_tables_compare_equal_after_a_csv_round_trip(committed, tmp_path):
    for name, frame in committed.items():  # written as the study writes them, read back
        frame.to_csv(tmp_path / f"{name}.csv", index=False, float_format=CSV_FLOAT_FORMAT)
    again = study.load_results(tmp_path)
    out = main_job.compare_tables(committed, again)
    assert out["same"].all() and (out["max_abs_diff"] == 0).all() and (out["values_differing"] == 0).all()
    # every value of every compared column of the compared rows, counted independently
    for (name, column), values in out.set_index(["table", "column"])["values"].items():
        keys, columns, query = main_job.COMPARED[name]
        rows = committed[name].query(query) if query else committed[name]
        assert column in columns and values == len(rows) > 0
    headline = main_job.headline_comparison(committed, again)
    assert (headline["difference"] == 0).all()
    layers = sorted(committed["probes"]["layer"].unique())
    accuracy = headline[headline["quantity"] == "held-out probe accuracy"]
    assert accuracy["layer"].tolist() == layers
    expected = committed["probes"].query("protocol == 'heldout'").set_index("layer")["accuracy"]
    assert accuracy.set_index("layer")["committed"].to_dict() == expected.to_dict()


def test_the_largest_difference_is_reported_with_where_it_is(committed):
    fresh = _copy(committed)
    ntps = fresh["ntps"]
    theory = ntps.index[ntps["variant"] == "theory"]
    rng = np.random.default_rng(0)
    picked = rng.choice(theory, size=5, replace=False)
    shifts = rng.uniform(-0.05, 0.05, size=5)
    ntps.loc[picked, "ntps"] += shifts
    worst = picked[np.argmax(np.abs(shifts))]
    out = main_job.compare_tables(committed, fresh).set_index(["table", "column"])
    row = out.loc[("ntps", "ntps")]
    changed = np.abs(ntps.loc[picked, "ntps"].to_numpy() - committed["ntps"].loc[picked, "ntps"].to_numpy())
    assert row["values_differing"] == 5 and row["max_abs_diff"] == changed.max() and not row["same"]
    assert row["where"] == f"layer {int(ntps.loc[worst, 'layer'])}, k {int(ntps.loc[worst, 'k'])}"
    # the other columns and tables are untouched
    assert out.drop(index=("ntps", "ntps"))["same"].all()
    # a reference-variant row is not compared: changing it changes nothing
    fresh = _copy(committed)
    reference = fresh["ntps"].index[fresh["ntps"]["variant"] == "reference"][0]
    fresh["ntps"].loc[reference, "ntps"] += 0.5
    assert main_job.compare_tables(committed, fresh)["same"].all()


def test_rows_on_one_side_and_nans_count_as_differences(committed):
    fresh = _copy(committed)
    heldout = fresh["probes"].index[fresh["probes"]["protocol"] == "heldout"]
    fresh["probes"] = fresh["probes"].drop(index=heldout[0])
    fresh["peers"].loc[fresh["peers"].index[0], "logme"] = np.nan
    out = main_job.compare_tables(committed, fresh).set_index(["table", "column"])
    assert out.loc[("probes", "accuracy"), "rows_unpaired"] == 1 and not out.loc[("probes", "accuracy"), "same"]
    assert out.loc[("probes", "accuracy"), "values"] == len(heldout) - 1
    assert out.loc[("peers", "logme"), "max_abs_diff"] == np.inf
    del fresh["intervals"]
    missing = main_job.compare_tables(committed, fresh).query("table == 'intervals'")
    assert len(missing) == 1 and missing["where"].iloc[0] == "no fresh table" and not missing["same"].iloc[0]


def test_the_check_says_plainly_whether_the_fresh_unit_differs(committed, monkeypatch, tmp_path):
    """`check_fresh_unit` on a stand-in fresh unit: identical, then with one NTPS moved."""
    monkeypatch.delenv("MKL_CBWR", raising=False)
    fresh = _copy(committed)
    monkeypatch.setattr(main_job, "fresh_unit", lambda config, folder: fresh)
    printed = io.StringIO()
    say = lambda text: print(text, file=printed)  # noqa: E731
    out = main_job.check_fresh_unit(ROOT / "studies" / "ci_unit.toml", tmp_path, say=say)
    assert out["same"].all() and "is the committed unit in every compared value" in printed.getvalue()
    assert "DIFFERS" not in printed.getvalue() and (tmp_path / "comparison.csv").is_file()
    first = fresh["ntps"].index[fresh["ntps"]["variant"] == "theory"][3]
    fresh["ntps"].loc[first, "ntps"] += 0.01
    printed = io.StringIO()
    out = main_job.check_fresh_unit(ROOT / "studies" / "ci_unit.toml", tmp_path, say=say)
    text = printed.getvalue()
    assert "THE FRESH UNIT DIFFERS" in text and "1 of" in text and main_job.KERNEL_NOTE in text
    assert "ATEN_CPU_CAPABILITY=avx2 OPENBLAS_CORETYPE=Haswell MKL_CBWR=COMPATIBLE make run" in text
    assert "MKL its own dispatch (the committed unit: torch AVX2, OpenBLAS Haswell, MKL_CBWR=COMPATIBLE)" in text
    monkeypatch.setenv("MKL_CBWR", "AVX2")  # the kernels line reads the branch MKL was pinned to
    printed.seek(0)
    printed.truncate()
    main_job.check_fresh_unit(ROOT / "studies" / "ci_unit.toml", tmp_path, say=say)
    assert "MKL_CBWR=AVX2 (the committed unit:" in printed.getvalue()
    assert pd.read_csv(tmp_path / "comparison.csv")["values_differing"].sum() == 1


def test_what_the_job_reads_is_checked_before_its_minutes_of_work(tmp_path, monkeypatch):
    """A missing unit config was a 'failed fresh unit' after which the report still ran; a results folder without a
    combined study failed only after the fresh unit's minutes; jobs = 0 went through."""
    ran = []
    monkeypatch.setattr(main_job, "check_fresh_unit", lambda *a, **k: ran.append("unit"))
    for kwargs, error, message in (({"unit_config": tmp_path / "none.toml"}, FileNotFoundError, "no study config"),
                                   ({"results": tmp_path}, FileNotFoundError, "no combined study results"),
                                   ({"jobs": 0}, ValueError, "jobs must be a positive integer, got 0")):
        with pytest.raises(error, match=message):
            main_job.main_job(tmp_path / "out", say=lambda line: None, **kwargs)
    assert ran == [] and not (tmp_path / "out").exists()
