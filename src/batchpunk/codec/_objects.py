"""How many objects a payload decodes to, counted before decoding it.

Bounding the decompressed bytes is not enough: one msgpack byte can become a 56-byte empty
list, so a 158-byte zstd frame of 3.5 million empty arrays decodes to 220 MiB of Python
objects. Every encoded object takes at least one byte, so a payload of at most ``max_objects``
bytes needs no count; a longer one is counted here, without building anything, and refused
past the limit. The count stops as soon as it passes the limit, so it costs at most
``max_objects`` steps whatever the payload holds.
"""

from __future__ import annotations

import re

from batchpunk.errors import FrameError

__all__ = ["DEFAULT_MAX_OBJECTS", "OBJECTS_PER_BYTE", "check_objects", "object_limit"]

#: Decoded objects (containers, strings, numbers, keys) any frame may hold by default: about
#: 70 MiB of Python objects at most.
DEFAULT_MAX_OBJECTS = 2**20
#: Beyond that, objects allowed per byte of the frame as received. An uncompressed payload
#: holds at most one object per byte, and honest data compresses far less than 16:1 in
#: objects, so only a frame that expands like a bomb is refused; memory stays within about
#: 70 bytes x 16 = 1.1 KiB per byte received.
OBJECTS_PER_BYTE = 16


def object_limit(max_objects: int | None, frame_size: int) -> int:
    """The object limit for a frame of ``frame_size`` bytes: ``max_objects`` when given."""
    if max_objects is not None:
        return max_objects
    return max(DEFAULT_MAX_OBJECTS, OBJECTS_PER_BYTE * frame_size)


# One JSON value or key per match: a string, the start of a container, or a bare literal. A
# string that never ends runs to the end of the data (possessively): scanning on from each
# unclosed quote in turn cost (quotes x length), minutes for a 1 KiB hostile frame.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)|[\[{]|[^\s,:\[\]{}"]+')

# msgpack markers followed by a fixed number of bytes (the marker included).
_FIXED = {
    0xC0: 1, 0xC1: 1, 0xC2: 1, 0xC3: 1,
    0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,
    0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18,
}  # fmt: skip
# Length-prefixed bodies: marker -> bytes of the length field (str, bin, ext).
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4}
# Containers with a length field: marker -> (bytes of the length field, objects per entry).
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def check_objects(raw: bytes | bytearray, serializer: str, max_objects: int) -> None:
    """FrameError when ``raw`` would decode to more than ``max_objects`` objects."""
    if len(raw) <= max_objects or serializer == "pickle":
        return  # each object takes at least one byte; pickle is for trusted data only
    if serializer == "json":
        count = _json_objects(bytes(raw), max_objects)
    elif serializer == "msgpack":
        count = _msgpack_objects(bytes(raw), max_objects)
    else:
        return
    if count > max_objects:
        raise FrameError(
            f"too many objects: the {serializer} payload holds more than {max_objects:,} "
            f"objects (max_objects); it would take far more memory than its {len(raw):,} bytes"
        )


def _json_objects(data: bytes, limit: int) -> int:
    containers = data.count(b"[") + data.count(b"{")
    if 2 * data.count(b",") + 3 * containers + 1 <= limit:
        return 0  # an upper bound, counted at C speed, already fits
    count = 0
    for _ in _JSON_TOKEN.finditer(data):
        count += 1
        if count > limit:
            break
    return count


def _msgpack_objects(data: bytes, limit: int) -> int:
    """Objects in one msgpack value (the payload is one list), walked without decoding."""
    size = len(data)
    pos = count = 0
    pending = 1
    while pending and pos < size:
        marker = data[pos]
        pending -= 1
        count += 1
        if count > limit:
            return count
        if marker <= 0x7F or marker >= 0xE0:
            pos += 1
        elif marker <= 0x8F:
            pending += 2 * (marker & 0x0F)
            pos += 1
        elif marker <= 0x9F:
            pending += marker & 0x0F
            pos += 1
        elif marker <= 0xBF:
            pos += 1 + (marker & 0x1F)
        elif marker in _FIXED:
            pos += _FIXED[marker]
        elif marker in _SIZED:
            width = _SIZED[marker]
            body = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            ext = 1 if marker in (0xC7, 0xC8, 0xC9) else 0
            pos += 1 + width + ext + body
        else:
            width, per_entry = _CONTAINERS[marker]
            pending += per_entry * int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
    return count
