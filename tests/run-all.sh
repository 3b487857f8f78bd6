#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine (system packages included),
# then run the whole suite: unit tests, the end-to-end tier, and the container image check.
# This is README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium prometheus podman runc debootstrap nginx >/dev/null
fi

# torch first, pinned: on these machines it resolves to a local CPU build, so the project's
# own install never pulls a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"

# Every stage runs and reports even when an earlier one failed; the exit status is the first
# failure's (a red test must not hide a broken image).
status=0
python -m ruff check . || status=$?
python -m pytest -q -p no:cacheprovider tests || { rc=$?; [ "$status" != 0 ] || status=$rc; }
if [ -x docker/check-image.sh ]; then
    bash docker/check-image.sh || { rc=$?; [ "$status" != 0 ] || status=$rc; }
fi
exit "$status"
