"""The milters as a mailwarden capability: the ``[milters]`` section and the ``milter`` command."""

from __future__ import annotations

import click
from pydantic import Field

from mailwarden.capability import Capability
from mailwarden.section import Section
from mailwarden.units import Size
from milters.clamav import ClamavSettings
from milters.banned import BannedSettings


class MiltersSettings(Section):
    spool_memory: Size = 1 << 20
    """Bytes of a message kept in memory; the rest goes to an unlinked temporary file."""
    clamav: ClamavSettings = ClamavSettings()
    banned: BannedSettings = Field(default_factory=BannedSettings)
    """The banned-attachments check (``[milters.banned]``)."""


def register_cli(group: click.Group) -> None:
    """The ``milter`` command arrives with the milter base."""


CAPABILITY = Capability(name="milters", settings_model=MiltersSettings, register_cli=register_cli)
