"""policyd's Prometheus metrics."""

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("mailwarden_policyd_decisions", "Policy decisions by deciding check and action",
                    ["check", "action"])
LATENCY = Histogram("mailwarden_policyd_decision_seconds", "Time from request to answer",
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
CHECK_LATENCY = Histogram("mailwarden_policyd_check_seconds", "Time one check took for one request", ["check"],
                          buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
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
