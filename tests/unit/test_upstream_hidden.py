"""The reading accounts' own entries are hidden from app-password sessions
however the directory writes their DNs (Active Directory's are spaced)."""

from __future__ import annotations

from pathlib import Path

from proxy.backends.ldap import Upstream
from proxy.config import DirectoryConfig


def upstream(bind_dn, search_dn=None):
    config = DirectoryConfig(url="ldaps://dc.example.test", bind_dn=bind_dn,
                             bind_password_file=Path("/unused"), user_base="dc=example,dc=test",
                             search_bind_dn=search_dn)
    return Upstream(reactor=None, config=config, endpoint=None, start_tls=None,
                    service_password="x")


def test_ad_style_names_are_hidden_in_every_spelling():
    up = upstream("CN=LDAP Proxy,OU=Service Accounts,DC=example,DC=test",
                  "CN=Reader,OU=Service Accounts,DC=example,DC=test")
    for name in ("CN=LDAP Proxy,OU=Service Accounts,DC=example,DC=test",
                 "cn=ldap proxy,ou=service accounts,dc=example,dc=test",
                 "CN=LDAP Proxy, OU=Service Accounts, DC=example, DC=test",
                 "CN=LDAP\\20Proxy,OU=Service Accounts,DC=example,DC=test",
                 "cn=reader,ou=service accounts,dc=example,dc=test"):
        assert up.is_hidden(name.encode()), name
    for name in ("CN=LDAP Proxy Two,OU=Service Accounts,DC=example,DC=test",
                 "CN=Alice,OU=People,DC=example,DC=test",
                 "CN=LDAP Proxy,OU=People,DC=example,DC=test"):
        assert not up.is_hidden(name.encode()), name


def test_openldap_names_still_hidden():
    up = upstream("cn=proxy,dc=example,dc=test")
    assert up.is_hidden(b"cn=proxy,dc=example,dc=test")
    assert up.is_hidden(b"CN=Proxy, DC=Example, DC=Test")
    assert not up.is_hidden(b"uid=proxy,ou=people,dc=example,dc=test")
