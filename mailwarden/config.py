"""One TOML config file, validated once at start-up.

The root model is assembled from the core sections (``redis``, ``logging``, ``metrics``) and the
section of each installed capability. Unknown keys, wrong types and bad values stop start-up with a
message that names the file, the dotted key and what is allowed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from mailwarden.capability import installed_capabilities
from mailwarden.dns import DnsSettings
from mailwarden.logs import LoggingSettings
from mailwarden.metrics import MetricsSettings
from mailwarden.redis_settings import RedisSettings

DEFAULT_PATH = Path("/etc/mailwarden/mailwarden.toml")
ENV_VAR = "MAILWARDEN_CONFIG"


class ConfigError(Exception):
    """The config cannot be used; the message says which file and key, and what is allowed."""


@dataclass(frozen=True)
class Config:
    settings: Any
    """The validated root model: ``settings.redis``, ``settings.policyd`` ..."""
    source: Path | None
    """The file it was read from, or None when running on built-in defaults."""

    def section(self, name: str) -> Any:
        return getattr(self.settings, name)


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
    return DEFAULT_PATH, False


def load_config(explicit: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read, merge drop-ins, apply command-line overrides and validate. Raises ConfigError."""
    path, required = resolve_path(explicit)
    data: dict[str, Any] = {}
    source: Path | None = None
    if path is not None and path.exists():
        data = _read_toml(path)
        source = path
        dropin_dir = path.with_suffix(".d")
        if dropin_dir.is_dir():
            for dropin in sorted(dropin_dir.glob("*.toml")):
                _deep_merge(data, _read_toml(dropin))
    elif required:
        raise ConfigError(f"{path}: no such file (given by --config or ${ENV_VAR})")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return Config(settings=validate(data, source), source=source)


def validate(data: dict[str, Any], source: Path | None = None) -> Any:
    model = root_model()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where = str(source) if source else "built-in defaults"
        raise ConfigError(format_errors(where, exc, model)) from None


def format_errors(where: str, exc: ValidationError, model: type[BaseModel]) -> str:
    lines = [f"{where}: invalid configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        # union branches add their own names (``function-before[...]``, ``literal['x']``): not keys
        key = ".".join(str(part) for part in err["loc"] if not (isinstance(part, str) and "[" in part))
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed) or '(none)'}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {message} (got {err.get('input')!r})")
    return "\n".join(lines)


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


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value
