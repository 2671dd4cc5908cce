"""Assembling the detector from the config, for the service, the phish milter and the CLI."""

from __future__ import annotations

import logging

from mailwarden.config import Config
from mailwarden.logs import DecisionLog, get_logger, log_kv
from mailwarden.redis_sync import sync_client
from phishhook.actions import ActionRunner, ActionWorker
from phishhook.detector import Detector, DetectorParts
from phishhook.geo import GeoDatabaseError, GeoLocator
from phishhook.networks import NetworkClassifier
from phishhook.snags import SnagStore

log = get_logger("phishhook")


def open_geo(settings: object) -> tuple[GeoLocator | None, str]:
    """The geo databases, or (None, why) when they cannot be opened and ``on_error = "alert-only"``;
    GeoDatabaseError (a start-up error naming the file and key) otherwise."""
    geo_settings = settings.geo  # type: ignore[attr-defined]
    if geo_settings.city_database is None:
        return None, ""
    try:
        return GeoLocator(geo_settings), ""
    except GeoDatabaseError as exc:
        if geo_settings.on_error != "alert-only":
            raise
        log_kv(log, logging.ERROR, "geo database unusable: every snag is alert-only until it is fixed",
               error=str(exc))
        return None, f"geo database unusable: {exc}"


def build_detector(config: Config, decisions: DecisionLog | None, *, background: bool = True) -> Detector:
    """The detector with every part from the config. ``background``: run slow actions (commands, ticket,
    webhook) on a worker thread (services); the CLI runs them in line."""
    settings = config.section("phishhook")
    redis_settings = config.section("redis")
    client = sync_client(redis_settings)
    geo, forced_alert = open_geo(settings)
    actions = ActionRunner(settings.actions, client, redis_settings.key_prefix)
    parts = DetectorParts(settings=settings, client=client, prefix=redis_settings.key_prefix, geo=geo,
                          classifier=NetworkClassifier(settings.networks), snags=SnagStore.open(
                              config.section("quarantine")), actions=actions,
                          worker=ActionWorker(actions) if background else None, decisions=decisions,
                          forced_alert=forced_alert)
    return Detector(parts)
