"""What ``mailwarden phish serve`` and the phish milter would trip over beyond the settings schema, for
``config check`` (start-up refuses the errors): a geo database missing, unreadable or of the wrong type
(unless ``on_error = "alert-only"``: then a warning, as the service would run alert-only), a broken relay
file, review accounts that are not argon2 hashes, two listeners on one address; and warnings for what works
but is unsafe (Dovecot's endpoint without an API header away from loopback, short intake tokens)."""

from __future__ import annotations

import ipaddress

from mailwarden.config import Problem
from phishhook.geo import check_databases
from phishhook.networks import check_relay_files
from phishhook.settings import PhishhookSettings
from quarantine.store import split_host_port

MIN_TOKEN = 16
"""Characters an intake token should have at least."""


def preflight(settings: PhishhookSettings) -> list[Problem]:
    problems: list[Problem] = []
    alert_only = settings.geo.on_error == "alert-only"
    for message in check_databases(settings.geo):
        suffix = "; until it is fixed every snag is alert-only" if alert_only else ""
        problems.append(Problem(("phishhook", "geo"), message + suffix, warning=alert_only))
    for message in check_relay_files(settings.networks):
        problems.append(Problem(("phishhook", "networks"), message))
    for name, hashed in settings.review.accounts.items():
        if not hashed.startswith("$argon2"):
            problems.append(Problem(("phishhook", "review", "accounts", name),
                                    "not an argon2 hash: `mailwarden phish passwd NAME` prints one (never put a "
                                    "password itself in the config)"))
    if settings.review.listen and split_host_port(settings.review.listen) == split_host_port(settings.listen):
        problems.append(Problem(("phishhook", "review", "listen"),
                                "the same address as [phishhook] listen: give the review page a port of its own"))
    if settings.dovecot.api_header is None and not _loopback(settings.listen):
        problems.append(Problem(("phishhook", "dovecot", "api_header"),
                                f"unset while [phishhook] listen ({settings.listen}) is not a loopback address: "
                                "anyone who reaches it can report logins; set it as Dovecot's "
                                "auth_policy_server_api_header", warning=True))
    elif settings.dovecot.api_header is not None and ":" not in settings.dovecot.api_header:
        problems.append(Problem(("phishhook", "dovecot", "api_header"),
                                "expected 'Header-Name: value', exactly as Dovecot's auth_policy_server_api_header"))
    for name, token in settings.intake.tokens.items():
        if len(token) < MIN_TOKEN:
            problems.append(Problem(("phishhook", "intake", "tokens", name),
                                    f"shorter than {MIN_TOKEN} characters: use a long random one (`openssl rand "
                                    "-hex 24`)", warning=True))
    return problems


def _loopback(listen: str) -> bool:
    host, _port = split_host_port(listen)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
