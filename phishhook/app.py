"""Assembling the detector from the config, for the service, the phish milter and the CLI."""

from __future__ import annotations

from mailwarden.config import Config
from mailwarden.logs import DecisionLog, get_logger
from mailwarden.redis_sync import sync_client
from phishhook.actions import ActionRunner, ActionWorker
from phishhook.detector import Detector, DetectorParts
from phishhook.geo import GeoLocator, GeoSettings
from phishhook.networks import NetworkClassifier
from phishhook.snags import SnagStore

log = get_logger("phishhook")


def open_geo(settings: GeoSettings) -> tuple[GeoLocator | None, str]:
    """The geo databases, and why every snag must be alert-only ("" when they are fine): GeoLocator.open
    raises GeoDatabaseError (a start-up error naming the file and key) unless ``on_error = "alert-only"``."""
    if settings.city_database is None:
        return None, ""
    locator = GeoLocator.open(settings)
    return (locator if locator.enabled else None), (f"geo database unusable: {locator.problem}"
                                                    if locator.problem else "")


def build_detector(config: Config, decisions: DecisionLog | None, *, background: bool = True) -> Detector:
    """The detector with every part from the config. ``background``: run slow actions (commands, ticket,
    webhook) on a worker thread (services); the CLI runs them in line."""
    settings = config.section("phishhook")
    redis_settings = config.section("redis")
    client = sync_client(redis_settings)
    geo, forced_alert = open_geo(settings.geo)
    actions = ActionRunner(settings.actions, client, redis_settings.key_prefix)
    parts = DetectorParts(settings=settings, client=client, prefix=redis_settings.key_prefix, geo=geo,
                          classifier=NetworkClassifier(settings.networks), snags=SnagStore.open(
                              config.section("quarantine")), actions=actions,
                          worker=ActionWorker() if background else None, decisions=decisions,
                          forced_alert=forced_alert)
    return Detector(parts)
