"""Mail to users when an app password is made for them, or they set up a
second factor.

A short plain-text message at the directory's mail address: which device
(or that an authenticator was set up), when, from which address, and what
to do if it was not them. An app password the help desk made, and so saw,
says so. Sent through
``portal.mail_relay`` (``smtp://``: a relay on this host or a trusted network,
without TLS; ``smtps://``: TLS, the relay's certificate checked against the
system's trust store) with Twisted's SMTP client, in the background: a relay
that is down delays nobody's page and is logged.
"""

from __future__ import annotations

import email.message
import email.utils
import io
import time
import urllib.parse
from typing import Any

from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.mail.smtp import ESMTPSenderFactory

from proxy.transports import tcp_endpoint

log = Logger(namespace="legacy_auth_proxy.portal")


def message(*, sender: str, to: str, username: str, device: str, at: float, address: str,
            actor: str, title: str) -> bytes:
    by_help_desk = actor.startswith("portal:") and actor != f"portal:{username}"
    who = f"the help desk ({actor.partition(':')[2]})" if by_help_desk else \
        "you" if actor == f"portal:{username}" else actor
    if by_help_desk:
        msg = _envelope(sender, to, at, f"The help desk created an app password for {username}")
        msg.set_content(
            f"The help desk ({actor.partition(':')[2]}) created an app password named\n"
            f"\"{device}\" for your account {username} on {_when(at)},\n"
            f"from the address {address}. It was shown to them once: with it, they can\n"
            f"read and send your mail until it is deleted.\n"
            f"\n"
            f"If you asked for it, there is nothing to do.\n"
            f"\n"
            f"If you did not, sign in to {title} now, delete the app password \"{device}\",\n"
            f"and tell your security team.\n"
        )
        return msg.as_bytes()
    msg = _envelope(sender, to, at, f"A new app password was created for {username}")
    msg.set_content(
        f"An app password named \"{device}\" was created for your account {username}\n"
        f"on {_when(at)}, by {who},\n"
        f"from the address {address}.\n"
        f"\n"
        f"If this was you, there is nothing to do.\n"
        f"\n"
        f"If it was not, sign in to {title} now, delete the app password \"{device}\",\n"
        f"change your password, and tell your help desk.\n"
    )
    return msg.as_bytes()


def _envelope(sender: str, to: str, at: float, subject: str) -> email.message.EmailMessage:
    """A notice's headers: from the portal's sender, dated, marked automatic."""
    msg = email.message.EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(at, usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    return msg


def _when(at: float) -> str:
    return time.strftime('%Y-%m-%d at %H:%M UTC', time.gmtime(at))


def second_factor_message(*, sender: str, to: str, username: str, at: float, address: str,
                          title: str) -> bytes:
    msg = _envelope(sender, to, at, f"An authenticator app was set up for {username}")
    msg.set_content(
        f"An authenticator app was set up for your account {username} at {title}\n"
        f"on {_when(at)}, from the address {address}. From now on, signing in there\n"
        f"asks for a code from it.\n"
        f"\n"
        f"If this was you, there is nothing to do.\n"
        f"\n"
        f"If it was not, someone knows your password: change it now and tell your\n"
        f"help desk, who can reset the authenticator.\n"
    )
    return msg.as_bytes()


PASSKEY_ADDED = "passkey_added"
PASSKEYS_RESET = "passkeys_reset"


def passkey_message(*, sender: str, to: str, username: str, at: float, address: str,
                    title: str, kind: str, name: str = "", by: str = "") -> bytes:
    """A passkey set up by the user (``PASSKEY_ADDED``, named ``name``), or
    all of them removed by the help desk (``PASSKEYS_RESET``, by ``by``)."""
    if kind == PASSKEY_ADDED:
        msg = _envelope(sender, to, at, f"A passkey was set up for {username}")
        msg.set_content(
            f"A passkey named \"{name}\" was set up for your account {username} at\n"
            f"{title} on {_when(at)}, from the address {address}. It can now sign\n"
            f"you in there after your password.\n"
            f"\n"
            f"If this was you, there is nothing to do.\n"
            f"\n"
            f"If it was not, someone knows your password: change it now and tell your\n"
            f"help desk, who can remove the passkey.\n")
    else:
        msg = _envelope(sender, to, at, f"The help desk removed the passkeys of {username}")
        msg.set_content(
            f"The help desk ({by}) removed every passkey of your account {username}\n"
            f"at {title} on {_when(at)}. Sign in there with your authenticator app;\n"
            f"you can set up passkeys again.\n"
            f"\n"
            f"If you did not ask for this, tell your help desk.\n")
    return msg.as_bytes()


def notify_passkey(reactor: Any, relay: str, sender: str, to: str, **fields: Any) -> None:
    """Send a passkey notice in the background."""
    _background(reactor, relay, sender, to, passkey_message(sender=sender, to=to, **fields),
                fields["username"], fields["kind"].replace("_", " "))


def send(reactor: Any, relay: str, sender: str, to: str, data: bytes,
         timeout: float = 30.0) -> Deferred[Any]:
    """Hand one message to the relay; fires when it took it."""
    parts = urllib.parse.urlsplit(relay)
    host = parts.hostname or "localhost"
    done: Deferred[Any] = Deferred()
    factory = ESMTPSenderFactory(
        None, None, sender, [to], io.BytesIO(data), done, retries=0, timeout=int(timeout),
        contextFactory=None, requireAuthentication=False, requireTransportSecurity=False,
    )
    if parts.scheme == "smtps":
        endpoint = endpoints.wrapClientTLS(
            ssl.optionsForClientTLS(host), tcp_endpoint(reactor, host, parts.port or 465, timeout))
    else:
        endpoint = tcp_endpoint(reactor, host, parts.port or 25, timeout)
    connecting = endpoint.connect(factory)
    connecting.addErrback(lambda f: done.called or done.errback(f))
    return done


def notify_created(reactor: Any, relay: str, sender: str, to: str, **fields: Any) -> None:
    """Send the notice in the background; a failure is logged, never raised."""
    _background(reactor, relay, sender, to, message(sender=sender, to=to, **fields),
                fields["username"], "a new app password")


def notify_second_factor(reactor: Any, relay: str, sender: str, to: str, **fields: Any) -> None:
    """Send the notice of a new authenticator in the background."""
    _background(reactor, relay, sender, to, second_factor_message(sender=sender, to=to, **fields),
                fields["username"], "a new authenticator")


def _background(reactor: Any, relay: str, sender: str, to: str, data: bytes, user: str,
                what: str) -> None:
    d = send(reactor, relay, sender, to, data)
    d.addCallbacks(
        lambda _: log.info("told {user} of {what}", user=user, what=what),
        lambda f: log.warn("cannot mail {user} of {what}: {error}", user=user, what=what,
                           error=f.getErrorMessage()),
    )
