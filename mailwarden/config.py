"""One TOML config file, validated once at start-up.

The root model is assembled from the core sections (``redis``, ``logging``, ``metrics``) and the
section of each installed capability. Unknown keys, wrong types and bad values stop start-up with a
message that names the file, the dotted key and what is allowed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from mailwarden.capability import installed_capabilities
from mailwarden.dns import DnsSettings
from mailwarden.logs import LoggingSettings, get_logger, log_kv
from mailwarden.metrics import MetricsSettings
from mailwarden.paths import CONFIG_FILE, system_path
from mailwarden.redis_settings import RedisSettings

DEFAULT_PATH = CONFIG_FILE
"""Read when neither --config nor $MAILWARDEN_CONFIG names a file (under $MAILWARDEN_ROOT when set)."""
ENV_VAR = "MAILWARDEN_CONFIG"
COMMAND_LINE = "command line"
"""Where a key given by a command-line option (``--listen``, ``--redis``) comes from, in messages."""

log = get_logger("config")

Loc = tuple[str | int, ...]
"""A place in the config tree: ``("policyd", "access", "files", 0)``."""


class ConfigError(Exception):
    """The config cannot be used; the message says which file and key, and what is allowed."""


@dataclass(frozen=True)
class Problem:
    """What the schema cannot see and start-up would trip over: a file the daemon reads that is missing
    (an error: start-up refuses it, and so does ``config check``), a check order that defeats itself (a
    warning: printed and logged, exit 0)."""

    key: Loc
    """The key at fault, e.g. ``("policyd", "access", "files", 0)``; empty when ``message`` is a complete
    report about another file (an access rules file's own errors name that file and the rule)."""
    message: str
    warning: bool = False


@dataclass(frozen=True)
class Config:
    settings: Any
    """The validated root model: ``settings.redis``, ``settings.policyd`` ..."""
    source: Path | None
    """The main file it was read from, or None when there is none (drop-ins and built-in defaults)."""
    dropins: tuple[Path, ...] = ()
    """The drop-in files merged on top, in the order they were applied."""
    origins: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    """The file (or ``COMMAND_LINE``) that set each key, so that a message names the file to fix."""

    def section(self, name: str) -> Any:
        return getattr(self.settings, name)

    def where(self, loc: Loc) -> str:
        """The file that set the value at ``loc`` (the main file when it is a default)."""
        return _where(loc, self.origins, _default_where(self.source))

    def describe(self, errors: Iterable[Problem]) -> str:
        """Errors in the format of validation errors: per file, ``file: invalid configuration ...`` then
        one ``key: message`` line each."""
        blocks: dict[str, list[str]] = {}
        reports: list[str] = []
        for problem in errors:
            if problem.key:
                blocks.setdefault(self.where(problem.key), []).append(f"  {dotted(problem.key)}: {problem.message}")
            else:
                reports.append(problem.message)
        return "\n".join(filter(None, [_blocks(blocks), *reports]))

    def describe_warning(self, warning: Problem) -> str:
        return f"{self.where(warning.key)}: warning: {dotted(warning.key)}: {warning.message}"


def dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def preflight(config: Config, names: Iterable[str] | None = None) -> list[Problem]:
    """What each capability (all, or the named ones) would refuse or misread at start-up beyond the
    schema: the files it reads, a check order that defeats itself. ``config check`` reports these, and
    start-up refuses the errors (``require_startable``)."""
    wanted = None if names is None else set(names)
    problems: list[Problem] = []
    for cap in installed_capabilities():
        if cap.preflight is not None and (wanted is None or cap.name in wanted):
            problems += cap.preflight(config.section(cap.name))
    return problems


def require_startable(config: Config, names: Iterable[str] | None = None) -> None:
    """At start-up: raise ConfigError for what ``config check`` reports as an error; log each warning."""
    problems = preflight(config, names)
    if errors := [problem for problem in problems if not problem.warning]:
        raise ConfigError(config.describe(errors))
    for warning in problems:
        log_kv(log, logging.WARNING, "config: " + warning.message, key=dotted(warning.key),
               file=config.where(warning.key))


def root_model() -> type[BaseModel]:
    """The config tree: core sections plus one per installed capability."""
    fields: dict[str, Any] = {
        "redis": (RedisSettings, Field(default_factory=RedisSettings)),
        "logging": (LoggingSettings, Field(default_factory=LoggingSettings)),
        "metrics": (MetricsSettings, Field(default_factory=MetricsSettings)),
        "dns": (DnsSettings, Field(default_factory=DnsSettings)),
    }
    for cap in installed_capabilities():
        fields[cap.name] = (cap.settings_model, Field(default_factory=cap.settings_model))
    return create_model("Settings", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


def resolve_path(explicit: str | os.PathLike[str] | None) -> tuple[Path | None, bool]:
    """The file to read and whether it must exist (given by flag or environment) or is optional."""
    if explicit:
        return Path(explicit), True
    if env := os.environ.get(ENV_VAR):
        return Path(env), True
    return system_path(DEFAULT_PATH), False


def load_config(explicit: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the main file, merge the drop-ins beside it (``mailwarden.d/*.toml``, in name order, also when
    the main file is absent), apply command-line overrides and validate. Raises ConfigError, naming the
    file that set the value at fault."""
    path, required = resolve_path(explicit)
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    source: Path | None = None
    dropins: list[Path] = []
    if path is not None and path.exists():
        _deep_merge(data, _read_toml(path), origins, str(path))
        source = path
    elif required:
        raise ConfigError(f"{path}: no such file (given by --config or ${ENV_VAR})")
    if path is not None and (dropin_dir := path.with_suffix(".d")).is_dir():
        for dropin in sorted(dropin_dir.glob("*.toml")):
            _deep_merge(data, _read_toml(dropin), origins, str(dropin))
            dropins.append(dropin)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
        _note_origin(origins, tuple(key.split(".")), value, COMMAND_LINE)
    settings = validate(data, source, origins)
    return Config(settings=settings, source=source, dropins=tuple(dropins), origins=origins)


def validate(data: dict[str, Any], source: Path | None = None,
             origins: Mapping[tuple[str, ...], str] | None = None) -> Any:
    model = root_model()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where = _default_where(source)
        raise ConfigError(format_errors(where, exc, model, lambda loc: _where(loc, origins or {}, where))) from None


def format_errors(where: str, exc: ValidationError, model: type[BaseModel],
                  where_of: Callable[[Loc], str] | None = None, key_of: Callable[[Loc], str] | None = None) -> str:
    """``where: invalid configuration (N problem(s)):`` and one ``key: message`` line per error; with
    ``where_of``, one such block per file that set a value at fault. ``key_of`` renders a key (default:
    dotted)."""
    blocks: dict[str, list[str]] = {}
    for err in exc.errors():
        # union branches add their own names (``function-before[...]``, ``literal['x']``): not keys
        loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
        key = key_of(loc) if key_of else dotted(loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            line = f"  {key}: unknown key; allowed here: {', '.join(allowed) or '(none)'}"
        else:
            message = err["msg"].removeprefix("Value error, ")
            got = err.get("input")  # a table (a check across its keys) would be a page of input: left out
            # the value echoed back is masked as config show masks it: errors reach logs and journals
            shown = redacted(got, str(loc[-1]) if loc else "")
            line = f"  {key}: {message}" + ("" if isinstance(got, dict) else f" (got {shown!r})")
        blocks.setdefault(where_of(loc) if where_of else where, []).append(line)
    return _blocks(blocks)


def _blocks(blocks: Mapping[str, list[str]]) -> str:
    return "\n".join(f"{where}: invalid configuration ({len(lines)} problem(s)):\n" + "\n".join(lines)
                     for where, lines in blocks.items())


def _default_where(source: Path | None) -> str:
    return str(source) if source else "built-in defaults"


def _where(loc: Loc, origins: Mapping[tuple[str, ...], str], default: str) -> str:
    """The file that set the value at ``loc``: the one that set it or the list holding it; for a table
    (an error about several of its keys), the files that set keys inside it."""
    path: tuple[str, ...] = ()
    for part in loc:
        if not isinstance(part, str):
            break
        path = (*path, part)
    for end in range(len(path), 0, -1):
        if (found := origins.get(path[:end])) is not None:
            return found
    inside = [origin for key, origin in origins.items() if key[:len(path)] == path]
    return ", ".join(dict.fromkeys(inside)) or default


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model inside an annotation such as ``Model``, ``list[Model]`` or ``dict[str, Model]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _deep_merge(into: dict[str, Any], other: dict[str, Any], origins: dict[tuple[str, ...], str], where: str,
                prefix: tuple[str, ...] = ()) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value, origins, where, (*prefix, key))
        else:
            into[key] = value
            _note_origin(origins, (*prefix, key), value, where)


def _note_origin(origins: dict[tuple[str, ...], str], path: tuple[str, ...], value: Any, where: str) -> None:
    """Record that ``where`` set ``path`` (every key inside it, for a table), replacing earlier origins."""
    for key in [key for key in origins if key[:len(path)] == path]:
        del origins[key]
    if isinstance(value, dict):  # an empty table sets nothing: its keys keep their defaults
        for name, inner in value.items():
            _note_origin(origins, (*path, name), inner, where)
    else:
        origins[path] = where


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


# -- showing the config --------------------------------------------------------------------------------

MASK = "***"
_SECRET_KEY = re.compile(r"(?:^|_)(?:password|secret)$|^(?:api_header|tokens|headers|accounts)$")
"""Keys whose values are secrets: passwords, signing secrets, the Dovecot API header, bearer tokens, webhook
headers (an Authorization), review accounts' hashes. A table under such a key keeps its names."""
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:)[^@\s]*?(?=@)")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)[^&#\s]*", re.IGNORECASE)


def redacted(data: Any, key: str = "") -> Any:
    """``data`` (a dumped config) with every secret replaced by ``***``: the values of the keys ``_SECRET_KEY``
    names, and the password in URLs (``redis://:pw@host``, ``mysql+pymysql://user:pw@host``,
    ``...?password=pw``)."""
    if isinstance(data, dict):
        if _SECRET_KEY.search(key):
            return {name: MASK for name in data}
        return {name: redacted(value, str(name)) for name, value in data.items()}
    if isinstance(data, list):
        return [redacted(value, key) for value in data]
    if data is not None and data != "" and _SECRET_KEY.search(key):
        return MASK
    if isinstance(data, str):
        return _QUERY_PASSWORD.sub(rf"\g<head>{MASK}", _URL_PASSWORD.sub(rf"\g<head>{MASK}", data))
    return data


def to_toml(data: dict[str, Any]) -> str:
    """A dumped config as TOML, for people: the effective value of every key, an unset key as a comment."""
    lines: list[str] = []
    _toml_table(data, (), lines, None)
    return "\n".join(lines).strip() + "\n"


def _toml_table(table: dict[str, Any], path: tuple[str, ...], lines: list[str], header: str | None) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_list(v)}
    if path:
        lines += ["", header or f"[{'.'.join(map(_toml_key, path))}]"]
    for name, value in scalars.items():
        lines.append(f"# {_toml_key(name)} = (unset)" if value is None else f"{_toml_key(name)} = {_toml_value(value)}")
    for name, value in table.items():
        if isinstance(value, dict):
            _toml_table(value, (*path, name), lines, None)
        elif _is_table_list(value):
            for item in value:
                _toml_table(item, (*path, name), lines, f"[[{'.'.join(map(_toml_key, (*path, name)))}]]")


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value if item is not None) + "]"
    if isinstance(value, dict):
        pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(pairs) + " }"
    return json.dumps(str(value), ensure_ascii=False)
