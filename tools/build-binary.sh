#!/usr/bin/env bash
# Builds dist/multiproxy, a single-file executable (PyInstaller, one-file mode) holding the proxy, the built-in
# engines and the lab. PyInstaller is installed into build/pyinstaller-venv (over this Python's site-packages,
# where multiproxy's own requirements and the lab's must be installed), never into the project's environment.
# A build whose sources have not changed since the last one is reused (build/binary/stamp holds their hash).
# Usage: tools/build-binary.sh [--force]        Environment: PYTHON (default python3)
set -euo pipefail
PYINSTALLER_VERSION=6.22.3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
BUILD=$ROOT/build/binary
VENV=$ROOT/build/pyinstaller-venv
OUT=$ROOT/dist/multiproxy
cd "$ROOT"

HASH=$( (echo "$PYINSTALLER_VERSION"; "$PYTHON" -c 'import sys; print(sys.version)';
         find setup.py multiproxy engines tools/pyinstaller tools/build-binary.sh -type f \( -name '*.py' -o -name '*.sh' \
           -o -name '*.html' -o -name '*.sql' -o -name '*.txt' \) -not -path '*/__pycache__/*' -print0 \
         | sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1)
if [ "${1:-}" != "--force" ] && [ -x "$OUT" ] && [ "$(cat "$BUILD/stamp" 2>/dev/null)" = "$HASH" ]; then
    echo "dist/multiproxy is up to date ($HASH)"; exit 0
fi

if [ ! -x "$VENV/bin/pyinstaller" ] || [ "$("$VENV/bin/python" -m PyInstaller --version 2>/dev/null)" != "$PYINSTALLER_VERSION" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install --quiet "pyinstaller==$PYINSTALLER_VERSION"
fi

# Staging: engines/ under its installed name, and the distribution metadata whose entry points
# (multiproxy.engines) let the frozen program find the built-in engines exactly as an installed one does.
rm -rf "$BUILD/src" "$BUILD/meta"
mkdir -p "$BUILD/src" "$BUILD/meta"
cp -r engines "$BUILD/src/multiproxy_engines"
find "$BUILD/src" -name __pycache__ -prune -exec rm -rf {} +
VERSION=$("$PYTHON" -c 'import re,sys; print(re.search(r"__version__ = \"(.*)\"", open("multiproxy/__init__.py").read())[1])')
DIST_INFO=$BUILD/meta/multiproxy-$VERSION.dist-info
mkdir -p "$DIST_INFO"
printf 'Metadata-Version: 2.1\nName: multiproxy\nVersion: %s\n' "$VERSION" > "$DIST_INFO/METADATA"
"$PYTHON" - "$DIST_INFO/entry_points.txt" <<'PY'
import ast, sys
tree = ast.parse(open("setup.py").read())
eps = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
           for kw in node.keywords if kw.arg == "entry_points")
groups = ast.literal_eval(eps)
with open(sys.argv[1], "w") as f:
    f.write("[multiproxy.engines]\n")
    for line in groups["multiproxy.engines"]:
        name, target = line.split("=", 1)
        f.write(f"{name.strip()} = {target.strip()}\n")
PY

"$VENV/bin/python" -m PyInstaller --noconfirm --onefile --name multiproxy --log-level WARN \
    --distpath "$ROOT/dist" --workpath "$BUILD/work" --specpath "$BUILD" \
    --paths "$BUILD/src" --paths "$ROOT" \
    --collect-submodules multiproxy --collect-data multiproxy --collect-submodules multiproxy_engines \
    --collect-submodules dns --collect-submodules sqlglot \
    --hidden-import jwt --hidden-import prometheus_client \
    `# the lab checks its TDS and MariaDB parts with python-tds (or pymssql) and PyMySQL when present` \
    --hidden-import pytds --hidden-import pymysql \
    --add-data "$DIST_INFO:$(basename "$DIST_INFO")" \
    `# gevent's own hook (PyInstaller's contrib hooks) brings its hidden imports; its tests, and what the build` \
    `# machine's test tools would drag in through optional imports, stay out` \
    --exclude-module gevent.tests --exclude-module gevent.testing \
    --exclude-module tkinter --exclude-module pytest --exclude-module _pytest --exclude-module hypothesis \
    --exclude-module IPython --exclude-module numpy --exclude-module pygments --exclude-module trio \
    --exclude-module setuptools --exclude-module pkg_resources --exclude-module distutils \
    --exclude-module jinja2 --exclude-module selenium --exclude-module sqlalchemy \
    tools/pyinstaller/entry.py
echo "$HASH" > "$BUILD/stamp"
echo "built $OUT"
