"""Retry policy as pure functions: backoff arithmetic, error classification, circuit breaker."""

from __future__ import annotations

import asyncio
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchpunk import BatchTimeout
from batchpunk.errors import DownstreamUnavailable
from batchpunk.retry import CircuitBreaker, backoff_delay, is_outage, is_retryable, retry_after


def test_backoff_doubles_from_retry_delay_up_to_the_cap() -> None:
    """Without jitter the n-th retry sleeps min(cap, base * 2**(n-1))."""
    delays = [backoff_delay(n, base=0.1, cap=1.0, jitter=False) for n in range(1, 8)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_backoff_without_jitter_ignores_the_random_source() -> None:
    """retry_jitter False is deterministic: the injected random source is never consulted."""

    def never() -> float:
        raise AssertionError("rand called without jitter")

    assert backoff_delay(3, base=1.0, cap=30.0, jitter=False, rand=never) == 4.0


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 0.0), (0.25, 1.0), (0.5, 2.0), (1.0, 4.0)])
def test_full_jitter_scales_the_capped_delay_by_the_draw(draw: float, expected: float) -> None:
    """With jitter the sleep is the capped delay times a uniform draw in [0, 1]."""
    assert backoff_delay(3, base=1.0, cap=30.0, jitter=True, rand=lambda: draw) == expected


def test_full_jitter_applies_after_the_cap() -> None:
    """Jitter draws within the capped delay, not within the uncapped exponential."""
    assert backoff_delay(10, base=1.0, cap=2.0, jitter=True, rand=lambda: 0.5) == 1.0


def test_huge_retry_numbers_stay_at_the_cap() -> None:
    """A very late retry neither overflows nor exceeds the cap."""
    assert backoff_delay(10_000, base=0.5, cap=7.0, jitter=False) == 7.0


@pytest.mark.parametrize("retry", [0, -1])
def test_retry_numbers_start_at_one(retry: int) -> None:
    """A retry number below 1 is a ValueError naming retry."""
    with pytest.raises(ValueError, match="retry"):
        backoff_delay(retry, base=1.0, cap=1.0, jitter=False)


@given(
    retry=st.integers(min_value=1, max_value=60),
    base=st.floats(min_value=0, max_value=10),
    cap=st.floats(min_value=0, max_value=100),
    draw=st.floats(min_value=0, max_value=1),
)
def test_jittered_delay_is_within_zero_and_the_capped_delay(
    retry: int, base: float, cap: float, draw: float
) -> None:
    """For any inputs the jittered sleep lies in [0, min(cap, base * 2**(retry-1))]."""
    ceiling = backoff_delay(retry, base=base, cap=cap, jitter=False)
    assert ceiling == min(cap, base * 2.0 ** (retry - 1))
    jittered = backoff_delay(retry, base=base, cap=cap, jitter=True, rand=lambda: draw)
    assert 0.0 <= jittered <= ceiling


class _Transient(Exception):
    retryable = True


class _Permanent(ConnectionError):
    retryable = False


def test_retry_on_tuple_matches_subclasses() -> None:
    """A tuple of types retries instances of those types and their subclasses only."""
    assert is_retryable(ConnectionResetError(), (ConnectionError,))
    assert not is_retryable(ValueError(), (ConnectionError,))


def test_retry_on_predicate_decides() -> None:
    """A predicate sees the exception and its answer is final."""

    def transient(exc: BaseException) -> bool:
        return "503" in str(exc)

    assert is_retryable(RuntimeError("HTTP 503"), transient)
    assert not is_retryable(RuntimeError("HTTP 400"), transient)
    assert not is_retryable(_Transient("HTTP 400"), transient)


def test_an_exception_that_declares_itself_wins_over_the_tuple() -> None:
    """An exception with a boolean `retryable` attribute decides for itself under a tuple."""
    assert is_retryable(_Transient(), (ConnectionError,))
    assert not is_retryable(_Permanent(), (ConnectionError,))


def test_batch_timeout_is_always_retryable() -> None:
    """A timed-out call is retried even when retry_on would not cover it."""
    assert is_retryable(BatchTimeout("slow"), (ConnectionError,))
    assert is_retryable(BatchTimeout("slow"), lambda exc: False)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    """The circuit opens only after `threshold` failures in a row; a success resets the count."""
    breaker = CircuitBreaker(threshold=2, cooldown=5.0, clock=FakeClock())
    breaker.record(False)
    breaker.record(True)
    breaker.record(False)
    assert breaker.state == "closed"
    breaker.record(False)
    assert breaker.state == "open"


async def test_open_breaker_lets_no_call_start_before_the_cooldown() -> None:
    """While open and inside the cooldown, acquire() does not return."""
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, clock=clock)
    breaker.record(False)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(breaker.acquire(), 0.02)
    assert breaker.state == "open"


async def test_after_cooldown_one_trial_call_goes_through_and_success_closes() -> None:
    """After the cooldown one trial runs (half_open), others wait, and its success closes."""
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, clock=clock)
    breaker.record(False)
    clock.now += 5.0
    await asyncio.wait_for(breaker.acquire(), 1.0)
    assert breaker.state == "half_open"
    second = asyncio.ensure_future(breaker.acquire())
    await asyncio.sleep(0.01)
    assert not second.done()
    breaker.record(True)
    await asyncio.wait_for(second, 1.0)
    assert breaker.state == "closed"


async def test_a_failed_trial_reopens_the_circuit_for_another_cooldown() -> None:
    """A failing trial call in half_open reopens the circuit and restarts the cooldown."""
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown=5.0, clock=clock)
    for _ in range(3):
        breaker.record(False)
    clock.now += 5.0
    await asyncio.wait_for(breaker.acquire(), 1.0)
    assert breaker.state == "half_open"
    breaker.record(False)
    assert breaker.state == "open"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(breaker.acquire(), 0.02)
    clock.now += 5.0
    await asyncio.wait_for(breaker.acquire(), 1.0)
    assert breaker.state == "half_open"


async def test_an_abandoned_trial_frees_the_slot_for_another() -> None:
    """A trial call cancelled before it reported lets the next caller make the trial."""
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.record(False)
    clock.now += 1.0
    await breaker.acquire()
    waiting = asyncio.ensure_future(breaker.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    breaker.abandon()
    await asyncio.wait_for(waiting, 1.0)
    assert breaker.state == "half_open"


async def test_an_outcome_from_before_the_opening_is_stale() -> None:
    """A call admitted before the circuit opened cannot close it, or count again, later."""
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, clock=clock)
    early = await breaker.acquire()
    failing = await breaker.acquire()
    breaker.record(False, failing)
    assert breaker.state == "open"
    breaker.record(True, early)
    assert breaker.state == "open"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(breaker.acquire(), 0.02)


async def test_the_trials_own_ticket_closes_the_circuit() -> None:
    """The trial admitted in half_open reports with a current ticket, so its success counts."""
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, clock=clock)
    breaker.record(False, await breaker.acquire())
    clock.now += 5.0
    trial = await asyncio.wait_for(breaker.acquire(), 1.0)
    assert breaker.state == "half_open"
    breaker.record(True, trial)
    assert breaker.state == "closed"


# -- outage or poison ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError("reset by peer"),
        BrokenPipeError(),
        TimeoutError("no answer"),
        BatchTimeout("past batch_timeout"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        DownstreamUnavailable("HTTP 503"),
    ],
)
def test_connection_failures_and_timeouts_are_outages_by_default(error: BaseException) -> None:
    """The built-in rule calls refused, reset and lost connections and timeouts outages."""
    assert is_outage(error, None)


@pytest.mark.parametrize(
    "error", [ValueError("bad row"), KeyError("id"), RuntimeError("?"), OSError(errno.ENOSPC, "")]
)
def test_data_errors_and_unknown_exceptions_may_be_poison(error: BaseException) -> None:
    """Anything that could belong to a message is not an outage."""
    assert not is_outage(error, None)


def test_the_class_attribute_decides_before_the_types() -> None:
    """``unavailable`` on the class wins; ``retryable = False`` rules an outage out."""

    class Overloaded(Exception):
        unavailable = True

    class RowRefused(ConnectionError):
        retryable = False

    assert is_outage(Overloaded(), None)
    assert not is_outage(RowRefused(), None)
    assert is_outage(Overloaded(), ())  # a tuple adds types, the attribute still decides


def test_unavailable_on_tuple_replaces_the_builtin_types_and_a_predicate_decides_alone() -> None:
    """A tuple names the outage types; a predicate overrides everything."""
    assert not is_outage(ConnectionRefusedError(), ())
    assert is_outage(KeyError("x"), (KeyError,))
    assert not is_outage(DownstreamUnavailable(), lambda exc: False)
    assert is_outage(ValueError(), lambda exc: True)


def test_driver_connection_errors_are_outages_without_importing_drivers() -> None:
    """redis' and nats' own connection errors (not builtin subclasses) count as outages."""
    redis_exceptions = pytest.importorskip("redis.exceptions")
    nats_errors = pytest.importorskip("nats.errors")
    assert is_outage(redis_exceptions.ConnectionError("Error 111 connecting"), None)
    assert is_outage(redis_exceptions.BusyLoadingError("loading"), None)
    assert is_outage(nats_errors.NoServersError(), None)
    assert not is_outage(redis_exceptions.ResponseError("WRONGTYPE"), None)


@pytest.mark.parametrize(
    ("status", "outage"), [(429, True), (503, True), (500, False), (400, False)]
)
def test_http_statuses_429_502_503_504_are_outages(status: int, outage: bool) -> None:
    """The HTTP sink's status error marks overload and gateway failures as outages."""
    from batchpunk.connectors.http import HttpStatusError, HttpTransportError

    assert is_outage(HttpStatusError("x", status=status, body=""), None) is outage
    assert is_outage(HttpTransportError("refused"), None)


def test_connector_connection_errors_are_marked_unavailable() -> None:
    """PostgreSQL's and RabbitMQ's transient error classes say they are outages."""
    from batchpunk.connectors.postgres import PostgresDataError, PostgresRetryable
    from batchpunk.connectors.rabbitmq import RabbitMQError

    assert is_outage(PostgresRetryable("refused"), None)
    assert is_outage(RabbitMQError("connection lost"), None)
    assert not is_outage(PostgresDataError("bad value"), None)


def test_retry_after_waits_at_least_the_errors_hint_up_to_the_cap() -> None:
    """A downstream's own hint (HTTP Retry-After) lengthens a backoff, never shortens it, and
    the user's cap still bounds it; a missing or unusable hint leaves the backoff alone."""

    def hinted(value: object) -> Exception:
        error = ConnectionError("throttled")
        error.retry_after = value  # type: ignore[attr-defined]
        return error

    assert retry_after(hinted(5), 0.5, 30.0) == 5.0
    assert retry_after(hinted(0.1), 0.5, 30.0) == 0.5
    assert retry_after(hinted(3600), 0.5, 30.0) == 30.0
    assert retry_after(ConnectionError(), 0.5, 30.0) == 0.5
    for unusable in (None, "5", True, float("nan"), float("inf"), -1):
        assert retry_after(hinted(unusable), 0.5, 30.0) == 0.5
