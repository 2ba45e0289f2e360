"""The codec: batches and dead letters to checked, optionally signed and compressed frames.

Safe by default: json unless the caller asks otherwise, pickle read only with
``allow_pickle=True``, every frame checksummed, and every decoder bounded by ``max_size`` so a
decompression bomb costs no memory. Importing this package imports no optional dependency;
msgspec, zstandard and lz4 load on first use and fail with the pip command when missing.

    >>> from batchpunk.codec import decode_batch, encode_batch
    >>> frame = encode_batch([{"id": 1}, {"id": 2}], compression="zlib", hmac_key=b"secret")
    >>> decode_batch(frame, hmac_key=b"secret")
    [{'id': 1}, {'id': 2}]

See docs/FORMAT.md for the byte layout and for which serializer and compression to choose.
"""

from __future__ import annotations

from batchpunk.codec.frame import (
    DEFAULT_MAX_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    SIGNATURE_SIZE,
    Codec,
    FrameInfo,
    decode_batch,
    encode_batch,
    read_header,
)
from batchpunk.codec.options import COMPRESSIONS, LEVEL_RANGES, SERIALIZERS, validate_options
from batchpunk.codec.serializers import decode_value, encode_value
from batchpunk.errors import FrameError

__all__ = [
    # frames
    "encode_batch",
    "decode_batch",
    "read_header",
    "Codec",
    "FrameInfo",
    "FrameError",
    # single values, without a frame
    "encode_value",
    "decode_value",
    # options
    "validate_options",
    "SERIALIZERS",
    "COMPRESSIONS",
    "LEVEL_RANGES",
    # format constants
    "MAGIC",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "SIGNATURE_SIZE",
    "DEFAULT_MAX_SIZE",
]
