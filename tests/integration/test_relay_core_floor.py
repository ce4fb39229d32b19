"""tools/floor_pooler.py on the relay core (`--relay c`, and `--relay twin`, its pure-Python twin) serves pgbench
against the session's private PostgreSQL, steady and connect-per-transaction, every row the one asked for."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from multiproxy import relay_core

from .pgserver import SUPERUSER
from .proxy import REPO_ROOT, free_port

DB = "relay_floor"
POOL = 3
# A point select whose answer is checked by the server: a row from another client's query (a relay mixing up
# its pairs) makes :got differ from :aid and the second statement divide by zero, which fails pgbench.
CHECKED_SELECT = ("\\set aid random(1, 100000)\n"
                  "SELECT aid AS got, abalance FROM pgbench_accounts WHERE aid = :aid \\gset\n"
                  "SELECT 1 / (CASE WHEN :got = :aid AND :abalance = 0 THEN 1 ELSE 0 END);\n")


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSFILE=os.devnull, LC_ALL="C", PGCONNECT_TIMEOUT="10")
    return env


@pytest.fixture(scope="module")
def bench_db(pg):
    if shutil.which("pgbench") is None:
        pytest.skip("pgbench is not installed")
    pg.psql(f"DROP DATABASE IF EXISTS {DB};")
    pg.psql(f"CREATE DATABASE {DB};")
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", SUPERUSER, DB],
                          capture_output=True, text=True, env=client_env(), timeout=120)
    assert init.returncode == 0, init.stderr
    yield pg
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE);")


@pytest.fixture(params=["c", "c-thread", "twin"])
def floor(request, bench_db, tmp_path):
    if request.param.startswith("c") and relay_core.IMPLEMENTATION != "c":
        pytest.skip("multiproxy._relay is not built (python3 setup.py build_ext --inplace)")
    port = free_port()
    log = tmp_path / "floor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "tools", "floor_pooler.py"),
                                 "--listen", f"127.0.0.1:{port}", "--backend", f"{bench_db.host}:{bench_db.port}",
                                 "--user", SUPERUSER, "--database", DB, "--pool-size", str(POOL),
                                 "--relay", request.param],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 20
        while psql(port, "SELECT 1").stdout.strip() != "1":
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield port, proc, log, request.param
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def psql(port: int, *statements: str) -> subprocess.CompletedProcess:
    """Each statement is its own Query message."""
    commands = [arg for sql in statements for arg in ("-c", sql)]
    return subprocess.run(["psql", "-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
                           "-U", SUPERUSER, "-d", DB, *commands], capture_output=True, text=True, env=client_env(),
                          timeout=20)


def pgbench(port: int, script, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["pgbench", "-n", "-f", str(script), *args, "-h", "127.0.0.1", "-p", str(port),
                           "-U", SUPERUSER, DB], capture_output=True, text=True, env=client_env(), timeout=120)


def check(run: subprocess.CompletedProcess, total: int, log) -> None:
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{log.read_text()[-2000:]}"
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", run.stdout)
    assert processed and processed.groups() == (str(total), str(total)), run.stdout
    failed = re.search(r"number of failed transactions: (\d+)", run.stdout)
    assert failed is None or failed.group(1) == "0", run.stdout


@pytest.mark.timeout(150)
def test_pgbench_select_only_through_the_relay_core(floor, tmp_path):
    port, proc, log, relay = floor
    script = tmp_path / "checked_select.sql"
    script.write_text(CHECKED_SELECT)
    # More clients than backends: clients queue in the relay for a backend at every transaction.
    check(pgbench(port, script, "-c", "8", "-j", "2", "-t", "300"), 8 * 300, log)
    check(pgbench(port, script, "-C", "-c", "4", "-j", "2", "-t", "50"), 4 * 50, log)
    builtin = subprocess.run(["pgbench", "-n", "-S", "-c", "8", "-j", "2", "-t", "200", "-h", "127.0.0.1",
                              "-p", str(port), "-U", SUPERUSER, DB], capture_output=True, text=True,
                             env=client_env(), timeout=120)
    check(builtin, 8 * 200, log)
    rows = psql(port, "SELECT count(*), sum(aid), count(DISTINCT bid) FROM pgbench_accounts")
    assert rows.stdout.strip() == f"100000|{100000 * 100001 // 2}|1", rows.stderr
    # A transaction block keeps its backend: the temp table and the row count are that one session's.
    block = psql(port, "BEGIN", "CREATE TEMP TABLE t(x int) ON COMMIT DROP",
                 "INSERT INTO t SELECT generate_series(1, 7)", "SELECT count(*) FROM t", "COMMIT")
    assert block.returncode == 0 and block.stdout.strip() == "7", block.stderr
    assert proc.poll() is None
    assert f"floor pooler: relay core {relay}" in log.read_text()


@pytest.mark.timeout(240)
def test_bench_measures_floor_c_beside_pgbouncer_and_floor(tmp_path):
    """tools/bench.py's floor-c target, tiny: every row has its TPS, CPU and CPU per transaction."""
    if shutil.which("pgbench") is None:
        pytest.skip("pgbench is not installed")
    if relay_core.IMPLEMENTATION != "c":
        pytest.skip("multiproxy._relay is not built (python3 setup.py build_ext --inplace)")
    markdown = tmp_path / "bench.md"
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "bench.py"), "--targets",
                             "pgbouncer,floor,floor-c", "--seconds", "1", "--rounds", "2", "--scale", "1",
                             "--pool-size", "4", "--markdown", str(markdown)],
                            capture_output=True, text=True, timeout=230, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in markdown.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {(cells[0], cells[1]): dict(zip(header, cells))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    assert set(rows) == {(target, load) for target in ("pgbouncer", "floor", "floor-c")
                         for load in ("steady", "connect")}
    for target in ("floor", "floor-c") + (("pgbouncer",) if shutil.which("pgbouncer") else ()):
        for load in ("steady", "connect"):
            row = rows[(target, load)]
            assert float(row["TPS"]) > 0 and float(row["proxy CPU%"]) >= 0, row
            assert re.fullmatch(r"\d+ \(\d+-\d+\)", row["CPU us/tx"]), row
