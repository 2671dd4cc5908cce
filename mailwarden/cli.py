"""The ``mailwarden`` command. Each capability adds its own subcommands (``policyd``, ``block`` ...).

Output is for people by default and for scripts with ``--json`` (errors too: ``{"ok": false, "error": ...}``
on stdout). Exit codes: 0 ok, 1 the action failed or nothing matched, 2 bad usage, 69 (EX_UNAVAILABLE) a
backend could not be reached, 78 (EX_CONFIG) bad config.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click
import redis

from mailwarden.capability import installed_capabilities
from mailwarden.config import Config, ConfigError, load_config, preflight, redacted, require_startable, to_toml
from mailwarden.listen import ListenError, exit_code_for
from mailwarden.logs import DecisionLog, get_logger, setup_logging
from mailwarden.metrics import start_metrics_server
from mailwarden.reload import ConfigReloader
from mailwarden.service import run_event_loop, run_until_signalled

EX_UNAVAILABLE = os.EX_UNAVAILABLE
EX_SOFTWARE = os.EX_SOFTWARE
EX_CONFIG = os.EX_CONFIG

log = get_logger("cli")


@dataclass
class CliContext:
    config_path: str | None
    overrides: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        try:
            return load_config(self.config_path, self.overrides)
        except ConfigError as exc:
            fail(str(exc), EX_CONFIG)

    def reread(self) -> Config:
        """The config read again as at start-up (same file, same command-line overrides), for SIGHUP;
        raises ConfigError."""
        return load_config(self.config_path, self.overrides)


def wants_json() -> bool:
    """Whether the command being run was given ``--json`` (its ``as_json`` parameter)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


def fail(message: str, code: int = 1) -> NoReturn:
    """The one way a command reports an error: on stderr for people, or ``{"ok": false, "error": ...}`` on
    stdout when the command was given ``--json``; the exit code is the same either way."""
    if wants_json():
        click.echo(json.dumps({"ok": False, "error": message}, indent=2))
    else:
        click.echo(f"mailwarden: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def backend_errors() -> Iterator[None]:
    """For commands that talk to a backend: a bad argument exits 2, an unreachable Redis 69, both with a
    message instead of a traceback."""
    try:
        yield
    except ValueError as exc:
        fail(str(exc), 2)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}", EX_UNAVAILABLE)


def emit(data: Any, as_json: bool, human: str) -> None:
    """Print ``human`` for people, or ``data`` as JSON for scripts."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str) if as_json else human)


def start_logging(config: Config, batch_decisions: bool = False) -> DecisionLog:
    """Logging as ``[logging]`` says; ``batch_decisions`` only for a daemon that flushes the decision log
    when it stops (see ``setup_logging``)."""
    return setup_logging(config.section("logging"), batch_decisions=batch_decisions)


@contextlib.contextmanager
def startup_errors() -> Iterator[None]:
    """Around a daemon's start and run: every failure is one line on stderr and a documented exit code,
    never a traceback (that is logged at debug level for an unexpected error)."""
    try:
        yield
    except ListenError as exc:
        fail(str(exc), exc.exit_code)
    except ConfigError as exc:
        fail(str(exc), EX_CONFIG)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"cannot start: {where}{(exc.strerror or str(exc)).lower()}", exit_code_for(exc))
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        fail(f"cannot start: {type(exc).__name__}: {exc}", EX_SOFTWARE)


def serve(config: Config, names: list[str] | None = None, reread: Callable[[], Config] | None = None) -> None:
    """Run the services of the named capabilities (all of them when None) in the foreground. With
    ``reread`` (CliContext.reread), SIGHUP reads the config file again and applies what it can."""
    caps = [cap for cap in installed_capabilities() if cap.make_service and (names is None or cap.name in names)]
    if not caps:
        fail("no service to run")
    with startup_errors():
        decisions = start_logging(config, batch_decisions=True)  # flushed below, however the loop ends
        require_startable(config, [cap.name for cap in caps])  # what `config check` reports, refused alike
        services = {cap.name: cap.make_service(config, decisions) for cap in caps}  # type: ignore[misc]
        start_metrics_server(config.section("metrics"))
        restart_keys = [f"{cap.name}.{key}" for cap in caps for key in cap.restart_keys]
        reloader = None
        if reread is not None:
            def read_startable() -> Config:  # SIGHUP refuses what start-up would refuse
                new = reread()
                require_startable(new, [cap.name for cap in caps])
                return new

            reloader = ConfigReloader(config, read_startable, restart_keys)

        async def main() -> None:
            try:
                await run_until_signalled(services, reloader)
            finally:
                decisions.flush()  # decision lines still batched ([logging] decision_batch), whatever stopped us

        run_event_loop(main())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "-c", "config_path", metavar="FILE", default=None,
              help="Config file (default: $MAILWARDEN_CONFIG, else /etc/mailwarden/mailwarden.toml if present).")
@click.version_option(package_name="mailwarden")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """mailwarden: policy service, milters, quarantine and phish detection for Postfix."""
    ctx.obj = CliContext(config_path)


@cli.group("config")
def config_group() -> None:
    """Inspect and validate the configuration."""


@config_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--for", "for_names", multiple=True, metavar="CAPABILITY",
              help="Only what the start-up of this capability checks (policyd, milters, quarantine...); "
                   "repeatable. A unit's ExecStartPre names its own.")
@click.pass_obj
def config_check(ctx: CliContext, as_json: bool, for_names: tuple[str, ...]) -> None:
    """Validate the config file and its drop-ins, and every file they name, as start-up would, without
    starting anything: exit 78 on what start-up would refuse; warnings are printed, exit 0."""
    known = {cap.name for cap in installed_capabilities()}
    if unknown := sorted(set(for_names) - known):
        raise click.BadParameter(f"no capability {', '.join(unknown)}; one of {', '.join(sorted(known))}",
                                 param_hint="--for")
    try:
        config = load_config(ctx.config_path, ctx.overrides)
    except ConfigError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc), "warnings": []}, indent=2))
            sys.exit(EX_CONFIG)
        fail(str(exc), EX_CONFIG)
    problems = preflight(config, for_names or None)
    errors = [problem for problem in problems if not problem.warning]
    warnings = [config.describe_warning(problem) for problem in problems if problem.warning]
    source = str(config.source) if config.source else "built-in defaults"
    report: dict[str, Any] = {"ok": not errors, "source": source, "dropins": [str(p) for p in config.dropins],
                              "warnings": warnings}
    if as_json:
        if errors:
            report["error"] = config.describe(errors)
        click.echo(json.dumps(report, indent=2))
    else:
        for warning in warnings:
            click.echo(f"mailwarden: {warning}", err=True)
        if errors:
            click.echo(f"mailwarden: {config.describe(errors)}", err=True)
        else:
            dropins = f" (and {len(config.dropins)} drop-in(s))" if config.dropins else ""
            click.echo(f"{source}{dropins}: configuration is valid")
    if errors:
        sys.exit(EX_CONFIG)


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
@click.pass_obj
def config_show(ctx: CliContext, as_json: bool) -> None:
    """Print the effective configuration (file, drop-ins and defaults) as TOML, or JSON with --json;
    passwords (``*password`` keys, the password in URLs) are shown as ***."""
    config = ctx.load()
    data = redacted(config.settings.model_dump(mode="json"))
    click.echo(json.dumps(data, indent=2) if as_json else to_toml(data), nl=as_json)


@cli.command("run")
@click.pass_obj
def run(ctx: CliContext) -> None:
    """Start every service of the suite in the foreground (the quick start)."""
    serve(ctx.load(), reread=ctx.reread)


def main() -> None:
    for cap in installed_capabilities():
        cap.register_cli(cli)
    try:
        cli.main(prog_name="mailwarden", standalone_mode=False)
    except click.ClickException as exc:  # bad usage (exit 2), as JSON too when --json was given
        if "--json" in sys.argv[1:]:
            click.echo(json.dumps({"ok": False, "error": exc.format_message()}, indent=2))
        else:
            exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
