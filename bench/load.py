"""Load generators for the benchmarks: asyncio clients that speak just enough
LDAP, IMAP and SMTP to log in over and over, and count.

Each runs ``connections`` clients for ``seconds`` and returns the number of
completed operations and their latencies. They run in their own process
(``python -m bench.load ...`` prints JSON) so that the server under test and
the generator do not share an interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import time

from proxy.wire import ber


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(2)
    if head[1] & 0x80:
        count = head[1] & 0x7F
        extra = await reader.readexactly(count)
        length = int.from_bytes(extra, "big")
        head += extra
    else:
        length = head[1]
    return head + await reader.readexactly(length)


async def ldap_binds(host: str, port: int, dn: str, password: str, seconds: float,
                     latencies: list[float], expect: int = 0, source: str | None = None) -> int:
    """Simple binds on one persistent connection, as fast as answers come."""
    request = ber.bind_request(1, dn, password)
    done = 0
    deadline = time.monotonic() + seconds
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local)
    try:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            writer.write(request)
            frame = await _read_frame(reader)
            code = ber.parse_result_code(ber.parse_message(frame))
            if code != expect:
                raise RuntimeError(f"bind answered {code}")
            latencies.append(time.perf_counter() - started)
            done += 1
    finally:
        writer.close()
    return done


async def _line(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n")


async def imap_logins(host: str, port: int, user: str, password: str, seconds: float,
                      latencies: list[float]) -> int:
    """Connect, AUTHENTICATE PLAIN (SASL-IR), LOGOUT; again and again."""
    plain = base64.b64encode(f"\0{user}\0{password}".encode())
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await _line(reader)  # greeting
            writer.write(b"a AUTHENTICATE PLAIN " + plain + b"\r\n")
            while True:
                line = await _line(reader)
                if line.startswith(b"a "):
                    break
            if not line.startswith(b"a OK"):
                raise RuntimeError(f"login answered {line!r}")
            latencies.append(time.perf_counter() - started)
            writer.write(b"b LOGOUT\r\n")
            while not (await _line(reader)).startswith(b"b "):
                pass
            done += 1
        finally:
            writer.close()
    return done


async def smtp_logins(host: str, port: int, user: str, password: str, seconds: float,
                      latencies: list[float]) -> int:
    """Connect, EHLO, AUTH PLAIN, QUIT; again and again."""
    plain = base64.b64encode(f"\0{user}\0{password}".encode())
    done = 0
    deadline = time.monotonic() + seconds

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await _line(reader)
            if line[3:4] != b"-":
                return line

    while time.monotonic() < deadline:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await reply(reader)
            writer.write(b"EHLO bench\r\n")
            await reply(reader)
            writer.write(b"AUTH PLAIN " + plain + b"\r\n")
            line = await reply(reader)
            if not line.startswith(b"235"):
                raise RuntimeError(f"AUTH answered {line!r}")
            latencies.append(time.perf_counter() - started)
            writer.write(b"QUIT\r\n")
            await reply(reader)
            done += 1
        finally:
            writer.close()
    return done


KINDS = {
    "ldap": ldap_binds,
    "ldap-wrong": functools.partial(ldap_binds, expect=49),
    "imap": imap_logins,
    "smtp": smtp_logins,
}


async def run(kind: str, host: str, port: int, credentials: list[tuple[str, str]],
              connections: int, seconds: float, sources: int = 0) -> dict:
    latencies: list[float] = []
    function = KINDS[kind]
    started = time.monotonic()
    extra = [{"source": f"127.0.{1 + i // 250}.{1 + i % 250}"} if sources else {}
             for i in range(connections)]
    counts = await asyncio.gather(*(
        function(host, port, *credentials[i % len(credentials)], seconds, latencies, **extra[i])
        for i in range(connections)
    ), return_exceptions=True)
    elapsed = time.monotonic() - started
    errors = [repr(c) for c in counts if isinstance(c, BaseException)]
    total = sum(c for c in counts if isinstance(c, int))
    latencies.sort()

    def percentile(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None

    return {"operations": total, "seconds": elapsed, "rate": total / elapsed,
            "p50": percentile(0.5), "p99": percentile(0.99), "errors": errors[:3]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--credentials", required=True,
                        help="a JSON list of [user, password] pairs")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sources", action="store_true",
                        help="LDAP: each connection from an address of its own in 127.0.0.0/8")
    args = parser.parse_args()
    credentials = [tuple(pair) for pair in json.loads(args.credentials)]
    print(json.dumps(asyncio.run(run(args.kind, args.host, args.port, credentials,
                                     args.connections, args.seconds, args.sources))))


if __name__ == "__main__":
    main()
