"""Messages to bytes and back: json (standard library semantics, orjson speed), msgpack, pickle.

The json serializer has one meaning whether or not orjson is installed, because the standard
library is the reference and orjson is only used where it provably agrees with it:

* Encoding tries orjson with every extension it has turned off (dataclasses, datetimes and
  subclasses of builtins are passed to a ``default`` that refuses them). Whatever orjson refuses
  (big ints, non-str keys, subclasses, circular or very deep structures, lone surrogates) is
  encoded again by the standard library, which then accepts or refuses it on its own terms.
* orjson natively writes ``uuid.UUID`` as its string and an ``Enum`` as its value; the standard
  library path does the same through its ``default``.
* Non-finite floats (NaN, +-Infinity) are not JSON: both paths write them as ``null``, as
  orjson, msgspec and JavaScript's JSON.stringify do. Use msgpack to keep them.
* Decoding uses orjson unless the payload may hold an integer outside 64 bits (orjson would
  return a float for it) or orjson refuses the text; then the standard library decides.

So a message round-trips through json exactly when it is JSON-native: None, bool, int, finite
float, str, and lists and str-keyed dicts of those. Tuples come back as lists, non-str keys as
strings (the standard library's rule), UUIDs and Enums as their string or value.
"""

from __future__ import annotations

import json
import math
import pickle
import uuid
from enum import Enum
from typing import Any

from batchpunk.errors import FrameError, require

__all__ = ["decode_value", "deserialize", "encode_value", "orjson_module", "serialize"]

#: Pickle protocol 5 (Python 3.8+): out-of-band buffers, and readable by every supported Python.
PICKLE_PROTOCOL = 5

_ORJSON_UNSET: Any = object()
_orjson: Any = _ORJSON_UNSET


def orjson_module() -> Any:
    """orjson if it is installed, else None; looked up once, on first use, never at import."""
    global _orjson
    if _orjson is _ORJSON_UNSET:
        try:
            import orjson
        except ImportError:
            _orjson = None
        else:
            _orjson = orjson
    return _orjson


def serialize(obj: Any, serializer: str, what: str = "messages") -> bytes:
    """``obj`` serialized, or TypeError naming ``what`` and the serializer that refused it."""
    try:
        if serializer == "json":
            return _json_dumps(obj)
        if serializer == "msgpack":
            msgspec = require("msgspec", "msgpack", "the msgpack serializer")
            data: bytes = msgspec.msgpack.encode(obj)
            return data
        if serializer == "pickle":
            return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    except ImportError:  # MissingDependency: the pip hint must reach the caller unchanged
        raise
    except Exception as exc:  # pickle alone raises PicklingError, AttributeError, TypeError...
        raise TypeError(f"{what}: the {serializer} serializer cannot encode it: {exc}") from exc
    raise ValueError(f"serializer: unknown serializer {serializer!r}")


def deserialize(payload: bytes | bytearray, serializer: str) -> Any:
    """The decoded payload; FrameError when the bytes are not valid for the serializer."""
    try:
        if serializer == "json":
            return _json_loads(payload)
        if serializer == "msgpack":
            msgspec = require("msgspec", "msgpack", "reading msgpack frames")
            return msgspec.msgpack.decode(payload)
        if serializer == "pickle":
            return pickle.loads(payload)
    except ImportError:
        raise
    except Exception as exc:  # a decoder fed hostile bytes may raise anything: report it plainly
        raise FrameError(f"payload does not decode as {serializer}: {exc}") from exc
    raise FrameError(f"payload does not decode: unknown serializer {serializer!r}")


def encode_value(obj: Any, serializer: str = "json") -> bytes:
    """One value serialized without a frame: for records that carry their own framing.

    The dead-letter sinks write each record as one json line with this. Same semantics and
    errors as a frame's payload (TypeError for what the serializer cannot represent).
    """
    if serializer not in ("json", "msgpack", "pickle"):
        raise ValueError(f"serializer: expected 'json', 'msgpack' or 'pickle', got {serializer!r}")
    return serialize(obj, serializer, "value")


def decode_value(
    data: bytes | bytearray, serializer: str = "json", *, allow_pickle: bool = False
) -> Any:
    """The value in ``data``; FrameError if it does not decode, or if it is pickle not allowed."""
    if serializer not in ("json", "msgpack", "pickle"):
        raise ValueError(f"serializer: expected 'json', 'msgpack' or 'pickle', got {serializer!r}")
    if serializer == "pickle" and not allow_pickle:
        raise FrameError("pickle refused: pass allow_pickle=True only for data you trust")
    return deserialize(data, serializer)


# -- json -------------------------------------------------------------------------------------


def _refuse(obj: Any) -> Any:
    # orjson's default: anything it hands us goes to the standard library instead.
    raise TypeError(f"Type is not JSON serializable: {type(obj).__qualname__}")


def _std_default(obj: Any) -> Any:
    # What orjson writes natively, written the same way by the standard library.
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    raise TypeError(f"Object of type {type(obj).__qualname__} is not JSON serializable")


_STD_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=True, default=_std_default
)


def _orjson_options(orjson: Any) -> int:
    options: int = (
        orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )
    return options


def _json_dumps(obj: Any) -> bytes:
    orjson = orjson_module()
    if orjson is not None:
        try:
            data: bytes = orjson.dumps(obj, default=_refuse, option=_orjson_options(orjson))
            return data
        except TypeError:  # orjson.JSONEncodeError: fall back to the reference encoder
            pass
    return std_json_dumps(obj)


def std_json_dumps(obj: Any) -> bytes:
    """The reference json encoding (standard library only); orjson's output means the same."""
    text = _STD_ENCODER.encode(obj)
    if "NaN" in text or "Infinity" in text:
        # Maybe a non-finite float, maybe just a string holding the word: redo it the slow way.
        text = _STD_ENCODER.encode(_finite(obj))
    return text.encode("utf-8")


def _finite(obj: Any) -> Any:
    """A copy of the structure with non-finite floats replaced by None (written as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str | int) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    if isinstance(obj, Enum):
        return _finite(obj.value)
    return obj


# Digits and the minus sign map to "0", everything else to a space, so that a run of 20 shows
# an integer that may not fit orjson's 64-bit integers (20 digits, or "-" and 19): one search
# instead of one per sign (each search of a 20-byte needle costs as much as the translate). A
# run that is no such integer ("1234567890-123456789" in a string) only sends that payload to
# the reference decoder.
_DIGIT_TABLE = bytes(0x30 if 0x30 <= c <= 0x39 or c == 0x2D else 0x20 for c in range(256))
_LONG_NUMBER = b"0" * 20


def _json_loads(payload: bytes | bytearray) -> Any:
    orjson = orjson_module()
    if orjson is not None and _LONG_NUMBER not in payload.translate(_DIGIT_TABLE):
        try:
            return orjson.loads(payload)
        except ValueError:  # orjson.JSONDecodeError: let the reference decoder decide
            pass
    # Decoded strictly first: json.loads would decode bytes with "surrogatepass", turning
    # invalid UTF-8 (an encoded lone surrogate) into a str no encoder takes back.
    return json.loads(bytes(payload).decode(json.detect_encoding(payload)))
