"""Measures what worker custody (multiproxy.custody) adds per transaction and per session change, for each engine.

Per transaction: the busy mark of `WorkerCustody.marking_recv` (a byte read and written) and `WorkerCustody.settle` at
the transaction's end (the engine's handover_refusal() and handover_generation(), a comparison, a byte), on a logged-in
client of each built-in engine whose session did not change. Per session change: the record exported and encoded as
the JSON line the worker sends. Run from the checkout: `python3 tools/custody_cost.py`.
"""
import json
import os
import sys
import timeit
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tests.conftest  # noqa: E402,F401  (the engines of this checkout, as the tests see them)
from tests.fuzzkit import tds_logged_in  # noqa: E402
from tests.unit.test_mysql_relay import logged_in  # noqa: E402
from tests.unit.test_pg_relay import logged_in_client  # noqa: E402

from multiproxy.custody import BUSY, BusyMap, WorkerCustody  # noqa: E402
from multiproxy.takeover import export_record  # noqa: E402

ROUNDS = 200_000


class SilentLink:
    """A worker channel that takes every message (nothing is sent when the session did not change)."""
    closed = False

    def send(self, message):
        pass

    def send_with_fds(self, message, fds):
        return True


def clients():
    return (("postgres", logged_in_client()), ("mysql", logged_in()), ("tds", tds_logged_in()))


def per_transaction() -> None:
    for name, proto in clients():
        custody = WorkerCustody(SimpleNamespace(worker=0), SilentLink(), BusyMap(1024))
        session = SimpleNamespace(custody_slot=3, proto=proto, backend=None, client_gone=False)
        custody.generations[3] = proto.handover_generation()
        memory = custody.busy.memory

        def transaction():
            before = memory[3]          # marking_recv, when the request's bytes are there
            memory[3] = BUSY
            custody.settle(session)     # the transaction's end
            return before
        cost = min(timeit.repeat(transaction, number=ROUNDS, repeat=5)) / ROUNDS
        generation = min(timeit.repeat(proto.handover_generation, number=ROUNDS, repeat=5)) / ROUNDS
        refusal = min(timeit.repeat(proto.handover_refusal, number=ROUNDS, repeat=5)) / ROUNDS
        print(f"{name}: {cost * 1e6:.2f} us per transaction (handover_generation {generation * 1e6:.3f} us, "
              f"handover_refusal {refusal * 1e6:.3f} us)")


def per_change() -> None:
    for name, proto in clients():
        session = SimpleNamespace(proto=proto, listener=SimpleNamespace(name="listener"), engine=SimpleNamespace(name=name),
                                  user="alice", database="app", cancel_key=(1, 2), address=("127.0.0.1", 40000),
                                  connected_at=1.0, transaction_mode=True, linked_once=True,
                                  pool=SimpleNamespace(variant=()), _where=lambda: "bench")

        def line():
            return json.dumps({"op": "record", "slot": 1, "record": export_record(session)})
        size = len(line())
        cost = min(timeit.repeat(line, number=2000, repeat=3)) / 2000
        print(f"{name}: a record of {size} bytes exported and encoded in {cost * 1e6:.0f} us")


if __name__ == "__main__":
    per_transaction()
    per_change()
