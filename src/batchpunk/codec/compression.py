"""Compress payloads, and decompress them in bounded steps so that a bomb costs no memory.

Every decompressor here is driven as a stream that hands out at most ``CHUNK`` bytes per step
and stops as soon as the output would pass the size the frame header declared (which the frame
reader has already checked against ``max_size``). The output grows only as real bytes arrive,
so a header that lies costs nothing, and a payload that inflates past its declared size is
refused after at most one extra byte.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

from batchpunk.codec.options import LEVEL_RANGES
from batchpunk.errors import FrameError, require

__all__ = ["CHUNK", "INPUT_CHUNK", "compress", "decompress"]

#: Most bytes one decompression step may produce.
CHUNK = 256 * 1024
#: Compressed bytes handed to a decompressor at once, so that its copies of unconsumed input
#: stay small whatever the payload size.
INPUT_CHUNK = 64 * 1024

_GZIP_WBITS = 31  # zlib's deflate with a gzip header and trailer (mtime 0: deterministic)


def compress(data: bytes, compression: str, level: int | None) -> bytes:
    """``data`` compressed with the named algorithm at its own level (None = its default)."""
    if compression == "none":
        return data
    chosen = LEVEL_RANGES[compression][2] if level is None else level
    if compression == "zlib":
        return zlib.compress(data, chosen)
    if compression == "gzip":
        packer = zlib.compressobj(chosen, zlib.DEFLATED, _GZIP_WBITS)
        return packer.compress(data) + packer.flush()
    if compression == "zstd":
        zstandard = require("zstandard", "zstd", "zstd compression")
        # A fresh compressor per call: ZstdCompressor objects must not be shared between threads.
        out: bytes = zstandard.ZstdCompressor(level=chosen).compress(data)
        return out
    if compression == "lz4":
        lz4_frame = require("lz4.frame", "lz4", "lz4 compression")
        out = lz4_frame.compress(data, compression_level=chosen, store_size=True)
        return out
    raise ValueError(f"compression: unknown compression {compression!r}")


def decompress(payload: bytes | memoryview, compression: str, size: int) -> bytearray:
    """Exactly ``size`` bytes from ``payload``, or FrameError; never holds more than size + CHUNK.

    ``size`` is the uncompressed length declared by the frame header, already checked against
    the reader's max_size. Output beyond it, short output, trailing bytes and decoder errors
    are all FrameErrors.
    """
    if compression in ("zlib", "gzip"):
        out = _inflate(payload, compression, size)
    elif compression == "zstd":
        out = _unzstd(payload, size)
    elif compression == "lz4":
        out = _unlz4(payload, size)
    else:
        raise FrameError(f"unknown compression {compression!r}")
    if len(out) != size:
        raise FrameError(
            f"payload is truncated or corrupt: {compression} gave {len(out)} bytes, "
            f"the header declares {size}"
        )
    return out


def _too_much(compression: str, size: int) -> FrameError:
    return FrameError(
        f"too large: the {compression} payload decompresses to more than the {size} bytes "
        "its header declares (a decompression bomb or a forged header)"
    )


def _pieces(payload: bytes | memoryview) -> Iterator[tuple[memoryview, int]]:
    """The input in INPUT_CHUNK slices (no copies), each with the bytes left after it."""
    view = memoryview(payload)
    for start in range(0, len(view), INPUT_CHUNK):
        piece = view[start : start + INPUT_CHUNK]
        yield piece, len(view) - start - len(piece)


def _inflate(payload: bytes | memoryview, compression: str, size: int) -> bytearray:
    wbits = _GZIP_WBITS if compression == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    try:
        for piece, rest in _pieces(payload):
            pending: Any = piece
            while True:
                # max_length is at least 1: zlib reads 0 as "no limit".
                limit = min(CHUNK, size + 1 - len(out))
                chunk = inflater.decompress(pending, limit)
                out += chunk
                if len(out) > size:
                    raise _too_much(compression, size)
                if inflater.eof:
                    trailing = len(inflater.unused_data) + rest
                    if trailing:
                        raise FrameError(
                            f"payload has {trailing} bytes after the end of its {compression} "
                            "stream"
                        )
                    return out
                left = len(pending)
                pending = inflater.unconsumed_tail
                # Done with this piece once its input is used up and the output was not capped.
                if not pending and len(chunk) < limit:
                    break
                if not chunk and len(pending) == left:  # cannot happen with zlib; never spin
                    raise FrameError(f"payload does not decompress as {compression}: no progress")
    except zlib.error as exc:
        raise FrameError(f"payload does not decompress as {compression}: {exc}") from exc
    raise FrameError(f"payload is truncated: the {compression} stream does not end")


def _unzstd(payload: bytes | memoryview, size: int) -> bytearray:
    zstandard = require("zstandard", "zstd", "reading zstd frames")
    # Our frames carry their content size, so zstd never needs a window larger than the
    # payload; refusing bigger windows stops a forged frame from making the decoder allocate.
    window = max(1 << 20, 1 << max(size - 1, 1).bit_length())
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(
            payload, read_size=CHUNK, read_across_frames=True
        )
        with reader:
            while True:
                chunk = reader.read(min(CHUNK, size + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
                if len(out) > size:
                    raise _too_much("zstd", size)
    except zstandard.ZstdError as exc:
        raise FrameError(f"payload does not decompress as zstd: {exc}") from exc
    return out


def _unlz4(payload: bytes | memoryview, size: int) -> bytearray:
    lz4_frame = require("lz4.frame", "lz4", "reading lz4 frames")
    inflater = lz4_frame.LZ4FrameDecompressor()
    out = bytearray()
    try:
        for piece, rest in _pieces(payload):
            pending: Any = piece
            while True:
                chunk = inflater.decompress(pending, max_length=min(CHUNK, size + 1 - len(out)))
                pending = b""  # the decompressor keeps what it did not consume
                out += chunk
                if len(out) > size:
                    raise _too_much("lz4", size)
                if inflater.eof:
                    trailing = len(inflater.unused_data or b"") + rest
                    if trailing:
                        raise FrameError(
                            f"payload has {trailing} bytes after the end of its lz4 frame"
                        )
                    return out
                if inflater.needs_input:
                    break
                if not chunk:
                    raise FrameError(
                        "payload does not decompress as lz4: the decoder made no progress"
                    )
    except RuntimeError as exc:  # python-lz4 reports corrupt input as RuntimeError
        raise FrameError(f"payload does not decompress as lz4: {exc}") from exc
    raise FrameError("payload is truncated: the lz4 frame does not end")
