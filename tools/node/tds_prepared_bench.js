// tools/bench.py's TDS prepared-statement load: N tedious connections prepare one point select, execute it S s.
//
// node tds_prepared_bench.js --port P [--host H] [--user U] [--password W] [--database D]
//                            [--connections N] [--seconds S] [--rows R]
//
// Every connection logs in, prepares `SELECT v FROM kv WHERE id = @id` once (tedious sends sp_prepare) and then
// executes it (sp_execute) with id cycling through 1..R until S seconds have passed since the start. A connection
// whose login or prepare fails, or whose execute fails, records the error and stops: the figures then show how
// many connections got through. The JSON on stdout has: connections, seconds (measured), executes, rows, errors,
// per_connection (executes of each), prepared (connections that prepared), slowest_prepare_ms (the longest
// prepare() round trip, which includes waiting for a backend behind a proxy), error_messages (distinct, at most 5).
'use strict';

const { Connection, Request, TYPES } = require('tedious');

function parseArgs(argv) {
  const opts = {
    host: '127.0.0.1', port: 0, user: 'bench', password: 'bench', database: 'bench',
    connections: 8, seconds: 5, rows: 1000,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in opts) || i + 1 >= argv.length) {
      throw new Error(`unknown or incomplete option ${argv[i]}`);
    }
    opts[key] = typeof opts[key] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
  }
  if (!opts.port) throw new Error('--port is required');
  return opts;
}

function connect(opts) {
  return new Promise((resolve, reject) => {
    const conn = new Connection({
      server: opts.host,
      authentication: { type: 'default', options: { userName: opts.user, password: opts.password } },
      options: {
        port: opts.port, database: opts.database, encrypt: false, trustServerCertificate: true,
        connectTimeout: (opts.seconds + 15) * 1000, requestTimeout: (opts.seconds + 15) * 1000,
      },
    });
    conn.on('error', () => {});   // a dropped socket also fails the pending request, which is what we count
    conn.connect((err) => (err ? reject(err) : resolve(conn)));
  });
}

async function worker(opts, index, stopAt, result) {
  let conn;
  try {
    conn = await connect(opts);
  } catch (err) {
    result.fail(`connect: ${err.message}`);
    return;
  }
  // tedious ends prepare() with a 'prepared' or an 'error' event and each execute() with the Request's callback;
  // `done` is the waiter of the one operation in flight on this connection.
  let done = null;
  let rows = 0;
  const finish = (err) => {
    const waiter = done;
    done = null;
    if (waiter) waiter(err || null);
  };
  const request = new Request('SELECT v FROM kv WHERE id = @id', finish);
  request.addParameter('id', TYPES.Int, 1);
  request.on('prepared', () => finish(null));
  request.on('error', finish);
  request.on('row', () => { rows += 1; });
  const run = (start) => new Promise((resolve) => { done = resolve; start(); });
  try {
    const prepareStarted = Date.now();
    let err = await run(() => conn.prepare(request));
    result.slowestPrepareMs = Math.max(result.slowestPrepareMs, Date.now() - prepareStarted);
    if (err || request.handle === undefined) {
      result.fail(`prepare: ${err ? err.message : 'no handle returned'}`);
      return;
    }
    result.prepared += 1;
    let n = 0;
    while (Date.now() < stopAt) {
      err = await run(() => conn.execute(request, { id: (n % opts.rows) + 1 }));
      if (err) {
        result.fail(`execute: ${err.message}`);
        break;
      }
      n += 1;
    }
    result.perConnection[index] = n;
    result.rows += rows;
  } finally {
    conn.close();
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const messages = new Set();
  const result = {
    prepared: 0, rows: 0, errors: 0, slowestPrepareMs: 0, perConnection: new Array(opts.connections).fill(0),
    fail(message) {
      this.errors += 1;
      if (messages.size < 5) messages.add(message);
    },
  };
  // Hard stop: a connection stuck in login or in a request must not keep the benchmark waiting.
  const guard = setTimeout(() => {
    process.stderr.write('tds_prepared_bench: still running 30 s after the end; giving up\n');
    process.exit(3);
  }, (opts.seconds + 30) * 1000);
  const started = Date.now();
  const stopAt = started + opts.seconds * 1000;
  const workers = [];
  for (let i = 0; i < opts.connections; i += 1) workers.push(worker(opts, i, stopAt, result));
  await Promise.all(workers);
  clearTimeout(guard);
  const executes = result.perConnection.reduce((a, b) => a + b, 0);
  process.stdout.write(JSON.stringify({
    connections: opts.connections,
    seconds: (Date.now() - started) / 1000,
    executes,
    rows: result.rows,
    errors: result.errors,
    prepared: result.prepared,
    slowest_prepare_ms: result.slowestPrepareMs,
    per_connection: result.perConnection,
    error_messages: [...messages],
  }) + '\n');
}

main().catch((err) => {
  process.stderr.write(`tds_prepared_bench: ${err.stack || err}\n`);
  process.exit(2);
});
