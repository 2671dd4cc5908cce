"""The milters' Prometheus metrics, labelled by milter (``clamav``, ``spamassassin`` ...)."""

from prometheus_client import Counter, Histogram

DECISIONS = Counter("mailwarden_milter_decisions", "Per-recipient milter decisions by milter, deciding check "
                    "and action", ["milter", "check", "action"])
MESSAGE_SECONDS = Histogram("mailwarden_milter_message_seconds", "Time from end of message to the answer",
                            ["milter"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                 5, 10, 30, 60))
CHECK_SECONDS = Histogram("mailwarden_milter_check_seconds", "Time one check took for one message",
                          ["milter", "check"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                        0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
MESSAGE_BYTES = Histogram("mailwarden_milter_message_bytes", "Size of the messages seen", ["milter"],
                          buckets=(1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26))
FAILURES = Counter("mailwarden_milter_failures", "Messages answered 451 because a check or the store failed, "
                   "by error type", ["milter", "error"])
RECORDS_SKIPPED = Counter("mailwarden_milter_records_skipped", "Delivered messages whose record in the quarantine "
                          "store (tagged spam, state delivered) was skipped because the store failed, by error "
                          "type", ["milter", "error"])
SCANNER_ERRORS = Counter("mailwarden_milter_scanner_errors", "Failed calls to a scanner (unreachable, timed out, "
                         "an error reply), retries included, by check", ["check"])
