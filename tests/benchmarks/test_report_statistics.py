"""The statistics the benchmark reports decide item 4 of issue 21 with, against independent computations.

docs/estimator.md reads its conclusions off the reports of `benchmarks/` (a cell's coverage outside item 4's band,
a pooled acceptance bin, the widening's level at other interval levels). Those reports rest on a few helpers:
`estimator_flag_report.band` and `exact_band_tests`, `acceptance_coverage.pooled`, `unseen_family_check.cells` and
`widening_level_check.matched_level`. Each is checked here against a second computation written from the definition:
exact binomial tails summed in rational arithmetic, counts taken by hand, the normal quantile from the standard
library instead of scipy.
"""

from __future__ import annotations

import importlib
import os
import sys
from fractions import Fraction
from math import comb
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def bench(name: str):
    """The benchmark script ``name`` as a module, imported when a test runs, not at collection. The scripts set
    OPENBLAS_NUM_THREADS and OMP_NUM_THREADS at import for the processes they start; the environment is restored
    after the import, so the rest of the suite and the processes it starts do not inherit them."""
    saved = dict(os.environ)
    try:
        return importlib.import_module(name)
    finally:
        os.environ.clear()
        os.environ.update(saved)


#: The one-sided level the reports test a cell at (each side), as docs/estimator.md states it.
ALPHA = Fraction(1, 40)
#: Agreement of a floating-point binomial tail with the exact rational one.
TAIL_RTOL = 1e-9


def lower_tail(x: int, n: int, p: Fraction) -> Fraction:
    """P(X <= x) for X ~ Binomial(n, p), summed exactly."""
    return sum((comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(x + 1)), Fraction(0))


def upper_tail(x: int, n: int, p: Fraction) -> Fraction:
    """P(X >= x) for X ~ Binomial(n, p), summed exactly."""
    return 1 - lower_tail(x - 1, n, p) if x > 0 else Fraction(1)


@pytest.mark.parametrize("nominal, expected", [(0.90, (0.85, 0.95)), (0.80, (0.70, 0.90)), (0.95, (0.925, 0.975)),
                                               (0.50, (0.25, 0.75))])
def test_the_band_is_a_miss_rate_within_half_of_the_nominal_either_way(nominal, expected):
    low, high = bench("estimator_flag_report").band(nominal)
    assert (low, high) == pytest.approx(expected, abs=1e-12)
    miss = 1 - nominal
    assert 1 - high == pytest.approx(miss / 2) and 1 - low == pytest.approx(3 * miss / 2)


@pytest.mark.parametrize("nominal", [0.0, 1.0, 1.5, -0.1])
def test_the_band_refuses_a_level_outside_the_open_unit_interval(nominal):
    with pytest.raises(ValueError, match="nominal must be in"):
        bench("estimator_flag_report").band(nominal)


@pytest.mark.parametrize("nominal", [0.90, 0.95, 0.80])
def test_the_exact_band_tests_reject_where_the_exact_binomial_tails_fall_below_the_level(nominal):
    low, high = (Fraction(str(v)) for v in bench("estimator_flag_report").band(nominal))
    covered, accepted = zip(*[(x, n) for n in (1, 10, 11, 24, 40, 72, 73, 150) for x in range(n + 1)])
    below, above = bench("estimator_flag_report").exact_band_tests(np.array(covered), np.array(accepted), nominal)
    expected_below = [lower_tail(x, n, low) < ALPHA for x, n in zip(covered, accepted)]
    expected_above = [upper_tail(x, n, high) < ALPHA for x, n in zip(covered, accepted)]
    assert below.tolist() == expected_below
    assert above.tolist() == expected_above
    # both outcomes occur on this grid, and no cell is outside on both sides
    assert any(expected_below) and any(expected_above) and not any(b and a for b, a in zip(below, above))


def test_a_cell_covering_every_time_is_above_095_only_from_72_rows():
    """The docstring's example: with n rows all covered, P(X = n) = 0.95^n falls below 2.5% from n = 72 on."""
    below, above = bench("estimator_flag_report").exact_band_tests(np.array([71, 72]), np.array([71, 72]))
    assert above.tolist() == [False, True] and not below.any()


def test_the_pooled_bins_count_and_test_the_rows_they_hold():
    table = pd.DataFrame({"bin": ["rare", "rare", "often", "often", "often"],
                          "draws": [1000, 800, 200, 300, 250],
                          "accepted": [5, 7, 40, 60, 0],
                          "covered": [3, 5, 36, 55, 0],
                          "covered_union": [5, 6, 39, 59, 0]})
    out = bench("acceptance_coverage").pooled(table, "bin")
    rare, often = out.loc["rare"], out.loc["often"]
    assert (rare["cells"], rare["draws"], rare["rows"], rare["covered"], rare["covered widened"]) == (
        2, 1800, 12, 8, 11)
    assert (often["cells"], often["draws"], often["rows"], often["covered"], often["covered widened"]) == (
        3, 750, 100, 91, 98)
    assert rare["default"] == pytest.approx(8 / 12, abs=1e-4) and often["widened"] == pytest.approx(0.98, abs=1e-4)
    for row, x, y, n in ((rare, 8, 11, 12), (often, 91, 98, 100)):
        assert row["p below 0.85"] == pytest.approx(float(lower_tail(x, n, Fraction(85, 100))), abs=1e-4)
        assert row["p below 0.85 (widened)"] == pytest.approx(float(lower_tail(y, n, Fraction(85, 100))), abs=1e-4)
        assert row["p above 0.95 (widened)"] == pytest.approx(float(upper_tail(y, n, Fraction(95, 100))), abs=1e-4)


def test_the_pooled_bins_test_against_the_band_of_their_level():
    table = pd.DataFrame({"bin": ["a"], "draws": [100], "accepted": [40], "covered": [30], "covered_union": [39]})
    out = bench("acceptance_coverage").pooled(table, "bin", nominal=0.80).loc["a"]
    assert out["p below 0.7"] == pytest.approx(float(lower_tail(30, 40, Fraction(7, 10))), abs=1e-4)
    assert out["p above 0.9 (widened)"] == pytest.approx(float(upper_tail(39, 40, Fraction(9, 10))), abs=1e-4)


def draws_of_one_cell(seed: int, truth: float, n: int, reliable: int, covered: int, offset: float,
                      half_width: float) -> pd.DataFrame:
    """``n`` draws of one population cell: the first ``reliable`` flagged reliable, of which the first ``covered``
    have an interval holding the truth; the estimates are truth + ``offset`` +- 0.001 in turn (mean exactly
    truth + ``offset`` for even ``n``)."""
    estimate = truth + offset + 1e-3 * (-1.0) ** np.arange(n)
    hit = np.arange(n) < covered
    lower = np.where(hit, truth - half_width, truth + 2 * half_width)
    upper = lower + 2 * half_width
    return pd.DataFrame({"task_family": "lds", "task_tails": np.nan, "task_offset": 0.0, "task_d": 16,
                         "task_n_classes": 2, "task_gap": "moderate", "task_memory": np.nan, "task_seed": seed,
                         "n_over_d": 32.0, "k": 1, "draw": np.arange(n), "truth": truth, "estimate": estimate,
                         "lower": lower, "upper": upper, "reliable": np.arange(n) < reliable,
                         "covered": (lower <= truth) & (truth <= upper)})


def test_the_cells_of_a_frame_carry_counts_coverage_and_the_three_tests_computed_by_hand():
    frame = pd.concat([
        draws_of_one_cell(1, 0.5, 200, 40, 27, 0.0, 0.1),     # 27 of 40: significantly below 0.85
        draws_of_one_cell(2, 0.4, 200, 9, 9, 0.0, 0.1),       # 9 reliable rows: too few to count
        draws_of_one_cell(3, 0.3, 200, 30, 28, 0.08, 0.1),    # |bias| 0.08 > width / 4 = 0.05 by many SEs
        draws_of_one_cell(4, 0.999, 100, 80, 80, 0.0, 0.1),  # 80 of 80 at an edge truth: above 0.95
    ], ignore_index=True)
    table = bench("unseen_family_check").cells(frame).set_index("task_seed")
    assert table["rows"].tolist() == [200, 200, 200, 100]
    assert table["size"].tolist() == [40, 9, 30, 80]
    assert table["accepted"].tolist() == pytest.approx([0.2, 0.045, 0.15, 0.8])
    assert table.loc[1, "coverage"] == pytest.approx(27 / 40) and table.loc[4, "coverage"] == 1.0
    assert table["counted"].tolist() == [True, False, True, True]
    assert table["below"].tolist() == [True, False, False, False]
    assert table["above"].tolist() == [False, False, False, True]
    assert table["biased"].tolist() == [False, False, True, False]
    assert table["edge"].tolist() == [False, False, False, True]
    assert table.loc[3, "width"] == pytest.approx(0.2) and table.loc[3, "bias"] == pytest.approx(0.08, abs=1e-3)
    # every row's coverage, flag ignored: the first `covered` of each cell's draws hold the truth
    assert table["covered_all"].tolist() == pytest.approx([27 / 200, 9 / 200, 28 / 200, 80 / 100])


def test_a_cell_at_a_quarter_of_its_width_is_biased_only_beyond_its_monte_carlo_error():
    """The bias test asks |bias| - width / 4 to exceed `BIAS_Z` Monte Carlo SEs, not the point value alone: with
    60 rows of SD 0.001 an SE is 0.00013, so 0.0502 is within it and 0.0504 beyond."""
    def biased(offset: float) -> bool:
        frame = draws_of_one_cell(5, 0.5, 60, 60, 60, offset, 0.1)
        return bool(bench("unseen_family_check").cells(frame)["biased"].item())

    assert [biased(offset) for offset in (0.05, 0.0502, 0.0504, -0.0504)] == [False, False, True, True]


def test_the_matched_level_keeps_the_sets_quantile_a_fixed_fraction_of_the_intervals():
    z = NormalDist().inv_cdf
    check = bench("widening_level_check")
    base = z((1 + check.WIDENING_LEVEL) / 2) / z((1 + 0.90) / 2)
    assert check.matched_level(0.90) == pytest.approx(check.WIDENING_LEVEL, abs=1e-6)
    levels = [0.50, 0.80, 0.90, 0.95, 0.99]
    matched = [check.matched_level(level) for level in levels]
    for level, m in zip(levels, matched):
        assert z((1 + m) / 2) / z((1 + level) / 2) == pytest.approx(base, abs=1e-5)
    assert matched == sorted(matched) and all(m < level for m, level in zip(matched, levels))
    # the values session 65 ran (docs/estimator.md, "The widening's level at other interval levels")
    assert (matched[1], matched[3]) == pytest.approx((0.488, 0.684), abs=5e-4)


def test_the_rows_of_cells_too_small_to_test_are_counted_and_tested_pooled():
    frame = pd.concat([draws_of_one_cell(6, 0.5, 100, 40, 38, 0.0, 0.1),   # counted: not among them
                       draws_of_one_cell(7, 0.5, 100, 6, 4, 0.0, 0.1),
                       draws_of_one_cell(8, 0.4, 100, 3, 3, 0.0, 0.1),
                       draws_of_one_cell(9, 0.3, 100, 0, 0, 0.0, 0.1),    # no reliable row
                       draws_of_one_cell(10, 0.998, 100, 5, 2, 0.0, 0.1)], ignore_index=True)   # an edge truth
    p, p_edge = float(lower_tail(7, 9, Fraction(85, 100))), float(lower_tail(2, 5, Fraction(85, 100)))
    report = bench("unseen_family_check")
    assert report.uncounted(report.cells(frame)) == (
        f"reliable rows in cells of fewer than 10: interior 9 in 2 cells, 7 covered (p = {p:.3g} below 0.85); "
        f"edge 5 in 1 cells, 2 covered (p = {p_edge:.3g} below 0.85)")


def test_the_widenings_moves_are_the_reliable_rows_whose_ends_left_the_interval_before_it():
    frame = pd.DataFrame({"reliable": [True, True, True, True, False],
                          "lower_unwidened": [0.4, 0.4, 0.4, np.nan, 0.4],
                          "upper_unwidened": [0.6, 0.6, 0.6, np.nan, 0.6],
                          "lower": [0.4, 0.3, 0.4 - 1e-8, 0.4, 0.0], "upper": [0.6, 0.6, 0.9, 0.6, 1.0]})
    # row 1: lower end moved (width 0.3 / 0.2); row 2: upper end moved, its lower end only by rounding (0.5 / 0.2);
    # row 3 has no interval before (not widened), row 4 is not reliable
    assert bench("unseen_family_check").widening_moves(frame) == (
        "the widening moved 2 of 3 reliable rows (width / width before: median 2.000, largest 2.500)")


def test_the_report_applies_the_stationary_widening_to_the_reliable_rows_and_recounts_their_coverage():
    """`unseen_family_check.stationary_widened`: the reliable rows' ends joined with stationary_lower / _upper, the
    coverage recomputed against the truth, ``stationary_moved`` where an end left the interval by more than
    `MOVED_ATOL`; unreliable rows as they were; None for a frame without the columns."""
    truth = 0.998
    frame = pd.DataFrame({"reliable": [True, True, True, False], "truth": truth, "estimate": [0.97, 0.97, 0.5, 0.97],
                          "lower": [0.95, 0.95, 0.4, 0.95], "upper": [0.99, 0.99, 0.6, 0.99],
                          "stationary_lower": [0.97, 0.97, 0.5 - 1e-8, 0.97],
                          "stationary_upper": [1.0, 0.995, 0.5, 1.0], "covered": False})
    report = bench("unseen_family_check")
    out = report.stationary_widened(frame)
    # row 0 reaches 1 and covers; row 1 moves but stops short of the truth; row 2 (far from the truth) moves only
    # by rounding; row 3 is refused and keeps its interval, which misses
    assert out["covered"].tolist() == [True, False, False, False]
    assert out["stationary_moved"].tolist() == [True, True, False, False]
    np.testing.assert_allclose(out["upper"], [1.0, 0.995, 0.6, 0.99])
    assert report.stationary_widened(frame.drop(columns=["stationary_lower", "stationary_upper"])) is None
