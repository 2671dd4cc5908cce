"""phishhook's Prometheus metrics (served on ``[phishhook] listen`` at ``/metrics``; the phish milter's on its
own ``metrics_listen``)."""

from prometheus_client import Counter, Histogram

LOGINS = Counter("mailwarden_phish_logins", "Logins judged, by where they were heard and their outcome "
                 "(accept, exempt, snag, failed)", ["via", "outcome"])
SNAGS = Counter("mailwarden_phish_snags", "Snags raised (a finding added to an open snag counts too), by kind and "
                "mode", ["kind", "mode"])
ACTIONS = Counter("mailwarden_phish_actions", "Snag actions run, by configured action name and result (ok, failed, "
                  "skipped: alert-only, or nothing to do such as no public source address)", ["action", "result"])
AUTH_POLICY = Counter("mailwarden_phish_auth_policy_requests", "Dovecot auth policy requests, by command and "
                      "result (allowed, refused, success, failure, bad, unauthorised)", ["command", "result"])
AUTH_POLICY_SECONDS = Histogram("mailwarden_phish_auth_policy_seconds", "Time to answer a Dovecot auth policy "
                                "request", ["command"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                 0.1, 0.25, 0.5, 1, 2.5))
INTAKE = Counter("mailwarden_phish_intake_requests", "Login events posted to the intake, by result", ["result"])
