"""A reference point for LDAP binds: an ldaptor server that accepts every
simple bind, in a process of its own. Prints its port, then serves until
terminated."""

from __future__ import annotations

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapserver import BaseLDAPServer
from twisted.internet import reactor
from twisted.internet.protocol import ServerFactory


class AcceptAll(BaseLDAPServer):
    def handle(self, message):
        if isinstance(message.value, pureldap.LDAPBindRequest):
            self.queue(message.id, pureldap.LDAPBindResponse(resultCode=0))
        elif isinstance(message.value, pureldap.LDAPUnbindRequest):
            self.transport.loseConnection()


def main() -> None:
    factory = ServerFactory.forProtocol(AcceptAll)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
