"""Generators for the hostile-input suite: pipeline files built from the real schema.

The schema is read from the code, not copied: the registries in ``batchpunk.pipeline_file``
(every connector ``type``), each class's constructor keywords, ``BatchConfig``'s fields and
``MetricsSpec``'s fields. A base section per connector type makes a valid file; a case then
replaces one or two keys with hostile values (wrong types, NaN, infinities, huge and negative
numbers, empty and unicode strings, reserved SQL words, environment references).
"""

from __future__ import annotations

import enum
import inspect
import json
import logging
import math
import string
import types
import typing
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from hypothesis import strategies as st

from batchpunk._identifiers import SQL_KEYWORDS
from batchpunk.config import BatchConfig
from batchpunk.pipeline_file import DEAD_LETTERS, SINKS, SOURCES, MetricsSpec, _hints, _import

#: Generated cases run, by kind; the suite prints them at the end of its module.
COUNTS: Counter[str] = Counter()

#: The environment variable every base section takes its credential from.
SECRET_VAR = "BP_HOSTILE_SECRET"
#: A variable whose name looks like a credential, never referenced: still masked everywhere.
NAMED_SECRET_VAR = "BP_HOSTILE_API_TOKEN"

# "@TMP@" becomes the case's own folder when the file is written.
BASES: dict[str, dict[str, dict[str, Any]]] = {
    "source": {
        "generator": {"count": 20},
        "http": {"port": 18080, "token": "${BP_HOSTILE_SECRET}"},
        "jsonl": {"path": "@TMP@/events.jsonl"},
        "rabbitmq": {"url": "amqp://guest:${BP_HOSTILE_SECRET}@127.0.0.1:5672/", "queue": "q"},
        "redis_streams": {
            "url": "redis://:${BP_HOSTILE_SECRET}@127.0.0.1:6379/0",
            "stream": "s",
            "group": "g",
            "consumer": "c",
        },
        "nats": {
            "servers": "nats://user:${BP_HOSTILE_SECRET}@127.0.0.1:4222",
            "stream": "S",
            "subject": "s.x",
            "durable": "d",
        },
    },
    "sink": {
        "sqlite": {"path": "@TMP@/out.db", "table": "events", "columns": ["id", "user", "amount"]},
        "jsonl": {"path": "@TMP@/out.jsonl"},
        "http": {
            "url": "https://user:${BP_HOSTILE_SECRET}@api.example:8443/in?token=${BP_HOSTILE_SECRET}",
            "headers": {"Authorization": "Bearer ${BP_HOSTILE_SECRET}"},
        },
        "rabbitmq": {
            "url": "amqps://guest:${BP_HOSTILE_SECRET}@127.0.0.1:5671/",
            "exchange": "",
            "routing_key": "k",
        },
        "redis_streams": {"url": "redis://:${BP_HOSTILE_SECRET}@127.0.0.1:6379/0", "stream": "s"},
        "nats": {"servers": ["nats://tok:${BP_HOSTILE_SECRET}@127.0.0.1:4222"], "subject": "s.x"},
        "postgres": {
            "dsn": "postgresql://app:${BP_HOSTILE_SECRET}@127.0.0.1:5432/t",
            "table": "e",
            "columns": ["id"],
        },
    },
    "dead_letter": {
        "memory": {},
        "jsonl": {"path": "@TMP@/dead.jsonl"},
        "sqlite": {"path": "@TMP@/dead.db"},
        "rabbitmq": {
            "url": "amqp://guest:${BP_HOSTILE_SECRET}@127.0.0.1:5672/",
            "exchange": "dlx",
            "routing_key": "dead",
        },
    },
}
REGISTRIES = {"source": SOURCES, "sink": SINKS, "dead_letter": DEAD_LETTERS}

#: Types `run` can start in a test without a server.
RUNNABLE = {"source": ("generator", "jsonl"), "sink": ("jsonl", "sqlite")}
RUNNABLE_DEAD = ("memory", "jsonl", "sqlite")
#: Keys whose legitimate values make a run last for ever (an endless or slow source, a port
#: on the shared machine): never mutated in cases that are run.
NOT_IN_RUNS = frozenset({"count", "rate", "follow", "poll_interval", "prometheus_port"})


def keys_of(section: str, kind: str | None) -> list[str]:
    """The keys a section accepts, read from the code."""
    if section == "batch":
        return [f.name for f in fields(BatchConfig) if f.name != "sizer"]
    if section == "metrics":
        return [f.name for f in fields(MetricsSpec)]
    assert kind is not None
    cls = _import(section, kind, REGISTRIES[section][kind])
    params = inspect.signature(cls).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# -- values -----------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -0.0, 5e-324, 1e-300, 0.5]),
    st.text(max_size=24),
    st.sampled_from(["", " ", "\t", "-", ":memory:", "..", "/", "\u00e9t\u00e9", "\U0001f600"]),
    st.sampled_from(sorted(SQL_KEYWORDS)),
    st.text(alphabet=string.punctuation, min_size=1, max_size=12),
    st.sampled_from(
        [
            "${BP_HOSTILE_SECRET}",
            "${BP_HOSTILE_NUMBER}",
            "${BP_HOSTILE_UNSET}",
            "${BP_HOSTILE_UNSET:-7}",
            "$$",
            "raise",
            "block",
            "builtins:dict",
            ":",
            ".x:Y",
            "os:system",
        ]
    ),
)
HOSTILE = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=8), _SCALARS, max_size=3),
)
#: Secrets with every punctuation character: what the environment may hand a pipeline file.
SECRETS = st.text(
    alphabet=string.ascii_letters + string.digits + string.punctuation, min_size=8, max_size=24
).filter(
    # a letter and one of ^`~| (no message or help text holds those), so that no output
    # happens to contain the secret by coincidence ("ression_" is in "compression_level")
    lambda s: any(c.isalpha() for c in s) and any(c in "^`~|" for c in s) and "${" not in s
)


def secret_forms(secret: str) -> set[str]:
    """The ways a secret could show in output: as is, quoted for URLs, escaped by repr/JSON."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe=""), repr(secret)[1:-1]}
    forms.add(json.dumps(secret)[1:-1])
    return {f for f in forms if len(f) >= 6}


def hint_of(section: str, kind: str | None, key: str) -> Any:
    """The annotation of a key, read from the class (or BatchConfig, MetricsSpec)."""
    if section == "batch":
        target: Any = BatchConfig
    elif section == "metrics":
        target = MetricsSpec
    elif kind is not None and kind in REGISTRIES[section]:
        target = _import(section, kind, REGISTRIES[section][kind])
    else:
        return None
    return _hints(target).get(key)


def typed(hint: Any) -> st.SearchStrategy[Any]:
    """Values of the annotated type, in range and out of it (NaN, huge, negative, reserved)."""
    if hint is None:
        return HOSTILE
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        options = [typed(a) for a in args if a is not type(None)]
        return st.one_of(*options) if options else HOSTILE
    if origin is typing.Literal:
        return st.sampled_from([*args, "bogus"])
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.one_of(
            st.integers(min_value=-3, max_value=100),
            st.sampled_from([0, -1, 2**63, 2**64, 10**30, -(2**63) - 1]),
        )
    if hint is float:
        return st.one_of(
            st.floats(min_value=-1, max_value=100),
            st.integers(min_value=0, max_value=100),
            st.sampled_from([math.nan, math.inf, -math.inf, 1e300, 1e-300, 0.0, 2e9]),
        )
    if hint is str:
        return st.one_of(
            st.sampled_from(["id", "user", "amount", "events", "FULL", "NORMAL", "", "-"]),
            st.sampled_from(sorted(SQL_KEYWORDS)),
            st.text(max_size=16),
        )
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from([*(m.value for m in hint), "bogus", "RAISE"])
    container = origin or hint
    if container in (list, tuple) or getattr(container, "__name__", "") in (
        "Sequence",
        "Collection",
        "Iterable",
    ):
        inner = typed(args[0]) if args else HOSTILE
        return st.lists(inner, max_size=4)
    return HOSTILE


@st.composite
def pipeline_cases(draw: st.DrawFn, *, runnable: bool = False) -> tuple[dict[str, Any], list]:
    """A pipeline file (as a dict) with one or two hostile keys, and which keys they were."""
    sections: dict[str, dict[str, Any]] = {}
    for section in ("source", "sink"):
        kinds = RUNNABLE[section] if runnable else sorted(BASES[section])
        kind = draw(st.sampled_from(kinds))
        sections[section] = {"type": kind, **BASES[section][kind]}
    dead_kinds = RUNNABLE_DEAD if runnable else sorted(BASES["dead_letter"])
    dead = draw(st.none() | st.sampled_from(dead_kinds))
    if dead is not None:
        sections["dead_letter"] = {"type": dead, **BASES["dead_letter"][dead]}
    sections["batch"] = {"max_wait": 0.05}
    sections["metrics"] = {"live": False}
    kinds = {name: table.get("type") for name, table in sections.items()}
    mutated: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        section = draw(st.sampled_from(sorted(sections)))
        kind = kinds.get(section)
        choices = keys_of(section, kind) + ["type"] * (kind is not None)
        if runnable:
            choices = [k for k in choices if k not in NOT_IN_RUNS and k != "type"]
        unknown = st.text(min_size=1, max_size=10)
        if runnable:  # unknown keys are the validate property's business; runs need valid files
            if not choices:
                continue
            key = draw(st.sampled_from(choices))
        else:
            key = draw(st.sampled_from(choices) | unknown if choices else unknown)
        if runnable and key in NOT_IN_RUNS:
            continue
        fitting = typed(hint_of(section, kind, key))
        values = st.one_of(fitting, fitting, fitting, HOSTILE) if runnable else fitting | HOSTILE
        sections[section][key] = draw(values)
        mutated.append((section, key))
    return sections, mutated


# -- TOML -------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A TOML literal (tomllib reads it back; no writer ships with the standard library)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        out = []
        for char in value:
            if char in '"\\':
                out.append("\\" + char)
            elif ord(char) < 0x20 or ord(char) == 0x7F:
                out.append(f"\\u{ord(char):04x}")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items())
            + "}"
        )
    raise TypeError(f"no TOML for {value!r}")


def write_pipeline(sections: Mapping[str, Mapping[str, Any]], folder: Path) -> Path:
    """The sections as a TOML file in ``folder`` (base paths pointed at the folder)."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        for key, value in table.items():
            if isinstance(value, str):
                value = value.replace("@TMP@", str(folder))
            elif isinstance(value, list):
                value = [
                    v.replace("@TMP@", str(folder)) if isinstance(v, str) else v for v in value
                ]
            lines.append(f"{toml_value(str(key))} = {toml_value(value)}")
        lines.append("")
    path = folder / "pipeline.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    (folder / "events.jsonl").write_text(
        "".join(json.dumps({"id": i, "user": f"u{i}", "amount": i}) + "\n" for i in range(20)),
        encoding="utf-8",
    )
    return path


@contextmanager
def kept_logging() -> Iterator[None]:
    """The command replaces the root logger's handlers: put them back after each case."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pipeline_level = logging.getLogger("batchpunk.pipeline").level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("batchpunk.pipeline").setLevel(pipeline_level)
