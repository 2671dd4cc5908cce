"""``mailwarden milter NAME``: run one milter process in the foreground."""

from __future__ import annotations

import click

from mailwarden.cli import EX_CONFIG, CliContext, fail, start_logging, startup_errors
from mailwarden.config import require_startable
from mailwarden.metrics import MetricsSettings
from milters.app import MILTERS, build_app
from milters.runner import serve
from quarantine.store import SchemaBehind


@click.command("milter")
@click.argument("name", type=click.Choice(sorted(MILTERS)))
@click.option("--listen", "-l", metavar="inet:HOST:PORT|unix:PATH",
              help="Listen here instead of [milters.NAME] listen.")
@click.pass_obj
def milter_command(ctx: CliContext, name: str, listen: str | None) -> None:
    """Serve one milter to Postfix (smtpd_milters) until SIGTERM."""
    if listen:
        ctx.overrides[f"milters.{name}.listen"] = listen
    config = ctx.load()
    with startup_errors():
        decisions = start_logging(config)
        require_startable(config, ["milters", "quarantine", *(["phishhook"] if name == "phish" else [])])
        try:
            app = build_app(config, name, decisions)
        except SchemaBehind as exc:
            fail(str(exc), EX_CONFIG)
        settings = getattr(config.section("milters"), name)
        serve(app, settings, MetricsSettings(listen=settings.metrics_listen))


def register_cli(group: click.Group) -> None:
    group.add_command(milter_command)
