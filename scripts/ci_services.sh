#!/usr/bin/env bash
# Services the slow tests use, on a fresh Debian machine: PostgreSQL for tests/test_mlflow_server.py
# (the MLflow tracking server over a PostgreSQL backend). Idempotent; needs root (or sudo) only when installing.
#
#   bash scripts/ci_services.sh        # called by .ci/run before the tests
set -euo pipefail

have_postgres() {
  local bindir
  for bindir in "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin; do
    [[ -n "$bindir" && -x "$bindir/initdb" && -x "$bindir/pg_ctl" && -x "$bindir/postgres" ]] && return 0
  done
  command -v initdb >/dev/null && command -v pg_ctl >/dev/null && command -v postgres >/dev/null
}

if have_postgres; then
  echo "PostgreSQL present"
  exit 0
fi
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
$SUDO apt-get update -qq
# The package also creates the `postgres` system user, which the test runs initdb as when CI runs as root.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
if ! have_postgres; then
  echo "ci_services.sh: installed the postgresql package but found no initdb/pg_ctl/postgres" >&2
  exit 1
fi
echo "PostgreSQL installed: $(pg_config --version 2>/dev/null || echo unknown version)"
