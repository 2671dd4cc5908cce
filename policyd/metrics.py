"""policyd's Prometheus metrics.

The three metrics every request updates (decisions, decision time, time per check) are plain counters
and bucket lists kept here, turned into metric families only when /metrics is scraped (``HotPath``, a
prometheus_client collector): prometheus_client's own objects take a lock and walk their buckets on every
update, about 0.75 µs a histogram observation, 5 of them per request on the default pipeline. The others
change per connection or per failure, not per request, and stay prometheus_client objects.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
CHECK_BUCKETS = (0.0001, *DECISION_BUCKETS)


class Buckets:
    """One histogram's counts: ``counts[i]`` holds the observations in bucket i alone (the last one: above
    every bound), made cumulative when scraped. Not thread-safe: updated from the event loop only, read by
    the scrape thread, which at worst sees a request counted in the buckets and not yet in the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (Prometheus' le is <=)
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        total, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((floatToGoString(bound), float(total)))
        return out


def _add_histogram(family: HistogramMetricFamily, labels: dict[str, str], buckets: Buckets) -> None:
    """The samples prometheus_client's own Histogram exposes, ``_created`` included."""
    family.add_metric(list(labels.values()), buckets.cumulative(), buckets.sum)
    family.samples.append(Sample(f"{family.name}_created", labels, buckets.created))


class HotPath(Collector):
    """The per-request metrics: ``decided`` once per answer; with ``check_histograms`` on, a ``check_buckets``
    histogram observed once per check run (off by default: one histogram observation per request on the hot
    path, as issue 14 asks; the family is served either way)."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str], int] = {}
        self.decisions_created: dict[tuple[str, str], float] = {}
        self.latency = Buckets(DECISION_BUCKETS)
        self.checks: dict[str, Buckets] = {}

    def decided(self, check: str, action: str, seconds: float) -> None:
        key = (check, action)
        try:
            self.decisions[key] += 1
        except KeyError:
            self.decisions_created[key] = time.time()
            self.decisions[key] = 1
        self.latency.observe(seconds)

    def check_buckets(self, check: str) -> Buckets:
        """The histogram of ``check``'s time (a pipeline keeps it, to observe without a lookup)."""
        buckets = self.checks.get(check)
        if buckets is None:
            buckets = self.checks[check] = Buckets(CHECK_BUCKETS)
        return buckets

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily("mailwarden_policyd_decisions", "Policy decisions by deciding check and action",
                                        labels=["check", "action"])
        for key, count in list(self.decisions.items()):
            decisions.add_metric(list(key), count, created=self.decisions_created.get(key))
        yield decisions
        latency = HistogramMetricFamily("mailwarden_policyd_decision_seconds", "Time from request to answer")
        _add_histogram(latency, {}, self.latency)
        yield latency
        checks = HistogramMetricFamily("mailwarden_policyd_check_seconds", "Time one check took for one request",
                                       labels=["check"])
        for check, buckets in list(self.checks.items()):
            _add_histogram(checks, {"check": check}, buckets)
        yield checks

    def describe(self) -> Iterator[Metric]:
        """Names only, so the registry can refuse a duplicate without collecting."""
        yield CounterMetricFamily("mailwarden_policyd_decisions", "", labels=["check", "action"])
        yield HistogramMetricFamily("mailwarden_policyd_decision_seconds", "")
        yield HistogramMetricFamily("mailwarden_policyd_check_seconds", "", labels=["check"])


HOT = HotPath()
REGISTRY.register(HOT)

BACKEND_ERRORS = Counter("mailwarden_policyd_backend_errors", "Failed backend calls by backend and check",
                         ["backend", "check"])
FAIL_MODE = Counter("mailwarden_policyd_fail_mode",
                    "Answers sent with a check in its dependency's fail mode, or at the answer_within bound: one "
                    "per answer, labelled by the first failed dependency and its mode", ["backend", "mode"])
TIMEOUTS = Counter("mailwarden_policyd_answer_timeouts", "Requests answered at the answer_within bound")
PROTOCOL_ERRORS = Counter("mailwarden_policyd_protocol_errors", "Connections closed for protocol errors",
                          ["kind"])
CONNECTIONS = Gauge("mailwarden_policyd_connections", "Open client connections")
CONNECTIONS_REFUSED = Counter("mailwarden_policyd_connections_refused",
                              "Client connections closed at once: over max_connections, or while draining",
                              ["reason"])
CONNECTIONS_EVICTED = Counter("mailwarden_policyd_connections_evicted",
                              "Client connections closed to give their slot to a new client, by what they were "
                              "doing (idle, or inside a request)", ["state"])
REDIS_UP = Gauge("mailwarden_redis_connected", "1 while the shared Redis connection is up")
RATELIMIT_HITS = Counter("mailwarden_policyd_ratelimit_hits", "Requests refused by a rate limit", ["limit"])
WHITELIST_AGE = Gauge("mailwarden_policyd_greylist_whitelist_age_seconds",
                      "Age of the newest greylist client whitelist (its recorded update or build date)")
WHITELIST_STALE = Gauge("mailwarden_policyd_greylist_whitelist_stale",
                        "1 while the greylist client whitelist is older than whitelist_max_age")
NOTIFICATIONS = Counter("mailwarden_policyd_notifications", "Rate-limit notifications by outcome", ["outcome"])
