"""The batchpunk frame: a fixed header that says how the payload was made, then the payload.

Layout of version 1 (little-endian; docs/FORMAT.md has the full account and a hexdump)::

    offset  size  field
    0       4     magic 89 42 50 4B ("\\x89BPK")
    4       1     version (1)
    5       1     serializer id (1 json, 2 msgpack, 3 pickle)
    6       1     compression id (0 none, 1 zlib, 2 gzip, 3 zstd, 4 lz4)
    7       1     flags (bit 0: signed; bits 1-7 reserved, must be 0)
    8       8     raw size: serialized payload length before compression
    16      8     payload size: bytes of payload stored after the header (and signature)
    24      4     crc32 of bytes 0-23 followed by the stored payload
    28      32    HMAC-SHA256 of bytes 0-27 followed by the payload (only when signed)
    28|60   ...   payload

A reader never guesses: the header names the serializer and the compression, and every check
runs in a fixed order (see :func:`decode_batch`) so each bad input gets one precise FrameError.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from batchpunk.codec._objects import DEFAULT_MAX_OBJECTS, check_objects, object_limit
from batchpunk.codec.compression import compress, decompress
from batchpunk.codec.options import (
    COMPRESSION_IDS,
    SERIALIZER_IDS,
    validate_hmac_key,
    validate_options,
)
from batchpunk.codec.serializers import deserialize, serialize
from batchpunk.errors import FrameError

if TYPE_CHECKING:
    from batchpunk.config import BatchConfig

__all__ = [
    "DEFAULT_MAX_OBJECTS",
    "DEFAULT_MAX_SIZE",
    "FLAG_SIGNED",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "SIGNATURE_SIZE",
    "Codec",
    "FrameInfo",
    "decode_batch",
    "encode_batch",
    "read_header",
]

MAGIC = b"\x89BPK"
FORMAT_VERSION = 1
FLAG_SIGNED = 0x01
DEFAULT_MAX_SIZE = 64 * 2**20

_PREFIX = struct.Struct("<4sBBBBQQ")  # everything the checksum protects, before the crc itself
HEADER_SIZE = _PREFIX.size + 4
SIGNATURE_SIZE = hashlib.sha256().digest_size

_SERIALIZER_NAMES = {v: k for k, v in SERIALIZER_IDS.items()}
_COMPRESSION_NAMES = {v: k for k, v in COMPRESSION_IDS.items()}


class FrameInfo(NamedTuple):
    """What a frame header says, read without touching the payload (for tools and logs)."""

    #: format version of the frame.
    version: int
    #: serializer name: "json", "msgpack" or "pickle".
    serializer: str
    #: compression actually applied: "none" when the payload was under the threshold.
    compression: str
    #: True when an HMAC-SHA256 signature follows the header.
    signed: bool
    #: length of the serialized payload before compression.
    raw_size: int
    #: length of the payload as stored.
    payload_size: int
    #: crc32 stored in the header.
    checksum: int
    #: total length of the frame in bytes.
    frame_size: int


def encode_batch(
    messages: Sequence[Any],
    *,
    serializer: str = "json",
    compression: str = "zlib",
    level: int | None = None,
    threshold: int = 1024,
    hmac_key: bytes | str | None = None,
) -> bytes:
    """One frame holding ``messages``, ready for a broker, a file or a socket.

    Choose json for interoperability, msgpack (the ``msgpack`` extra) for speed, bytes and exact
    non-finite floats; pickle only between processes that trust each other. Compression applies
    only to payloads larger than ``threshold`` bytes, where it pays; the header records what
    was applied. Give ``hmac_key`` when the reader must know who wrote the frame.

    Raises ValueError for a bad option (naming it), TypeError for a message the serializer
    cannot represent, MissingDependency when msgpack, zstd or lz4 is not installed.
    """
    validate_options(serializer, compression, level, level_name="level")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
        raise ValueError(f"threshold: expected an integer >= 0, got {threshold!r}")
    key = validate_hmac_key(hmac_key)
    if isinstance(messages, str | bytes | bytearray | memoryview | dict) or not isinstance(
        messages, Sequence
    ):
        raise TypeError(
            f"messages: expected a sequence (list or tuple) of messages, "
            f"got {type(messages).__name__}"
        )
    raw = serialize(messages if type(messages) is list else list(messages), serializer)
    if compression != "none" and len(raw) > threshold:
        payload = compress(raw, compression, level)
    else:
        payload, compression = raw, "none"
    flags = FLAG_SIGNED if key is not None else 0
    prefix = _PREFIX.pack(
        MAGIC,
        FORMAT_VERSION,
        SERIALIZER_IDS[serializer],
        COMPRESSION_IDS[compression],
        flags,
        len(raw),
        len(payload),
    )
    header = prefix + struct.pack("<I", zlib.crc32(payload, zlib.crc32(prefix)))
    if key is None:
        return header + payload
    return b"".join((header, _sign(key, header, payload), payload))


def decode_batch(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    hmac_key: bytes | str | None = None,
    allow_pickle: bool = False,
    max_objects: int | None = None,
) -> list[Any]:
    """The messages of one frame, after every check; FrameError says which check failed.

    Checks, in order: magic, version, header length, flags, serializer and compression ids,
    frame length (truncated or trailing bytes), crc32, signature presence (a key needs a signed
    frame, a signed frame needs a key), signature value (constant-time), pickle policy, declared
    size against ``max_size``, bounded decompression, decoded objects against ``max_objects``
    (so memory is bounded too, not only bytes), deserialization to a list.
    """
    if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
        raise ValueError(f"max_size: expected an integer >= 1, got {max_size!r}")
    if max_objects is not None and (
        not isinstance(max_objects, int) or isinstance(max_objects, bool) or max_objects < 1
    ):
        raise ValueError(f"max_objects: expected an integer >= 1 or None, got {max_objects!r}")
    if not isinstance(allow_pickle, bool):
        raise ValueError(f"allow_pickle: expected True or False, got {allow_pickle!r}")
    key = validate_hmac_key(hmac_key)
    view = _view(data)
    info = _parse(view)
    offset = HEADER_SIZE + (SIGNATURE_SIZE if info.signed else 0)
    payload = view[offset:]
    actual = zlib.crc32(payload, zlib.crc32(view[: _PREFIX.size]))
    if actual != info.checksum:
        raise FrameError(
            f"checksum mismatch: the header says crc32 0x{info.checksum:08x}, the frame hashes "
            f"to 0x{actual:08x} (corrupted in transit or storage)"
        )
    if key is not None and not info.signed:
        raise FrameError(
            "signature missing: an hmac_key was given but the frame is not signed "
            "(refusing unauthenticated data)"
        )
    if key is None and info.signed:
        raise FrameError("signature present but no hmac_key was given to verify it")
    if key is not None:
        expected = _sign(key, view[:HEADER_SIZE], payload)
        if not hmac.compare_digest(expected, view[HEADER_SIZE:offset]):
            raise FrameError(
                "signature wrong: HMAC-SHA256 does not match (a different hmac_key, "
                "or the frame was altered)"
            )
    if info.serializer == "pickle" and not allow_pickle:
        raise FrameError(
            "pickle refused: the payload is pickle, which runs code while loading; "
            "pass allow_pickle=True only for frames from a writer you trust"
        )
    if info.raw_size > max_size:
        raise FrameError(
            f"too large: the frame declares {info.raw_size} bytes of payload, "
            f"max_size is {max_size}"
        )
    if info.compression == "none":
        raw: bytes | bytearray = bytes(payload)
    else:
        raw = decompress(payload, info.compression, info.raw_size)
    check_objects(raw, info.serializer, object_limit(max_objects, len(view)))
    messages = deserialize(raw, info.serializer)
    if type(messages) is not list:
        raise FrameError(
            f"payload does not decode to a list of messages (got {type(messages).__name__})"
        )
    return messages


def read_header(data: bytes | bytearray | memoryview) -> FrameInfo:
    """The header of a complete frame, checked for shape but not for checksum or signature.

    For tools that show what a stored frame holds (``batchpunk dlq`` and logs) without
    decoding it; use :func:`decode_batch` to trust it.
    """
    return _parse(_view(data))


def _view(data: Any) -> memoryview:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data: expected bytes, bytearray or memoryview, got {type(data).__name__}")
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _parse(view: memoryview) -> FrameInfo:
    size = len(view)
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC:
        if size < len(MAGIC) and MAGIC.startswith(head):
            raise FrameError(f"truncated: {size} bytes, a frame header needs {HEADER_SIZE}")
        raise FrameError(
            f"not a batchpunk frame: expected magic bytes {MAGIC.hex(' ')}, "
            f"got {head.hex(' ') or 'nothing'}"
        )
    if size <= len(MAGIC):
        raise FrameError(f"truncated: {size} bytes, a frame header needs {HEADER_SIZE}")
    if view[4] != FORMAT_VERSION:
        raise FrameError(
            f"unsupported frame version {view[4]}: this batchpunk reads version {FORMAT_VERSION}"
        )
    if size < HEADER_SIZE:
        raise FrameError(f"truncated: {size} bytes, a frame header needs {HEADER_SIZE}")
    _, version, serializer_id, compression_id, flags, raw_size, payload_size = _PREFIX.unpack(
        view[: _PREFIX.size]
    )
    (checksum,) = struct.unpack("<I", view[_PREFIX.size : HEADER_SIZE])
    if flags & ~FLAG_SIGNED:
        raise FrameError(
            f"unknown flags 0x{flags:02x} in the frame header "
            f"(version {FORMAT_VERSION} defines only 0x01, signed)"
        )
    serializer = _SERIALIZER_NAMES.get(serializer_id)
    if serializer is None:
        known = ", ".join(f"{i} {n}" for i, n in _SERIALIZER_NAMES.items())
        raise FrameError(f"unknown serializer id {serializer_id} in the header (known: {known})")
    compression = _COMPRESSION_NAMES.get(compression_id)
    if compression is None:
        known = ", ".join(f"{i} {n}" for i, n in _COMPRESSION_NAMES.items())
        raise FrameError(f"unknown compression id {compression_id} in the header (known: {known})")
    if compression == "none" and raw_size != payload_size:
        raise FrameError(
            f"inconsistent header: an uncompressed payload of {payload_size} bytes "
            f"cannot have a raw size of {raw_size}"
        )
    signed = bool(flags & FLAG_SIGNED)
    frame_size = HEADER_SIZE + (SIGNATURE_SIZE if signed else 0) + payload_size
    if size < frame_size:
        raise FrameError(
            f"truncated: the frame needs {frame_size} bytes (header {HEADER_SIZE}"
            f"{f' + signature {SIGNATURE_SIZE}' if signed else ''} + payload {payload_size}), "
            f"got {size}"
        )
    if size > frame_size:
        raise FrameError(
            f"{size - frame_size} unexpected bytes after the end of the frame "
            f"(the frame is {frame_size} bytes, got {size})"
        )
    return FrameInfo(
        version=version,
        serializer=serializer,
        compression=compression,
        signed=signed,
        raw_size=raw_size,
        payload_size=payload_size,
        checksum=checksum,
        frame_size=frame_size,
    )


def _sign(key: bytes, header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(payload)
    return mac.digest()


@dataclass(frozen=True, slots=True)
class Codec:
    """Codec settings bundled once, for code that encodes and decodes many batches alike.

    The DESIGN's Codec seam (``encode(messages) -> bytes``, ``decode(data) -> list``); build it
    from a processor's settings with :meth:`from_config`. Options are validated at construction.

    Attributes:
        serializer: "json", "msgpack" or "pickle".
        compression: "none", "zlib", "gzip", "zstd" or "lz4".
        level: the algorithm's own level; None for its default.
        threshold: payloads of at most this many bytes are stored uncompressed.
        max_size: decode refuses frames whose payload would exceed this many bytes.
        max_objects: decode refuses frames that would decode to more objects than this; None
            for the default, max(DEFAULT_MAX_OBJECTS, 16 per byte of the frame).
        hmac_key: sign on encode and require a valid signature on decode.
        allow_pickle: decode accepts pickle frames (only for a writer you trust).
    """

    serializer: str = "json"
    compression: str = "zlib"
    level: int | None = None
    threshold: int = 1024
    max_size: int = DEFAULT_MAX_SIZE
    hmac_key: bytes | None = field(default=None, repr=False)
    allow_pickle: bool = False
    max_objects: int | None = None

    def __post_init__(self) -> None:
        validate_options(self.serializer, self.compression, self.level, level_name="level")
        if not isinstance(self.threshold, int) or isinstance(self.threshold, bool):
            raise ValueError(f"threshold: expected an integer >= 0, got {self.threshold!r}")
        if self.threshold < 0:
            raise ValueError(f"threshold: expected an integer >= 0, got {self.threshold!r}")
        if not isinstance(self.max_size, int) or isinstance(self.max_size, bool):
            raise ValueError(f"max_size: expected an integer >= 1, got {self.max_size!r}")
        if self.max_size < 1:
            raise ValueError(f"max_size: expected an integer >= 1, got {self.max_size!r}")
        if not isinstance(self.allow_pickle, bool):
            raise ValueError(f"allow_pickle: expected True or False, got {self.allow_pickle!r}")
        object.__setattr__(self, "hmac_key", validate_hmac_key(self.hmac_key))

    @classmethod
    def from_config(cls, config: BatchConfig, **overrides: Any) -> Codec:
        """The codec a processor with this config uses for ``Batch.encode()``."""
        settings: dict[str, Any] = {
            "serializer": config.serializer,
            "compression": config.compression,
            "level": config.compression_level,
            "threshold": config.compression_threshold,
        }
        settings.update(overrides)
        return cls(**settings)

    def encode(self, messages: Sequence[Any]) -> bytes:
        """One frame holding ``messages``; see :func:`encode_batch`."""
        return encode_batch(
            messages,
            serializer=self.serializer,
            compression=self.compression,
            level=self.level,
            threshold=self.threshold,
            hmac_key=self.hmac_key,
        )

    def decode(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """The messages of one frame; see :func:`decode_batch`."""
        return decode_batch(
            data,
            max_size=self.max_size,
            hmac_key=self.hmac_key,
            allow_pickle=self.allow_pickle,
            max_objects=self.max_objects,
        )
