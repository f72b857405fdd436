"""The demo's mail server: IMAP, POP3 and SMTP submission in memory (Twisted's
IMAP4Server, POP3 and ESMTP), trusting the proxy as a master user as Dovecot does.

Messages submitted for any recipient land in the demo user's INBOX, so that
mail sent through the proxy can be read back through it. Nothing is kept on
disk; it is for trying the proxy, not for production.
"""

from __future__ import annotations

import email
import hmac
import email.policy
import email.utils
import io
import time
from typing import Any

from twisted.cred import credentials, error, portal
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.mail import imap4, pop3, smtp
from twisted.mail.interfaces import IMessageIMAP, IMessageIMAPFile
from zope.interface import implementer

FLAGS = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"]


@implementer(IMessageIMAP, IMessageIMAPFile)
class Message:
    def __init__(self, uid: int, data: bytes, flags: list[str], date: float) -> None:
        self.uid = uid
        self.data = data
        self.flags = list(flags)
        self.date = date
        head, _, self.body = data.partition(b"\r\n\r\n")
        self.parsed = email.message_from_bytes(head + b"\r\n\r\n", policy=email.policy.compat32)

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)

    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        wanted = {n.decode().lower() if isinstance(n, bytes) else n.lower() for n in names}
        headers = {}
        for key, value in self.parsed.items():
            if (key.lower() in wanted) != negate or not names:
                headers[key.lower()] = value
        return headers

    def getBodyFile(self) -> io.BytesIO:
        return io.BytesIO(self.body)

    def getSize(self) -> int:
        return len(self.data)

    def isMultipart(self) -> bool:
        return False

    def getSubPart(self, part: int) -> Any:
        raise IndexError(part)

    def getUID(self) -> int:
        return self.uid

    def getFlags(self) -> list[str]:
        return self.flags

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.date)


@implementer(imap4.IMailbox)
class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.next_uid = 1
        self.listeners: list[Any] = []

    def getFlags(self) -> list[str]:
        return FLAGS

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def getUIDValidity(self) -> int:
        return 1

    def getUIDNext(self) -> int:
        return self.next_uid

    def getUID(self, message: int) -> int:
        return self.messages[message - 1].uid

    def getMessageCount(self) -> int:
        return len(self.messages)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        return sum(1 for m in self.messages if "\\Seen" not in m.flags)

    def isWriteable(self) -> bool:
        return True

    def destroy(self) -> None:
        self.messages.clear()

    def requestStatus(self, names: Any) -> dict[str, Any]:
        return imap4.statusRequestHelper(self, names)

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def add(self, data: bytes, flags: list[str] | None = None) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.messages.append(Message(uid, data, flags or [], time.time()))
        for listener in self.listeners:
            listener.newMessages(len(self.messages), None)
        return uid

    def addMessage(self, message: Any, flags: Any, date: Any = None) -> defer.Deferred[int]:
        return defer.succeed(self.add(message.read(), [f.decode() if isinstance(f, bytes) else f for f in flags]))

    def expunge(self) -> list[int]:
        gone = [i + 1 for i, m in enumerate(self.messages) if "\\Deleted" in m.flags]
        self.messages = [m for m in self.messages if "\\Deleted" not in m.flags]
        return gone

    def _select(self, messages: Any, uid: bool) -> list[tuple[int, Message]]:
        if uid:
            messages.last = self.next_uid - 1 if self.messages else 0
        else:
            messages.last = len(self.messages)
        return [(i + 1, m) for i, m in enumerate(self.messages)
                if (m.uid if uid else i + 1) in messages]

    def fetch(self, messages: Any, uid: bool) -> list[tuple[int, Message]]:
        return self._select(messages, uid)

    def store(self, messages: Any, flags: Any, mode: int, uid: bool) -> dict[int, list[str]]:
        flags = [f.decode() if isinstance(f, bytes) else f for f in flags]
        result = {}
        for number, message in self._select(messages, uid):
            if mode == 0:
                message.flags = list(flags)
            elif mode == 1:
                message.flags = sorted(set(message.flags) | set(flags))
            else:
                message.flags = [f for f in message.flags if f not in flags]
            result[number] = message.flags
        return result


class Account(imap4.MemoryAccount):
    def _emptyMailbox(self, name: str, id: int) -> Mailbox:
        return Mailbox()


class MasterChecker:
    """Accepts ``user*master`` with the master password, as Dovecot does."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, master_user: str, master_password: str, users: set[str]) -> None:
        self.master = master_user.encode()
        self.password = master_password.encode()
        self.users = users

    def requestAvatarId(self, creds: Any) -> defer.Deferred[bytes]:
        username = creds.username if isinstance(creds.username, bytes) else creds.username.encode()
        user, _, master = username.rpartition(b"*")
        password = creds.password if isinstance(creds.password, bytes) else creds.password.encode()
        right = hmac.compare_digest(master, self.master) & hmac.compare_digest(password, self.password)
        if right and user.decode() in self.users:
            return defer.succeed(user)
        return defer.fail(error.UnauthorizedLogin())


class MasterPLAIN(imap4.PLAINCredentials):
    """SASL PLAIN where the authorization identity is the user and the
    authentication identity the master: turned into ``user*master``."""

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise imap4.IllegalClientResponse("malformed PLAIN response")
        authzid, authcid, password = parts
        self.username = (authzid or authcid) + b"*" + authcid
        self.password = password


@implementer(smtp.IMessage)
class Incoming:
    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        self.mailbox.add(b"\r\n".join(self.lines) + b"\r\n")
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return lambda: Incoming(self.mailbox)


@implementer(pop3.IMailbox)
class POP3Mailbox:
    """The INBOX as POP3 sees it, for one session: deletions are marked,
    and made when the client quits."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.messages = list(mailbox.messages)
        self.deleted: set[int] = set()

    def listMessages(self, index: int | None = None) -> Any:
        if index is None:
            return [0 if i in self.deleted else m.getSize() for i, m in enumerate(self.messages)]
        if index in self.deleted:
            raise ValueError(index)
        return self.messages[index].getSize()

    def getMessage(self, index: int) -> io.BytesIO:
        if index in self.deleted:
            raise ValueError(index)
        # Twisted's POP3 server ends each line with CRLF itself.
        return io.BytesIO(self.messages[index].data.replace(b"\r\n", b"\n"))

    def getUidl(self, index: int) -> bytes:
        return str(self.messages[index].uid).encode()

    def deleteMessage(self, index: int) -> None:
        self.deleted.add(index)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> None:
        doomed = {id(self.messages[i]) for i in self.deleted}
        self.mailbox.messages = [m for m in self.mailbox.messages if id(m) not in doomed]


@implementer(portal.IRealm)
class Realm:
    def __init__(self, account: Account) -> None:
        self.account = account

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        inbox = self.account.select("INBOX")
        if imap4.IAccount in interfaces:
            return imap4.IAccount, self.account, lambda: None
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, Delivery(inbox), lambda: None
        if pop3.IMailbox in interfaces:
            box = POP3Mailbox(inbox)
            return pop3.IMailbox, box, box.sync
        raise NotImplementedError(interfaces)


class IMAPFactory(Factory):
    noisy = False
    def __init__(self, portal_: portal.Portal) -> None:
        self.portal = portal_

    def buildProtocol(self, addr: Any) -> imap4.IMAP4Server:
        protocol = imap4.IMAP4Server(chal={b"PLAIN": MasterPLAIN})
        protocol.portal = self.portal
        protocol.factory = self
        return protocol


class POP3Factory(Factory):
    noisy = False

    def __init__(self, portal_: portal.Portal) -> None:
        self.portal = portal_

    def buildProtocol(self, addr: Any) -> pop3.POP3:
        protocol = pop3.POP3()
        protocol.portal = self.portal
        protocol.factory = self
        return protocol


class SMTPFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    noisy = False

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        protocol = super().buildProtocol(addr)
        protocol.challengers = {b"PLAIN": MasterPLAIN}
        protocol.host = b"mail.example.test"
        return protocol


def build(*, user: str, master_user: str, master_password: str,
          ) -> tuple[IMAPFactory, POP3Factory, SMTPFactory, Mailbox]:
    account = Account(user)
    account.addMailbox("INBOX")
    inbox = account.select("INBOX")
    checker = MasterChecker(master_user, master_password, {user})
    shared = portal.Portal(Realm(account), [checker])
    smtp_factory = SMTPFactory(shared)
    return IMAPFactory(shared), POP3Factory(shared), smtp_factory, inbox
