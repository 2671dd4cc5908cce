#!/usr/bin/env bash
# The README's test command: installs what is missing (Debian packages, the locked venv), then runs the
# linter and the whole suite against real Postfix, Redis, slapd, Dovecot and MariaDB, all private
# instances on loopback ports of their own. Extra arguments go to pytest (e.g. -k greylist, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
exec "$VENV/bin/pytest" -q "$@"
