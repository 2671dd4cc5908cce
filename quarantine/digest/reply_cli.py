"""``mailwarden digest`` commands of reply.py
(the ``digest`` group joins this module's and the others': capability.py)."""

from __future__ import annotations

import click


@click.group("digest")
def digest_group() -> None:
    """Commands of reply.py."""
