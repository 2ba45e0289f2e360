"""Sources and sinks, one module per broker or store, each importing its client lazily.

Importing this package costs nothing: a connector's module (and its optional dependency) loads
on first use of its name, and a missing dependency fails with the pip command to run.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "GeneratorSource": "generator",
    "JsonlSource": "jsonl",
    "JsonlSink": "jsonl",
    "SqliteSink": "sqlite",
    "HttpSink": "http",
    "RabbitMQSource": "rabbitmq",
    "RabbitMQSink": "rabbitmq",
    "RedisStreamSource": "redis_streams",
    "RedisStreamSink": "redis_streams",
    "NatsJetStreamSource": "nats",
    "NatsJetStreamSink": "nats",
    "PostgresSink": "postgres",
    "KafkaSource": "kafka",
    "KafkaSink": "kafka",
    "SqsSource": "sqs",
    "SqsSink": "sqs",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'batchpunk.connectors' has no attribute {name!r}")
    return getattr(importlib.import_module(f"batchpunk.connectors.{module}"), name)


def __dir__() -> list[str]:
    return __all__
