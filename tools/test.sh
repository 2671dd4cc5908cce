#!/usr/bin/env bash
# The README's test command: installs what is missing (Debian packages, the locked venv), then runs the
# linter (ruff), the type checker (mypy) and the whole suite against real Postfix, Redis, slapd, Dovecot and MariaDB, all private
# instances on loopback ports of their own. Extra arguments go to pytest (e.g. -k greylist, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"   # the packages and settings are in pyproject.toml [tool.mypy]
exec "$VENV/bin/pytest" -q "$@"
