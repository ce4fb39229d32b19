"""`multiproxy lab failover ENGINE`: stop the writer, promote a reader, repoint DNS, measure the outage through the proxy."""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

from .dns_server import write_zone
from .parts import PARTS, LabPartError
from .processes import alive, start_time
from .stack import SERVER_STOP_TIMEOUT, Lab, LabError, Progress, describe_event, zone_records, _busy

FIRST_WRITES = 10  # successful writes through the proxy before the writer is stopped
FIRST_WRITES_TIMEOUT = 20.0
RECOVERY_TIMEOUT = 60.0  # the longest wait for a write through the proxy after the stop
AFTER_RECOVERY = 0.5  # keep writing this long after the first successful write
EVENT_TIMEOUT = 10.0


class WriteLoop(threading.Thread):
    """One client connection through the proxy's writer listener, inserting a row every few milliseconds.

    It keeps its connection across errors (that is what the proxy promises) and reconnects only when the
    driver says the connection is gone; `reconnects` counts those.
    """

    def __init__(self, part, address: str, lab: dict):
        super().__init__(daemon=True, name="lab-failover-writes")
        self.part, self.address, self.lab = part, address, lab
        self.base = time.time_ns() // 1000 * 1000  # ids of this run: unique across runs
        self.ok: list[tuple[int, float, float]] = []  # acknowledged: (id, started, finished), monotonic
        self.failed: list[tuple[int, float, float, str]] = []  # (id, started, finished, error): may still be there
        self.last_id = self.base
        self.reconnects = 0
        self.stopping = threading.Event()
        self.conn = part.connect_client(address, lab)
        cur = self.conn.cursor()
        cur.execute(part.failover_sql[0])

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            i += 1
            started = time.monotonic()
            self.last_id = self.base + i
            try:
                if self.conn is None:
                    self.conn = self.part.connect_client(self.address, self.lab)
                    self.reconnects += 1
                self.conn.cursor().execute(self.part.failover_sql[1], (self.base + i,))
                self.ok.append((self.base + i, started, time.monotonic()))
                time.sleep(0.01)
            except Exception as exc:  # any driver error is an outage the user sees; keep going
                self.failed.append((self.base + i, started, time.monotonic(),
                                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
                if self.conn is not None and getattr(self.conn, "closed", False):
                    self.conn = None
                time.sleep(0.05)

    def first_ok_after(self, t: float) -> float | None:
        """When the first write that started at or after `t` finished."""
        done = [finished for _, started, finished in list(self.ok) if started >= t]
        return min(done) if done else None

    def close(self) -> None:
        self.stopping.set()
        self.join(30)
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # closing a broken connection may fail; nothing to do
                pass


def _registry_events(admin: str, cluster: str, new: str, since: float) -> list[dict]:
    """The registry's writer events of `cluster` from wall time `since` up to the change to `new` (the writer
    may first be lost: old -> none -> new), waiting a little for that change; [] when it does not come."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as resp:
                events = (json.load(resp).get("registry") or {}).get("events") or []
        except (OSError, ValueError):
            events = []
        found = [e for e in events if e.get("event") == "writer" and e.get("cluster") == cluster
                 and e.get("time", 0) >= since - 1]
        for i, event in enumerate(found):
            if event.get("new") == new:
                return found[:i + 1]
        if time.monotonic() > deadline:
            return []
        time.sleep(0.2)


def failover(lab: Lab, engine: str, rebuild: bool = True) -> int:
    """Stop the writer of `engine`'s cluster in `lab`, promote a reader, repoint DNS; report the outage seen
    through the proxy (`multiproxy lab failover`)."""
    state = lab._require()
    if engine not in state.get("engines", {}):
        raise LabError(f"the lab in {lab.dir} runs no {engine} (it runs: {', '.join(state.get('engines', {}))})")
    part = PARTS[engine]
    if not part.supports_failover:
        raise LabError(f"the lab cannot fail over {part.title} yet")
    proxy = state.get("proxy", {})
    if not proxy.get("pid") or not alive(proxy["pid"], proxy.get("started")):
        raise LabError(f"multiproxy is not running in the lab in {lab.dir}; see `multiproxy lab status`")
    if _busy(state):
        raise LabError(f"another `lab {state['busy'].get('what')}` is running (pid {state['busy']['pid']})")
    part_state = state["engines"][engine]
    cluster = part_state["cluster"]
    nodes = part_state["nodes"]
    writer = next((n for n in nodes if n["role"] == "writer"), None)
    if writer is None or not writer.get("pid") or not alive(writer["pid"], writer.get("started")):
        raise LabError(f"the {part.title} writer is not running; see `multiproxy lab status`")
    standby = next((n for n in nodes if n["role"] == "reader" and n.get("pid") and alive(n["pid"], n.get("started"))),
                   None)
    if standby is None:
        stopped = [n["name"] for n in nodes if n["role"] == "stopped"]
        why = (f" ({', '.join(stopped)} was stopped by the last failover and not rebuilt)" if stopped else "")
        raise LabError(f"no standby left in the {part.title} cluster {cluster}{why}: the writer "
                       f"{writer['host']}:{writer['port']} is its only node. Start a fresh lab "
                       "(`multiproxy lab down`, `multiproxy lab up`) to fail over again")
    address = lambda n: f"{n['host']}:{n['port']}"  # noqa: E731
    listener = part_state["listeners"]["writer"]

    state["busy"] = {"pid": os.getpid(), "started": start_time(os.getpid()), "what": f"failover {engine}"}
    lab.state = state
    lab._save()
    progress = Progress(lab.out)
    loop = None
    try:
        lab.out(f"failover of {part.title} cluster {cluster}: writer {writer['name']} {address(writer)} -> "
                f"{standby['name']} {address(standby)}")
        with progress(f"write loop through {listener['name']} ({listener['address']})") as step:
            try:
                loop = WriteLoop(part, listener["address"], state)
            except LabPartError as exc:
                raise LabError(str(exc)) from None
            except Exception as exc:
                raise LabError(f"cannot write through {listener['name']}: {exc}") from None
            loop.start()
            deadline = time.monotonic() + FIRST_WRITES_TIMEOUT
            while len(loop.ok) < FIRST_WRITES:
                if time.monotonic() > deadline:
                    last = loop.failed[-1][3] if loop.failed else "no answer"
                    raise LabError(f"writes through {listener['name']} do not succeed before the failover: {last}")
                time.sleep(0.02)
            step.done(f"{len(loop.ok)} writes")

        stop_mono, stop_wall = time.monotonic(), time.time()
        with progress(f"stop the writer {writer['name']} {address(writer)} ({part.stop_how(writer)})") as step:
            part.stop_writer(writer, SERVER_STOP_TIMEOUT)
            # Writes may still succeed on the old writer while it shuts down; the outage ends with the first
            # write that started once it was gone.
            stopped_mono = time.monotonic()
            writer.update(role="stopped", pid=None, started=None)
            lab._save()
        with progress(f"promote {standby['name']} {address(standby)}") as step:
            try:
                part.promote(standby, part_state, state)
            except (LabPartError, RuntimeError, OSError) as exc:
                raise LabError(f"promoting {standby['name']} failed: {exc}") from None
            standby["role"] = "writer"
            part_state["nodes"] = [standby] + [n for n in nodes if n is not standby]
            lab._save()
        records = zone_records(state)
        with progress("repoint " + ", ".join(f"{name} -> {', '.join(r['A']) or '-'}"
                                             for name, r in records.items() if name in part.endpoint_names().values())):
            write_zone(state["dns"]["zone"], records, ttl=state["dns"].get("ttl", 5))
        with progress("first write through the proxy after the stop") as step:
            deadline = time.monotonic() + RECOVERY_TIMEOUT
            while loop.first_ok_after(stopped_mono) is None:
                if time.monotonic() > deadline:
                    last = loop.failed[-1][3] if loop.failed else "no answer"
                    raise LabError(f"no write through {listener['name']} succeeded {RECOVERY_TIMEOUT:.0f} s after the "
                                   f"stop; last error: {last}; see {proxy.get('log')}")
                time.sleep(0.02)
            outage = loop.first_ok_after(stopped_mono) - stop_mono
            step.done(f"after {outage:.2f} s")
        time.sleep(AFTER_RECOVERY)
        loop.close()
        events = _registry_events(proxy["admin"], cluster, address(standby), stop_wall)
        failed = sum(1 for _, started, _, _ in loop.failed if started >= stop_mono - 1)
        count = WriteCount(loop, _rows_present(part, listener["address"], state, loop.base, loop.last_id))

        rebuilt = None
        if rebuild:
            try:
                with progress(f"rebuild {writer['name']} {address(writer)} as a reader of {standby['name']}") as step:
                    rebuilt = part.rebuild_as_reader(writer, standby, part_state, state)
                    part_state["nodes"] = [rebuilt if n is writer else n for n in part_state["nodes"]]
                    lab._save()
                    write_zone(state["dns"]["zone"], zone_records(state), ttl=state["dns"].get("ttl", 5))
                    step.done(f"pid {rebuilt['pid']}" + (f"; {rebuilt['rejoined']}" if rebuilt.get("rejoined") else ""))
            except NotImplementedError:
                lab.out(f"  the lab cannot rebuild a {part.title} reader yet; {writer['name']} stays stopped")
            except Exception as exc:  # the failover itself is done: report, and leave the node stopped
                lab.out(f"  could not rebuild {writer['name']}: {str(exc).splitlines()[0]}; it stays stopped")

        lab.out("")
        lab.out(f"outage seen through the proxy: {outage:.2f} s (from the writer's stop to the first successful write "
                f"through {listener['name']} that started once it was down)")
        lab.out(f"  writes: {len(count.committed)} committed, {failed} failed during the failover; "
                + ("the client kept its connection" if loop.reconnects == 0
                   else f"the client had to reconnect {loop.reconnects} time(s)"))
        lab.out(f"  rows: {count.describe()}")
        for event in events:
            lab.out(f"  registry: {describe_event(event)}")
        if not events:
            lab.out(f"  registry: no writer-change event to {address(standby)} within {EVENT_TIMEOUT:.0f} s "
                    "(see `multiproxy lab status`)")
        if rebuilt is not None:
            lab.out(f"  {writer['name']} {address(writer)} now {part.reader_follows} {standby['name']}: "
                    f"`multiproxy lab failover {engine}` can run again")
        else:
            lab.out(f"  {standby['name']} is the only node left: no further failover")
        return 0
    finally:
        if loop is not None and loop.is_alive():
            loop.close()
        state.pop("busy", None)
        lab._save()


class WriteCount:
    """The write loop's rows against the rows the new writer holds, each id counted once.

    committed: acknowledged to the client. present: ids of this run (base < id <= last id tried) on the new
    writer, or None when it could not be read. A write that failed for the client may still have committed
    (the server applied it, its answer was cut by the failover): it is reported apart, never as committed.
    """

    def __init__(self, loop: WriteLoop, present: set[int] | None):
        self.committed = {i for i, _, _ in loop.ok}
        self.unacknowledged = {i for i, _, _, _ in loop.failed}
        self.present = present

    @property
    def kept(self) -> set[int]:
        return self.committed & (self.present or set())

    @property
    def lost(self) -> set[int]:
        return self.committed - (self.present or set())

    @property
    def unacknowledged_present(self) -> set[int]:
        return self.unacknowledged & (self.present or set())

    @property
    def unexplained(self) -> set[int]:
        return (self.present or set()) - self.committed - self.unacknowledged

    def describe(self) -> str:
        if self.present is None:
            return "could not read them back from the new writer"
        text = f"{len(self.kept)} of {len(self.committed)} committed rows are on the new writer"
        if self.lost:
            text += f"; {len(self.lost)} committed row(s) are MISSING there (lost in the failover)"
        if self.unacknowledged_present:
            text += (f"; {len(self.unacknowledged_present)} unacknowledged write(s) are there too (the client got "
                     "an error, but the server had committed them)")
        if self.unexplained:
            text += f"; {len(self.unexplained)} row(s) of this run that no write of the loop explains"
        return text


def _rows_present(part, address: str, lab: dict, low: int, high: int) -> set[int] | None:
    """The ids low < id <= high (this run's) that the writer now holds, read through the proxy; None when it
    cannot tell."""
    try:
        conn = part.connect_client(address, lab)
        try:
            cur = conn.cursor()
            cur.execute(part.failover_sql[2], (low, high))
            return {int(row[0]) for row in cur.fetchall()}
        finally:
            conn.close()
    except Exception:  # a report line, not a check: say so rather than fail the failover
        return None
