#!/usr/bin/env python3
"""Opens N client sessions through pgbastion (TLS verify-full, the token as password), holds
them idle for S seconds, then closes them with Terminate. pgbench cannot hold thousands of
connections from one process; this speaks just enough of the protocol to log in.

Usage: idle_sessions.py HOST PORT USER TOKEN ROOTCERT N SECONDS
Prints how many sessions were established; exits 1 if any failed.
"""
import asyncio
import ssl
import struct
import sys


async def session(host, port, user, token, context, ready, hold):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(struct.pack("!ii", 8, 80877103))  # SSLRequest
    await writer.drain()
    if await reader.readexactly(1) != b"S":
        raise RuntimeError("TLS refused")
    await writer.start_tls(context, server_hostname=host)
    params = b"user\0" + user.encode() + b"\0database\0demo\0\0"
    writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
    await writer.drain()
    while True:
        tag = await reader.readexactly(1)
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        body = await reader.readexactly(length - 4)
        if tag == b"R" and struct.unpack("!i", body[:4])[0] == 3:
            password = token.encode() + b"\0"
            writer.write(b"p" + struct.pack("!i", 4 + len(password)) + password)
            await writer.drain()
        elif tag == b"E":
            raise RuntimeError(body.decode(errors="replace"))
        elif tag == b"Z":
            break
    ready.append(1)
    await hold.wait()
    writer.write(b"X\0\0\0\4")
    await writer.drain()
    writer.close()


async def main():
    host, port, user, token, rootcert, n, seconds = sys.argv[1:8]
    context = ssl.create_default_context(cafile=rootcert)
    ready, hold = [], asyncio.Event()
    tasks = []
    for i in range(int(n)):
        tasks.append(asyncio.create_task(session(host, int(port), user, token, context, ready, hold)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    deadline = asyncio.get_running_loop().time() + 120
    while len(ready) < int(n) and asyncio.get_running_loop().time() < deadline:
        if any(t.done() and t.exception() for t in tasks):
            break
        await asyncio.sleep(0.2)
    print(f"idle sessions established: {len(ready)} of {n}", flush=True)
    await asyncio.sleep(float(seconds))
    hold.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        print(f"{len(failed)} sessions failed, e.g.: {failed[0]}", file=sys.stderr)
        sys.exit(1)


asyncio.run(main())
