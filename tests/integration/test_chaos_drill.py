"""Chaos drill (issue 11): three lab failovers in a row per engine while writers, readers and hostile sessions run
through the proxy (tests/integration/chaoskit.py, the same code as `tools/failover_drill.py --chaos`).

Invariants per engine: no acknowledged write lost; no write executed through the reader listener (nor a
read-only session's write, nor a dropped transaction's); every reader answer from a replica / read-only node
within the lag bound; writer changes seen by the proxy == failovers made; every idle connection kept."""
from __future__ import annotations

import pytest

from . import chaoskit

FAILOVERS = 3


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", [pytest.param("postgres"),
                                    pytest.param("mysql", marks=pytest.mark.mysql),
                                    pytest.param("tds", marks=pytest.mark.tds)])
def test_chaos_drill(engine):
    result = chaoskit.run_drill(engine, FAILOVERS)
    report = chaoskit.format_table([result]) + "\n" + chaoskit.format_details(result)
    print(report)
    assert result.failovers == FAILOVERS, report
    assert result.writes_acked > 100 and result.reader_answers > 100, report
    assert result.violations() == [], report
