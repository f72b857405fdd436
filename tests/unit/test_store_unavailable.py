"""A store that cannot be reached now (temporary: exit 75, started again) told
apart from one that refuses the config (exit 78, left for a person), on the
words libpq and PostgreSQL really say."""

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from proxy.cli import EX_CONFIG, EX_TEMPFAIL, Failure
from proxy.bootstrap import StartupError, StoreUnreachable
from proxy.store.postgres import _what, unavailable

AT = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '


@pytest.mark.parametrize("text", [
    AT + "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
    "failed to resolve host 'db.example.com': [Errno -2] Name or service not known",
    'could not translate host name "db.example.com" to address: Temporary failure in name resolution',
    AT + "timeout expired",
    AT + "No route to host",
    AT + "FATAL:  the database system is starting up",
    AT + "FATAL:  the database system is shutting down",
    AT + "FATAL:  sorry, too many clients already",
    AT + "server closed the connection unexpectedly",
    'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such file or directory',
])
def test_what_waiting_can_mend_is_temporary(text):
    assert unavailable(psycopg.OperationalError(text))


@pytest.mark.parametrize("text", [
    AT + 'FATAL:  password authentication failed for user "lap"',
    AT + 'FATAL:  no pg_hba.conf entry for host "10.0.0.5", user "lap", database "lap", no encryption',
    AT + 'FATAL:  database "lap" does not exist',
    AT + 'FATAL:  role "lap" does not exist',
    AT + 'FATAL:  role "lap" is not permitted to log in',
    AT + 'FATAL:  permission denied for database "lap"',
    AT + "fe_sendauth: no password supplied",
    AT + "server does not support SSL, but SSL was required",
    AT + "SSL error: certificate verify failed",
    'connection is bad: invalid sslmode value: "disabled"',
])
def test_what_needs_a_person_is_configuration(text):
    assert not unavailable(psycopg.OperationalError(text))


def test_a_malformed_url_is_configuration_and_a_pool_timeout_temporary():
    assert not unavailable(psycopg.ProgrammingError("invalid connection option \"bogus\""))
    assert unavailable(PoolTimeout("couldn't get a connection after 5.00 sec"))


def test_the_operator_reads_one_line_without_psycopgs_prefix():
    text = _what(psycopg.OperationalError(
        AT + "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?"))
    assert text == 'connection to server at "127.0.0.1", port 5432 failed: Connection refused'


def test_the_command_line_exits_75_for_an_outage_and_78_for_the_rest():
    temporary = Failure.cannot_start(StoreUnreachable("postgresql://lap@db:5432/lap: the store "
                                                      "cannot be reached: Connection refused"))
    assert temporary.code == EX_TEMPFAIL == 75
    assert "temporary" in str(temporary) and "\n" not in str(temporary)
    permanent = Failure.cannot_start(StartupError("the store's schema is version 1"))
    assert permanent.code == EX_CONFIG == 78 and str(permanent) == "the store's schema is version 1"
