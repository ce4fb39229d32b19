"""tools/fuzz_campaign.py for a few seconds per engine: it runs every target of the engine and finds nothing."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ..fuzzkit import build_targets
from .proxy import REPO_ROOT

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("engine", ["postgres", "mysql", "tds"])
def test_campaign_runs_every_target_of_the_engine(engine):
    result = subprocess.run([sys.executable, "tools/fuzz_campaign.py", "--engine", engine, "--minutes", "0.08",
                             "--derandomize"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=80)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = dict(re.findall(r"^(\S+)\s+(\d+) examples .* ok ", result.stdout, re.M))
    expected = {t.name for t in build_targets() if t.engine == engine}
    assert set(counts) == expected, result.stdout
    assert all(int(n) > 0 for n in counts.values()), counts
    assert re.search(r"^total: \d+ examples over %d targets .* 0 finding\(s\)$" % len(expected), result.stdout, re.M)
