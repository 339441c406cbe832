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
        statement = await conn.prepare("SELECT $1::int * 10 + $2::int, pg_backend_pid()")
        value, pid = await statement.fetchrow(i, j)
        assert value == i * 10 + j, (value, i, j)
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
        ) as conn:
            for j in range(ROUNDS):
                value, pid = conn.execute(
                    "SELECT %s::int * 10 + %s::int, pg_backend_pid()", (i, j)
                ).fetchone()
                assert value == i * 10 + j, (value, i, j)
                pids["psycopg"].add(pid)
                with conn.transaction():
                    conn.execute("SELECT id FROM orders WHERE id > %s", (j,)).fetchall()
                with conn.pipeline():
                    first = conn.execute("SELECT %s::int", (j,))
                    second = conn.execute("SELECT %s::text", (f"x{i}",))
                assert first.fetchone()[0] == j
                assert second.fetchone()[0] == f"x{i}"
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
