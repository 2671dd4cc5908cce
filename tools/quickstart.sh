#!/usr/bin/env bash
# `make run`: Redis (if none answers on 127.0.0.1:6379), an SMTP sink on 127.0.0.1:2500 that keeps what it
# receives in run/sink/, a private Postfix on 127.0.0.1:2525 wired to policyd on 127.0.0.1:10023, and the
# suite itself in the foreground (Ctrl-C stops it all). Run it again at any time: it cleans up first.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$PWD/run
VENV=${VENV:-.venv}
mkdir -p "$RUN/sink"
chown nobody "$RUN/sink"

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "quickstart: starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir "$RUN" \
    --logfile "$RUN/redis.log"
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# a previous run's leftovers
"$VENV/bin/python" tests/harness/postfix.py stop "$RUN/postfix" 2>/dev/null || true
[ -f "$RUN/sink.pid" ] && kill "$(cat "$RUN/sink.pid")" 2>/dev/null || true

smtp-sink -u nobody -d "$RUN/sink/msg." 127.0.0.1:2500 64 &
echo $! > "$RUN/sink.pid"
mkdir -p "$RUN/postfix" && chmod 755 "$RUN" "$RUN/postfix"
"$VENV/bin/python" tests/harness/postfix.py start "$RUN/postfix" --smtp-port 2525 --sink-port 2500 --policy-port 10023

cleanup() {
  "$VENV/bin/python" tests/harness/postfix.py stop "$RUN/postfix" || true
  kill "$(cat "$RUN/sink.pid")" 2>/dev/null || true
}
trap cleanup EXIT

cat <<MSG

  Postfix listens on 127.0.0.1:2525 and asks mailwarden policyd (127.0.0.1:10023) about every recipient.
  Try:   swaks --server 127.0.0.1:2525 --from a@example.org --to user@example.test --xclient-addr 192.0.2.20
  (the first attempt is greylisted; accepted mail lands in $RUN/sink/, Postfix's log is $RUN/postfix/maillog)

MSG
"$VENV/bin/mailwarden" ${MAILWARDEN_CONFIG:+--config "$MAILWARDEN_CONFIG"} run
