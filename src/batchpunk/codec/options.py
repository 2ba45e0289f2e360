"""Which serializers and compressors exist, their frame ids, and the levels each accepts.

Pure constants and checks, importing nothing optional: BatchConfig validates its codec fields
with :func:`validate_options` at construction, on a machine that may lack zstandard or lz4.
Whether an optional library is installed is checked only when a frame is encoded or decoded.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "COMPRESSIONS",
    "COMPRESSION_IDS",
    "LEVEL_RANGES",
    "SERIALIZERS",
    "SERIALIZER_IDS",
    "validate_hmac_key",
    "validate_options",
]

#: Serializer name -> the id stored in the frame header. Ids are forever: never reuse one.
SERIALIZER_IDS: dict[str, int] = {"json": 1, "msgpack": 2, "pickle": 3}
#: Compression name -> the id stored in the frame header. Ids are forever: never reuse one.
COMPRESSION_IDS: dict[str, int] = {"none": 0, "zlib": 1, "gzip": 2, "zstd": 3, "lz4": 4}

SERIALIZERS: tuple[str, ...] = tuple(SERIALIZER_IDS)
COMPRESSIONS: tuple[str, ...] = tuple(COMPRESSION_IDS)

#: Inclusive level range of each algorithm, in the algorithm's own units, and its default.
#: zlib/gzip: -1 is zlib's default (6). zstd: negative levels are its fast modes, 20-22 its
#: "ultra" levels; libzstd's minimum is -(1 << 17). lz4: 0-2 fast mode, 3-16 high compression.
LEVEL_RANGES: dict[str, tuple[int, int, int]] = {
    "zlib": (-1, 9, -1),
    "gzip": (-1, 9, -1),
    "zstd": (-(1 << 17), 22, 3),
    "lz4": (0, 16, 0),
}


def validate_options(
    serializer: str,
    compression: str,
    level: int | None,
    *,
    level_name: str = "compression_level",
) -> None:
    """Fail early, with a ValueError naming the field, on a codec setting no frame could use.

    BatchConfig calls this when it is built so that a typo fails at start-up, not at the first
    ``Batch.encode()``. ``level_name`` is the field name used in the message (``encode_batch``
    passes "level", its own keyword).
    """
    if not isinstance(serializer, str) or serializer not in SERIALIZER_IDS:
        raise ValueError(f"serializer: expected one of {_names(SERIALIZERS)}, got {serializer!r}")
    if not isinstance(compression, str) or compression not in COMPRESSION_IDS:
        raise ValueError(
            f"compression: expected one of {_names(COMPRESSIONS)}, got {compression!r}"
        )
    if level is None:
        return
    if not isinstance(level, int) or isinstance(level, bool):
        raise ValueError(f"{level_name}: expected an integer or None, got {level!r}")
    if compression == "none":
        raise ValueError(f"{level_name}: must be None when compression is 'none', got {level!r}")
    low, high, default = LEVEL_RANGES[compression]
    if not low <= level <= high:
        raise ValueError(
            f"{level_name}: {level} is out of range ({compression} accepts {low}..{high}); "
            f"None means {compression}'s default, {default}"
        )


def validate_hmac_key(key: Any, name: str = "hmac_key") -> bytes | None:
    """The key as bytes (a str is UTF-8 encoded), or None; reject empty keys and other types.

    An empty key would sign frames with a secret everyone knows, so it is refused rather than
    treated as "no key".
    """
    if key is None:
        return None
    if isinstance(key, str):
        out = key.encode("utf-8")
    elif isinstance(key, bytes | bytearray | memoryview):
        out = bytes(key)
    else:
        raise ValueError(f"{name}: expected bytes, str or None, got {type(key).__name__}")
    if not out:
        raise ValueError(f"{name}: must not be empty (pass None to sign nothing)")
    return out


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(repr(n) for n in names)
