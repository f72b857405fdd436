"""The demo's directory: a small in-memory LDAP server (ldaptor) on loopback.

It plays the on-premises directory for ``legacy-auth-proxy demo``: a service
account, one user, and the groups the proxy reads. It has no access control
and keeps nothing on disk; it is for trying the proxy, not for production.
"""

from __future__ import annotations

from typing import Any

from ldaptor import inmemory
from ldaptor.interfaces import IConnectedLDAPEntry
from ldaptor.protocols.ldap.ldapserver import LDAPServer
from twisted.internet.protocol import ServerFactory
from twisted.python.components import registerAdapter

SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
SERVICE_DN = f"cn=legacy-auth-proxy,ou=services,{SUFFIX}"
MFA_GROUP = f"cn=mfa,ou=groups,{SUFFIX}"
ADMIN_GROUP = f"cn=helpdesk,ou=groups,{SUFFIX}"


class DirectoryFactory(ServerFactory):
    protocol = LDAPServer
    noisy = False

    def __init__(self, root: Any) -> None:
        self.root = root

    def buildProtocol(self, addr: Any) -> LDAPServer:
        protocol = self.protocol()
        protocol.debug = False
        protocol.factory = self
        return protocol


registerAdapter(lambda factory: factory.root, DirectoryFactory, IConnectedLDAPEntry)


def build(*, user: str, mail: str, password: str, service_password: str,
          helpdesk: str, helpdesk_password: str) -> DirectoryFactory:
    root = inmemory.ReadOnlyInMemoryLDAPEntry(
        SUFFIX, {"objectClass": ["dcObject", "organization"], "dc": ["example"], "o": ["Example"]}
    )
    people = root.addChild("ou=people", {"objectClass": ["organizationalUnit"], "ou": ["people"]})
    services = root.addChild("ou=services", {"objectClass": ["organizationalUnit"], "ou": ["services"]})
    groups = root.addChild("ou=groups", {"objectClass": ["organizationalUnit"], "ou": ["groups"]})
    services.addChild("cn=legacy-auth-proxy", {
        "objectClass": ["applicationProcess", "simpleSecurityObject"],
        "cn": ["legacy-auth-proxy"],
        "userPassword": [service_password],
    })
    groups.addChild("cn=mfa", {
        "objectClass": ["groupOfNames"], "cn": ["mfa"], "member": [f"uid={user},{PEOPLE}"],
    })
    people.addChild(f"uid={user}", {
        "objectClass": ["inetOrgPerson"],
        "uid": [user],
        "cn": ["Demo User"],
        "sn": ["User"],
        "mail": [mail],
        "userPassword": [password],
        "memberOf": [MFA_GROUP],
    })
    groups.addChild("cn=helpdesk", {
        "objectClass": ["groupOfNames"], "cn": ["helpdesk"], "member": [f"uid={helpdesk},{PEOPLE}"],
    })
    people.addChild(f"uid={helpdesk}", {
        "objectClass": ["inetOrgPerson"],
        "uid": [helpdesk],
        "cn": ["Help Desk"],
        "sn": ["Desk"],
        "mail": [f"{helpdesk}@example.test"],
        "userPassword": [helpdesk_password],
        "memberOf": [ADMIN_GROUP],
    })
    return DirectoryFactory(root)
