"""The contract between the core and a capability (policyd, milters, quarantine, phishhook).

A capability is found through the ``mailwarden.capabilities`` entry point group. It names its config
section, gives the settings model for it, adds its subcommands to the CLI and may offer a service that
``mailwarden run`` starts. The core never imports a capability by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    import click

    from mailwarden.config import Config, Problem
    from mailwarden.logs import DecisionLog


class Service(Protocol):
    """A long-running part of a capability; ``start`` returns once it serves, ``stop`` is bounded."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def reload(self) -> None:
        """Re-read what can change without a restart (SIGHUP); on error keep the old state and log why."""

    def reconfigure(self, config: Config) -> None:
        """SIGHUP with the config file read again and valid: apply what changed (and re-read files, as
        ``reload``); keys in ``Capability.restart_keys`` arrive with their old values. On error keep the
        config in use and log why."""


@dataclass(frozen=True)
class Capability:
    name: str
    """Its section in the config file, e.g. ``policyd`` for ``[policyd]``."""
    settings_model: type[BaseModel]
    register_cli: Callable[[click.Group], None]
    make_service: Callable[[Config, DecisionLog], Service] | None = None
    """Builds the capability's daemon; ``mailwarden run`` starts every one of them."""
    restart_keys: tuple[str, ...] = ()
    """Keys of its section (``listen``, ``greylist.x`` ...) that only a restart can change: on SIGHUP they
    keep their old values and the log names them."""
    preflight: Callable[[Any], list[Problem]] | None = None
    """Given its validated section: what start-up would refuse or misread beyond the schema (missing
    files, a self-defeating order), as full keys; ``config check`` reports them, start-up refuses errors."""


@cache
def installed_capabilities() -> tuple[Capability, ...]:
    """Every capability installed with the package, in a stable order."""
    found = [ep.load() for ep in entry_points(group="mailwarden.capabilities")]
    return tuple(sorted(found, key=lambda cap: cap.name))
