#!/usr/bin/env bash
# Installs the test dependencies, then runs the whole test suite; a run that collects no test fails.
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
exit "$status"
