"""One function per parser that reads what a client (or a config file)
sends. Each takes bytes and must neither raise nor hang, whatever they are:
an exception here is a finding. Targets drive the I/O-free machines the
front ends use, as the daemon does, so the state after each input is what a
real connection would be in."""

from __future__ import annotations

import tempfile
from pathlib import Path

from proxy.config import ConfigError
from proxy.config import parse as parse_config
from proxy.frontends import imap as imap_frontend
from proxy.frontends import pop3 as pop3_frontend
from proxy.frontends import smtp as smtp_frontend
from proxy.frontends.base import Login
from proxy.auth.ldappolicy import SessionPolicy, readable
from proxy.frontends.ldap import DecideBind, Identity, LDAPSession
from proxy.wire import ber
from proxy.wire import proxyheader
from proxy.wire import sasl as sasl_exchange


def _chunks(data: bytes) -> list[bytes]:
    """Split the input the way reads from a socket might: the first byte
    says how."""
    if not data:
        return []
    step = data[0] % 17 + 1
    body = data[1:]
    return [body[i:i + step] for i in range(0, len(body), step)] or [b""]


def ldap(data: bytes) -> None:
    session = LDAPSession(tls=data[:1] == b"\x01", starttls=True, max_before_bind=4096,
                          max_after_bind=65536, max_depth=16)
    for chunk in _chunks(data):
        for action in session.feed(chunk):
            if isinstance(action, DecideBind):
                identity = Identity("app_password", "uid=a,dc=x", SessionPolicy(True, True, "uid=a,dc=x"))
                session.bound(action.message, ber.SUCCESS, "", identity)


def ber_messages(data: bytes) -> None:
    framer = ber.Framer(1 << 16, 16)
    try:
        frames = framer.feed(data)
    except ber.BERError:
        return
    for frame in frames:
        try:
            message = ber.parse_message(frame)
            ber.control_types(message)
            for parse in (ber.parse_bind, ber.parse_extended, ber.compared_attribute,
                          ber.entry_name, ber.searched_attributes,
                          lambda m: ber.with_requested_attributes(m, [ber.NO_ATTRIBUTES]),
                          lambda m: ber.with_result(m, ber.NO_SUCH_OBJECT, "")):
                try:
                    parse(message)
                except ber.BERError:
                    pass
            try:
                ber.without_attributes(message, frozenset({b"userpassword"}))
            except ber.BERError:
                pass
            # What the directory sends an app-password session: never raises.
            readable(frame, lambda name: name.startswith(b"cn=reader"))
        except ber.BERError:
            pass


def imap(data: bytes) -> None:
    machine = imap_frontend.PreLogin(tls=bool(data[:1]) and data[0] & 1 == 1, starttls=True,
                       allow_plaintext=False, max_line=512, max_literal=256)
    for chunk in _chunks(data):
        for event in machine.feed(chunk):
            if isinstance(event, Login):
                machine.login_failed(event.tag, temporary=False)


def pop3(data: bytes) -> None:
    machine = pop3_frontend.PreLogin(tls=True, starttls=True, allow_plaintext=False, max_line=512)
    for chunk in _chunks(data):
        for event in machine.feed(chunk):
            if isinstance(event, Login):
                machine.login_failed(event.tag, temporary=False)


def smtp(data: bytes) -> None:
    machine = smtp_frontend.PreAuth(hostname="mx.example.test", tls=True, starttls=True, allow_plaintext=False,
                      max_line=512)
    for chunk in _chunks(data):
        for event in machine.feed(chunk):
            if isinstance(event, Login):
                machine.login_failed(event.tag, temporary=False)


def smtp_after_auth(data: bytes) -> None:
    """Client and backend bytes interleaved: the first byte of each piece
    says whose it is."""
    guard = smtp_frontend.AfterAuth(chunking=True, max_line=256)
    for chunk in _chunks(data):
        if chunk and chunk[0] & 1:
            guard.feed_backend(chunk[1:])
        else:
            guard.feed_client(chunk[1:])


def sasl(data: bytes) -> None:
    mechanism = sasl_exchange.MECHANISMS[data[0] % 2] if data else "PLAIN"
    lines = data[1:].split(b"\r\n")
    exchange = sasl_exchange.Exchange(mechanism)
    step = exchange.start(lines[0] if data[:1] and data[0] & 2 else None)
    for line in lines[1:5]:
        if not isinstance(step, sasl_exchange.Challenge):
            break
        step = exchange.answer(line)


_config_folder = Path(tempfile.mkdtemp(prefix="fuzz-config-"))


def config(data: bytes) -> None:
    """The config loader: any bytes give a Config or a ConfigError naming
    the file, never another exception."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        parse_config(text, _config_folder / "config.yaml")
    except ConfigError:
        pass


def proxy_header(data: bytes) -> None:
    """A balancer's PROXY header, as the reader gets it: growing read by
    read until it is whole, waiting, or refused."""
    buffer = b""
    for chunk in _chunks(data):
        buffer += chunk
        try:
            header, used = proxyheader.parse(buffer)
        except proxyheader.BadHeader:
            return
        if header is not None:
            assert 0 < used <= len(buffer)
            # Plain addresses only: no zone, nothing for a log line or a terminal to act on.
            for address in (header.source, header.destination):
                assert address is None or set(address[0]) <= set("0123456789abcdef.:"), address
            return
        assert len(buffer) <= proxyheader.MAX


TARGETS = {
    "ldap": ldap, "ber": ber_messages, "imap": imap, "pop3": pop3, "smtp": smtp,
    "smtp-after-auth": smtp_after_auth, "sasl": sasl, "config": config,
    "proxy-header": proxy_header,
}
