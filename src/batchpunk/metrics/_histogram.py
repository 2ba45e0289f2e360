"""A fixed-memory histogram with a stated relative error, for percentiles without keeping samples.

Buckets grow geometrically (the DDSketch mapping): with ``gamma = (1 + a) / (1 - a)``, a value
``x`` lands in bucket ``ceil(log_gamma(x))`` and is reported as ``2 * gamma**i / (gamma + 1)``, so
every quantile of values inside ``[min_value, max_value]`` is within relative error ``a`` of the
sample at that rank (nearest-rank definition). Memory is bounded by the number of buckets between
``min_value`` and ``max_value``: about 1,400 for the defaults (1 % between 1 microsecond and 11.6
days), and in practice a few dozen, because buckets are stored sparsely.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["LogHistogram"]


class LogHistogram:
    """Counts of positive values in log-spaced buckets; quantiles within ``relative_error``.

    Choose it where a percentile must be cheap to record (one log and one dict update) and bounded
    in memory whatever the number of samples; choose exact sorting only for small offline samples.
    Values below ``min_value`` (including zero) share one bucket reported as ``min_value``; values
    above ``max_value`` share the top bucket. The extremes (quantiles 0 and 1) are the exact
    minimum and maximum, and other quantiles are clamped into them, so a single sample, or a run
    of zeros, is reported exactly.
    """

    __slots__ = (
        "_buckets",
        "_count",
        "_gamma",
        "_inv_log_gamma",
        "_max",
        "_max_index",
        "_min",
        "_min_index",
        "_min_value",
        "relative_error",
    )

    def __init__(
        self,
        relative_error: float = 0.01,
        *,
        min_value: float = 1e-6,
        max_value: float = 1e6,
    ) -> None:
        if not 0.0 < relative_error < 1.0:
            raise ValueError(f"relative_error: expected a number in (0, 1), got {relative_error!r}")
        if not 0.0 < min_value < max_value:
            raise ValueError(
                f"min_value, max_value: expected 0 < min_value < max_value, "
                f"got {min_value!r}, {max_value!r}"
            )
        self.relative_error = relative_error
        self._gamma = (1.0 + relative_error) / (1.0 - relative_error)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)
        self._min_value = min_value
        # One bucket below every regular one holds the values at or under min_value.
        self._min_index = math.ceil(math.log(min_value) * self._inv_log_gamma) - 1
        self._max_index = math.ceil(math.log(max_value) * self._inv_log_gamma)
        self._buckets: dict[int, int] = {}
        self._count = 0
        self._min = math.inf
        self._max = -math.inf

    @property
    def count(self) -> int:
        """Samples recorded (weights included)."""
        return self._count

    @property
    def max(self) -> float | None:
        """The exact largest sample, or None when empty."""
        return self._max if self._count else None

    @property
    def min(self) -> float | None:
        """The exact smallest sample, or None when empty."""
        return self._min if self._count else None

    def add(self, value: float, count: int = 1) -> None:
        """Record ``value`` ``count`` times (a weight, e.g. the messages a latency stands for)."""
        if value > self._min_value:
            index = math.ceil(math.log(value) * self._inv_log_gamma)
            if index > self._max_index:
                index = self._max_index
        else:
            index = self._min_index
        buckets = self._buckets
        buckets[index] = buckets.get(index, 0) + count
        self._count += count
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value

    def merge(self, other: LogHistogram) -> None:
        """Add every sample of ``other``, which must have the same relative error and range."""
        if other._gamma != self._gamma or other._min_index != self._min_index:
            raise ValueError(
                "other: expected a LogHistogram with the same relative_error and range"
            )
        buckets = self._buckets
        for index, n in other._buckets.items():
            buckets[index] = buckets.get(index, 0) + n
        self._count += other._count
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    def clear(self) -> None:
        """Forget every sample (the bucket dict is reused)."""
        self._buckets.clear()
        self._count = 0
        self._min = math.inf
        self._max = -math.inf

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` in [0, 1] (nearest rank), or None when empty."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """Several quantiles in one pass over the sorted buckets; None for each when empty."""
        wanted = list(qs)
        for q in wanted:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"q: expected a number in [0, 1], got {q!r}")
        if not self._count:
            return [None] * len(wanted)
        order = sorted(range(len(wanted)), key=wanted.__getitem__)
        out: list[float | None] = [None] * len(wanted)
        items = sorted(self._buckets.items())
        position = 0
        cumulative = items[0][1]
        for slot in order:
            rank = max(1, math.ceil(wanted[slot] * self._count))
            while cumulative < rank:
                position += 1
                cumulative += items[position][1]
            if rank == 1:
                out[slot] = float(self._min)
            elif rank == self._count:
                out[slot] = float(self._max)
            else:
                out[slot] = self._value(items[position][0])
        return out

    def _value(self, index: int) -> float:
        if index == self._min_index:
            estimate = self._min_value
        else:
            estimate = 2.0 * self._gamma**index / (self._gamma + 1.0)
        return float(min(max(estimate, self._min), self._max))

    def __repr__(self) -> str:
        return (
            f"LogHistogram(relative_error={self.relative_error}, count={self._count}, "
            f"buckets={len(self._buckets)})"
        )
