"""What every broker source shares, written once: payload decoding, parts, limits, backoff.

A broker source supplies its read, settle and connect primitives; the ideas they share live
here (the kombu pattern, docs/ARCHITECTURE.md):

- ``payload_decoder``: json, bytes, text or frame, with the frame's HMAC checked wherever a frame
  can arrive, so no source can forget it;
- ``hmac_key_option``: one way to read and validate an HMAC key setting;
- ``Parts``: the ledger of a delivery that holds a frame of many messages, settled once every
  part is, with one rule for mixed outcomes;
- ``REDELIVERED`` (re-exported from ``batchpunk.envelope``) and ``delivery_limit_error``: the one
  flag and the one error for a message delivered past its limit;
- ``reconnect_delay``: reconnect backoff on ``retry.backoff_delay`` (capped, jittered), so that
  workers of a restarted broker do not reconnect in lockstep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchpunk.envelope import REDELIVERED
from batchpunk.errors import ConfigError, DeliveryLimitExceeded
from batchpunk.retry import backoff_delay

__all__ = [
    "ACK",
    "DECODINGS",
    "REDELIVERED",
    "REJECT",
    "REQUEUE",
    "Parts",
    "delivery_limit_error",
    "hmac_key_option",
    "payload_decoder",
    "reconnect_delay",
]

#: How a source turns message bytes into payloads.
DECODINGS = ("json", "bytes", "text", "frame")

#: Outcomes of one message, in the order ``Parts`` ranks them (see there).
REJECT, ACK, REQUEUE = 1, 2, 3


def hmac_key_option(owner: str, value: Any) -> bytes | None:
    """An ``hmac_key`` setting as bytes (a str is UTF-8 encoded); None for no key.

    The error never echoes the value: it is a secret.
    """
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return value.encode()
    raise ConfigError(f"{owner}.hmac_key: expected bytes or a non-empty string")


def payload_decoder(
    owner: str, decode: str, hmac_key: bytes | None = None
) -> Callable[[bytes], list[Any]]:
    """A function from message bytes to its payloads (one, or every message of a frame).

    It raises on undecodable bytes (the source then yields a malformed envelope). For "frame",
    a frame is checked against ``hmac_key`` when one is set, and a signed frame is refused
    without one: the check cannot be skipped by the sender.
    """
    if decode == "json":
        # The codec's json: the standard library's meaning at orjson's speed (a fifth of the
        # per-message cost with json.loads), falling back to json where orjson would differ.
        from batchpunk.codec.serializers import deserialize

        return lambda raw: [deserialize(raw, "json")]
    if decode == "bytes":
        return lambda raw: [bytes(raw)]
    if decode == "text":
        return lambda raw: [bytes(raw).decode("utf-8")]
    if decode == "frame":
        from batchpunk.codec import decode_batch

        return lambda raw: list(decode_batch(raw, hmac_key=hmac_key))
    raise ConfigError(f"{owner}.decode: expected one of {', '.join(DECODINGS)}, got {decode!r}")


class Parts:
    """The ledger of one delivery that holds a frame of several messages.

    The envelopes of the frame share it (as their receipt, or inside it); the delivery is
    settled once every part is, with the outcome that loses nothing: requeue if any part asked
    for it, else ack if any part was acked (the frame was at least partly processed, so it must
    not go to a dead-letter exchange again), reject only when every part was rejected.
    """

    __slots__ = ("key", "left", "outcome")

    def __init__(self, key: Any, parts: int) -> None:
        self.key = key
        self.left = parts
        self.outcome = REJECT

    def settle(self, outcome: int) -> int | None:
        """Record one part's outcome; the delivery's outcome once it is the last, else None."""
        if outcome > self.outcome:
            self.outcome = outcome
        self.left -= 1
        return self.outcome if self.left == 0 else None


def delivery_limit_error(what: str, count: int, limit: int, setting: str) -> DeliveryLimitExceeded:
    """The error of a message flagged ``REDELIVERED``: which one, how often, and the limit."""
    return DeliveryLimitExceeded(f"{what} was delivered {count} times ({setting}={limit})")


def reconnect_delay(failures: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait before reconnect attempt ``failures`` (1-based): capped, fully jittered.

    Jitter spreads the workers of a broker that just restarted; the cap bounds how long a worker
    stays away once the broker is back.
    """
    return backoff_delay(max(1, failures), base=base, cap=cap, jitter=True)
