"""tools/bench.py's MySQL and TDS benchmarks, text and prepared-statement variants, run tiny and print every row."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "tools", "bench.py")
TALLY = re.compile(r"multiproxy_prepared_statements_total after the run: cluster main: "
                   r"eviction=(\d+), hit=(\d+), miss=(\d+)")
NUMBER = re.compile(r"^\d+(\.\d+)?$")


def run_bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, stdin=subprocess.DEVNULL)


def table(out: str) -> dict[str, dict[str, str]]:
    """The markdown results table of the output: {variant: {column: cell}}."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def check_over_row(out: str, row: dict, clients: int, unit: str) -> None:
    """ps-over: the proxy either served more clients than its pool (statements multiplexed) or the failure is
    written out with the proxy's own reason; the baselines always ran."""
    assert NUMBER.match(row[f"direct {unit}"])
    if row[f"multiproxy {unit}"] == "failed":
        failure = next(line for line in out.splitlines() if line.startswith(f"ps-over / multiproxy ({clients} "))
        assert "failed in 1 of 1 rounds" in failure
        assert "no database connection became free" in failure or "executed nothing" in failure, failure


def check_tally(out: str) -> None:
    found = TALLY.search(out)
    assert found, out
    evictions, hits, misses = map(int, found.groups())
    # Before statement multiplexing the statements pin and the proxy counts none; after it, every execute counts.
    assert hits + misses > 0 or "before statement multiplexing" in out


@pytest.mark.timeout(200)
def test_mysql_text_and_prepared_variants(tmp_path):
    if not shutil.which("sysbench"):
        pytest.skip("sysbench is not installed")
    markdown = tmp_path / "mysql.md"
    result = run_bench("--engine", "mysql", "--seconds", "1", "--warmup", "0", "--pool-size", "4",
                       "--markdown", str(markdown), timeout=190)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    assert list(rows) == ["text", "ps", "ps-over"]
    assert [rows[v]["clients"] for v in rows] == ["4", "4", "8"]
    for variant in ("text", "ps"):
        for column in ("direct TPS", "multiproxy TPS", "relay TPS", "multiproxy / relay", "multiproxy / direct"):
            assert NUMBER.match(rows[variant][column]), (variant, column, rows[variant])
        assert float(rows[variant]["multiproxy TPS"]) > 0
    assert NUMBER.match(rows["ps-over"]["relay TPS"])
    check_over_row(result.stdout, rows["ps-over"], 8, "TPS")
    check_tally(result.stdout)
    assert markdown.read_text() == result.stdout


@pytest.mark.timeout(200)
def test_tds_text_and_prepared_variants(tmp_path):
    pytest.importorskip("pymssql")
    if not shutil.which("node") or not os.path.isdir(os.path.join(REPO, "tools", "node", "node_modules", "tedious")):
        pytest.skip("node or tools/node/node_modules/tedious is missing (tools/install-deps.sh)")
    result = run_bench("--engine", "tds", "--seconds", "2", "--warmup", "0", "--pool-size", "4", "--clients", "8",
                       timeout=190)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    assert list(rows) == ["text", "ps", "ps-over"]
    assert [rows[v]["clients"] for v in rows] == ["8", "4", "8"]
    for variant in ("text", "ps"):
        for column in ("direct /s", "multiproxy /s", "multiproxy / direct"):
            assert NUMBER.match(rows[variant][column]), (variant, column, rows[variant])
        assert float(rows[variant]["multiproxy /s"]) > 0
    check_over_row(result.stdout, rows["ps-over"], 8, "/s")
    check_tally(result.stdout)


@pytest.mark.timeout(60)
def test_engine_options_are_checked():
    bad = run_bench("--engine", "mysql", "--only", "ps,bogus", timeout=50)
    assert bad.returncode == 2
    assert "--only: unknown bogus; choose from text, ps, ps-over" in bad.stderr
    stray = run_bench("--engine", "tds", "--ps", "--scale", "5", timeout=50)
    assert stray.returncode == 2 and "unrecognized arguments: --scale 5" in stray.stderr
    targets = run_bench("--engine", "tds", "--targets", "direct", timeout=50)
    assert targets.returncode == 2 and "--targets: choose from direct, multiproxy, multiproxy-c" in targets.stderr
