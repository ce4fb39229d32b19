#!/usr/bin/env python3
"""A long hypothesis fuzzing campaign over every client-facing parser of every engine (the targets of tests/fuzzkit.py).

The unit suite runs a few hundred examples per parser; this runs them for as long as you give it. Each example
feeds bytes, whole or in random chunks, to an engine's sans-IO client protocol (the handshake or the relay after
login). Allowed outcomes: the protocol's own error for the client (PostgreSQL ErrorResponse, MySQL ERR packet,
TDS ERROR token), a clean close, or waiting for more bytes. Anything else is a finding: another exception, an
example running past its deadline (a hang), or a protocol object buffering more than max_message_size allows.
A finding prints a minimal reproducer (hex bytes and chunking) and the exit status is 1.

    python3 tools/fuzz_campaign.py --minutes 10                      # all engines, 10 minutes in total
    python3 tools/fuzz_campaign.py --engine tds --minutes 2 --per-target
    python3 tools/fuzz_campaign.py --seed 42 --minutes 1             # replayable: same seed, same examples
    python3 tools/fuzz_campaign.py --list
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import sys
import time
import traceback
import warnings
from collections import Counter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings  # noqa: E402
from hypothesis.errors import Flaky  # noqa: E402
from hypothesis.reporting import with_reporter  # noqa: E402

from tests import fuzzkit  # noqa: E402


MIN_EXAMPLES = 3


class TimeUp(BaseException):
    """The target's time budget is spent (a BaseException, so hypothesis stops without shrinking)."""


class Hang(Exception):
    """One example ran past its deadline."""


def _alarm(signum, frame):
    raise Hang("the example did not finish within its deadline")


class Campaign:
    def __init__(self, target: fuzzkit.Target, seconds: float, example_deadline: float, seed: int | None,
                 derandomize: bool, shrink_seconds: float = 60.0):
        self.target = target
        self.seconds = seconds
        self.example_deadline = example_deadline
        self.seed = seed
        self.derandomize = derandomize
        self.shrink_seconds = shrink_seconds
        self.shrink_ends = None       # after the first failure: when to stop shrinking and report what we have
        self.examples = 0
        self.outcomes: Counter = Counter()
        self.failing = None          # (case, exception text) of the last failing example: after shrinking, the minimal one
        self.finding = None
        self.report: list[str] = []

    def run(self) -> None:
        target = self.target
        ends = time.monotonic() + self.seconds

        def one(case):
            now = time.monotonic()
            # Every target runs a few examples even when generating its first ones took the whole budget.
            if (self.failing is None and now > ends and self.examples >= MIN_EXAMPLES
                    or self.shrink_ends is not None and now > self.shrink_ends):
                raise TimeUp()
            self.examples += 1
            signal.setitimer(signal.ITIMER_REAL, self.example_deadline)
            try:
                outcome = target.run(case)
            except TimeUp:
                raise
            except BaseException as exc:
                self.failing = (case, "".join(traceback.format_exception(exc)))
                if self.shrink_ends is None:
                    self.shrink_ends = time.monotonic() + self.shrink_seconds
                raise
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.outcomes[outcome.kind] += 1

        test = settings(max_examples=10 ** 9, deadline=None, database=None, derandomize=self.derandomize,
                        phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False, print_blob=False,
                        suppress_health_check=list(HealthCheck))(given(target.cases)(one))
        if self.seed is not None and not self.derandomize:
            test = hypothesis_seed(self.seed)(test)
        with with_reporter(self.report.append):
            try:
                test()
            except TimeUp:
                if self.failing is not None:        # shrinking ran out of time: report the smallest failure so far
                    self.finding = TimeUp("shrinking stopped")
            except (Exception, Flaky) as exc:
                self.finding = exc


def period(data: bytes) -> int:
    """The length of the shortest unit that `data` repeats (len(data) when it repeats none)."""
    n = len(data)
    for size in range(1, n // 2 + 1):
        if n % size == 0 and data[:size] * (n // size) == data:
            return size
    return n


def describe(case) -> str:
    sizes = case.sizes or ["whole"]
    data = case.data
    unit = period(data) if len(data) > 256 else len(data)
    if unit < len(data):
        shown = f"{len(data) // unit} times this unit of {unit} bytes: {data[:unit].hex()}"
        python = f"bytes.fromhex('{data[:unit].hex()}') * {len(data) // unit}"
    else:
        shown = data.hex()
        python = f"bytes.fromhex('{data.hex()}')"
    return (f"  variant: {case.variant or '-'}\n  chunk sizes (cycled): {sizes}\n  bytes ({len(data)}): {shown}", python)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="time budget in minutes: in total, split evenly over the targets (default 5)")
    parser.add_argument("--per-target", action="store_true", help="--minutes is per target, not in total")
    parser.add_argument("--engine", action="append", choices=fuzzkit.ENGINES,
                        help="only this engine's targets (repeatable; default all)")
    parser.add_argument("--target", action="append", default=[], metavar="GLOB",
                        help="only targets whose name matches (e.g. 'tds.*', 'pg.auth.*'; repeatable)")
    parser.add_argument("--seed", type=int, help="hypothesis seed: the same seed replays the same examples")
    parser.add_argument("--derandomize", action="store_true",
                        help="hypothesis derandomize: examples depend only on the target, not on a seed")
    parser.add_argument("--example-deadline", type=float, default=10.0,
                        help="seconds one example may run before it counts as a hang (default 10)")
    parser.add_argument("--shrink-seconds", type=float, default=60.0,
                        help="how long to shrink a finding before reporting the smallest example so far (default 60)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)

    targets = [t for t in fuzzkit.build_targets()
               if (not args.engine or t.engine in args.engine)
               and (not args.target or any(fnmatch.fnmatch(t.name, g) for g in args.target))]
    if args.list:
        for t in targets:
            print(f"{t.name:28} {t.about}")
        return 0
    if not targets:
        print("no target matches", file=sys.stderr)
        return 2
    per_target = args.minutes * 60 if args.per_target else args.minutes * 60 / len(targets)
    signal.signal(signal.SIGALRM, _alarm)
    warnings.filterwarnings("ignore", message="Generating overly large repr")
    print(f"fuzz campaign: {len(targets)} targets, {per_target:.1f} s each, max_message_size "
          f"{fuzzkit.MAX_MESSAGE}, buffering limit {fuzzkit.HELD_LIMIT} bytes, example deadline "
          f"{args.example_deadline:g} s, seed {args.seed if args.seed is not None else 'random'}"
          f"{', derandomized' if args.derandomize else ''}", flush=True)
    findings = 0
    total = 0
    started = time.monotonic()
    for target in targets:
        campaign = Campaign(target, per_target, args.example_deadline, args.seed, args.derandomize,
                            args.shrink_seconds)
        t0 = time.monotonic()
        campaign.run()
        total += campaign.examples
        spread = ", ".join(f"{k} {v}" for k, v in sorted(campaign.outcomes.items()))
        status = "FINDING" if campaign.finding is not None else "ok"
        print(f"{target.name:28} {campaign.examples:8d} examples  {time.monotonic() - t0:6.1f} s  {status}"
              f"  ({spread})", flush=True)
        if campaign.finding is not None:
            findings += 1
            print(f"\nFINDING in {target.name} ({target.engine}): {target.about}")
            if campaign.failing is not None:
                case, text = campaign.failing
                shown, python = describe(case)
                print("minimal reproducer:\n" + shown)
                print(f"  replay: python3 -c \"from tests import fuzzkit as k; "
                      f"t = {{x.name: x for x in k.build_targets()}}['{target.name}']; "
                      f"print(t.run(k.Case({python}, {case.sizes!r}, '{case.variant}')))\"")
                print(text)
            else:
                print("".join(traceback.format_exception(campaign.finding)))
            print("\n".join(campaign.report[-5:]))
    print(f"total: {total} examples over {len(targets)} targets in {time.monotonic() - started:.1f} s, "
          f"{findings} finding(s)", flush=True)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
