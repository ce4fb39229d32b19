// Prepared statements through tedious: CLIENTS connections at once, each prepare()s a statement once (sp_prepare)
// and execute()s it ROUNDS times (sp_execute), checking every result; prints a JSON summary.
//
//   node tds_prepared_clients.js HOST PORT USER PASSWORD DATABASE [CLIENTS] [ROUNDS] [STATEMENTS] [TX] [TOGETHER]
// or the same from the environment (TDS_HOST, TDS_PORT, TDS_USER, TDS_PASSWORD, TDS_DATABASE, CLIENTS, ROUNDS,
// STATEMENTS, TX, TOGETHER). STATEMENTS distinct statement texts are spread over the clients (client i prepares text i mod
// STATEMENTS). TX=1 runs each execute in a transaction of its own (beginTransaction, execute, commit); TOGETHER=1
// makes every client wait, once prepared, until all have prepared (all hold a prepared statement at once).
// The summary: {"clients", "executes", "ok", "failures", "errors": [first few], "seconds"}.
'use strict';

const { Connection, Request, TYPES } = require('tedious');

const argv = process.argv.slice(2);
const env = process.env;
const host = argv[0] || env.TDS_HOST || '127.0.0.1';
const port = Number(argv[1] || env.TDS_PORT || 1433);
const user = argv[2] || env.TDS_USER || 'sa';
const password = argv[3] || env.TDS_PASSWORD || '';
const database = argv[4] || env.TDS_DATABASE || 'master';
const clients = Number(argv[5] || env.CLIENTS || 20);
const rounds = Number(argv[6] || env.ROUNDS || 10);
const statements = Number(argv[7] || env.STATEMENTS || 1);
const inTransactions = (argv[8] || env.TX || '0') === '1';
const together = (argv[9] || env.TOGETHER || '0') === '1';

// TOGETHER: resolved once every client prepared (or failed to)
let arrived = 0;
let allArrived;
const everyonePrepared = new Promise((resolve) => { allArrived = resolve; });
function arrive() {
  arrived += 1;
  if (arrived === clients) allArrived();
}

const summary = { clients, executes: 0, ok: 0, failures: 0, errors: [], seconds: 0 };

function fail(what) {
  summary.failures += 1;
  if (summary.errors.length < 10) summary.errors.push(String(what));
}

function connect() {
  return new Promise((resolve, reject) => {
    const connection = new Connection({
      server: host,
      authentication: { type: 'default', options: { userName: user, password } },
      options: { port, database, encrypt: false, trustServerCertificate: true, connectTimeout: 30000,
                 requestTimeout: 60000, rowCollectionOnRequestCompletion: false },
    });
    connection.on('error', () => {});
    connection.connect((err) => (err ? reject(err) : resolve(connection)));
  });
}

// One tedious Request prepared once: 'prepared' fires after the prepare (its callback only when it failed), the
// callback after each execute and the unprepare.
function prepared(connection, sql) {
  let pending = null;
  let rows = [];
  const request = new Request(sql, (err) => {
    const done = pending;
    pending = null;
    const got = rows;
    rows = [];
    if (done) (err ? done.reject(err) : done.resolve(got));
  });
  request.addParameter('a', TYPES.Int);
  request.addParameter('b', TYPES.Int);
  request.on('row', (columns) => rows.push(columns[0].value));
  request.on('error', (err) => {        // a failed prepare: tedious emits it instead of calling back
    const done = pending;
    pending = null;
    if (done) done.reject(err);
  });
  request.on('prepared', () => {
    const done = pending;
    pending = null;
    if (done) done.resolve([]);
  });
  const wait = () => new Promise((resolve, reject) => { pending = { resolve, reject }; });
  return {
    prepare() { const p = wait(); connection.prepare(request); return p; },
    execute(values) { const p = wait(); connection.execute(request, values); return p; },
    unprepare() { const p = wait(); connection.unprepare(request); return p; },
    get handle() { return request.handle; },
  };
}

function transaction(connection, verb) {
  return new Promise((resolve, reject) => {
    const done = (err) => (err ? reject(err) : resolve());
    if (verb === 'begin') connection.beginTransaction(done);
    else connection.commitTransaction(done);
  });
}

async function client(i) {
  let connection;
  try {
    connection = await connect();
  } catch (err) {
    fail(`client ${i}: connect: ${err.message}`);
    summary.executes += rounds;
    arrive();
    return;
  }
  const k = i % statements;
  const statement = prepared(connection, `SELECT @a * 1000 + @b + ${k} AS v`);
  let waited = false;
  try {
    try {
      await statement.prepare();
    } finally {
      if (together) {
        arrive();
        waited = true;
        await everyonePrepared;
      }
    }
    if (typeof statement.handle !== 'number') throw new Error(`no handle after prepare: ${statement.handle}`);
    for (let n = 0; n < rounds; n += 1) {
      summary.executes += 1;
      try {
        if (inTransactions) await transaction(connection, 'begin');
        const rows = await statement.execute({ a: i, b: n });
        if (inTransactions) await transaction(connection, 'commit');
        const want = i * 1000 + n + k;
        if (rows.length === 1 && rows[0] === want) summary.ok += 1;
        else fail(`client ${i} round ${n}: got ${JSON.stringify(rows)}, want [${want}]`);
      } catch (err) {
        fail(`client ${i} round ${n}: ${err.message}`);
      }
    }
    await statement.unprepare();
  } catch (err) {
    fail(`client ${i}: ${err.message}`);
  } finally {
    if (together && !waited) arrive();
    connection.close();
  }
}

async function main() {
  const started = Date.now();
  await Promise.all(Array.from({ length: clients }, (_, i) => client(i)));
  summary.seconds = (Date.now() - started) / 1000;
  process.stdout.write(`${JSON.stringify(summary)}\n`);
}

main().catch((err) => { fail(err.stack || err); process.stdout.write(`${JSON.stringify(summary)}\n`); });
