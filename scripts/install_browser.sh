#!/usr/bin/env bash
# Install Debian's headless-capable Chromium (/usr/bin/chromium) for the MLflow UI browser test
# (tests/test_mlflow_ui.py). Does nothing when it is already there. Only tries when it can: as root
# with apt-get (CI and the dev machines run as root). Never downloads a browser build of its own:
# only Debian's package works on this closed network.
# Exit status: 0 when /usr/bin/chromium is there afterwards, 1 otherwise.
set -uo pipefail
browser=/usr/bin/chromium
if [ -x "$browser" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get here; install Chromium yourself (Debian/Ubuntu package 'chromium')" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_browser: not root; run 'sudo apt-get install -y chromium' yourself" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install_browser: installing Debian's chromium (about 300 MB)" >&2
apt_install() {
  apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null
}
# The package lists may be missing or stale on a fresh machine: update them once, then retry.
if ! apt_install 2>/dev/null; then
  apt-get update -q >/dev/null || true
  if ! apt_install; then
    echo "install_browser: 'apt-get install chromium' failed" >&2
    exit 1
  fi
fi
if [ ! -x "$browser" ]; then
  echo "install_browser: chromium installed, but $browser is missing" >&2
  exit 1
fi
echo "install_browser: $("$browser" --version 2>/dev/null || echo "$browser")" >&2
