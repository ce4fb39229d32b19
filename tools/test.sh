#!/usr/bin/env bash
# Installs the test dependencies, then runs the whole test suite (and the PostgreSQL, MySQL and TDS modules again in
# the compiled relay mode); a run that collects no test fails.
# Extra arguments go to pytest, e.g. tools/test.sh tests/unit -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
tools/install-deps.sh

echo "test.sh: ${PYTHON:-python3} -m pytest -q $*"
status=0
"${PYTHON:-python3}" -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: error: pytest collected no tests (exit 5); a suite that runs nothing is a failure" >&2
    exit 1
fi
if [[ $status -eq 0 && $# -eq 0 ]]; then
    # The whole suite ran on the default (Python) relay path; the PostgreSQL, MySQL and TDS client, pooling and pinning
    # modules run again with every proxy in the compiled relay mode ([proxy] relay = "compiled",
    # tests/integration/proxy.py).
    relay_modules=(tests/integration/test_pg_pooling.py tests/integration/test_pg_pinning.py
                   tests/integration/test_pg_spurious_pins.py tests/integration/test_pg_drivers.py
                   tests/integration/test_pg_clients.py tests/integration/test_pg_bad_input.py
                   tests/integration/test_knobs_pg.py
                   tests/integration/test_mysql_pooling.py tests/integration/test_mysql_spurious_pins.py
                   tests/integration/test_mysql_drivers.py tests/integration/test_mysql_clients.py
                   tests/integration/test_mysql_bad_input.py tests/integration/test_mysql_kill.py
                   tests/integration/test_tds_proxy.py tests/integration/test_tds_spurious_pins.py
                   tests/integration/test_tds_drivers.py tests/integration/test_tds_prepared.py
                   tests/integration/test_tds_sqlalchemy.py)
    echo "test.sh: MULTIPROXY_TEST_RELAY=compiled ${PYTHON:-python3} -m pytest -q ${relay_modules[*]}"
    MULTIPROXY_TEST_RELAY=compiled "${PYTHON:-python3}" -m pytest -q "${relay_modules[@]}" || status=$?
fi
exit "$status"
