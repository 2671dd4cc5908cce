#!/usr/bin/env bash
# Everything the two README commands need before they run: the Debian packages (tools/install-system-deps.sh)
# and the virtualenv .venv with the locked Python dependencies (requirements/test.txt, every pin hashed).
# Idempotent: the venv is rebuilt only when the lock or pyproject.toml changed since it was built.
#
# Works with Debian 12's own /usr/bin/python3 and its pip; needs no make. pymilter has no wheel on PyPI: pip
# compiles it (hash-checked sdist) with the compiler and libmilter-dev that install-system-deps.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements/test.txt}

bash tools/install-system-deps.sh

# This machine's pip settings (a site constraints file, local wheel folders) must not change what is
# installed: the lock says which versions, PyPI's files and the lock's hashes say which bytes.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# Our own modules compiled now: commands that run as a service user (the digest reply pipe runs as one that
# cannot write __pycache__ here) would otherwise compile every module from source at each start.
compile_sources() {
  "$VENV/bin/python" -m compileall -q mailwarden policyd milters quarantine phishhook >/dev/null \
    || echo "bootstrap: compileall failed (the commands still run, each compiling at start)" >&2
}

# Debian's own interpreter, the one the lock is resolved for (tools/lock.sh) and the one a Debian 12 server
# has, even where another python3 comes first on PATH (pyenv, /usr/local): Debian builds it with
# profile-guided and link-time optimisation, and it runs our hot paths about twice as fast as a plain
# source build (bench/README.md). PYTHON=... overrides it.
PYTHON=${PYTHON:-$( [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || command -v python3 )}

stamp=$( (cat "$LOCK" pyproject.toml; "$PYTHON" -c 'import sys; print(sys.executable, sys.version)') \
         | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" = "$stamp" ] && [ -x "$VENV/bin/mailwarden" ]; then
  compile_sources
  exit 0
fi
echo "bootstrap: building $VENV from $LOCK"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --require-hashes --no-deps -r "$LOCK"
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" check >/dev/null || { "$VENV/bin/pip" check; echo "bootstrap: the lock is inconsistent" >&2; exit 1; }
compile_sources
echo "$stamp" > "$VENV/.installed"
