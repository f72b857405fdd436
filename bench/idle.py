"""Many idle clients (scenario 6): N IMAP sessions in IDLE held through the
proxy, the proxy's memory per session, and NOOP latency while they are held.

The backend is the demo's in-memory IMAP server (one Twisted process, which
holds ten thousand sessions cheaply), so that the machine's memory goes to
what is measured: the proxy. ``python -m bench.idle backend USER MASTER PASSWORD``
runs that backend and prints its port; ``python -m bench.idle hold ...`` opens
the sessions, prints "held N", waits for a line on standard input, measures
NOOP latency on fresh sessions, and prints JSON.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time


def raise_file_limit(wanted: int = 65536) -> None:
    """As many open files as allowed: the proxy holds two a session. Root may
    raise the hard limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, wanted), max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def backend(users: list[str], master: str, password: str) -> None:
    raise_file_limit()
    from twisted.internet import reactor

    from proxy.demo import mail

    # One account per user name would cost memory on the backend only; the
    # demo's server keeps one mailbox and accepts the listed users.
    imap_factory, _, _, inbox = mail.build(user=users[0], master_user=master, master_password=password)
    for checker in imap_factory.portal.checkers.values():
        checker.users.update(users)
    inbox.add(b"Subject: idle\r\n\r\nHello.\r\n")
    port = reactor.listenTCP(0, imap_factory, interface="127.0.0.1", backlog=4096)
    print(port.getHost().port, flush=True)
    reactor.run()


async def _session(port: int, user: str, password: str, idle: bool) -> tuple:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readuntil(b"\r\n")
    writer.write(b'a LOGIN "' + user.encode() + b'" "' + password.encode() + b'"\r\n')
    while not (line := await reader.readuntil(b"\r\n")).startswith(b"a "):
        pass
    if not line.startswith(b"a OK"):
        raise RuntimeError(f"login: {line!r}")
    writer.write(b"b SELECT INBOX\r\n")
    while not (await reader.readuntil(b"\r\n")).startswith(b"b "):
        pass
    if idle:
        writer.write(b"c IDLE\r\n")
        while not (await reader.readuntil(b"\r\n")).startswith(b"+"):
            pass
    return reader, writer


async def hold(port: int, count: int, credentials: list[tuple[str, str]]) -> None:
    raise_file_limit()
    limit = asyncio.Semaphore(50)
    held: list = []

    async def one(i: int) -> None:
        async with limit:
            held.append(await _session(port, *credentials[i % len(credentials)], idle=True))

    await asyncio.gather(*(one(i) for i in range(count)))
    print(f"held {len(held)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    latencies = []
    sessions = [await _session(port, *credentials[i % len(credentials)], idle=False)
                for i in range(20)]
    for round in range(25):
        for reader, writer in sessions:
            started = time.perf_counter()
            writer.write(b"n NOOP\r\n")
            while not (await reader.readuntil(b"\r\n")).startswith(b"n "):
                pass
            latencies.append(time.perf_counter() - started)
    latencies.sort()
    print(json.dumps({"held": len(held), "noop_p50_ms": latencies[len(latencies) // 2] * 1000,
                      "noop_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}), flush=True)
    for reader, writer in held + sessions:
        writer.close()


if __name__ == "__main__":
    if sys.argv[1] == "backend":
        backend(sys.argv[2].split(","), sys.argv[3], sys.argv[4])
    else:
        asyncio.run(hold(int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])))
