#!/usr/bin/env bash
# Install Debian's PostgreSQL server (initdb, pg_ctl, postgres) for scripts/tracking_server.sh and its tests
# (tests/test_team_server.py). Does nothing when it is already there. Only tries when it can: as root with
# apt-get (CI and the dev machines run as root).
# Exit status: 0 when initdb is there afterwards, 1 otherwise.
set -uo pipefail
have() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; }
have && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_postgres: no apt-get here; install PostgreSQL yourself (Debian/Ubuntu package 'postgresql')" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_postgres: not root; run 'sudo apt-get install -y postgresql' yourself" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install_postgres: installing Debian's postgresql" >&2
# policy-rc.d: the package must not start a cluster of its own (tracking_server.sh runs one per folder)
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
apt_install() { apt-get install -y -q --no-install-recommends postgresql >/dev/null; }
if ! apt_install 2>/dev/null; then
  apt-get update -q >/dev/null || true
  apt_install || { rm -f /usr/sbin/policy-rc.d; echo "install_postgres: 'apt-get install postgresql' failed" >&2; exit 1; }
fi
rm -f /usr/sbin/policy-rc.d
have
