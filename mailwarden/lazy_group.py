"""A click group whose commands are imported when one of them runs: every ``mailwarden`` command registers
every capability's commands, and most of them bring heavy libraries (Alembic, SMTP, Starlette, geoip2)."""

from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A click group whose subcommands live in other modules, imported on first use: the commands of each
    ``(module, attribute)`` in ``sources``, a click group there (the first source that has a name wins)."""

    def __init__(self, *args: object, sources: tuple[tuple[str, str], ...], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._sources = sources

    def _groups(self) -> list[click.Group]:
        groups = [getattr(importlib.import_module(module), name) for module, name in self._sources]
        assert all(isinstance(group, click.Group) for group in groups)
        return groups

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({name for group in self._groups() for name in group.list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return next((command for group in self._groups() if (command := group.get_command(ctx, cmd_name))), None)
