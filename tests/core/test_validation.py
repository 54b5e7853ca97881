"""core.validation: what each check accepts, returns, and how its errors name the bad value."""

import numpy as np
import pytest

from ntps_nb.core.validation import (
    check_count,
    check_features,
    check_finite,
    check_k,
    check_labels,
    check_n_classes,
)


def test_check_count_accepts_integral_numbers_and_returns_int():
    for value in (3, np.int64(3), 3.0, np.float32(3.0)):
        out = check_count(value, "steps")
        assert out == 3 and type(out) is int
    assert check_count(0, "n_tokens", minimum=0) == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, np.bool_(True), "3", None, float("nan"), float("inf")])
def test_check_count_refuses_with_the_name_and_the_value(bad):
    with pytest.raises(ValueError, match=rf"steps must be a positive integer, got {re_escape(bad)}"):
        check_count(bad, "steps")


def re_escape(value):
    import re

    return re.escape(repr(value))


def test_check_count_minimum_is_in_the_message():
    with pytest.raises(ValueError, match="n_tokens must be an integer >= 0, got -1"):
        check_count(-1, "n_tokens", minimum=0)


def test_check_k_with_and_without_a_limit():
    assert check_k(4) == 4 and check_k(np.int32(2), limit=2) == 2
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        check_k(0)
    with pytest.raises(ValueError, match=r"k must be an integer in 1..rank\(Shh\) = 4, got 5"):
        check_k(5, limit=4, limit_name="rank(Shh)")
    with pytest.raises(ValueError, match="k_U must be a positive integer, got 1.5"):
        check_k(1.5, name="k_U")


def test_check_n_classes():
    assert check_n_classes(np.int64(2)) == 2
    for bad in (1, 0, 2.5, False):
        with pytest.raises(ValueError, match="n_classes must be an integer >= 2"):
            check_n_classes(bad)


def test_check_labels_returns_int64_and_converts_integral_floats():
    out = check_labels([0, 2, 1], n_classes=3)
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 1]
    assert check_labels(np.array([1.0, 0.0])).tolist() == [1, 0]
    assert check_labels(np.array([0, 1], dtype=np.uint8), n_rows=2, min_classes=2).dtype == np.int64


@pytest.mark.parametrize(
    "labels, kwargs, message",
    [
        (np.zeros((2, 2), int), {}, r"labels must be one-dimensional, got shape \(2, 2\)"),
        ([], {}, "labels are empty"),
        ([0.5, 1.0], {}, "labels must be integers 0..C-1; got non-integer or NaN floats"),
        ([0.0, np.nan], {"n_classes": 2}, "labels must be integers 0..1; got non-integer or NaN floats"),
        (["pos", "neg"], {}, "labels must be integers 0..C-1, got dtype <U3; map class names"),
        ([0, 3], {"n_classes": 2}, r"labels must lie in 0..1 \(n_classes=2\), got range 0..3"),
        ([-1, 0], {}, "labels must lie in 0..C-1, got range -1..0"),
        ([0, 1, 1], {"n_rows": 2}, "one per feature row: 2 feature rows but 3 labels"),
        ([1, 1, 1], {"min_classes": 2}, r"labels contain a single class \(1\); at least 2 are needed"),
        ([0, 1], {"min_classes": 3}, "labels contain 2 classes; at least 3 are needed"),
    ],
)
def test_check_labels_errors_name_the_problem(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_labels(labels, **kwargs)


def test_check_labels_uses_the_callers_name():
    with pytest.raises(ValueError, match="test labels must lie in"):
        check_labels([0, 5], n_classes=2, name="test labels")


def test_check_finite_counts_bad_rows_or_entries_and_keeps_float64_input_uncopied():
    X = np.ones((4, 3))
    assert check_finite(X, "features") is X
    X[1, 0] = X[3, 2] = np.nan
    with pytest.raises(ValueError, match="features have NaN/inf in 2 row\\(s\\); from the extraction"):
        check_finite(X, "features", hint="from the extraction")
    with pytest.raises(ValueError, match="moment have NaN/inf in 1 entries"):
        check_finite([1.0, np.inf, 2.0], "moment")
    with pytest.raises(ValueError, match=r"x must have 2 dimension\(s\), got shape \(3,\)"):
        check_finite([1.0, 2.0, 3.0], "x", ndim=2)


def test_check_features_shape_and_finiteness():
    assert check_features([[1, 2], [3, 4]]).dtype == np.float64
    with pytest.raises(ValueError, match=r"features must be \(N >= 2, d >= 1\), got shape \(1, 3\)"):
        check_features(np.ones((1, 3)), min_rows=2)
    with pytest.raises(ValueError, match=r"train features must be \(N, d >= 1\), got shape \(5,\)"):
        check_features(np.ones(5), "train features")
    with pytest.raises(ValueError, match="NaN/inf in 1 row"):
        check_features([[1.0, np.nan], [0.0, 1.0]])
