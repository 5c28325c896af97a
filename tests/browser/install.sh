#!/usr/bin/env bash
# What tests/browser/test_jitsu_js.py needs beside the venv (whose dev extra brings Playwright's
# Python driver): Chromium from Debian and @jitsu/js from npm (pinned in package.json /
# package-lock.json). Idempotent: installs only what is missing. Run it from anywhere.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
apt_updated=

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "$apt_updated" ]; then
        apt-get update
        apt_updated=1
    fi
    apt-get install -y --no-install-recommends "$@"
}

if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi

if [ ! -d "$here/node_modules" ]; then
    command -v npm >/dev/null 2>&1 || apt_install npm
    npm ci --prefix "$here" --no-audit --no-fund
fi
