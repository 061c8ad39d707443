#!/usr/bin/env bash
# Installs what the service needs into .venv, then runs web, worker, beat and Flower on the
# embedded defaults: SQLite under instance/, and the Redis at REDIS_URL, started here when none
# answers there. Ctrl-C stops everything it started.
#
# The worker runs as WORKER_CONCURRENCY (default 2) copies of the Procfile's one-process worker
# line (honcho's -c). honcho replaces none: when any process exits, it stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."

worker_concurrency=${WORKER_CONCURRENCY:-2}
case "$worker_concurrency" in
  [1-9]|[1-5][0-9]|6[0-4]) ;;
  *) echo "WORKER_CONCURRENCY must be an integer between 1 and 64, got '$worker_concurrency'" >&2; exit 1 ;;
esac

source scripts/lib.sh

ensure_venv requirements.txt
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p instance
export REDIS_URL=${REDIS_URL:-redis://localhost:6379/0}
export PORT=${PORT:-8000}
export FLOWER_PORT=${FLOWER_PORT:-5555}

children=()
cleanup() { for pid in "${children[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# Only a plain redis:// URL is started here when nothing answers; a Sentinel group or a cluster
# (sentinel://, redis+cluster://) is the operator's to run.
if [[ "$REDIS_URL" == redis://* ]] && ! python -c 'import os, redis; redis.Redis.from_url(os.environ["REDIS_URL"], socket_connect_timeout=1).ping()' 2>/dev/null; then
  read -r host port < <(python -c 'import os; from urllib.parse import urlsplit; u = urlsplit(os.environ["REDIS_URL"]); print(u.hostname or "localhost", u.port or 6379)')
  case "$host" in
    localhost|127.0.0.1|::1) ;;
    *) echo "no Redis answers at $host:$port, and it is not this machine: start it, or unset REDIS_URL" >&2; exit 1 ;;
  esac
  mkdir -p instance/redis
  binary=$(redis_server_binary)
  echo "starting Redis ($binary) on 127.0.0.1:$port, data in instance/redis"
  # Append-only file, fsynced before each answer: an event answered 200 survives a crash of this
  # Redis, and a power cut (docs/operations.md, "What a crash or a power cut can cost").
  "$binary" --port "$port" --bind 127.0.0.1 --dir "$PWD/instance/redis" --appendonly yes --appendfsync always \
    --logfile "$PWD/instance/redis/redis.log" &
  children+=($!)
  python - <<'PY'
import os, time, redis
client = redis.Redis.from_url(os.environ["REDIS_URL"])
for _ in range(100):
    try:
        client.ping(); break
    except redis.ConnectionError:
        time.sleep(0.1)
else:
    raise SystemExit("Redis did not start; see instance/redis/redis.log")
PY
fi

if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
  # Flower never runs open: a password of this install's own, kept out of the logs.
  if [ ! -f instance/flower-credentials ]; then
    (umask 077; python -c 'import secrets; print("admin:" + secrets.token_urlsafe(18))' > instance/flower-credentials)
  fi
  FLOWER_BASIC_AUTH=$(cat instance/flower-credentials)
  export FLOWER_BASIC_AUTH
  echo "Flower's user:password is in instance/flower-credentials"
fi

export PROMETHEUS_MULTIPROC_DIR="$PWD/instance/metrics"
rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"

echo "migrating the database (the Procfile's release step)"
flask --app wsgi db upgrade

echo "web: http://127.0.0.1:$PORT  Flower: http://127.0.0.1:$FLOWER_PORT"
honcho start --no-prefix --port "$PORT" -c "worker=$worker_concurrency" web worker beat flower &
children+=($!)
wait "${children[-1]}"
