#!/usr/bin/env bash
# The README's run command. Installs what is missing (Debian packages, the locked venv), then starts
# Redis (if none answers on 127.0.0.1:6379), an SMTP sink on 127.0.0.1:2500 that keeps what it receives in
# run/sink/, a private clamd with the local test signatures (there is no freshclam without internet), a
# private spamd on 127.0.0.1:7830 (local tests only, per-user Bayes), the ClamAV milter on 127.0.0.1:10030 and
# the SpamAssassin milter on 127.0.0.1:10031 and the phish milter on 127.0.0.1:10032 with their quarantine in
# run/, phishhook (Dovecot's auth policy endpoint and the intake on 127.0.0.1:10040, the review page on
# 127.0.0.1:10041), a private Postfix on 127.0.0.1:2525 wired to policyd on 127.0.0.1:10023 and to the milters
# (re-injection listener on 127.0.0.1:10026), and policyd in
# the foreground (Ctrl-C stops it all). Everything it keeps is under run/, config included
# (run/mailwarden.toml, unless $MAILWARDEN_CONFIG names another). Run again while it runs, it says so and
# leaves the running one alone.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${MAILWARDEN_RUN:-$PWD/run}   # tests point it elsewhere
export VENV=$(realpath -m "${VENV:-.venv}")
mkdir -p "$RUN"

if [ -f "$RUN/quickstart.pid" ]; then
  pid=$(cat "$RUN/quickstart.pid")
  if [ -n "$pid" ] && [ "$pid" != "$$" ] && kill -0 "$pid" 2>/dev/null \
     && grep -qs quickstart "/proc/$pid/cmdline"; then
    echo "quickstart: already running (pid $pid): Postfix on 127.0.0.1:2525, policyd on 127.0.0.1:10023."
    echo "quickstart: left it alone; stop it with Ctrl-C in its terminal, or: kill $pid"
    exit 0
  fi
fi
echo $$ > "$RUN/quickstart.pid"

bash tools/bootstrap.sh

mkdir -p "$RUN/sink" "$RUN/db"
chown nobody "$RUN/sink"
if [ -z "${MAILWARDEN_CONFIG:-}" ]; then
  export MAILWARDEN_CONFIG=$RUN/mailwarden.toml
  [ -f "$MAILWARDEN_CONFIG" ] || cat > "$MAILWARDEN_CONFIG" <<TOML
# The quick start's config (tools/quickstart.sh wrote it; edit it freely, it is kept between runs).
# Every key, with its default: etc/mailwarden.toml.
[policyd.greylist]
# 'mailwarden greylist whitelist-update' writes here, not under /var/lib/mailwarden
managed_whitelist = "$RUN/whitelist_clients"

[milters.clamav]
listen = "inet:127.0.0.1:10030"
clamd = "unix:$RUN/clamd/clamd.sock"

[quarantine]
database_url = "sqlite:///$RUN/db/quarantine.sqlite"
message_dir = "$RUN/db/messages"
reinject = "127.0.0.1:10026"
TOML
  # (a config kept from a quick start before the SpamAssassin milter gets its section)
  grep -qs '^\[milters.spamassassin\]' "$MAILWARDEN_CONFIG" || cat >> "$MAILWARDEN_CONFIG" <<TOML

[milters.spamassassin]
listen = "inet:127.0.0.1:10031"
# the banner's examples log in (to skip greylisting): score their mail too (a site's default: false)
scan_submission = true

[milters.spamassassin.spamd]
address = "127.0.0.1:7830"
TOML
  # (a config kept from a quick start before digests: its catalogue moves to run/db, which the reply pipe's
  # user may write, and it gets a [quarantine.digest] section with a token key of its own)
  if ! grep -qs '^\[quarantine.digest\]' "$MAILWARDEN_CONFIG"; then
    if grep -qs "^database_url = \"sqlite:///$RUN/quarantine.sqlite\"" "$MAILWARDEN_CONFIG"; then
      mkdir -p "$RUN/db"
      for f in "$RUN"/quarantine.sqlite*; do [ -e "$f" ] && mv "$f" "$RUN/db/"; done
      [ -d "$RUN/quarantine" ] && mv "$RUN/quarantine" "$RUN/db/messages"
      sed -i -e "s#^database_url = \"sqlite:///$RUN/quarantine.sqlite\"#database_url = \"sqlite:///$RUN/db/quarantine.sqlite\"#" \
             -e "s#^message_dir = \"$RUN/quarantine\"#message_dir = \"$RUN/db/messages\"#" "$MAILWARDEN_CONFIG"
    fi
    cat >> "$MAILWARDEN_CONFIG" <<TOML

[quarantine.digest]
from_address = "postmaster@example.test"
reply_mailbox = "quarantine@example.test"
# SASL logins without a domain (swaks --xclient-login user) are user@example.test
login_domain = "example.test"
[[quarantine.digest.token_keys]]
id = "a"
secret = "$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
TOML
  fi
  # (a config kept from a quick start before phishhook)
  if ! grep -qs '^\[phishhook\]' "$MAILWARDEN_CONFIG"; then
    review_password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(12))')
    echo "$review_password" > "$RUN/review-password" && chmod 600 "$RUN/review-password"
    cat >> "$MAILWARDEN_CONFIG" <<TOML

[milters.phish]
listen = "inet:127.0.0.1:10032"

[phishhook]
listen = "127.0.0.1:10040"
[phishhook.geo]
# the 2018 GeoLite2 City database the tests use (PyPI's maxminddb-geolite2); a site's comes from geoipupdate
city_database = "$("$VENV/bin/python" -c 'from _maxminddb_geolite2 import geolite2_database; print(geolite2_database())')"
[phishhook.history]
# the quick start's accounts are all new: judge them at once (a site's default: 7 days of alerts only)
learning_period = "0s"
[phishhook.review]
listen = "127.0.0.1:10041"
session_secret = "$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
[phishhook.review.accounts]
# password in $RUN/review-password
admin = "$("$VENV/bin/python" -c 'import sys; from argon2 import PasswordHasher; print(PasswordHasher().hash(sys.argv[1]))' "$review_password")"
TOML
  fi
fi
# the quarantine's catalogue: the reply pipe's user (nobody, below) writes it too; what root creates in
# run/db the store gives to the directory's owner
chown -R nobody "$RUN/db"

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "quickstart: starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir "$RUN" \
    --logfile "$RUN/redis.log"
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# a previous run's leftovers (one that was killed before it could clean up)
"$VENV/bin/python" tests/harness/postfix.py stop "$RUN/postfix" 2>/dev/null || true
"$VENV/bin/python" tests/harness/clamd.py stop "$RUN/clamd" 2>/dev/null || true
# spamd runs as debian-spamd, which must reach its directory: not under a 0700 home
SPAMD_DIR=$RUN/spamd
runuser -u debian-spamd -- test -x "$RUN" 2>/dev/null || SPAMD_DIR=/tmp/mailwarden-quickstart-spamd
"$VENV/bin/python" tests/harness/spamd.py stop "$SPAMD_DIR" 2>/dev/null || true
[ -f "$RUN/sink.pid" ] && kill "$(cat "$RUN/sink.pid")" 2>/dev/null || true
for name in milter milter-spamassassin milter-phish phishhook; do
  [ -f "$RUN/$name.pid" ] && kill "$(cat "$RUN/$name.pid")" 2>/dev/null || true
done

smtp-sink -u nobody -d "$RUN/sink/msg." 127.0.0.1:2500 64 &
echo $! > "$RUN/sink.pid"

# the EICAR anti-virus test file for the banner's example, written here (the tree keeps it encoded only, so
# that no scanner flags the checkout)
echo WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo= \
  | base64 -d > "$RUN/eicar.com"
# clamd with the local test signatures only: a site's clamd gets the real ones from freshclam (README)
mkdir -p "$RUN/clamd"
"$VENV/bin/python" tests/harness/clamd.py start "$RUN/clamd" --port 3310
# spamd with the package's rules, local tests only (no network tests without internet)
"$VENV/bin/python" tests/harness/spamd.py start "$SPAMD_DIR" --port 7830
# the quarantine's tables (SQLite in run/), then the milters, logging to run/milter.log and
# run/milter-spamassassin.log
"$VENV/bin/mailwarden" quarantine migrate
"$VENV/bin/mailwarden" milter clamav >>"$RUN/milter.log" 2>&1 &
echo $! > "$RUN/milter.pid"
"$VENV/bin/mailwarden" milter spamassassin >>"$RUN/milter-spamassassin.log" 2>&1 &
echo $! > "$RUN/milter-spamassassin.pid"
"$VENV/bin/mailwarden" milter phish >>"$RUN/milter-phish.log" 2>&1 &
echo $! > "$RUN/milter-phish.pid"
"$VENV/bin/mailwarden" phish serve >>"$RUN/phishhook.log" 2>&1 &
echo $! > "$RUN/phishhook.pid"
for log in milter.log milter-spamassassin.log milter-phish.log; do
  for _ in $(seq 100); do grep -qs "msg=ready" "$RUN/$log" && break; sleep 0.1; done
done
for _ in $(seq 100); do grep -qs "phishhook serving" "$RUN/phishhook.log" && break; sleep 0.1; done

mkdir -p "$RUN/postfix" && chmod 755 "$RUN" "$RUN/postfix"
# replies to digests: Postfix pipes quarantine@example.test to `mailwarden digest reply` as user nobody (pipe(8)
# runs no command as root), which must run this checkout's Python and write the catalogue in run/db
PIPE_USER=nobody
PIPE_PYTHON="$VENV/bin/python"
if ! runuser -u "$PIPE_USER" -- "$PIPE_PYTHON" -c "import mailwarden.cli" 2>/dev/null; then
  # a venv whose interpreter the pipe user cannot run (a pyenv under /root): Debian's, with the venv's packages
  site=$("$VENV/bin/python" -c "import pathlib, pydantic; print(pathlib.Path(pydantic.__file__).parents[1])")
  PIPE_PYTHON="env PYTHONPATH=$PWD:$site /usr/bin/python3"
  runuser -u "$PIPE_USER" -- $PIPE_PYTHON -c "import mailwarden.cli" 2>/dev/null || PIPE_PYTHON=""
fi
reply_args=()
if [ -n "$PIPE_PYTHON" ]; then
  touch "$RUN/digest-reply.log" && chown "$PIPE_USER" "$RUN/digest-reply.log"
  cat > "$RUN/digest-reply" <<SH
#!/bin/sh
# what the quick start's Postfix pipes replies to (README, "Replies to digests"); the pipe discards output
exec env MAILWARDEN_CONFIG=$MAILWARDEN_CONFIG $PIPE_PYTHON -m mailwarden.cli "\$@" 2>>$RUN/digest-reply.log
SH
  chmod 755 "$RUN/digest-reply"
  reply_args=(--digest-reply-command "$RUN/digest-reply" --digest-reply-user "$PIPE_USER"
              --reply-mailbox quarantine@example.test)
else
  echo "quickstart: user $PIPE_USER cannot run this checkout's Python (is it under a private home directory?):"
  echo "quickstart: replies to digests are not wired; clone it under /srv or /opt to try them"
fi
"$VENV/bin/python" tests/harness/postfix.py start "$RUN/postfix" --smtp-port 2525 --sink-port 2500 --policy-port 10023 \
  --milters "inet:127.0.0.1:10030, inet:127.0.0.1:10031, inet:127.0.0.1:10032" --reinject-port 10026 \
  "${reply_args[@]}"

cleanup() {
  [ -n "${suite:-}" ] && kill -TERM "$suite" 2>/dev/null && wait "$suite" 2>/dev/null
  "$VENV/bin/python" tests/harness/postfix.py stop "$RUN/postfix" || true
  kill "$(cat "$RUN/milter.pid")" "$(cat "$RUN/milter-spamassassin.pid")" "$(cat "$RUN/milter-phish.pid")" \
       "$(cat "$RUN/phishhook.pid")" 2>/dev/null || true
  "$VENV/bin/python" tests/harness/clamd.py stop "$RUN/clamd" || true
  "$VENV/bin/python" tests/harness/spamd.py stop "$SPAMD_DIR" || true
  kill "$(cat "$RUN/sink.pid")" 2>/dev/null || true
  rm -f "$RUN/quickstart.pid"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat <<MSG

  Postfix listens on 127.0.0.1:2525 and asks mailwarden policyd (127.0.0.1:10023) about every recipient,
  then the ClamAV milter (127.0.0.1:10030, log $RUN/milter.log), the SpamAssassin milter
  (127.0.0.1:10031, log $RUN/milter-spamassassin.log) and the phish milter (127.0.0.1:10032, log
  $RUN/milter-phish.log) about every message. phishhook (Dovecot's auth policy, the login intake and the
  review page) logs to $RUN/phishhook.log.
  Try:   swaks --server 127.0.0.1:2525 --from a@example.org --to user@example.test --xclient-addr 192.0.2.20
  (the first attempt is greylisted; accepted mail lands in $RUN/sink/, Postfix's log is $RUN/postfix/maillog)
  A virus (the EICAR test file), refused at end of data with 554 5.7.1:
         swaks --server 127.0.0.1:2525 --from a@example.org --to user@example.test --xclient-login alice \\
               --attach-name eicar.txt --attach @$RUN/eicar.com
  A spam (the GTUBE test string), refused with 550 5.7.1 (held instead once the recipient's reject level
  is above its score of 1000: mailwarden spam levels set --for user@example.test --reject 2000):
         swaks --server 127.0.0.1:2525 --from a@example.org --to user@example.test --xclient-login alice \\
               --body 'XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X'

  A digest of what was held for user@example.test (it lands in $RUN/sink/), sent now whatever its interval:
         mailwarden digest send --owner user@example.test
  Reply to it as its owner: a button's address and subject, through Postfix, logged in (replies log to
  $RUN/digest-reply.log):
         swaks --server 127.0.0.1:2525 --from user@example.test --xclient-login user \\
               --to 'quarantine+<the token of the link>@example.test' --header 'Subject: RELEASE <shortid>' --body thanks

  A phished account: a login from Boston an hour ago (told as webmail would), then mail from Beijing as the
  same user. The message is held for the security team and the account snagged: its next message is
  refused at RCPT (550 5.7.1). Review at http://127.0.0.1:10041/ (admin, password in $RUN/review-password)
  or with mailwarden phish list / show / release:
         mailwarden phish login --user eve --address 128.197.26.35 --at 1h
         swaks --server 127.0.0.1:2525 --from eve@example.test --to user@example.test --xclient-login eve \\
               --xclient-addr 166.111.4.100

  The command line, in another terminal, with this run's config:
         export PATH=$VENV/bin:\$PATH MAILWARDEN_CONFIG=$MAILWARDEN_CONFIG
         mailwarden greylist show --client 192.0.2.20

MSG
# in the background, so that a SIGTERM to this script reaches it too (through cleanup)
"$VENV/bin/mailwarden" run &
suite=$!
wait "$suite"
