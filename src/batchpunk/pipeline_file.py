"""Pipeline files: a TOML description of a source, a sink, batching, dead letters and metrics.

A wrong file fails here, before anything connects, with a ConfigError naming the section, the
key and what was expected. Values may come from the environment (``${NAME}``, or
``${NAME:-default}``); such values are treated as secrets: they never appear in an error
message, in ``describe()``, or (through ``PipelineSpec.redact``) in the command's output.

Connectors are found through a registry mapping a ``type`` name to a lazily imported class; the
keys a section accepts are the keyword parameters of that class's constructor, read from its
signature, so a new connector needs no code here beyond its registry line. ``type`` may also be
``"package.module:ClassName"`` for a connector of your own.
"""

from __future__ import annotations

import builtins
import difflib
import enum
import importlib
import inspect
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from batchpunk.config import PIPELINE_CIRCUIT_BREAKER, BatchConfig
from batchpunk.connectors._common import mask_secrets
from batchpunk.errors import ConfigError

if typing.TYPE_CHECKING:
    from batchpunk.pipeline import Pipeline

__all__ = [
    "SOURCES",
    "SINKS",
    "DEAD_LETTERS",
    "SECTIONS",
    "ConnectorSpec",
    "MetricsSpec",
    "PipelineSpec",
    "load_pipeline",
    "parse_pipeline",
]

#: Source ``type`` names and where their classes live (imported only when used).
SOURCES: dict[str, str] = {
    "generator": "batchpunk.connectors.generator:GeneratorSource",
    "jsonl": "batchpunk.connectors.jsonl:JsonlSource",
    "rabbitmq": "batchpunk.connectors.rabbitmq:RabbitMQSource",
    "redis_streams": "batchpunk.connectors.redis_streams:RedisStreamSource",
    "nats": "batchpunk.connectors.nats:NatsJetStreamSource",
    "http": "batchpunk.connectors.http_source:HttpSource",
}

#: Sink ``type`` names and where their classes live.
SINKS: dict[str, str] = {
    "sqlite": "batchpunk.connectors.sqlite:SqliteSink",
    "jsonl": "batchpunk.connectors.jsonl:JsonlSink",
    "http": "batchpunk.connectors.http:HttpSink",
    "rabbitmq": "batchpunk.connectors.rabbitmq:RabbitMQSink",
    "redis_streams": "batchpunk.connectors.redis_streams:RedisStreamSink",
    "nats": "batchpunk.connectors.nats:NatsJetStreamSink",
    "postgres": "batchpunk.connectors.postgres:PostgresSink",
}

#: Dead-letter sink ``type`` names and where their classes live.
DEAD_LETTERS: dict[str, str] = {
    "memory": "batchpunk.deadletter:MemoryDeadLetters",
    "jsonl": "batchpunk.deadletter:JsonlDeadLetters",
    "sqlite": "batchpunk.deadletter:SqliteDeadLetters",
    "rabbitmq": "batchpunk.connectors.rabbitmq:RabbitMQDeadLetters",
}

#: The sections a pipeline file may have; [source] and [sink] are required.
SECTIONS = ("source", "batch", "sink", "dead_letter", "metrics", "spool")

_REGISTRIES = {"source": SOURCES, "sink": SINKS, "dead_letter": DEAD_LETTERS}
_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_UNKNOWN = object()


@dataclass(frozen=True)
class MetricsSpec:
    """The [metrics] section: what ``batchpunk run`` exposes while the pipeline runs.

    Attributes:
        prometheus_port: serve /metrics and /stats on this port (0 picks a free one); None for
            no endpoint.
        prometheus_host: the address to bind; keep 127.0.0.1 unless a remote scraper needs it
            (the endpoint has no authentication).
        live: draw the live terminal view (plain lines when the output is not a terminal).
        refresh_per_second: redraws of the live view per second.
        token: when set, the metrics server (and its status page) asks for
            ``Authorization: Bearer <token>``; write it as ``${METRICS_TOKEN}``.
    """

    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    live: bool = True
    refresh_per_second: float = 4.0
    token: str | None = None

    def __post_init__(self) -> None:
        port = self.prometheus_port
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"[metrics] prometheus_port: expected 0..65535, got {port}")
        if self.refresh_per_second <= 0:
            raise ConfigError(
                f"[metrics] refresh_per_second: expected > 0, got {self.refresh_per_second}"
            )


@dataclass(frozen=True)
class ConnectorSpec:
    """One connector section, checked against its class: ``build()`` makes the object.

    Attributes:
        section: "source", "sink" or "dead_letter".
        kind: the ``type`` written in the file.
        cls: the connector class.
        kwargs: the constructor keywords, after environment substitution and type checks.
    """

    section: str
    kind: str
    cls: type
    kwargs: Mapping[str, Any]
    secrets: frozenset[str] = field(default=frozenset(), repr=False)

    def build(self) -> Any:
        """A new connector object; a constructor error becomes a ConfigError naming the section."""
        try:
            return self.cls(**self.kwargs)
        except ConfigError as exc:
            raise ConfigError(
                mask_secrets(f"[{self.section}] {_strip_section(str(exc))}", self.secrets)
            ) from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                mask_secrets(f"[{self.section}] type {self.kind!r}: {exc}", self.secrets)
            ) from None

    def describe(self) -> dict[str, Any]:
        """The section as written, with secrets and URL passwords masked."""
        out: dict[str, Any] = {"type": self.kind}
        for key, value in self.kwargs.items():
            out[key] = _masked(value, self.secrets)
        return out


@dataclass(frozen=True)
class PipelineSpec:
    """A checked pipeline file: everything needed to build a Pipeline, nothing started yet.

    Attributes:
        path: where it was read from ("<string>" for text).
        source, sink: the connector sections.
        batch: the [batch] section as a BatchConfig.
        dead_letter: the [dead_letter] section, or None (letters kept in memory).
        metrics: the [metrics] section.
        secrets: values that came from the environment; ``redact`` masks them in any text.
    """

    path: str
    source: ConnectorSpec
    sink: ConnectorSpec
    batch: BatchConfig
    dead_letter: ConnectorSpec | None
    metrics: MetricsSpec
    secrets: frozenset[str] = field(default=frozenset(), repr=False)
    #: The [spool] section's keywords for batchpunk.Spool, or None (docs/spool.md).
    spool: Mapping[str, Any] | None = None

    def build(self, *, metrics_collector: object | None = None) -> Pipeline:
        """A new Pipeline with fresh connectors, ready to ``run()``."""
        from batchpunk.pipeline import Pipeline
        from batchpunk.spool import Spool

        return Pipeline(
            self.source.build(),
            self.sink.build(),
            self.batch,
            dead_letter=self.build_dead_letter(),
            metrics_collector=metrics_collector,
            spool=Spool(**self.spool) if self.spool is not None else None,
        )

    def build_dead_letter(self) -> Any:
        """The [dead_letter] sink, or None when the section is absent."""
        return self.dead_letter.build() if self.dead_letter is not None else None

    def redact(self, text: str) -> str:
        """``text`` with every environment-supplied value and URL password masked."""
        return mask_secrets(text, self.secrets)

    def describe(self) -> dict[str, Any]:
        """The whole file, resolved and masked: what ``batchpunk validate`` prints."""
        batch = self.batch.to_dict()
        return {
            "source": self.source.describe(),
            "batch": {k: _masked(v, self.secrets) for k, v in batch.items()},
            "sink": self.sink.describe(),
            "dead_letter": self.dead_letter.describe() if self.dead_letter else {"type": None},
            "metrics": {f.name: getattr(self.metrics, f.name) for f in fields(MetricsSpec)},
        }


def load_pipeline(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> PipelineSpec:
    """Read and check a pipeline file; ConfigError (naming section and key) if it is wrong."""
    name = str(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such pipeline file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read the pipeline file: {exc}") from None
    return parse_pipeline(text, path=name, environ=environ)


def parse_pipeline(
    text: str | Mapping[str, Any],
    *,
    path: str = "<string>",
    environ: Mapping[str, str] | None = None,
) -> PipelineSpec:
    """Check a pipeline given as TOML text (or an already parsed mapping).

    ``environ`` (default ``os.environ``) resolves ``${NAME}``. Relative paths in the file are
    relative to the working directory, like a shell command's arguments.
    """
    if isinstance(text, str):
        try:
            data: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    else:
        data = dict(text)
    env = os.environ if environ is None else environ
    secrets: set[str] = set()
    from_env: set[tuple[str, str]] = set()
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{name}]{_suggest(name, SECTIONS)}")
    resolved: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table (a [{name}] header), got a value")
        resolved[name] = {}
        for key, value in table.items():
            new, used = _substitute(value, env, f"[{name}] {key}", secrets)
            if used:
                from_env.add((name, key))
            resolved[name][key] = new
    frozen = frozenset(secrets)
    for required in ("source", "sink"):
        if required not in resolved:
            raise ConfigError(
                f"{path}: missing section [{required}] (with type = one of "
                f"{', '.join(sorted(_REGISTRIES[required]))})"
            )
    try:
        source = _connector("source", resolved["source"], from_env, frozen)
        sink = _connector("sink", resolved["sink"], from_env, frozen)
        dead_letter = (
            _connector("dead_letter", resolved["dead_letter"], from_env, frozen)
            if "dead_letter" in resolved
            else None
        )
        batch = _batch(resolved.get("batch", {}), from_env, frozen)
        metrics = MetricsSpec(
            **_keywords("metrics", MetricsSpec, resolved.get("metrics", {}), from_env, frozen)
        )
        spool = _spool(resolved["spool"], from_env, frozen) if "spool" in resolved else None
    except ConfigError as exc:
        raise ConfigError(mask_secrets(f"{path}: {exc}", frozen)) from None
    return PipelineSpec(path, source, sink, batch, dead_letter, metrics, frozen, spool)


def _spool(
    table: dict[str, Any], from_env: set[tuple[str, str]], secrets: frozenset[str]
) -> dict[str, Any]:
    """The [spool] section: Spool's keywords, checked by building one (nothing is opened)."""
    from batchpunk.spool import Spool

    kwargs = _keywords("spool", Spool, table, from_env, secrets)
    try:
        Spool(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"[spool] {exc}") from None
    return kwargs


# -- environment substitution -----------------------------------------------------------------


def _substitute(
    value: Any, env: Mapping[str, str], where: str, secrets: set[str]
) -> tuple[Any, bool]:
    """Replace ``${NAME}`` in every string of ``value``; True when the environment was used."""
    if isinstance(value, str):
        used = False

        def one(match: re.Match[str]) -> str:
            nonlocal used
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            found = env.get(name)
            if found is None:
                if default is None:
                    raise ConfigError(f"{where}: environment variable {name} is not set")
                return default
            used = True
            if found:
                secrets.add(found)
            return found

        return _ENV.sub(one, value), used
    if isinstance(value, list):
        items = [_substitute(v, env, where, secrets) for v in value]
        return [v for v, _ in items], any(u for _, u in items)
    if isinstance(value, dict):
        pairs = {k: _substitute(v, env, f"{where}.{k}", secrets) for k, v in value.items()}
        return {k: v for k, (v, _) in pairs.items()}, any(u for _, u in pairs.values())
    return value, False


# -- sections ---------------------------------------------------------------------------------


def _connector(
    section: str,
    table: dict[str, Any],
    from_env: set[tuple[str, str]],
    secrets: frozenset[str],
) -> ConnectorSpec:
    registry = _REGISTRIES[section]
    table = dict(table)
    kind = table.pop("type", None)
    choices = ", ".join(sorted(registry))
    if kind is None:
        raise ConfigError(f"[{section}] missing key 'type' (expected one of {choices})")
    if not isinstance(kind, str):
        raise ConfigError(f"[{section}] type: expected a string (one of {choices}), got {kind!r}")
    target = registry.get(kind)
    if target is None:
        if ":" not in kind:
            raise ConfigError(
                f"[{section}] type: unknown {section} type {kind!r}{_suggest(kind, registry)} "
                f"(expected one of {choices}, or 'package.module:ClassName')"
            )
        target = kind
    cls = _import(section, kind, target)
    kwargs = _keywords(section, cls, table, from_env, secrets)
    return ConnectorSpec(section, kind, cls, kwargs, secrets)


def _import(section: str, kind: str, target: str) -> type:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"[{section}] type: {kind!r} needs module {module_name!r}, which is not available"
            ) from None
        raise  # an optional client library is missing: MissingDependency says what to install
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(f"[{section}] type: {target!r} does not name a class")
    return cls


def _keywords(
    section: str,
    target: Callable[..., Any],
    table: dict[str, Any],
    from_env: set[tuple[str, str]],
    secrets: frozenset[str],
) -> dict[str, Any]:
    """Check ``table`` against ``target``'s keyword parameters: names, presence, types."""
    signature = inspect.signature(target)
    params = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    hints = _hints(target)
    owner = getattr(target, "__name__", str(target))
    out: dict[str, Any] = {}
    for key, value in table.items():
        param = params.get(key)
        if param is None:
            if open_ended:
                out[key] = value
                continue
            raise ConfigError(
                f"[{section}] unknown key {key!r}{_suggest(key, params)} "
                f"({owner} accepts: {', '.join(params) or 'nothing'})"
            )
        hint = hints.get(key, _UNKNOWN)
        if (section, key) in from_env and isinstance(value, str):
            value = _coerce_env(value, hint)
        verdict = _matches(value, hint)
        if verdict is False:
            shown = "a value from the environment" if (section, key) in from_env else repr(value)
            raise ConfigError(
                f"[{section}] {key}: expected {_describe(param, hint)}, got {shown}"
                f" ({type(value).__name__})"
            )
        out[key] = value
    missing = [
        name
        for name, p in params.items()
        if p.default is p.empty and name not in out and name != "self"
    ]
    if missing:
        raise ConfigError(
            f"[{section}] missing key(s) {', '.join(repr(m) for m in missing)} "
            f"(required by {owner})"
        )
    return out


def _batch(
    table: dict[str, Any], from_env: set[tuple[str, str]], secrets: frozenset[str]
) -> BatchConfig:
    table = dict(table)
    if "sizer" in table:
        raise ConfigError(
            "[batch] sizer: a function cannot come from a pipeline file; use max_bytes with the "
            "default sizer, or build the Pipeline in Python"
        )
    retry_on = _exception_types(table.pop("retry_on")) if "retry_on" in table else None
    outages = table.pop("unavailable_on", None)
    breaker_off = table.get("circuit_breaker_threshold") == 0  # 0 turns the default off
    if breaker_off:
        del table["circuit_breaker_threshold"]
    kwargs = _keywords("batch", BatchConfig, table, from_env, secrets)
    if retry_on is not None:
        kwargs["retry_on"] = retry_on
    if outages is not None:
        kwargs["unavailable_on"] = _exception_types(outages, "unavailable_on")
    if breaker_off:
        kwargs["circuit_breaker_threshold"] = None
    elif "circuit_breaker_threshold" not in kwargs:  # on by default in pipelines (issue 13)
        kwargs["circuit_breaker_threshold"], cooldown = PIPELINE_CIRCUIT_BREAKER
        kwargs.setdefault("circuit_breaker_cooldown", cooldown)
    try:
        return BatchConfig(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"[batch] {exc}") from None


def _exception_types(value: Any, field: str = "retry_on") -> tuple[type[BaseException], ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"[batch] {field}: expected a list of exception names like "
            f'["ConnectionError", "TimeoutError"], got {value!r}'
        )
    out: list[type[BaseException]] = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            found = (
                getattr(importlib.import_module(module_name), attr)
                if module_name
                else getattr(builtins, attr)
            )
        except (ImportError, AttributeError):
            found = None
        if not (isinstance(found, type) and issubclass(found, BaseException)):
            raise ConfigError(
                f"[batch] {field}: {name!r} is not an exception class (use a builtin name like "
                "'ConnectionError' or a dotted path like 'batchpunk.errors.BatchTimeout')"
            )
        out.append(found)
    return tuple(out)


# -- type checks ------------------------------------------------------------------------------


def _hints(target: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations of ``target``'s parameters; a name that cannot resolve is skipped."""
    function = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    raw = getattr(function, "__annotations__", {})
    module = sys.modules.get(getattr(function, "__module__", ""), None)
    namespace = dict(vars(module)) if module is not None else {}
    out: dict[str, Any] = {}
    for name, annotation in raw.items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)
            except Exception:
                continue
        out[name] = annotation
    if isinstance(target, type) and not raw:
        try:
            out = typing.get_type_hints(target)
        except Exception:
            out = {}
    return out


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether a TOML value fits a type hint: True, False, or None when it cannot tell."""
    if hint is _UNKNOWN or hint is Any:
        return None
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        verdicts = [_matches(value, arg) for arg in args]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if hint is os.PathLike or origin is os.PathLike:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, typing.Sequence, typing.Collection, typing.Iterable) or (
        isinstance(container, type)
        and container.__module__ == "collections.abc"
        and container.__name__ in ("Sequence", "Collection", "Iterable", "MutableSequence")
    ):
        if not isinstance(value, list):
            return False
        if not args:
            return True
        inner = args[0]
        verdicts = [_matches(v, inner) for v in value]
        return not any(v is False for v in verdicts)
    if container in (dict, typing.Mapping) or (
        isinstance(container, type)
        and container.__module__ == "collections.abc"
        and container.__name__ in ("Mapping", "MutableMapping")
    ):
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            verdicts = [_matches(v, args[1]) for v in value.values()]
            return not any(v is False for v in verdicts)
        return True
    if container is type or (
        isinstance(container, type)
        and container.__module__ == "collections.abc"
        and container.__name__ == "Callable"
    ):
        return False  # a TOML value is never a class or a function
    if isinstance(hint, type):
        return isinstance(value, hint)
    return None


def _coerce_env(value: str, hint: Any) -> Any:
    """An environment string turned into the number or boolean a parameter expects."""
    if _matches(value, hint) is not False:
        return value
    text = value.strip()
    for candidate in (_int(text), _float(text), _bool(text)):
        if candidate is not None and _matches(candidate, hint):
            return candidate
    return value


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _bool(text: str) -> bool | None:
    return {"true": True, "false": False, "1": True, "0": False}.get(text.lower())


def _describe(param: inspect.Parameter, hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    annotation = param.annotation
    if isinstance(annotation, str):
        return annotation
    if annotation is param.empty:
        return "a value"
    return inspect.formatannotation(hint)


# -- small helpers ----------------------------------------------------------------------------


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _strip_section(message: str) -> str:
    return re.sub(r"^\[[a-z_]+\]\s*", "", message)


def _masked(value: Any, secrets: frozenset[str]) -> Any:
    if isinstance(value, str):
        return mask_secrets(value, secrets)
    if isinstance(value, list):
        return [_masked(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v, secrets) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value
