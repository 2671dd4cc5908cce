#!/usr/bin/env bash
# Installs the Debian packages the suite and its tests need, where missing. Idempotent. The tests start
# private instances of every server (redis-server, Postfix, slapd, Dovecot, MariaDB) on loopback ports of
# their own and never use a system instance the packages may have started; `make run` starts what it uses.
set -euo pipefail

# python3, python3-venv: the venv the README's commands build (Debian's own python3 is enough);
# postfix, redis-server: the policy path end to end; libsasl2-modules: Postfix's smtpd refuses to start
# with SASL enabled and no mechanism ("fatal: no SASL authentication mechanisms"), and it is only a
# Recommends of libsasl2-2, which --no-install-recommends leaves out; slapd, dovecot, mariadb-server:
# directory, quota and SQL sources the border checks ask in the tests; swaks: the quick start's client.
PACKAGES=(python3 python3-venv ca-certificates postfix libsasl2-modules redis-server swaks slapd dovecot-core
          dovecot-imapd mariadb-server)
[ "${WITH_BENCH:-0}" = 1 ] && PACKAGES+=(postgrey)

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
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
