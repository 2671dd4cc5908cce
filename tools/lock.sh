#!/usr/bin/env bash
# Locks the Python dependencies: resolves pyproject.toml's ranges from PyPI and writes
#   requirements/main.txt  what a production install gets (the daemons and the CLI)
#   requirements/test.txt  the same pins plus the test tools (the README's commands install this one)
# every pin with its hashes, for CPython 3.11 on Linux (Debian 12's python3). Run it after changing a
# dependency in pyproject.toml (the pins already there are kept where they still fit), or with --upgrade
# to take the newest releases the ranges allow; then run the tests and commit both files.
#
#   bash tools/lock.sh [--upgrade]
#
# Resolve with Debian 12's own interpreter (/usr/bin/python3, 3.11.2), the one the README's commands
# use: markers such as redis's `async-timeout; python_full_version < "3.11.3"` are decided for it.
# It ignores this machine's pip settings (PIP_CONFIG_FILE=/dev/null) so that what is locked is what a
# fresh server's pip finds on PyPI, not a local wheel or a site constraint.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-/usr/bin/python3}" -m venv "$work/venv"
"$work/venv/bin/pip" install -q 'pip-tools==7.*'
compile=("$work/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url
         --resolver=backtracking)
[ "${1:-}" = --upgrade ] && compile+=(--upgrade)
"${compile[@]}" --extra test --output-file requirements/test.txt pyproject.toml
# main.txt: the subset of test.txt's pins a production install needs (same versions, resolved together)
"${compile[@]}" --constraint requirements/test.txt --output-file requirements/main.txt pyproject.toml
echo "lock: wrote requirements/main.txt and requirements/test.txt"
