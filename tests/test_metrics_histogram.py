"""LogHistogram: percentiles within the stated relative error, in bounded memory."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpunk.metrics import LogHistogram


def exact_quantile(samples: list[float], q: float) -> float:
    """Nearest-rank quantile of ``samples``: the definition LogHistogram approximates."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


QS = (0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0)


@pytest.mark.parametrize(
    "draw",
    [
        lambda r: r.lognormvariate(-4, 1.5),
        lambda r: r.expovariate(50.0),
        lambda r: r.uniform(1e-5, 2.0),
        lambda r: float(r.randint(1, 5000)),
    ],
    ids=["lognormal", "exponential", "uniform", "integers"],
)
def test_quantiles_within_one_percent_of_exact_quantiles(draw: object) -> None:
    """For 20,000 samples of several shapes every quantile is within 1 % of the exact one."""
    rng = random.Random(7)
    samples = [draw(rng) for _ in range(20_000)]  # type: ignore[operator]
    histogram = LogHistogram(0.01)
    for value in samples:
        histogram.add(value)
    for q, estimate in zip(QS, histogram.quantiles(QS), strict=True):
        exact = exact_quantile(samples, q)
        assert estimate is not None
        assert abs(estimate - exact) <= 0.01 * exact * (1 + 1e-9), (q, estimate, exact)
    assert histogram.max == max(samples)
    assert histogram.min == min(samples)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=1.5e-6, max_value=1e5), min_size=1, max_size=300),
    st.floats(min_value=0.0, max_value=1.0),
    st.sampled_from([0.005, 0.01, 0.02]),
)
def test_any_quantile_of_any_sample_is_within_the_stated_error(
    samples: list[float], q: float, error: float
) -> None:
    """Whatever the samples in range and the quantile, the estimate is within relative_error."""
    histogram = LogHistogram(error)
    for value in samples:
        histogram.add(value)
    estimate = histogram.quantile(q)
    exact = exact_quantile(samples, q)
    assert estimate is not None
    assert abs(estimate - exact) <= error * exact * (1 + 1e-9)


def test_weights_count_like_repeated_samples() -> None:
    """add(value, n) gives the same quantiles as adding value n times."""
    weighted, repeated = LogHistogram(), LogHistogram()
    for value, n in [(0.01, 5), (0.5, 90), (3.0, 5)]:
        weighted.add(value, n)
        for _ in range(n):
            repeated.add(value)
    assert weighted.quantiles(QS) == repeated.quantiles(QS)
    assert weighted.count == repeated.count == 100


def test_memory_is_bounded_whatever_the_number_of_samples() -> None:
    """A million distinct values across the whole range occupy at most the ~1,400 buckets."""
    histogram = LogHistogram(0.01)
    rng = random.Random(1)
    for _ in range(200_000):
        histogram.add(10 ** rng.uniform(-8, 8))
    assert histogram.count == 200_000
    assert len(histogram._buckets) <= 1400


def test_zero_and_tiny_values_are_reported_exactly_when_alone() -> None:
    """Values at or under min_value share one bucket; zeros and the extremes come back exact."""
    histogram = LogHistogram()
    for _ in range(10):
        histogram.add(0.0)
    assert histogram.quantiles([0.5, 0.99]) == [0.0, 0.0]
    histogram.add(1e9)
    assert histogram.quantile(1.0) == 1e9


def test_empty_histogram_reports_none() -> None:
    """Before any sample every quantile and the max are None."""
    histogram = LogHistogram()
    assert histogram.quantiles([0.5, 0.9]) == [None, None]
    assert histogram.max is None
    assert histogram.min is None


def test_merge_equals_recording_everything_in_one() -> None:
    """Merging two histograms gives the quantiles of one histogram that saw both sample sets."""
    rng = random.Random(3)
    a, b, both = LogHistogram(), LogHistogram(), LogHistogram()
    for i in range(2000):
        value = rng.expovariate(10.0)
        (a if i % 2 else b).add(value)
        both.add(value)
    a.merge(b)
    assert a.quantiles(QS) == both.quantiles(QS)
    assert a.count == both.count
    with pytest.raises(ValueError, match="other"):
        a.merge(LogHistogram(0.02))


def test_clear_forgets_every_sample() -> None:
    """After clear() the histogram is empty again."""
    histogram = LogHistogram()
    histogram.add(1.0, 3)
    histogram.clear()
    assert histogram.count == 0
    assert histogram.quantile(0.5) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"relative_error": 0.0}, "relative_error"),
        ({"relative_error": 1.0}, "relative_error"),
        ({"min_value": 0.0}, "min_value"),
        ({"min_value": 2.0, "max_value": 1.0}, "max_value"),
    ],
)
def test_bad_parameters_name_the_field(kwargs: dict[str, float], field: str) -> None:
    """An invalid relative error or range raises ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        LogHistogram(**kwargs)  # type: ignore[arg-type]


def test_quantile_outside_zero_one_is_refused() -> None:
    """A quantile outside [0, 1] raises ValueError naming q."""
    histogram = LogHistogram()
    histogram.add(1.0)
    with pytest.raises(ValueError, match="q"):
        histogram.quantile(1.5)
