"""The codec: options, round trips, json semantics on both paths, every FrameError, bombs."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import hashlib
import hmac
import pickle
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

import batchpunk.codec as codec
from batchpunk import errors
from batchpunk.codec import (
    COMPRESSIONS,
    HEADER_SIZE,
    LEVEL_RANGES,
    MAGIC,
    SERIALIZERS,
    Codec,
    FrameError,
    decode_batch,
    encode_batch,
    read_header,
    validate_options,
)
from batchpunk.codec import serializers as _serializers
from batchpunk.config import BatchConfig

SERIALIZER_ID = {"json": 1, "msgpack": 2, "pickle": 3}
COMPRESSION_ID = {"none": 0, "zlib": 1, "gzip": 2, "zstd": 3, "lz4": 4}

EVENTS = [
    {"id": i, "kind": "click", "tags": ["a", "b"], "score": i / 3, "note": None, "ok": i % 2 == 0}
    for i in range(50)
]


def craft_frame(
    payload: bytes,
    *,
    serializer: int = 1,
    compression: int = 0,
    raw_size: int | None = None,
    flags: int = 0,
    version: int = 1,
    magic: bytes = MAGIC,
    key: bytes | None = None,
    payload_size: int | None = None,
) -> bytes:
    """A frame built by hand, with a correct checksum (and signature when a key is given)."""
    raw = len(payload) if raw_size is None else raw_size
    stored = len(payload) if payload_size is None else payload_size
    prefix = struct.pack("<4sBBBBQQ", magic, version, serializer, compression, flags, raw, stored)
    header = prefix + struct.pack("<I", zlib.crc32(payload, zlib.crc32(prefix)))
    signature = b"" if key is None else hmac.new(key, header + payload, hashlib.sha256).digest()
    return header + signature + payload


@pytest.fixture(params=["orjson", "stdlib"])
def json_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with orjson doing the json work and once with the standard library."""
    if request.param == "stdlib":
        monkeypatch.setattr(_serializers, "_orjson", None)
    else:
        import orjson

        monkeypatch.setattr(_serializers, "_orjson", orjson)
    return str(request.param)


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("serializer", "compression", "level", "message"),
    [
        ("xml", "zlib", None, "serializer: expected one of 'json', 'msgpack', 'pickle'"),
        ("json", "brotli", None, "compression: expected one of 'none', 'zlib'"),
        ("json", "zlib", 10, "compression_level: 10 is out of range (zlib accepts -1..9)"),
        ("json", "gzip", -2, "compression_level: -2 is out of range (gzip accepts -1..9)"),
        ("json", "zstd", 23, "compression_level: 23 is out of range (zstd accepts -131072..22)"),
        ("json", "lz4", 17, "compression_level: 17 is out of range (lz4 accepts 0..16)"),
        ("json", "lz4", -1, "compression_level: -1 is out of range (lz4 accepts 0..16)"),
        ("json", "none", 1, "compression_level: must be None when compression is 'none'"),
        ("json", "zlib", "9", "compression_level: expected an integer or None, got '9'"),
        ("json", "zlib", True, "compression_level: expected an integer or None, got True"),
    ],
)
def test_validate_options_names_the_field_at_fault(
    serializer: Any, compression: Any, level: Any, message: str
) -> None:
    """Each bad codec option fails with a ValueError whose message starts with the field name."""
    with pytest.raises(ValueError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)")):
        validate_options(serializer, compression, level)


def test_validate_options_accepts_every_level_the_libraries_accept() -> None:
    """The level ranges are exactly what zlib, zstandard and lz4 really compress with."""
    for compression in COMPRESSIONS:
        validate_options("json", compression, None)
    data = b"batchpunk " * 100
    for compression, (low, high, default) in LEVEL_RANGES.items():
        for level in (low, default, high):
            validate_options("json", compression, level)
            frame = encode_batch([data.decode()], compression=compression, level=level, threshold=0)
            assert read_header(frame).compression == compression
            assert decode_batch(frame) == [data.decode()]


def test_encode_batch_names_its_own_level_keyword() -> None:
    """encode_batch reports a bad level under its own keyword, 'level'."""
    with pytest.raises(ValueError, match=r"^level: 99 is out of range \(zlib accepts -1\.\.9\)"):
        encode_batch([1], level=99)


def test_importing_the_codec_loads_no_optional_dependency() -> None:
    """`import batchpunk.codec` (what BatchConfig validation needs) imports no optional package."""
    code = (
        "import sys, batchpunk.codec, batchpunk.config\n"
        "print(sorted(m for m in ('orjson', 'msgspec', 'zstandard', 'lz4') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_optional_library_fails_at_encode_with_the_pip_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without zstandard, encoding zstd raises MissingDependency naming the extra to install."""
    monkeypatch.setitem(sys.modules, "zstandard", None)
    validate_options("json", "zstd", 3)  # validation alone never needs the library
    with pytest.raises(errors.MissingDependency, match=r"pip install 'batchpunk\[zstd\]'"):
        encode_batch(["x" * 2000], compression="zstd")


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("serializer", SERIALIZERS)
@pytest.mark.parametrize("key", [None, b"k3y"])
def test_every_serializer_and_compression_round_trips(
    serializer: str, compression: str, key: bytes | None
) -> None:
    """A batch encoded with any serializer, compression and signing decodes to the same list."""
    frame = encode_batch(
        EVENTS, serializer=serializer, compression=compression, threshold=0, hmac_key=key
    )
    info = read_header(frame)
    assert (info.serializer, info.compression, info.signed) == (serializer, compression, bool(key))
    assert info.frame_size == len(frame)
    assert decode_batch(frame, hmac_key=key, allow_pickle=serializer == "pickle") == EVENTS


def test_compression_applies_only_above_the_threshold() -> None:
    """A payload at or under threshold is stored as is; one byte more and it is compressed."""
    raw_size = read_header(encode_batch(EVENTS, compression="none")).raw_size
    under = encode_batch(EVENTS, compression="zlib", threshold=raw_size)
    over = encode_batch(EVENTS, compression="zlib", threshold=raw_size - 1)
    assert read_header(under).compression == "none"
    assert read_header(over).compression == "zlib"
    assert len(over) < len(under)
    assert decode_batch(under) == decode_batch(over) == EVENTS


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_encoding_is_deterministic(compression: str) -> None:
    """The same batch and options give the same bytes (gzip writes no timestamp)."""
    first = encode_batch(EVENTS, compression=compression, threshold=0)
    assert encode_batch(EVENTS, compression=compression, threshold=0) == first


def test_decode_accepts_bytearray_and_memoryview() -> None:
    """decode_batch reads a frame from any bytes-like object without requiring a copy."""
    frame = encode_batch(EVENTS, threshold=0)
    assert decode_batch(bytearray(frame)) == EVENTS
    assert decode_batch(memoryview(frame)) == EVENTS


def test_bad_arguments_name_the_argument() -> None:
    """Wrong argument types or values raise with the argument's name, not a FrameError."""
    with pytest.raises(TypeError, match=r"^messages: expected a sequence"):
        encode_batch("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^messages: expected a sequence"):
        encode_batch({"a": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^threshold: expected an integer >= 0"):
        encode_batch([1], threshold=-1)
    with pytest.raises(ValueError, match=r"^hmac_key: must not be empty"):
        encode_batch([1], hmac_key=b"")
    with pytest.raises(ValueError, match=r"^hmac_key: expected bytes, str or None"):
        encode_batch([1], hmac_key=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^max_size: expected an integer >= 1"):
        decode_batch(encode_batch([1]), max_size=0)
    with pytest.raises(TypeError, match=r"^data: expected bytes, bytearray or memoryview"):
        decode_batch("not bytes")  # type: ignore[arg-type]


def test_a_message_the_serializer_cannot_represent_is_a_type_error() -> None:
    """Unencodable messages raise TypeError naming the serializer, for every serializer."""
    with pytest.raises(TypeError, match=r"^messages: the json serializer cannot encode"):
        encode_batch([{1, 2}])
    with pytest.raises(TypeError, match=r"^messages: the msgpack serializer cannot encode"):
        encode_batch([2**70], serializer="msgpack")
    with pytest.raises(TypeError, match=r"^messages: the pickle serializer cannot encode"):
        encode_batch([lambda: None], serializer="pickle")


def test_tuples_are_accepted_as_the_message_sequence() -> None:
    """A tuple of messages encodes like the list of the same messages and decodes to a list."""
    assert encode_batch(tuple(EVENTS)) == encode_batch(EVENTS)
    assert decode_batch(encode_batch(tuple(EVENTS))) == EVENTS


# -- json semantics, with and without orjson --------------------------------------------------


class Colour(enum.Enum):
    RED = "red"
    PAIR = (1, 2)


class Level(enum.IntEnum):
    HIGH = 3


class Text(str):
    pass


Point = collections.namedtuple("Point", "x y")

JSON_CASES: list[tuple[str, Any, Any]] = [
    ("native values", [None, True, 0, -1, 1.5, "é\u2028", [], {}], None),
    ("tuple becomes a list", (1, (2, 3)), [1, [2, 3]]),
    ("namedtuple becomes a list", Point(1, 2), [1, 2]),
    (
        "non-str keys become strings",
        {1: "a", 2.5: "b", None: "d"},
        {"1": "a", "2.5": "b", "null": "d"},
    ),
    ("bool keys become strings", {False: 0}, {"false": 0}),
    ("NaN becomes null", [float("nan"), float("inf"), -float("inf"), 1.0], [None, None, None, 1.0]),
    ("NaN nested in a dict becomes null", {"x": {"y": [float("nan")]}}, {"x": {"y": [None]}}),
    ("the word NaN in a string survives", ["NaN", "Infinity"], None),
    ("int beyond 64 bits stays exact", [2**64, -(2**63) - 1, 10**30], None),
    ("int at the 64-bit edges stays exact", [2**64 - 1, -(2**63)], None),
    ("uuid becomes its string", uuid.UUID(int=5), "00000000-0000-0000-0000-000000000005"),
    ("enum becomes its value", [Colour.RED, Colour.PAIR], ["red", [1, 2]]),
    ("IntEnum becomes its int", Level.HIGH, 3),
    ("str subclass becomes a str", Text("hi"), "hi"),
    ("dict subclass becomes a dict", collections.OrderedDict(a=1), {"a": 1}),
    ("deep nesting beyond orjson's limit", [[[[[[[[[[0]]]]]]]]]] * 1, None),
]


@pytest.mark.parametrize(
    ("name", "message", "expected"), JSON_CASES, ids=[c[0] for c in JSON_CASES]
)
def test_json_semantics_are_the_same_with_and_without_orjson(
    json_path: str, name: str, message: Any, expected: Any
) -> None:
    """Each case decodes to the same value on the orjson path and the standard-library path."""
    wanted = message if expected is None else expected
    assert decode_batch(encode_batch([message]))[0] == wanted


def test_json_handles_nesting_deeper_than_orjson_allows(json_path: str) -> None:
    """Structures nested 300 deep (orjson stops at 254) still round-trip through json."""
    deep: Any = 0
    for _ in range(300):
        deep = [deep]
    assert decode_batch(encode_batch([deep])) == [deep]


@dataclasses.dataclass
class Event:
    id: int


@pytest.mark.parametrize(
    "message",
    [{1, 2}, b"bytes", datetime.datetime(2024, 1, 1), Event(1), object(), "\ud800"],
    ids=["set", "bytes", "datetime", "dataclass", "object", "lone surrogate"],
)
def test_json_refuses_the_same_messages_with_and_without_orjson(
    json_path: str, message: Any
) -> None:
    """Values outside the json semantics are refused on both paths, orjson's extras included."""
    with pytest.raises(TypeError, match="json serializer cannot encode"):
        encode_batch([message])


def test_json_refuses_circular_structures(json_path: str) -> None:
    """A list that contains itself is refused instead of recursing forever."""
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="json serializer cannot encode"):
        encode_batch([loop])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            b"[123456789012345678901234567890, -9223372036854775809]",
            [123456789012345678901234567890, -9223372036854775809],
        ),
        (b'["12345678901234567890123", 1.0e2]', ["12345678901234567890123", 100.0]),
        (b"[NaN, 1e400]", None),
        (b'[{"a": 1, "a": 2}]', [{"a": 2}]),
        (b'["\\ud83d\\ude00"]', ["\U0001f600"]),
    ],
)
def test_json_decoding_agrees_on_foreign_payloads(
    json_path: str, text: bytes, expected: Any
) -> None:
    """Payloads other writers may produce decode the same on both paths (big ints stay exact)."""
    got = decode_batch(craft_frame(text))
    if expected is None:  # NaN never equals itself: compare the shape instead
        assert [type(v) for v in got] == [float, float]
        assert got[0] != got[0]
        assert got[1] == float("inf")
    else:
        assert got == expected
        assert [type(v) for v in got] == [type(v) for v in expected]


@pytest.mark.parametrize(
    "text",
    [b'{"name": "\xed\xa0\x80"}', b'["\xff"]', b'["\xed\xa0\x80", ' + b"1" * 20 + b"]"],
    ids=["encoded lone surrogate", "invalid byte", "invalid with a long number"],
)
def test_json_decoding_refuses_invalid_utf8_on_both_paths(json_path: str, text: bytes) -> None:
    """JSON text is UTF-8: bytes that are not (a surrogate in UTF-8 form, 0xff) are a
    FrameError on both paths, never a str holding a lone surrogate (json.loads alone decodes
    bytes with "surrogatepass")."""
    with pytest.raises(FrameError, match="does not decode as json"):
        decode_batch(craft_frame(text))
    with pytest.raises(FrameError, match="does not decode as json"):
        codec.decode_value(text)


def test_a_json_frame_of_unclosed_strings_is_refused_quickly() -> None:
    """The object count scanned on from each unclosed quote to the end of the payload: 40
    escaped quotes and 1.1 M commas (a 2 KiB zlib frame) took seconds, 1,000 quotes over a
    minute. An unclosed string now runs to the end once."""
    raw = b'"' + b'\\"' * 1000 + b"," * 1_100_000
    frame = craft_frame(zlib.compress(raw, 9), compression=1, raw_size=len(raw))
    assert len(frame) < 4000
    began = time.process_time()
    with pytest.raises(FrameError):
        decode_batch(frame)
    assert time.process_time() - began < 2.0


def test_orjson_does_the_work_when_it_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """With orjson installed, a plain batch never reaches the standard-library encoder."""
    import orjson

    monkeypatch.setattr(_serializers, "_orjson", orjson)

    def refuse(obj: Any) -> bytes:
        raise AssertionError("the standard-library encoder should not run")

    monkeypatch.setattr(_serializers, "std_json_dumps", refuse)
    assert decode_batch(encode_batch(EVENTS)) == EVENTS


def test_msgpack_keeps_bytes_and_non_finite_floats() -> None:
    """msgpack, unlike json, round-trips bytes and NaN; tuples and sets come back as lists."""
    got = decode_batch(
        encode_batch([b"\x00\xff", float("inf"), (1, 2), {3}, {1: "int key"}], serializer="msgpack")
    )
    assert got == [b"\x00\xff", float("inf"), [1, 2], [3], {1: "int key"}]
    nan = decode_batch(encode_batch([float("nan")], serializer="msgpack"))[0]
    assert nan != nan


# -- signatures and pickle --------------------------------------------------------------------


def test_signed_frames_need_the_right_key() -> None:
    """A signed frame decodes only with its key; str keys are their UTF-8 bytes."""
    frame = encode_batch(EVENTS, hmac_key="s3cret")
    assert decode_batch(frame, hmac_key=b"s3cret") == EVENTS
    with pytest.raises(FrameError, match=r"^signature wrong: HMAC-SHA256 does not match"):
        decode_batch(frame, hmac_key=b"other")
    with pytest.raises(FrameError, match=r"^signature present but no hmac_key was given"):
        decode_batch(frame)
    with pytest.raises(FrameError, match=r"^signature missing: an hmac_key was given"):
        decode_batch(encode_batch(EVENTS), hmac_key=b"s3cret")


def test_a_forged_payload_with_a_fixed_checksum_fails_the_signature() -> None:
    """Changing the payload and recomputing the crc (what an attacker can do) is still refused."""
    key = b"k"
    good = encode_batch([{"amount": 1}], compression="none", hmac_key=key)
    signature = good[HEADER_SIZE : HEADER_SIZE + 32]
    forged = craft_frame(b'[{"amount":9}]', flags=1)
    forged = forged[:HEADER_SIZE] + signature + forged[HEADER_SIZE:]
    with pytest.raises(FrameError, match=r"^signature wrong"):
        decode_batch(forged, hmac_key=key)


def test_signature_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The signature is checked with hmac.compare_digest, not ==."""
    from batchpunk.codec import frame as frame_module

    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(frame_module.hmac, "compare_digest", spy)
    decode_batch(encode_batch([1], hmac_key=b"k"), hmac_key=b"k")
    assert calls == [1]


def test_pickle_is_written_only_when_asked_and_read_only_when_allowed() -> None:
    """The default serializer is json; a pickle frame is refused unless allow_pickle=True."""
    assert read_header(encode_batch(EVENTS)).serializer == "json"
    frame = encode_batch([{1, 2}], serializer="pickle")
    with pytest.raises(FrameError, match=r"^pickle refused"):
        decode_batch(frame)
    assert decode_batch(frame, allow_pickle=True) == [{1, 2}]


def test_pickle_is_refused_before_any_byte_of_it_is_loaded() -> None:
    """A pickle payload that would run code is refused without being unpickled."""

    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (eval, ("1/0",))

    frame = craft_frame(pickle.dumps([Boom()]), serializer=3)
    with pytest.raises(FrameError, match=r"^pickle refused"):
        decode_batch(frame)


# -- every FrameError from crafted bytes ------------------------------------------------------


def _valid() -> bytes:
    return encode_batch(EVENTS, threshold=0)


BAD_FRAMES: list[tuple[str, Any, str]] = [
    ("empty", lambda: b"", r"^truncated: 0 bytes, a frame header needs 28"),
    ("magic prefix only", lambda: MAGIC[:3], r"^truncated: 3 bytes"),
    ("json text", lambda: b'{"a": 1}', r"^not a batchpunk frame: expected magic bytes 89 42 50 4b"),
    ("zlib data", lambda: zlib.compress(b"[1]"), r"^not a batchpunk frame"),
    ("version 2", lambda: craft_frame(b"[1]", version=2), r"^unsupported frame version 2"),
    ("version 0", lambda: craft_frame(b"[1]", version=0), r"^unsupported frame version 0"),
    ("header cut", lambda: _valid()[:20], r"^truncated: 20 bytes, a frame header needs 28"),
    ("unknown flags", lambda: craft_frame(b"[1]", flags=0x04), r"^unknown flags 0x04"),
    (
        "unknown serializer",
        lambda: craft_frame(b"[1]", serializer=9),
        r"^unknown serializer id 9 in the header \(known: 1 json, 2 msgpack, 3 pickle\)",
    ),
    (
        "unknown compression",
        lambda: craft_frame(b"[1]", compression=7),
        r"^unknown compression id 7",
    ),
    (
        "inconsistent sizes",
        lambda: craft_frame(b"[1]", raw_size=5),
        r"^inconsistent header: an uncompressed payload of 3 bytes cannot have a raw size of 5",
    ),
    ("payload cut", lambda: _valid()[:-5], r"^truncated: the frame needs \d+ bytes"),
    (
        "signature cut",
        lambda: encode_batch([1], hmac_key=b"k")[:40],
        r"^truncated: the frame needs \d+ bytes \(header 28 \+ signature 32 \+ payload 3\), got 40",
    ),
    ("trailing bytes", lambda: _valid() + b"\x00\x00", r"^2 unexpected bytes after the end"),
    ("two frames", lambda: _valid() * 2, r"unexpected bytes after the end of the frame"),
    (
        "payload bit flip",
        lambda: (lambda f: f[:-1] + bytes([f[-1] ^ 1]))(_valid()),
        r"^checksum mismatch",
    ),
    (
        "header bit flip",
        lambda: (lambda f: f[:9] + bytes([f[9] ^ 1]) + f[10:])(_valid()),
        r"^checksum mismatch",
    ),
    (
        "too large",
        lambda: craft_frame(zlib.compress(b"[1]"), compression=1, raw_size=2**40),
        r"^too large: the frame declares 1099511627776 bytes of payload, max_size is 67108864",
    ),
    ("json does not parse", lambda: craft_frame(b"[1,"), r"^payload does not decode as json"),
    ("invalid utf-8", lambda: craft_frame(b'["\xff"]'), r"^payload does not decode as json"),
    (
        "msgpack garbage",
        lambda: craft_frame(b"\xc1", serializer=2),
        r"^payload does not decode as msgpack",
    ),
    (
        "not a list",
        lambda: craft_frame(b'{"a":1}'),
        r"^payload does not decode to a list of messages \(got dict\)",
    ),
    (
        "zlib garbage",
        lambda: craft_frame(b"garbage!", compression=1, raw_size=3),
        r"^payload does not decompress as zlib",
    ),
    (
        "gzip garbage",
        lambda: craft_frame(b"garbage!", compression=2, raw_size=3),
        r"^payload does not decompress as gzip",
    ),
    (
        "zstd garbage",
        lambda: craft_frame(b"garbage!", compression=3, raw_size=3),
        r"^payload does not decompress as zstd",
    ),
    (
        "lz4 garbage",
        lambda: craft_frame(b"garbage!", compression=4, raw_size=3),
        r"^payload does not decompress as lz4",
    ),
    (
        "zlib stream cut",
        lambda: craft_frame(zlib.compress(b"[1,2,3]")[:-6], compression=1, raw_size=7),
        r"^payload is truncated",
    ),
    (
        "zlib stream then junk",
        lambda: craft_frame(zlib.compress(b"[1]") + b"junk", compression=1, raw_size=3),
        r"^payload has 4 bytes after",
    ),
    (
        "declares fewer bytes",
        lambda: craft_frame(zlib.compress(b"[1,2,3]"), compression=1, raw_size=3),
        r"^too large: the zlib payload",
    ),
    (
        "declares more bytes",
        lambda: craft_frame(zlib.compress(b"[1]"), compression=1, raw_size=30),
        r"^payload is truncated or corrupt",
    ),
    ("pickle", lambda: craft_frame(pickle.dumps([1]), serializer=3), r"^pickle refused"),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_every_bad_frame_gets_its_own_frame_error(name: str, make: Any, message: str) -> None:
    """Each kind of bad input raises a FrameError whose message says exactly what is wrong."""
    with pytest.raises(FrameError, match=message):
        decode_batch(make())


def test_zstd_and_lz4_lies_about_size_are_caught() -> None:
    """A zstd or lz4 payload larger or smaller than its header says is refused."""
    import lz4.frame
    import zstandard

    for compression, packed in (
        (3, zstandard.ZstdCompressor().compress(b"[1,2,3]")),
        (4, lz4.frame.compress(b"[1,2,3]")),
    ):
        with pytest.raises(FrameError, match=r"^too large: the (zstd|lz4) payload decompresses"):
            decode_batch(craft_frame(packed, compression=compression, raw_size=3))
        with pytest.raises(FrameError, match=r"^payload is truncated or corrupt"):
            decode_batch(craft_frame(packed, compression=compression, raw_size=30))


def test_frame_error_is_a_value_error_and_a_batchpunk_error() -> None:
    """FrameError from the codec is the one in batchpunk.errors, catchable as either base."""
    assert codec.FrameError is errors.FrameError
    assert issubclass(FrameError, ValueError)
    assert issubclass(FrameError, errors.BatchpunkError)


# -- decompression bombs ----------------------------------------------------------------------

GIB = 2**30
MIB = 2**20


def _deflate_zeros(gzip: bool) -> bytes:
    """A real zlib or gzip stream of 1 GiB of zeros, built from one repeated flushed block."""
    chunk = bytes(MIB)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if gzip else 15)
    first = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the compressor forgets its history: each MiB of zeros is the same block.
    assert packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH) == block
    check = 0 if gzip else 1
    for _ in range(GIB // MIB):
        check = zlib.crc32(chunk, check) if gzip else zlib.adler32(chunk, check)
    final = b"\x03\x00"  # an empty final block
    trailer = struct.pack("<II", check, GIB % 2**32) if gzip else struct.pack(">I", check)
    return first + block * (GIB // MIB - 1) + final + trailer


def _stream_zeros(compression: str) -> bytes:
    chunk = bytes(MIB)
    if compression == "zstd":
        import zstandard

        packer: Any = zstandard.ZstdCompressor().compressobj()
        parts = [packer.compress(chunk) for _ in range(GIB // MIB)]
        return b"".join([*parts, packer.flush()])
    import lz4.frame

    packer = lz4.frame.LZ4FrameCompressor()
    parts = [packer.begin()] + [packer.compress(chunk) for _ in range(GIB // MIB)]
    return b"".join([*parts, packer.flush()])


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """1 GiB of zeros compressed by each algorithm (a few MB each)."""
    return {
        "zlib": _deflate_zeros(gzip=False),
        "gzip": _deflate_zeros(gzip=True),
        "zstd": _stream_zeros("zstd"),
        "lz4": _stream_zeros("lz4"),
    }


@pytest.fixture
def peak_memory() -> Iterator[list[int]]:
    """Trace Python allocations during the test; yields a list that receives the peak bytes."""
    result: list[int] = []
    tracemalloc.start()
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.mark.parametrize("compression", ["zlib", "gzip", "zstd", "lz4"])
def test_a_truthful_bomb_is_refused_from_its_header(
    bombs: dict[str, bytes], compression: str
) -> None:
    """A 1 GiB payload whose header says so is refused before any decompression."""
    payload = bombs[compression]
    assert len(payload) < 5 * MIB
    frame = craft_frame(payload, compression=COMPRESSION_ID[compression], raw_size=GIB)
    with pytest.raises(FrameError, match=r"^too large: the frame declares 1073741824 bytes"):
        decode_batch(frame)


@pytest.mark.parametrize("compression", ["zlib", "gzip", "zstd", "lz4"])
def test_a_lying_bomb_stops_at_max_size_without_allocating_it(
    bombs: dict[str, bytes], compression: str
) -> None:
    """A 1 GiB payload whose header claims max_size is cut off after max_size, in bounded memory."""
    max_size = 2 * MIB
    frame = craft_frame(
        bombs[compression], compression=COMPRESSION_ID[compression], raw_size=max_size
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match=rf"^too large: the {compression} payload"):
            decode_batch(frame, max_size=max_size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert peak < max_size + MIB, f"peak Python allocation {peak} bytes"
    assert rss_growth < 64 * 1024, f"max RSS grew by {rss_growth} KiB"


# -- Codec ------------------------------------------------------------------------------------


def test_codec_from_config_uses_the_processor_settings() -> None:
    """Codec.from_config encodes exactly as encode_batch does with the config's codec fields."""
    config = BatchConfig(compression="lz4", compression_level=9, compression_threshold=10)
    codec_ = Codec.from_config(config, hmac_key=b"SECRET")
    frame = codec_.encode(EVENTS)
    assert read_header(frame).compression == "lz4"
    assert frame == encode_batch(
        EVENTS, compression="lz4", level=9, threshold=10, hmac_key=b"SECRET"
    )
    assert codec_.decode(frame) == EVENTS
    assert "SECRET" not in repr(codec_)


def test_codec_validates_at_construction() -> None:
    """A Codec with a bad option cannot be built, so it never fails later in a run."""
    with pytest.raises(ValueError, match=r"^level: 30 is out of range"):
        Codec(compression="zstd", level=30)
    with pytest.raises(ValueError, match=r"^max_size: expected an integer >= 1"):
        Codec(max_size=0)
    with pytest.raises(ValueError, match=r"^threshold: expected an integer >= 0"):
        Codec(threshold=-5)


# -- single values ----------------------------------------------------------------------------


def test_single_values_use_the_same_serializers_without_a_frame() -> None:
    """encode_value/decode_value serialize one value with the frame's semantics and checks."""
    record = {"id": "x", "n": [1, 2.5, None], "nan": float("nan")}
    assert codec.decode_value(codec.encode_value(record)) == {**record, "nan": None}
    assert codec.decode_value(codec.encode_value(b"raw", "msgpack"), "msgpack") == b"raw"
    pickled = codec.encode_value({1, 2}, "pickle")
    with pytest.raises(FrameError, match=r"^pickle refused"):
        codec.decode_value(pickled, "pickle")
    assert codec.decode_value(pickled, "pickle", allow_pickle=True) == {1, 2}
    with pytest.raises(FrameError, match=r"^payload does not decode as json"):
        codec.decode_value(b"{oops")
    with pytest.raises(ValueError, match=r"^serializer: expected 'json', 'msgpack' or 'pickle'"):
        codec.encode_value(1, "yaml")
    with pytest.raises(TypeError, match=r"^value: the json serializer cannot encode it"):
        codec.encode_value({1, 2})


def test_the_hexdumps_in_format_md_are_what_the_codec_writes() -> None:
    """docs/FORMAT.md's worked example matches the bytes encode_batch produces today."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    example = text.split("## Worked example", 1)[1].split("## Serializers", 1)[0]
    dumps = [block for i, block in enumerate(example.split("```")) if i % 2 == 1]
    frames = [
        bytes.fromhex(" ".join(line[10:58] for line in block.strip().splitlines()))
        for block in dumps
    ]
    assert frames == [
        encode_batch([{"id": 1, "ok": True}]),
        encode_batch([{"id": 1, "ok": True}], hmac_key=b"secret"),
    ]
