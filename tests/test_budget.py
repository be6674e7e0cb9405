"""Budget: parsing with units, validation, resolution against the FP32 reference, JSON."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcompile.budget import Budget, InfeasibleBudgetError, UnsupportedBudgetError, check_limits
from pqcompile.meta import CostTotals


@pytest.mark.parametrize("text, expected", [
    ("bops=60x,weight_bytes=200KB", Budget(bops="60x", weight_bytes=200_000)),
    ("weight_bytes=1.5MB", Budget(weight_bytes=1_500_000)),
    ("weight_bytes=2KiB", Budget(weight_bytes=2048)),
    ("weight_bytes=1MiB", Budget(weight_bytes=1_048_576)),
    ("weight_bytes=300B", Budget(weight_bytes=300)),
    ("weight_bytes=300", Budget(weight_bytes=300)),
    ("bops=2.5G", Budget(bops=2_500_000_000)),
    ("macs=5M, bops=12K", Budget(macs=5_000_000, bops=12_000)),
    ("macs=12.5x", Budget(macs="12.5x")),
    ("latency_ms=5ms", Budget(latency_ms=5)),
    ("latency_ms=0.5s", Budget(latency_ms=500)),
    (" bops = 60X ", Budget(bops="60x")),
])
def test_parse(text, expected):
    assert Budget.parse(text) == expected


def test_values_are_normalized():
    b = Budget(bops="60x", weight_bytes="200KB", macs=1e6)
    assert (b.bops, b.weight_bytes, b.macs, b.latency_ms) == ("60x", 200_000, 1_000_000, None)
    assert isinstance(b.weight_bytes, int) and isinstance(b.macs, int)
    assert Budget(weight_bytes="1.5KB").weight_bytes == 1500
    assert Budget(weight_bytes=0.5).weight_bytes == 0.5


def test_reduction_constructor():
    assert Budget.reduction(bops=60) == Budget(bops="60x")
    assert Budget.reduction(bops=60, weight_bytes=8.5) == Budget(bops="60x", weight_bytes="8.5x")
    with pytest.raises(ValueError, match="unknown budget key"):
        Budget.reduction(flops=3)


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "sets no limit"),
    ({"bops": -5}, ValueError, "positive"),
    ({"bops": 0}, ValueError, "positive"),
    ({"weight_bytes": "0KB"}, ValueError, "positive"),
    ({"bops": float("inf")}, ValueError, "finite"),
    ({"bops": float("nan")}, ValueError, "positive, finite"),
    ({"bops": "0.5x"}, ValueError, "at least 1x"),
    ({"bops": "abcx"}, ValueError, "followed by 'x'"),
    ({"weight_bytes": "5GHz"}, ValueError, "unit"),
    ({"bops": "5KB"}, ValueError, "'k', 'm', 'g', 't'"),
    ({"bops": True}, TypeError, "number or a string"),
    ({"bops": [1]}, TypeError, "number or a string"),
])
def test_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        Budget(**kwargs)


@pytest.mark.parametrize("text, match", [
    ("flops=3", "unknown key 'flops'"),
    ("bops", "not key=value"),
    ("bops=", "not key=value"),
    ("bops=2x,bops=3x", "given twice"),
    ("", "sets no limit"),
])
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Budget.parse(text)


def test_parse_takes_a_string():
    with pytest.raises(TypeError):
        Budget.parse(60)


def test_resolve_mapping_and_cost_totals():
    ref = {"bops": 6_000_000, "macs": 1000, "weight_bytes": 1_000_000}
    assert Budget(bops="60x", macs=400, weight_bytes="4x").resolve(ref) == {
        "bops": 100_000.0, "weight_bytes": 250_000.0, "macs": 400}
    totals = CostTotals(macs=1000, params=10, bops=1_024_000, weight_bytes=40.0,
                        fp32_bops=1_024_000, fp32_weight_bytes=40.0)
    assert Budget(bops="1024x", weight_bytes="2x", macs="10x").resolve(totals) == {
        "bops": 1000.0, "weight_bytes": 20.0, "macs": 100.0}


def test_resolve_ratio_without_reference():
    with pytest.raises(ValueError, match="no 'latency_ms'"):
        Budget(latency_ms="2x").resolve({"bops": 10})
    assert Budget(latency_ms=3).resolve({"bops": 10}) == {"latency_ms": 3}
    with pytest.raises(TypeError, match="CostTotals"):
        Budget(bops="2x").resolve(42)


def test_json_round_trip():
    b = Budget(bops="60x", weight_bytes=200_000, latency_ms=2.5)
    assert Budget.from_json(b.to_json()) == b
    with pytest.raises(ValueError, match="format"):
        Budget.from_json('{"format": 99, "bops": 3}')
    with pytest.raises(ValueError, match="unknown key"):
        Budget.from_json('{"format": 1, "bops": 3, "speed": 1}')


def test_str_parses_back():
    b = Budget(bops="60x", weight_bytes=123_456, macs=7)
    assert str(b) == "bops=60x,weight_bytes=123456,macs=7"
    assert Budget.parse(str(b)) == b


_value = st.one_of(st.integers(1, 10**12),
                   st.floats(1.0, 1e4, allow_nan=False).map(lambda r: f"{r:g}x"))


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: _value for k in
                                           ("bops", "weight_bytes", "macs", "latency_ms")}))
def test_round_trips_property(values):
    if not values:
        return
    b = Budget(**values)
    assert Budget.from_json(b.to_json()) == b
    assert Budget.parse(str(b)) == b


def test_check_limits():
    assert check_limits({"bops": 10, "macs": 2.5}) == {"bops": 10, "macs": 2.5}
    with pytest.raises(UnsupportedBudgetError, match="measured latency table") as info:
        check_limits({"latency_ms": 3.0})
    assert isinstance(info.value, NotImplementedError)
    with pytest.raises(ValueError, match="unknown budget limit"):
        check_limits({"energy": 3.0})
    with pytest.raises(ValueError, match="Budget.resolve"):
        check_limits({"bops": "60x"})
    with pytest.raises(ValueError, match="sets no limit"):
        check_limits({})


def test_infeasible_error_is_a_value_error():
    err = InfeasibleBudgetError("no", {"bops": 5}, {"bops": 1})
    assert isinstance(err, ValueError) and err.minimum == {"bops": 5} and err.limits["bops"] == 1
