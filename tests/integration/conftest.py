"""Fixtures that start real servers for the integration tests."""

import itertools

import pytest

from tests.conftest import require_tool
from tests.slapd import Slapd


@pytest.fixture(scope="session")
def slapd(tmp_path_factory):
    """One real OpenLDAP slapd for the whole session (see tests/slapd.py).
    Tests share it: they create their own users with names from `unique`
    and must leave slapd running (a test that stops it starts it again)."""
    slapd_bin = require_tool("slapd")
    require_tool("ldapadd")
    server = Slapd(tmp_path_factory.mktemp("slapd"), slapd_bin=slapd_bin)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def samba(tmp_path_factory):
    """One real Samba Active Directory domain controller for the whole
    session (see tests/samba.py). A DC serves the standard ports (389, 636),
    so there is only ever this one; if another process holds them, the
    tests that need it fail and say so. Tests share it: they create their
    own users with names from `unique`, and a test that stops it starts it
    again."""
    for tool in ("samba", "samba-tool", "ldbmodify", "ldbsearch", "ldapsearch"):
        require_tool(tool)
    from tests.samba import Samba, SambaError

    server = Samba(tmp_path_factory.mktemp("samba"))
    try:
        server.start()
    except SambaError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


PRIMARY = "Primary-Passw0rd"


@pytest.fixture
def user(slapd, proxy, unique):
    """A directory user (password PRIMARY) with an app password named
    "Outlook 2010", made with the command line tool of the module's `proxy`:
    (uid, dn, app password)."""
    uid = unique()
    dn = slapd.add_user(uid, PRIMARY)
    return uid, dn, proxy.create_app_password(uid, "Outlook 2010")


@pytest.fixture(scope="session")
def _unique_counter():
    return itertools.count(1)


@pytest.fixture
def unique(_unique_counter):
    """A factory of names never handed out before in this session:
    unique() -> "u0001", unique("svc") -> "svc0002", ..."""

    def make(prefix: str = "u") -> str:
        return f"{prefix}{next(_unique_counter):04d}"

    return make


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory):
    """One real Dovecot, IMAP and submission backend with its SMTP sink, for
    the whole session (see tests/dovecot.py). Tests share it: they use user
    names from `unique`, compare logs and sink messages from the point where
    they started (`since`), and must leave it running (a test that stops it
    starts it again)."""
    server = started_dovecot(tmp_path_factory.mktemp("dovecot"))
    yield server
    server.stop()


def started_dovecot(folder):
    """A real Dovecot in ``folder``, running (the caller stops it)."""
    from tests.dovecot import Dovecot

    server = Dovecot(folder, dovecot_bin=require_tool("dovecot"), doveadm_bin=require_tool("doveadm"))
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL for the whole session (see tests/postgres.py);
    each test that needs a store makes a database of its own."""
    require_tool("setpriv")
    from tests.postgres import Postgres, _bin

    try:
        _bin("initdb")
    except FileNotFoundError:
        require_tool("initdb")  # fails in CI, skips elsewhere
    server = Postgres()
    server.init()
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def idp(slapd):
    """One real OpenID Connect provider for the whole session: LemonLDAP::NG
    behind nginx, signing in the users of ``slapd`` (see tests/idp.py for
    why this one and how to use it). Tests add their own clients with
    ``idp.add_client`` under names of their own (from ``unique``); a test
    that needs the provider changed otherwise makes its own ``Idp``."""
    for tool in ("nginx", "llng-fastcgi-server"):
        require_tool(tool)
    from tests.idp import Idp, IdpError

    server = Idp(slapd)
    try:
        server.start()
    except IdpError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.remove()
