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
import math
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
from urllib.parse import urlsplit

from batchpunk._redact import is_secret_name, redact, redact_value
from batchpunk.config import PIPELINE_CIRCUIT_BREAKER, BatchConfig
from batchpunk.errors import ConfigError, MissingDependency

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
    "kafka": "batchpunk.connectors.kafka:KafkaSource",
    "sqs": "batchpunk.connectors.sqs:SqsSource",
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
    "kafka": "batchpunk.connectors.kafka:KafkaSink",
    "sqs": "batchpunk.connectors.sqs:SqsSink",
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
# $$, ${NAME}, ${NAME:-default} (a default holds no "${"), or any other "${": a mistake.
_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-((?:[^}$]|\$(?!\{))*))?\}|\$\{")
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
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535
        ):
            raise ConfigError(f"[metrics] prometheus_port: expected 0..65535, got {port!r}")
        host = self.prometheus_host
        if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
            raise ConfigError(
                f"[metrics] prometheus_host: expected an address to bind such as '127.0.0.1' "
                f"(an empty host would bind every interface), got {host!r}"
            )
        if not isinstance(self.live, bool):
            raise ConfigError(f"[metrics] live: expected true or false, got {self.live!r}")
        rate = self.refresh_per_second
        if (
            not isinstance(rate, int | float)
            or isinstance(rate, bool)
            or not math.isfinite(rate)
            or not 0 < rate <= 100
        ):
            raise ConfigError(
                f"[metrics] refresh_per_second: expected a number in (0, 100], got {rate!r}"
            )
        token = self.token
        if token is not None and (not isinstance(token, str) or not token.strip()):
            # Checked here, not only by the server: `validate` must refuse what `run` would.
            raise ConfigError(
                "[metrics] token: expected a non-empty string (remove the key for no "
                "authentication); an environment variable used for it may be set but empty"
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
        """A new connector object; a constructor error becomes a ConfigError naming the section.

        Files it reads must exist and files it writes must have a folder: checked here rather
        than when the file is parsed, so ``dlq replay`` can use a file's [sink] alone.
        """
        _check_paths(self.section, self.kind, self.kwargs)
        try:
            return self.cls(**self.kwargs)
        except ConfigError as exc:
            raise ConfigError(
                redact(f"[{self.section}] {_strip_section(str(exc))}", self.secrets)
            ) from None
        except MissingDependency:
            raise
        except Exception as exc:  # a constructor refusing a value, whatever it raises
            raise ConfigError(
                redact(f"[{self.section}] type {self.kind!r}: {exc}", self.secrets)
            ) from None

    def describe(self) -> dict[str, Any]:
        """The section as written, with secrets and URL passwords masked."""
        out: dict[str, Any] = {"type": self.kind}
        for key, value in self.kwargs.items():
            out[key] = _masked(value, self.secrets)
        return dict(_masked(out, self.secrets))


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
        """A new Pipeline with fresh connectors, ready to ``run()``; nothing connects yet.

        ``batchpunk validate`` calls this too (through ``check``), so what it accepts is
        exactly what ``batchpunk run`` starts with.
        """
        from batchpunk.pipeline import Pipeline
        from batchpunk.spool import Spool

        source = self.source.build()
        sink = self.sink.build()
        dead_letter = self.build_dead_letter()
        try:
            spool = Spool(**self.spool) if self.spool is not None else None
            return Pipeline(
                source,
                sink,
                self.batch,
                dead_letter=dead_letter,
                metrics_collector=metrics_collector,
                spool=spool,
            )
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(self.redact(f"{self.path}: {exc}")) from None

    def check(self) -> None:
        """Build every component as ``batchpunk run`` does, minus connecting; ConfigError if not.

        The metrics exporter's extra is checked too (MissingDependency names the pip command).
        """
        if self.metrics.prometheus_port is not None:
            from batchpunk.metrics import PrometheusMetrics

            PrometheusMetrics()
        self.build()

    def build_dead_letter(self) -> Any:
        """The [dead_letter] sink, or None when the section is absent."""
        return self.dead_letter.build() if self.dead_letter is not None else None

    def redact(self, text: str) -> str:
        """``text`` with every environment-supplied value, URL password and credential masked."""
        return redact(text, self.secrets)

    def describe(self) -> dict[str, Any]:
        """The whole file, resolved and masked: what ``batchpunk validate`` prints."""
        batch = self.batch.to_dict()
        metrics = {f.name: getattr(self.metrics, f.name) for f in fields(MetricsSpec)}
        out = {
            "source": self.source.describe(),
            "batch": {k: _masked(v, self.secrets) for k, v in batch.items()},
            "sink": self.sink.describe(),
            "dead_letter": self.dead_letter.describe() if self.dead_letter else {"type": None},
            "metrics": {k: _masked(v, self.secrets) for k, v in metrics.items()},
        }
        if self.spool:
            out["spool"] = {k: _masked(v, self.secrets) for k, v in self.spool.items()}
        return out


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
            new, used = _substitute(value, env, f"[{name}] {_name(key)}", secrets)
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
        raise ConfigError(redact(f"{path}: {exc}", frozen)) from None
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
        # A short number or boolean that is a key's whole value (max_size = "${BATCH_SIZE}") is
        # a setting, not a secret, unless the key is named like a credential: masking its text
        # everywhere garbled the output ("max_wait": 5.***). Inside a longer string it stays one.
        key = where.rsplit(" ", 1)[-1].rsplit(".", 1)[-1]
        setting = _ENV.fullmatch(value) is not None and not is_secret_name(key)

        def one(match: re.Match[str]) -> str:
            nonlocal used
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name is None:  # a "${" that is no reference: never taken as literal text
                start = match.start()
                raise ConfigError(
                    f"{where}: malformed environment reference {value[start : start + 40]!r}: "
                    "expected ${NAME} or ${NAME:-default} (a name of letters, digits and _; a "
                    "default cannot hold another ${...}); write $$ for a literal $"
                )
            found = env.get(name)
            if found is None:
                if default is None:
                    raise ConfigError(f"{where}: environment variable {name} is not set")
                return default
            used = True
            if found and not (setting and _SETTING.fullmatch(found)):
                secrets.add(found)
            return found

        return _ENV.sub(one, value), used
    if isinstance(value, list):
        items = [_substitute(v, env, where, secrets) for v in value]
        return [v for v, _ in items], any(u for _, u in items)
    if isinstance(value, dict):
        pairs = {k: _substitute(v, env, f"{where}.{_name(k)}", secrets) for k, v in value.items()}
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
    method = _ROLE_METHODS[section]
    if not callable(getattr(cls, method, None)):
        raise ConfigError(
            f"[{section}] type: {kind!r} is not a {section.replace('_', '-')} connector "
            f"(its class {cls.__name__} has no {method} method)"
        )
    kwargs = _keywords(section, cls, table, from_env, secrets)
    return ConnectorSpec(section, kind, cls, kwargs, secrets)


def _import(section: str, kind: str, target: str) -> type:
    module_name, _, attr = target.partition(":")
    if not _MODULE.fullmatch(module_name) or not attr.isidentifier():
        raise ConfigError(
            f"[{section}] type: {kind!r} is not 'package.module:ClassName' "
            "(absolute module path, a colon, a class name)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"[{section}] type: {kind!r} needs module {module_name!r}, which is not available"
            ) from None
        raise  # an optional client library is missing: MissingDependency says what to install
    except MissingDependency:
        raise
    except Exception as exc:  # the module itself failed to import: say so in one line
        raise ConfigError(
            f"[{section}] type: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
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
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        owner = getattr(target, "__name__", "the class")
        raise ConfigError(f"[{section}] type: cannot read {owner}'s constructor keywords") from None
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
        shown = "a value from the environment" if (section, key) in from_env else repr(value)
        if verdict is False:
            raise ConfigError(
                f"[{section}] {key}: expected {_describe(param, hint)}, got {shown}"
                f" ({type(value).__name__})"
            )
        _check_value(f"[{section}] {key}", key, value, shown)
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
    if str(table.get("overflow", "")).lower() == "raise":
        raise ConfigError(
            "[batch] overflow: 'raise' is for producers calling the processor in Python; a "
            "pipeline reads its source only when there is room, so use 'block' (or "
            "'drop_newest' / 'drop_oldest')"
        )
    retry_on = _exception_types(table.pop("retry_on")) if "retry_on" in table else None
    outages = table.pop("unavailable_on", None)
    kwargs = _keywords("batch", BatchConfig, table, from_env, secrets)
    if retry_on is not None:
        kwargs["retry_on"] = retry_on
    if outages is not None:
        kwargs["unavailable_on"] = _exception_types(outages, "unavailable_on")
    threshold = kwargs.get("circuit_breaker_threshold")  # "${NAME}" is a number by now
    if type(threshold) is int and threshold == 0:  # 0 (not false, not 0.0) turns it off
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
        except Exception:  # ImportError, or TypeError / ValueError for a name like "..x"
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
        if isinstance(value, hint):
            return True
        return isinstance(value, str | int) and value in {m.value for m in hint}
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


# -- ranges and meaning ------------------------------------------------------------------------

#: Largest integer any setting may hold: every consumer of a count stores it in 64 bits.
_INT64 = 2**63 - 1
#: Longest duration a setting may name (about 31 years): beyond it timers and locks overflow.
_MAX_SECONDS = 1e9
#: Numeric settings that may be negative (everything else counts, sizes or waits).
_SIGNED = frozenset({"start", "seed", "priority", "offset", "compression_level"})
#: Settings in seconds (checked against _MAX_SECONDS).
_DURATION = re.compile(r"(timeout|interval|delay|wait|ttl|cooldown|seconds|linger|period)$")
#: Durations where 0 cannot work (a busy loop, every request timing out at once).
_POSITIVE = re.compile(r"(^timeout|interval|connect_timeout|^rate|refresh_per_second)$")
#: Keys that may be 0 although _POSITIVE matches them (the spool commits at once with 0).
_ZERO_ALLOWED = frozenset({"commit_interval"})
#: A short number or a boolean: as a key's whole value, a setting (see _substitute).
_SETTING = re.compile(r"(?i)[+-]?[0-9]{1,7}(\.[0-9]*)?|true|false")
#: The method each role's class must have.
_ROLE_METHODS = {"source": "__aiter__", "sink": "write", "dead_letter": "put"}
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _check_value(where: str, key: str, value: Any, shown: str) -> None:
    """Range and meaning beyond the type: finite numbers, 64-bit integers, sane durations."""
    _check_numbers(where, value, shown)
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(f"{where}: a NUL character cannot appear in a setting")
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and "://" in text:
                _check_url(where, text)
        return
    if key not in _SIGNED and value < 0:
        raise ConfigError(f"{where}: expected a number >= 0, got {shown}")
    if _DURATION.search(key) and value > _MAX_SECONDS:
        raise ConfigError(f"{where}: expected at most {_MAX_SECONDS:.0e} seconds, got {shown}")
    if _POSITIVE.search(key) and value == 0 and key not in _ZERO_ALLOWED:
        raise ConfigError(f"{where}: expected a number > 0, got {shown}")


def _check_url(where: str, url: str) -> None:
    """A URL the connectors' parsers accept: a password with '[', '/' or '#' must be quoted."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ConfigError(
            f"{where}: not a valid URL ({exc}); percent-encode special characters in the "
            "user name and password (urllib.parse.quote)"
        ) from None


def _check_numbers(where: str, value: Any, shown: str) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not -_INT64 - 1 <= value <= _INT64:
        raise ConfigError(f"{where}: {shown} does not fit in 64 bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {shown}")
    if isinstance(value, list):
        hidden = shown.startswith("a value from the environment")
        for item in value:
            _check_numbers(where, item, "an item out of range" if hidden else repr(item))
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_numbers(f"{where}.{name}", item, repr(item))


#: Keys that name local files, by section and type ("path" of the HTTP source is a URL path).
_FILE_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("source", "jsonl"): ("path", "checkpoint"),
    ("sink", "jsonl"): ("path",),
    ("sink", "sqlite"): ("path",),
    ("dead_letter", "jsonl"): ("path",),
    ("dead_letter", "sqlite"): ("path",),
}


def _check_paths(section: str, kind: str, kwargs: Mapping[str, Any]) -> None:
    """Files a connector reads must exist; files it writes must have an existing folder."""
    for key in _FILE_KEYS.get((section, kind), ()):
        value = kwargs.get(key)
        if not isinstance(value, str) or value in ("-", ":memory:") or not value:
            continue
        where = f"[{section}] {key}"
        target = Path(value)
        reads = section == "source" and key == "path"
        if reads:
            if target.is_dir():
                raise ConfigError(f"{where}: {value!r} is a folder, not a file")
            if not target.is_file() and not kwargs.get("follow"):
                raise ConfigError(f"{where}: no such file {value!r}")
            continue
        if target.is_dir():
            raise ConfigError(f"{where}: {value!r} is a folder, not a file")
        parent = target.parent
        if not parent.is_dir() and section != "dead_letter":
            raise ConfigError(f"{where}: the folder {str(parent)!r} does not exist")


# -- small helpers ----------------------------------------------------------------------------


def _name(key: str) -> str:
    """A key as a message shows it: plain names as they are, anything else quoted."""
    return key if key.isidentifier() else repr(key)


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _strip_section(message: str) -> str:
    return re.sub(r"^\[[a-z_]+\]\s*", "", message)


def _masked(value: Any, secrets: frozenset[str]) -> Any:
    if isinstance(value, enum.Enum):
        value = value.value
    return redact_value(value, secrets)
