"""asyncpg and psycopg 3 (server-side prepared statements, transactions, pipeline mode)
through pgbastion: 8 concurrent clients each, with the proxy's settings in the environment
(PGB_PORT, PGB_USER, PGB_TOKEN, PGB_CA). Prints the upstream backend pids each driver saw,
then "ok"."""

import asyncio
import os
import ssl
import sys
import threading

PORT = int(os.environ["PGB_PORT"])
USER = os.environ["PGB_USER"]
TOKEN = os.environ["PGB_TOKEN"]
CA = os.environ["PGB_CA"]
CLIENTS, ROUNDS = 8, 30
pids = {"asyncpg": set(), "psycopg": set()}


async def asyncpg_client(i):
    import asyncpg

    tls = ssl.create_default_context(cafile=CA)
    conn = await asyncpg.connect(
        host="127.0.0.1", port=PORT, user=USER, password=TOKEN, database="demo", ssl=tls
    )
    for j in range(ROUNDS):
        # Each client's own text under the driver's shared statement names: an answer from
        # another client's statement shows as a wrong client number.
        statement = await conn.prepare(
            f"SELECT {i} AS client, $1::int * 10 + $2::int, pg_backend_pid()"
        )
        client, value, pid = await statement.fetchrow(i, j)
        assert (client, value) == (i, i * 10 + j), (client, value, i, j)
        pids["asyncpg"].add(pid)
        async with conn.transaction():
            count = await conn.fetchval("SELECT count(*) FROM orders WHERE id > $1", 0)
            assert count > 0
            again = await conn.fetchval("SELECT count(*) FROM orders WHERE id > $1", 0)
            assert again == count
    await conn.close()


def psycopg_client(i, errors):
    import psycopg

    try:
        with psycopg.connect(
            host="127.0.0.1",
            port=PORT,
            user=USER,
            password=TOKEN,
            dbname="demo",
            sslmode="verify-full",
            sslrootcert=CA,
            prepare_threshold=0,
            # Each statement its own transaction, as applications run them: without this
            # the whole run would be one transaction on one connection.
            autocommit=True,
        ) as conn:
            for j in range(ROUNDS):
                client, value, pid = conn.execute(
                    f"SELECT {i} AS client, %s::int * 10 + %s::int, pg_backend_pid()", (i, j)
                ).fetchone()
                assert (client, value) == (i, i * 10 + j), (client, value, i, j)
                pids["psycopg"].add(pid)
                with conn.transaction():
                    conn.execute("SELECT id FROM orders WHERE id > %s", (j,)).fetchall()
                with conn.pipeline():
                    first = conn.execute(f"SELECT %s::int + {i} - {i}", (j,))
                    second = conn.execute(f"SELECT %s::text || '{i}'", (f"x{i}",))
                assert first.fetchone()[0] == j
                assert second.fetchone()[0] == f"x{i}{i}"
    except Exception as error:  # reported by the main thread
        errors.append(f"psycopg client {i}: {error!r}")


async def asyncpg_all():
    await asyncio.gather(*(asyncpg_client(i) for i in range(CLIENTS)))


def main():
    asyncio.run(asyncpg_all())
    errors = []
    threads = [threading.Thread(target=psycopg_client, args=(i, errors)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    for driver, seen in pids.items():
        print(f"pids {driver} " + " ".join(str(pid) for pid in sorted(seen)))
    print("ok")


main()
