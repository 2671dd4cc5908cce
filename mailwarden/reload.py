"""SIGHUP: read the config file again (same path, same command-line overrides as at start-up).

A file that does not parse or validate changes nothing: the config in use stays, and one log line says
why (file and key). Otherwise the keys that only a restart can change (listen addresses, the Redis
connection, the metrics listener, where logs go) keep their old values and one line names them; the
services get the result and apply the rest (reply texts, limits, lists, check settings).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

from mailwarden.config import Config, ConfigError
from mailwarden.logs import LOGGER_NAME, get_logger, log_kv

log = get_logger("reload")

CORE_RESTART_KEYS = (
    "redis",
    "metrics.listen",
    "logging.destination",
    "logging.syslog_socket",
    "logging.syslog_facility",
    "logging.decisions",
    "logging.decision_batch",
)
"""Keys of the core sections that a running daemon cannot change (``redis`` stands for all its keys).
``logging.level`` applies at once; ``dns`` applies with the checks that use it."""


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, descending into settings models (a list or dict is one value).
    Models are compared by their fields: each load builds the root model class afresh."""
    if (isinstance(old, BaseModel) and isinstance(new, BaseModel)
            and type(old).model_fields.keys() == type(new).model_fields.keys()):
        keys: list[str] = []
        for name in type(old).model_fields:
            keys += changed_keys(getattr(old, name), getattr(new, name), f"{prefix}{name}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def covered(key: str, restart_keys: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``restart_keys`` or lies under one."""
    return any(key == other or key.startswith(other + ".") for other in restart_keys)


def with_old_values(old: BaseModel, new: BaseModel, keys: Iterable[str]) -> BaseModel:
    """``new`` with the value of each dotted key taken from ``old``."""
    for key in keys:
        new = _replace(new, key.split("."), _get(old, key.split(".")))
    return new


def _get(model: Any, path: list[str]) -> Any:
    for part in path:
        model = getattr(model, part)
    return model


def _replace(model: BaseModel, path: list[str], value: Any) -> BaseModel:
    head, *rest = path
    return model.model_copy(update={head: _replace(getattr(model, head), rest, value) if rest else value})


def one_line(text: str) -> str:
    """A multi-line error (a validation report lists one problem per line) as one log line."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip()).replace(":;", ":")


class ConfigReloader:
    """Holds the config in force and reads the file again on demand."""

    def __init__(self, current: Config, read: Callable[[], Config], restart_keys: Iterable[str] = ()) -> None:
        self.current = current
        self.read = read
        self.restart_keys = (*CORE_RESTART_KEYS, *restart_keys)

    def reread(self) -> Config | None:
        """The config the services should now run with, or None when the file is broken (nothing changes)."""
        try:
            new = self.read()
        except ConfigError as exc:
            log_kv(log, logging.ERROR, "SIGHUP: config not reloaded; keeping the config in use",
                   error=one_line(str(exc)))
            return None
        changed = changed_keys(self.current.settings, new.settings)
        pending = [key for key in changed if covered(key, self.restart_keys)]
        if pending:
            log_kv(log, logging.WARNING, f"SIGHUP: these keys need a restart: {', '.join(pending)}; "
                   "they keep their old values until then")
        settings: Any = with_old_values(self.current.settings, new.settings, pending)
        # the new file's drop-ins and the record of which file set each key stay (errors name them)
        self.current = dataclasses.replace(new, settings=settings)
        applied = [key for key in changed if key not in pending]
        if "logging.level" in applied:
            logging.getLogger(LOGGER_NAME).setLevel(settings.logging.level.upper())
        log_kv(log, logging.INFO, "SIGHUP: config read", source=str(new.source or "built-in defaults"),
               changed=",".join(applied) or "nothing")
        return self.current
