// node-postgres named statements (prepared once per client name, shared names across
// clients) and transactions through pgbastion: 8 concurrent clients, with the proxy's
// settings in the environment (PGB_PORT, PGB_USER, PGB_TOKEN, PGB_CA). Prints the upstream
// backend pids seen, then "ok".
const fs = require('fs');
const { Client } = require('pg');

const CLIENTS = 8;
const ROUNDS = 30;
const pids = new Set();

async function client(i) {
  const c = new Client({
    host: '127.0.0.1',
    port: Number(process.env.PGB_PORT),
    user: process.env.PGB_USER,
    password: process.env.PGB_TOKEN,
    database: 'demo',
    ssl: { ca: fs.readFileSync(process.env.PGB_CA) },
  });
  await c.connect();
  for (let j = 0; j < ROUNDS; j++) {
    // The same statement name in every client, each with its own text: an answer from
    // another client's statement shows as a wrong client number.
    const r = await c.query({
      name: 'times_ten_plus',
      text: `SELECT ${i} AS client, $1::int * 10 + $2::int AS value, pg_backend_pid() AS pid`,
      values: [i, j],
    });
    if (r.rows[0].client !== i || r.rows[0].value !== i * 10 + j) {
      throw new Error(`client ${i}: got ${JSON.stringify(r.rows[0])}, expected value ${i * 10 + j}`);
    }
    pids.add(r.rows[0].pid);
    await c.query('BEGIN');
    const n = await c.query({ name: 'orders_after', text: 'SELECT count(*)::int AS n FROM orders WHERE id > $1', values: [0] });
    const again = await c.query({ name: 'orders_after', values: [0] });
    if (n.rows[0].n !== again.rows[0].n) throw new Error(`client ${i}: counts differ in a transaction`);
    await c.query('COMMIT');
  }
  await c.end();
}

Promise.all([...Array(CLIENTS).keys()].map(client)).then(
  () => {
    console.log('pids node-postgres ' + [...pids].sort((a, b) => a - b).join(' '));
    console.log('ok');
  },
  (error) => {
    console.error(error.message);
    process.exit(1);
  },
);
