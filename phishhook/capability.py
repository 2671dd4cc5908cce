"""phishhook as a mailwarden capability: the ``[phishhook]`` section and the ``phish`` commands (loaded when
one of them runs: they bring Starlette, geoip2 and SQL with them)."""

from __future__ import annotations

import click

from mailwarden.capability import Capability
from mailwarden.config import Problem
from mailwarden.lazy_group import LazyGroup
from phishhook.settings import PhishhookSettings


@click.group("phish", cls=LazyGroup, sources=(("phishhook.cli", "phish"),))
def phish_group() -> None:
    """Phished accounts: logins, snags, their review (the security team's), the service."""


def register_cli(group: click.Group) -> None:
    group.add_command(phish_group)


def _preflight(settings: PhishhookSettings) -> list[Problem]:
    from phishhook.preflight import preflight  # geoip2 and the relay files only when checked

    return preflight(settings)


CAPABILITY = Capability(name="phishhook", settings_model=PhishhookSettings, register_cli=register_cli,
                        preflight=_preflight)
