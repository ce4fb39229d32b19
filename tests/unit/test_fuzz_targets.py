"""Every target of tools/fuzz_campaign.py, a few examples each: the kit's strategies build and its oracle passes."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from ..fuzzkit import ENGINES, build_targets

TARGETS = build_targets()


def test_every_engine_has_handshake_and_relay_targets():
    names = {t.name for t in TARGETS}
    assert len(names) == len(TARGETS)
    for engine in ENGINES:
        mine = [t.name for t in TARGETS if t.engine == engine]
        assert any(".relay." in n or ".commands." in n for n in mine), mine
        assert any(".startup." in n or ".handshake." in n or ".prelogin." in n for n in mine), mine


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_target(target):
    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(target.cases)
    def run(case):
        target.run(case)

    run()
