"""The setting checks every broker connector shares (connectors/_toolkit.py).

Kafka, Redis Streams, SQS and NATS call these for their integer and named-choice settings, so
one wording reaches the user whichever connector they configure.
"""

from __future__ import annotations

import pytest

from batchpunk.connectors._toolkit import choice_option, int_option
from batchpunk.connectors.kafka import KafkaSource
from batchpunk.connectors.sqs import SqsSource
from batchpunk.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "low", "high", "words"),
    [
        (0, 1, None, "X.n: expected an integer >= 1, got 0"),
        (True, 0, None, "X.n: expected an integer >= 0, got True"),
        (21, 0, 20, "X.n: expected an integer from 0 to 20, got 21"),
        ("5", 1, None, "X.n: expected an integer >= 1, got '5'"),
    ],
)
def test_int_option_refuses_bools_and_out_of_range_values_naming_the_field(
    value: object, low: int, high: int | None, words: str
) -> None:
    """A bool is never a count, and the message names the owner, field, range and value."""
    with pytest.raises(ConfigError) as caught:
        int_option("X", "n", value, low, high)
    assert str(caught.value) == words


def test_choice_option_lists_every_choice() -> None:
    """An unknown choice names all the allowed ones; a known one comes back as given."""
    assert choice_option("X", "decode", "json", ("json", "text")) == "json"
    with pytest.raises(
        ConfigError, match=r"X.decode: expected one of \('json', 'text'\), got 'xml'"
    ):
        choice_option("X", "decode", "xml", ("json", "text"))


def test_connectors_word_a_bad_count_and_decode_alike() -> None:
    """Kafka and SQS, built on the shared checks, refuse the same mistakes in the same words."""
    for make in (
        lambda **kw: KafkaSource("localhost:9092", "t", "g", **kw),
        lambda **kw: SqsSource("https://sqs.example/1/q", **kw),
    ):
        with pytest.raises(ConfigError, match=r"\.count: expected an integer >= 1, got 0"):
            make(count=0)
        with pytest.raises(ConfigError, match=r"\.decode: expected one of \("):
            make(decode="xml")
