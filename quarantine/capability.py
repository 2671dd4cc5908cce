"""The quarantine as a mailwarden capability: the ``[quarantine]`` section and the ``quarantine`` commands.

The commands are loaded when one of them runs (``LazyGroup``): every ``mailwarden`` command registers every
capability's commands, and the quarantine's bring Alembic and SMTP with them.
"""

from __future__ import annotations

import importlib
import logging

import click

from mailwarden.capability import Capability
from quarantine.preflight import preflight
from quarantine.store import QuarantineSettings, log

__all__ = ["CAPABILITY", "QuarantineSettings"]


class LazyGroup(click.Group):
    """A click group whose subcommands live in ``module`` (its attribute ``group``), imported on first use."""

    def __init__(self, *args: object, module: str, group: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._where = (module, group)

    def _group(self) -> click.Group:
        module, group = self._where
        loaded = getattr(importlib.import_module(module), group)
        assert isinstance(loaded, click.Group)
        return loaded

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._group().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._group().get_command(ctx, cmd_name)


@click.group("quarantine", cls=LazyGroup, module="quarantine.cli", group="quarantine_group")
def quarantine_group() -> None:
    """Held messages: list, show, release, delete, purge; migrate the catalogue."""
    # the outcome of each command is its output and exit code; the log lines the store writes for the
    # services (a failed release ...) would repeat it on stderr through logging's last resort
    logging.getLogger(log.name).addHandler(logging.NullHandler())


def register_cli(group: click.Group) -> None:
    group.add_command(quarantine_group)


CAPABILITY = Capability(name="quarantine", settings_model=QuarantineSettings, register_cli=register_cli,
                        preflight=preflight)
