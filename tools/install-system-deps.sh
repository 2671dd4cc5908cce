#!/usr/bin/env bash
# Installs the Debian packages the suite and its tests need, where missing. Idempotent. The tests start
# private instances of every server (redis-server, Postfix, slapd, Dovecot, MariaDB) on loopback ports of
# their own and never use a system instance the packages may have started; `make run` starts what it uses.
set -euo pipefail

# python3, python3-venv: the venv the README's commands build (Debian's own python3 is enough);
# postfix, redis-server: the policy path end to end; libsasl2-modules: Postfix's smtpd refuses to start
# with SASL enabled and no mechanism ("fatal: no SASL authentication mechanisms"), and it is only a
# Recommends of libsasl2-2, which --no-install-recommends leaves out; slapd, dovecot, mariadb-server:
# directory, quota and SQL sources the border checks ask in the tests; swaks: the quick start's client;
# postgrey: the test of `mailwarden greylist import-postgrey` (and the bench) runs the real one privately;
# db-util: db_dump, which that command reads Postgrey's Berkeley DB files with;
# gcc, libc6-dev, python3-dev, libmilter-dev: pymilter has no wheel on PyPI, pip builds it against Debian's
# libmilter; clamav-daemon: clamd, which the ClamAV milter streams messages to (the tests and the quick start
# run private instances with local test signatures); spamassassin, spamd: SpamAssassin's rules, sa-learn and its
# daemon, which the SpamAssassin milter asks (the tests run private spamd instances with per-user Bayes; spamd
# is a package of its own in bookworm, and only a Recommends of spamc, so it is named); chromium, fonts-dejavu-core:
# the digest's HTML part is rendered in Debian's headless Chromium by its test (a screenshot the README shows);
# chromium-driver: the phish review page is driven in that Chromium through Selenium by its test.
PACKAGES=(python3 python3-venv ca-certificates postfix libsasl2-modules redis-server swaks slapd dovecot-core
          dovecot-imapd mariadb-server postgrey db-util gcc libc6-dev python3-dev libmilter-dev clamav-daemon
          spamassassin spamd chromium chromium-driver fonts-dejavu-core)

# WITH_BENCH=1 (make bench sets it): what only the benchmarks run. clamav-milter: Debian's ClamAV milter, which
# bench/milter_bench.py runs privately beside ours (smtp-source and smtp-sink, its load and its sink, ship
# with postfix, above); spamass-milter: Debian's SpamAssassin milter, the same for the spam milter (it brings
# spamc).
if [ "${WITH_BENCH:-0}" = 1 ]; then
  PACKAGES+=(clamav-milter spamass-milter)
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-system-deps: run as root (or install sudo)" >&2; exit 1; }
  SUDO=sudo
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-system-deps: installing ${missing[*]}"
  # Postfix must not configure (or start) a system mail server: the suite runs private instances.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  # slapd likewise: no system directory; the tests run private instances
  echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
  # Installing a server package starts a system instance (Dovecot on 143, MariaDB on 3306, postgrey on
  # 10023 where the quick start's policyd listens ...). The suite and the quick start start private
  # instances of what they use, so a policy-rc.d (unless the host has one, as containers do) forbids
  # every start while the packages are installed.
  policy_rc=/usr/sbin/policy-rc.d
  if [ ! -e "$policy_rc" ]; then
    printf '#!/bin/sh\n# install-system-deps: start no system services while installing\nexit 101\n' \
      | $SUDO tee "$policy_rc" >/dev/null
    $SUDO chmod 755 "$policy_rc"
    trap '$SUDO rm -f "$policy_rc"' EXIT
  fi
  $SUDO apt-get update -qq
  apt_log=$(mktemp /tmp/install-system-deps.XXXXXX.log)
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
       >"$apt_log" 2>&1; then
    tail -n 40 "$apt_log" >&2
    echo "install-system-deps: apt-get install failed; its whole output: $apt_log" >&2
    exit 1
  fi
  rm -f "$apt_log"
  # ... nor at boot, for the servers installed only for the tests (redis-server stays: the quick start
  # uses the one on 127.0.0.1:6379 when it answers)
  # (spamd: Debian's spamd on port 783; spamassassin-maintenance: the daily timer that runs sa-update, which
  # fetches rules from the internet, and restarts spamd)
  for pair in postgrey:postgrey dovecot-core:dovecot mariadb-server:mariadb slapd:slapd \
              clamav-daemon:clamav-daemon clamav-daemon:clamav-freshclam clamav-milter:clamav-milter \
              spamd:spamd spamassassin:spamassassin-maintenance.timer spamass-milter:spamass-milter; do
    package=${pair%%:*} service=${pair#*:}
    if [[ " ${missing[*]} " == *" $package "* ]]; then
      unit=$service
      [[ $unit == *.* ]] || unit=$unit.service
      $SUDO deb-systemd-helper disable "$unit" >/dev/null 2>&1 || true
      $SUDO update-rc.d "${service%.*}" disable >/dev/null 2>&1 || true
    fi
  done
fi
