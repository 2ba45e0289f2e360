"""Property tests of the codec: round trips, the two json paths agreeing, and hostile bytes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchpunk.codec import (
    COMPRESSIONS,
    LEVEL_RANGES,
    SERIALIZERS,
    FrameError,
    decode_batch,
    encode_batch,
)
from batchpunk.codec import serializers as _serializers
from batchpunk.codec.compression import compress
from tests.test_codec import COMPRESSION_ID, SERIALIZER_ID, craft_frame

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: JSON-native values that every serializer represents exactly (ints within msgpack's 64 bits).
json_native = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
batches = st.lists(json_native, max_size=12)

#: Values beyond JSON's model whose meaning the json serializer defines (see serializers.py).
json_extended = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.uuids(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.booleans(), children, max_size=4)
    ),
    max_leaves=20,
)


def levels(compression: str) -> st.SearchStrategy[int | None]:
    """Every level the algorithm accepts, or None for its default."""
    if compression == "none":
        return st.none()
    low, high, _ = LEVEL_RANGES[compression]
    return st.none() | st.integers(low, high)


@contextmanager
def json_path(use_orjson: bool) -> Iterator[None]:
    """Run the block with orjson enabled or with the standard library only."""
    saved = _serializers._orjson
    if use_orjson:
        import orjson

        _serializers._orjson = orjson
    else:
        _serializers._orjson = None
    try:
        yield
    finally:
        _serializers._orjson = saved


@PROPERTY
@given(
    messages=batches,
    serializer=st.sampled_from(SERIALIZERS),
    compression=st.sampled_from(COMPRESSIONS),
    signed=st.booleans(),
    threshold=st.sampled_from([0, 64, 1024]),
    use_orjson=st.booleans(),
    data=st.data(),
)
def test_json_native_batches_round_trip_for_every_option(
    messages: list[Any],
    serializer: str,
    compression: str,
    signed: bool,
    threshold: int,
    use_orjson: bool,
    data: st.DataObject,
) -> None:
    """Every serializer x compression x level, signed or not, gives back the batch it was given."""
    level = data.draw(levels(compression), label="level")
    key = b"property-key" if signed else None
    with json_path(use_orjson):
        frame = encode_batch(
            messages,
            serializer=serializer,
            compression=compression,
            level=level,
            threshold=threshold,
            hmac_key=key,
        )
        assert decode_batch(frame, hmac_key=key, allow_pickle=serializer == "pickle") == messages


@PROPERTY
@given(messages=st.lists(json_extended, max_size=6))
def test_the_orjson_and_stdlib_json_paths_agree(messages: list[Any]) -> None:
    """For values beyond JSON's model too, both json paths accept the same and decode the same."""
    results = []
    for use_orjson in (True, False):
        with json_path(use_orjson):
            try:
                frame = encode_batch(messages, compression="none")
            except TypeError as exc:
                results.append(("refused", type(exc)))
                continue
            decoded = [decode_batch(frame)]
        with json_path(not use_orjson):  # and each path reads what the other wrote
            decoded.append(decode_batch(frame))
        assert decoded[0] == decoded[1]
        results.append(("decoded", decoded[0]))
    assert results[0] == results[1]


def _mutations(frame: bytes) -> st.SearchStrategy[bytes]:
    """The frame with 1-3 random flips, cuts, insertions or overwrites."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(frame)
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            if kind == "flip" and data:
                data[at] ^= draw(st.integers(1, 255))
            elif kind == "truncate":
                del data[at:]
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete":
                del data[at : at + draw(st.integers(1, 8))]
            else:
                chunk = draw(st.binary(min_size=1, max_size=8))
                data[at : at + len(chunk)] = chunk
        return bytes(data)

    return mutate()


@PROPERTY
@given(
    messages=batches,
    serializer=st.sampled_from(SERIALIZERS),
    compression=st.sampled_from(COMPRESSIONS),
    signed=st.booleans(),
    data=st.data(),
)
def test_mutated_frames_raise_only_frame_error(
    messages: list[Any], serializer: str, compression: str, signed: bool, data: st.DataObject
) -> None:
    """Random damage to a valid frame is reported as FrameError, never another error or a hang."""
    key = b"k" if signed else None
    frame = encode_batch(
        messages, serializer=serializer, compression=compression, threshold=0, hmac_key=key
    )
    damaged = data.draw(_mutations(frame), label="damaged")
    try:
        decoded = decode_batch(damaged, hmac_key=key, max_size=1 << 20)
    except FrameError:
        return
    # Only a mutation that changed nothing (same byte written back) may decode, and then exactly.
    assert damaged == frame
    assert decoded == messages


@PROPERTY
@given(
    payload=st.binary(max_size=400),
    serializer=st.sampled_from(["json", "msgpack"]),
    compression=st.sampled_from(COMPRESSIONS),
    compress_it=st.booleans(),
    raw_size=st.integers(0, 1 << 16),
)
def test_garbage_under_a_valid_header_raises_only_frame_error(
    payload: bytes, serializer: str, compression: str, compress_it: bool, raw_size: int
) -> None:
    """Random payloads behind a header with a correct checksum reach the decoders safely."""
    if compression == "none":
        stored, raw_size = payload, len(payload)
    elif compress_it:  # valid compression of garbage: the deserializer sees random bytes
        stored, raw_size = compress(payload, compression, None), len(payload)
    else:  # garbage where compressed data should be: the decompressor sees random bytes
        stored = payload
    frame = craft_frame(
        stored,
        serializer=SERIALIZER_ID[serializer],
        compression=COMPRESSION_ID[compression],
        raw_size=raw_size,
    )
    try:
        decoded = decode_batch(frame, max_size=1 << 16)
    except FrameError:
        return
    assert isinstance(decoded, list)


@PROPERTY
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_frame_error(data: bytes) -> None:
    """Bytes that were never a frame are refused with FrameError."""
    with pytest.raises(FrameError):
        decode_batch(data)


def test_uuid_values_are_part_of_the_extended_strategy() -> None:
    """The differential json test really covers UUIDs, which orjson writes natively."""
    value = uuid.UUID(int=7)
    with json_path(True):
        fast = decode_batch(encode_batch([value]))
    with json_path(False):
        slow = decode_batch(encode_batch([value]))
    assert fast == slow == [str(value)]
