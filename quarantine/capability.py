"""The quarantine as a mailwarden capability: the ``[quarantine]`` section, the ``quarantine`` commands and
the ``spam`` commands (the spam preferences live in the quarantine's database).

The commands are loaded when one of them runs (``LazyGroup``): every ``mailwarden`` command registers every
capability's commands, and the quarantine's bring Alembic and SMTP with them.
"""

from __future__ import annotations

import logging

import click

from mailwarden.capability import Capability
from mailwarden.lazy_group import LazyGroup
from quarantine.preflight import preflight
from quarantine.store import QuarantineSettings, log

__all__ = ["CAPABILITY", "LazyGroup", "QuarantineSettings"]


def _quiet_store_log() -> None:
    # the outcome of each command is its output and exit code; the log lines the store writes for the
    # services (a failed release ...) would repeat it on stderr through logging's last resort
    logging.getLogger(log.name).addHandler(logging.NullHandler())


@click.group("quarantine", cls=LazyGroup, sources=(("quarantine.cli", "quarantine_group"),))
def quarantine_group() -> None:
    """Held messages: list, show, release, delete, purge; migrate the catalogue."""
    _quiet_store_log()


SPAM_COMMANDS = (("quarantine.spam_cli", "spam_group"), ("milters.spam_cli", "spam_group"))
"""Where the ``mailwarden spam`` commands live: (module, click group) pairs whose commands the group joins:
the preferences (levels, senders) here, Bayes and scoring (learn, check) with the SpamAssassin milter."""


@click.group("spam", cls=LazyGroup, sources=SPAM_COMMANDS)
def spam_group() -> None:
    """Spam: score levels and sender lists per mailbox or domain; Bayes training; scoring a message."""
    _quiet_store_log()


DIGEST_COMMANDS = (("quarantine.digest.send_cli", "digest_group"), ("quarantine.digest.reply_cli", "digest_group"))
"""Where the ``mailwarden digest`` commands live: sending digests (send, status) and reading the replies
(reply, events)."""


@click.group("digest", cls=LazyGroup, sources=DIGEST_COMMANDS)
def digest_group() -> None:
    """Users' digests of their held mail, and the replies that release, delete, whitelist or block."""
    _quiet_store_log()


def register_cli(group: click.Group) -> None:
    group.add_command(quarantine_group)
    group.add_command(spam_group)
    group.add_command(digest_group)


CAPABILITY = Capability(name="quarantine", settings_model=QuarantineSettings, register_cli=register_cli,
                        preflight=preflight)
