"""The quarantine as a mailwarden capability: the ``[quarantine]`` section and the ``quarantine`` commands."""

from __future__ import annotations

import click

from mailwarden.capability import Capability
from mailwarden.section import Section


class QuarantineSettings(Section):
    """Filled in with the store."""


def register_cli(group: click.Group) -> None:
    """The ``quarantine`` commands arrive with the store."""


CAPABILITY = Capability(name="quarantine", settings_model=QuarantineSettings, register_cli=register_cli)
