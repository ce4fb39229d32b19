"""A connection storm against a PostgreSQL endpoint: N psycopg clients connect at the same moment, run one checked
query each and leave; prints one JSON line with how many were served, the errors and the time each took.

Used by `tools/bench.py --loads storm` (2,000 clients on a pooler in front of a server that allows 20 connections);
runs on its own too:

    python3 tools/pg_storm.py --port 6432 --user bench --database bench --clients 2000 [--password PW]

Each client is an asyncio task on psycopg's async connection (libpq underneath, so the client side costs little
CPU), all released together by one event, so the pooler sees every connect within a few milliseconds. The query
goes in one round trip (Parse, Bind, Execute, Sync), which transaction poolers without statement tracking serve
too. `--timeout` bounds each client's whole life (connect, authentication, the query); a client past it counts
as an error.
"""
import argparse
import asyncio
import json
import resource
import statistics
import sys
import time

import psycopg


def raise_open_file_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards `wanted` within the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


async def one_client(number: int, args, go: asyncio.Event, started_at: list) -> tuple:
    await go.wait()
    try:
        async with asyncio.timeout(args.timeout):
            conn = await psycopg.AsyncConnection.connect(host=args.host, port=args.port, user=args.user,
                                                         password=args.password, dbname=args.database,
                                                         autocommit=True, connect_timeout=int(args.timeout) + 1)
            try:
                cursor = await conn.execute("SELECT %s::int + 1", (number,))
                rows = await cursor.fetchall()
                if rows != [(number + 1,)]:
                    return None, f"client {number}: wrong answer {rows!r}"
            finally:
                await conn.close()
    except TimeoutError:
        return None, f"client {number}: not served within {args.timeout:g} s"
    except Exception as exc:  # every failure is a result: the storm reports it, it does not stop
        return None, f"client {number}: {type(exc).__name__}: {exc}"
    return time.monotonic() - started_at[0], None


async def storm_clients(args) -> tuple[list, float]:
    go = asyncio.Event()
    started_at = [0.0]
    clients = [asyncio.create_task(one_client(n, args, go, started_at)) for n in range(args.clients)]
    await asyncio.sleep(0)      # every task is waiting on the event before it is set
    started_at[0] = time.monotonic()
    go.set()
    results = await asyncio.gather(*clients)
    return results, time.monotonic() - started_at[0]


def storm(args) -> dict:
    limit = raise_open_file_limit(args.clients + 64)
    if limit < args.clients + 16:
        raise SystemExit(f"RLIMIT_NOFILE allows {limit} open files, too few for {args.clients} clients")
    results, wall = asyncio.run(storm_clients(args))
    served = sorted(t for t, _ in results if t is not None)
    errors = [e for _, e in results if e is not None]
    quantile = lambda q: served[min(len(served) - 1, int(q * len(served)))] if served else None  # noqa: E731
    return {"clients": args.clients, "served": len(served), "errors": len(errors), "first_errors": errors[:5],
            "wall_s": round(wall, 3), "p50_s": quantile(0.5), "p99_s": quantile(0.99),
            "max_s": served[-1] if served else None,
            "mean_s": round(statistics.fmean(served), 4) if served else None}

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password")
    parser.add_argument("--database", required=True)
    parser.add_argument("--clients", type=int, default=2000, help="clients released at once (default 2000)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds each client may take from the release to its answer (default 30)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.timeout <= 0:
        parser.error("--clients: at least 1; --timeout: above 0")
    return args


def main(argv=None) -> int:
    result = storm(parse_args(sys.argv[1:] if argv is None else argv))
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
