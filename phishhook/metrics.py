"""phishhook's Prometheus metrics."""

from prometheus_client import Counter

ACTIONS = Counter("mailwarden_phish_actions", "Snag actions run, by configured action name and result (ok, failed, "
                  "skipped: alert-only, or nothing to do such as no public source address)", ["action", "result"])
