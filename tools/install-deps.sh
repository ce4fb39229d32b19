#!/usr/bin/env bash
# Installs what the tests need on a Debian/Ubuntu machine (database servers, clients, this package); safe to re-run.
#
# apt is skipped when every needed binary is already there, and pip when this checkout is already
# installed from the same setup.py with the same Python, so a prepared machine (or CI) is fast.
# Environment: PYTHON (default python3), INSTALL_DEPS_FORCE=1 to run every step anyway.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LOG="$(mktemp -t install-deps.XXXXXX.log)"
APT_PACKAGES=(postgresql postgresql-client pgbouncer prometheus-pgbouncer-exporter sysbench freetds-bin mariadb-server mariadb-client libmariadb-dev chromium chromium-driver gcc python3-dev)

trap 'echo "install-deps: error: unexpected failure at line $LINENO (log: $LOG)" >&2' ERR

say() { echo "install-deps: $*"; }
fail() { echo "install-deps: error: $*" >&2; exit 1; }

# Run one step quietly; on failure show what it printed.
step() {
    local what="$1"; shift
    say "$what"
    if ! "$@" >>"$LOG" 2>&1; then
        echo "install-deps: error: step failed: $what (full log: $LOG); last lines:" >&2
        tail -n 25 "$LOG" >&2
        exit 1
    fi
}

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    SUDO=(__no_sudo__)
fi
as_root() {
    if [[ ${SUDO[0]:-} == __no_sudo__ ]]; then
        echo "not root and no sudo: run this script as root to install system packages" >&2
        return 1
    fi
    "${SUDO[@]}" "$@"
}

# The PostgreSQL server binaries are not on PATH on Debian: look where pgserver.py looks.
pg_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
        [[ -x $dir/initdb && -x $dir/postgres && -x $dir/pg_ctl ]] && { echo "$dir"; return 0; }
    done
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        [[ -n $dir && -x $dir/initdb && -x $dir/postgres ]] && { echo "$dir"; return 0; }
    fi
    return 1
}

have() { command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 || -x /usr/bin/$1 || -x /sbin/$1 ]]; }

missing_binaries() {
    local missing=()
    pg_bindir >/dev/null || missing+=(initdb/postgres/pg_ctl)
    local bin
    for bin in psql pgbench pgbouncer prometheus-pgbouncer-exporter sysbench tsql mariadb chromium chromedriver; do   # chromium: the status page test; the exporter: the admin console test
        have "$bin" || missing+=("$bin")
    done
    have mariadbd || have mysqld || missing+=(mariadbd)
    have mariadb-install-db || have mysql_install_db || missing+=(mariadb-install-db)
    have mariadb_config || missing+=(mariadb_config)   # libmariadb-dev: MariaDB Connector/Python builds against it
    # gcc and the Python headers: setup.py builds the compiled relay core (multiproxy/_relay.c) with them
    have gcc || missing+=(gcc)
    "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))' 2>/dev/null || missing+=(Python.h)
    "$PYTHON" -m pip --version >/dev/null 2>&1 || missing+=(pip)
    echo "${missing[*]}"
}

stop_pgbouncer_service() {
    # Tests start their own PgBouncer on free ports; the packaged service only gets in the way.
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --now pgbouncer
    else
        as_root service pgbouncer stop || true
        if command -v update-rc.d >/dev/null 2>&1; then
            as_root update-rc.d pgbouncer disable
        fi
    fi
}

# -- system packages ---------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || APT_PACKAGES+=(python3 python3-pip)
missing="$(missing_binaries)"
if [[ -n $missing || ${INSTALL_DEPS_FORCE:-} == 1 ]]; then
    command -v apt-get >/dev/null 2>&1 || fail "missing: $missing; this script installs them with apt-get (Debian/Ubuntu) only"
    "$PYTHON" -m pip --version >/dev/null 2>&1 || APT_PACKAGES+=(python3-pip)
    export DEBIAN_FRONTEND=noninteractive
    step "apt-get update (missing: ${missing:-none, forced})" as_root apt-get update -q
    step "apt-get install ${APT_PACKAGES[*]}" \
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
    missing="$(missing_binaries)"
    [[ -z $missing ]] || fail "still missing after apt-get install: $missing"
else
    say "system packages already present (PostgreSQL in $(pg_bindir)), skipping apt"
fi
if [[ -e /etc/init.d/pgbouncer || -e /lib/systemd/system/pgbouncer.service ]]; then
    step "stop and disable the pgbouncer service" stop_pgbouncer_service
fi

# -- this package, editable, with its lab and test extras ---------------------------------------------
cd "$REPO_ROOT"
stamp_dir="$REPO_ROOT/build"
stamp="$stamp_dir/install-deps.stamp"
packaging_files=()
for f in setup.py pyproject.toml setup.cfg; do
    if [[ -f $f ]]; then packaging_files+=("$f"); fi
done
EXTRAS="lab,test"  # the lab (`multiproxy lab`, sqlglot, cryptography) and the test suite's clients
want="$("$PYTHON" -c 'import sys; print(sys.executable)') $REPO_ROOT [$EXTRAS] $(cat "${packaging_files[@]}" | sha256sum | cut -c1-16)"
relay_source=multiproxy/_relay.c
relay_header=multiproxy/_relay_crypto.h
installed_here() {
    # multiproxy must import from this checkout, not from another clone installed earlier.
    [[ "$(cd / && "$PYTHON" -c 'import multiproxy, os; print(os.path.dirname(os.path.dirname(multiproxy.__file__)))' 2>/dev/null)" == "$REPO_ROOT" ]]
}
if [[ ${INSTALL_DEPS_FORCE:-} != 1 && -f $stamp && "$(cat "$stamp")" == "$want" ]] && installed_here; then
    say "multiproxy already installed from $REPO_ROOT with this setup.py, skipping pip"
else
    pip_args=(-m pip install -q --disable-pip-version-check -e ".[$EXTRAS]")
    # A distribution's own Python (PEP 668) refuses pip outside a virtualenv; this is a test machine.
    if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not (sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))'; then
        pip_args+=(--break-system-packages)
    fi
    step "$PYTHON -m pip install -e '.[$EXTRAS]'" env PIP_ROOT_USER_ACTION=ignore "$PYTHON" "${pip_args[@]}"
    installed_here || fail "pip installed multiproxy, but '$PYTHON -c \"import multiproxy\"' does not load it from $REPO_ROOT"
    mkdir -p "$stamp_dir" && echo "$want" >"$stamp"
fi

# -- the compiled relay core: pip's editable install builds it in place (setuptools' build_ext in editable mode);
# rebuild it here when its C source (or header) is newer than the built module or the module is missing. Optional:
# without it multiproxy.relay_core uses its pure-Python twin and logs that it does.
if [[ -f $relay_source ]]; then
    relay_module="multiproxy/_relay$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    if [[ ${INSTALL_DEPS_FORCE:-} == 1 || ! -f $relay_module || $relay_source -nt $relay_module
          || $relay_header -nt $relay_module ]]; then
        say "build the compiled relay core in place ($relay_module)"
        if ! "$PYTHON" setup.py -q build_ext --inplace >>"$LOG" 2>&1 || [[ ! -f $relay_module ]]; then
            say "warning: the compiled relay core was not built (log: $LOG); the pure-Python relay core is used"
            LOG_KEEP=1
        fi
    else
        say "compiled relay core up to date ($relay_module)"
    fi
fi

# -- Node.js drivers the tests and benchmarks run (tools/node: tedious for TDS) ------------------------------
node_dir="$REPO_ROOT/tools/node"
if ! command -v npm >/dev/null 2>&1; then
    fail "npm is missing: install Node.js (Debian: apt-get install nodejs npm) for the tests' Node.js drivers"
fi
node_stamp="$node_dir/node_modules/.install-deps.stamp"
node_want="$(cat "$node_dir/package.json" "$node_dir/package-lock.json" | sha256sum | cut -c1-16)"
if [[ ${INSTALL_DEPS_FORCE:-} != 1 && -f $node_stamp && "$(cat "$node_stamp")" == "$node_want" ]]; then
    say "Node.js drivers already installed in tools/node, skipping npm"
else
    step "npm ci in tools/node" npm ci --prefix "$node_dir" --no-audit --no-fund
    echo "$node_want" >"$node_stamp"
fi
[[ ${LOG_KEEP:-} == 1 ]] || rm -f "$LOG"
say "done"
