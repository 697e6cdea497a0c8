#!/usr/bin/env bash
# Install Debian's Chromium for the Playwright browser test (tests/test_browser.py).
# Playwright is pointed at /usr/bin/chromium with `executable_path`; it never downloads a browser.
# Idempotent: does nothing when the binary is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version || true
