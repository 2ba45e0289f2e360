"""batchpunk: fast, lossless asyncio batch processing.

Accumulate messages into batches, flush them on size, byte or time triggers, run them
concurrently with retries and poison isolation, and dead-letter what finally fails: every
accepted message ends processed or dead-lettered, never lost.
"""

from batchpunk.batch import Batch
from batchpunk.config import BatchConfig, BatchTrigger, OverflowPolicy
from batchpunk.deadletter import DeadLetter
from batchpunk.errors import (
    BatchpunkError,
    BatchTimeout,
    BufferFull,
    DownstreamUnavailable,
    MessageExpired,
    PartialFailure,
    ProcessorClosed,
    ResultMismatch,
)
from batchpunk.processor import BatchProcessor, ReplayReport
from batchpunk.spool import Spool

__version__ = "0.1.0"

__all__ = [
    "BatchProcessor",
    "BatchConfig",
    "BatchTrigger",
    "OverflowPolicy",
    "Batch",
    "DeadLetter",
    "PartialFailure",
    "ReplayReport",
    "Spool",
    "BatchpunkError",
    "BufferFull",
    "ProcessorClosed",
    "BatchTimeout",
    "MessageExpired",
    "ResultMismatch",
    "DownstreamUnavailable",
]
