"""OAuth both ways, end to end, against the real identity provider
(LemonLDAP::NG, tests/idp.py) and a Dovecot that takes nothing but OAuth
(its oauth2 passdb, validating JWTs with the provider's keys).

backend_login: oauth2: a device signs in to the real daemon with its app
password, and the daemon logs in to Dovecot with an access token of its own
app registration, obtained by the client-credentials grant. Tokens live a
few seconds here, so that renewal and a revoked secret are seen in a test's
time.

The other way (the oauth section): a client that can do OAuth signs in to
the daemon with the user's own access token (XOAUTH2, OAUTHBEARER), which
the core checks against the provider's JWKS before relaying as for any
sign-in.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import re
import signal
import smtplib
import ssl
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import audit_text, require_tool
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, free_port

CLIENT_ID = "legacy-auth-proxy"
SECRET = "app-registration-secret-1"
MAIL_CLIENT = "mail-client"  # Thunderbird's registration, say
MAIL_SECRET = "mail-client-secret-1"
REDIRECT = "http://127.0.0.1/callback"
LIFETIME = 6  # seconds: the provider's access tokens, so that renewal is seen
DEADLINE = 60.0


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwt_parts(token: str) -> tuple[dict, dict]:
    header, payload, _ = token.split(".")
    return json.loads(_b64url(header)), json.loads(_b64url(payload))


@pytest.fixture(scope="module")
def idp(slapd):
    from tests.idp import Idp

    # The provider's portal runs as www-data: a folder it can enter.
    provider = Idp(slapd, Path(tempfile.mkdtemp(prefix="lap-oauth-")))
    provider.add_client(CLIENT_ID, SECRET, client_credentials=True, access_token_lifetime=LIFETIME)
    provider.add_client(MAIL_CLIENT, MAIL_SECRET, redirect_uris=[REDIRECT])
    provider.add_client(DOVECOT_CLIENT, DOVECOT_SECRET, client_credentials=True)
    provider.start()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def oauth_dovecot(idp, tmp_path_factory):
    """Dovecot taking nothing but the app registration's JWTs, checked with
    the provider's published keys (its JWKS) and issuer."""
    from tests.dovecot import Dovecot

    require_tool("dovecot")
    discovery = idp.discovery()
    jwks = requests.get(discovery["jwks_uri"], verify=str(idp.ca_file), timeout=30).json()
    sample = idp.client_credentials(CLIENT_ID, SECRET)["access_token"]
    _, claims = _jwt_parts(sample)
    assert claims.get("client_id", claims.get("azp")) == CLIENT_ID, claims
    server = Dovecot(tmp_path_factory.mktemp("dovecot-oauth"), dovecot_bin=require_tool("dovecot"),
                     doveadm_bin=require_tool("doveadm"), oauth2={})
    server.oauth2 = server.oauth2_settings(issuer=claims["iss"], client_id=CLIENT_ID)
    server.trust_provider(jwks, sample)
    server.start()
    yield server
    server.stop()


DOVECOT_CLIENT = "dovecot"  # the backend's own registration, to ask about tokens
DOVECOT_SECRET = "dovecot-introspection-secret"


@pytest.fixture(scope="module")
def introspecting_dovecot(idp, tmp_path_factory):
    """Dovecot asking the provider's introspection endpoint about each token."""
    from tests.dovecot import Dovecot

    server = Dovecot(tmp_path_factory.mktemp("dovecot-introspect"), dovecot_bin=require_tool("dovecot"),
                     doveadm_bin=require_tool("doveadm"), oauth2={})
    server.oauth2 = server.oauth2_introspection_settings(
        url=idp.discovery()["introspection_endpoint"], client_id=CLIENT_ID,
        own_client=DOVECOT_CLIENT, own_secret=DOVECOT_SECRET, ca_file=idp.ca_file)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(slapd, idp, oauth_dovecot, introspecting_dovecot, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy-oauth")
    secret = folder / "client-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    token_url = idp.discovery()["token_endpoint"]
    oauth = {
        "realm": "cloud", "backend_login": "oauth2", "oauth2_token_url": token_url,
        "oauth2_client_id": CLIENT_ID, "oauth2_client_secret_file": str(secret),
        "oauth2_scope": "openid", "oauth2_ca_file": str(idp.ca_file), "backend_pool": 0,
    }
    d = oauth_dovecot
    discovery = idp.discovery()
    inbound = (f"oauth:\n  issuer: {json.dumps(discovery['issuer'])}\n"
               f"  audiences: [{MAIL_CLIENT}]\n  jwks_url: {json.dumps(discovery['jwks_uri'])}\n"
               f"  username_claims: [sub]\n  ca_file: {json.dumps(str(idp.ca_file))}\n")
    metrics_port = free_port()
    inbound += f"metrics:\n  endpoint: tcp:{metrics_port}:interface=127.0.0.1\n"
    daemon = ProxyDaemon(folder, slapd, extra=inbound, listeners={
        "imap": dict(oauth, protocol="imap", backend=f"imap://127.0.0.1:{d.imap_port}"),
        "imap-bearer": dict(oauth, protocol="imap", backend=f"imap://127.0.0.1:{d.imap_port}",
                            oauth2_mechanism="oauthbearer", oauth2_client_auth="client_secret_post"),
        "pop3": dict(oauth, protocol="pop3", backend=f"pop3://127.0.0.1:{d.pop3_port}"),
        "submission": dict(oauth, protocol="smtp",
                           backend=f"smtp://127.0.0.1:{d.submission_port}"),
        "imap-introspected": dict(oauth, protocol="imap",
                                  backend=f"imap://127.0.0.1:{introspecting_dovecot.imap_port}"),
    })
    daemon.metrics_port = metrics_port
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def metric(proxy, name: str) -> float:
    """The sum of a metric's samples (0 if none yet)."""
    text = requests.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def context(proxy):
    return ssl.create_default_context(cafile=str(proxy.pki.ca_file))


def imap(proxy, listener="imap"):
    client = imaplib.IMAP4("127.0.0.1", proxy.ports[listener], timeout=30)
    client.starttls(context(proxy))
    return client


def message(subject: str) -> bytes:
    return (b"From: printer@example.test\r\nTo: someone@example.test\r\nSubject: "
            + subject.encode() + b"\r\n\r\nScanned.\r\n")


def audit(proxy) -> list[dict]:
    path = proxy.folder / "audit.log"
    return [json.loads(line) for line in audit_text(path).splitlines() if line.strip()]


def tokens_obtained(proxy) -> int:
    return len(re.findall(r"access token obtained for", proxy.log()))


def test_a_device_reads_mail_with_its_app_password(proxy, oauth_dovecot, user):
    uid, _, secret = user
    oauth_dovecot.deliver(uid, message("first"))
    since = oauth_dovecot.log_path.stat().st_size
    client = imap(proxy)
    assert client.login(uid, secret)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == message("first")
    client.logout()
    # Dovecot writes its login line a moment after the client's answer.
    oauth_dovecot.wait_for_log(rf"Login: user=<{uid}>, method=XOAUTH2", since=since)
    assert SECRET not in proxy.log() and secret not in proxy.log()


def test_a_dovecot_asking_the_provider_about_each_token(proxy, introspecting_dovecot, user):
    uid, _, secret = user
    introspecting_dovecot.deliver(uid, message("introspected"))
    since = introspecting_dovecot.log_path.stat().st_size
    client = imap(proxy, "imap-introspected")
    assert client.login(uid, secret)[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    assert client.fetch("1", "(BODY.PEEK[])")[1][0][1] == message("introspected")
    client.logout()
    introspecting_dovecot.wait_for_log(rf"Login: user=<{uid}>, method=XOAUTH2", since=since)
    introspecting_dovecot.wait_for_log(
        r"Got 200 response for request \[Req\d+: POST \S+/oauth2/introspect\]", since=since)
    assert DOVECOT_SECRET not in proxy.log()


def test_oauthbearer_and_the_secret_in_the_form(proxy, oauth_dovecot, user):
    uid, _, secret = user
    since = oauth_dovecot.log_path.stat().st_size
    client = imap(proxy, "imap-bearer")
    assert client.login(uid, secret)[0] == "OK"
    client.logout()
    oauth_dovecot.wait_for_log(rf"Login: user=<{uid}>, method=OAUTHBEARER", since=since)


def test_pop3_reads_the_mailbox(proxy, oauth_dovecot, user):
    uid, _, secret = user
    oauth_dovecot.deliver(uid, message("by pop3"))
    client = poplib.POP3("127.0.0.1", proxy.ports["pop3"], timeout=30)
    client.stls(context(proxy))
    client.user(uid)
    assert client.pass_(secret).startswith(b"+OK")
    assert b"Subject: by pop3" in b"\r\n".join(client.retr(1)[1])
    client.quit()


def test_a_device_submits_a_message(proxy, oauth_dovecot, user):
    uid, _, secret = user
    before = len(oauth_dovecot.sink_messages())
    with smtplib.SMTP("127.0.0.1", proxy.ports["submission"], timeout=30) as client:
        client.starttls(context=context(proxy))
        client.login(uid, secret)
        client.sendmail(f"{uid}@example.test", ["someone@example.test"], message("scan"))
    got = oauth_dovecot.wait_for_messages(before + 1)
    assert got is not None and got[-1].submitted == message("scan")


def test_a_wrong_app_password_never_reaches_the_provider(proxy, user):
    uid, _, _ = user
    before = tokens_obtained(proxy)
    client = imap(proxy)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(uid, "wrong wrong wrong wrong")
    client.logout()
    assert tokens_obtained(proxy) == before


def test_an_expiring_token_is_renewed_without_the_client_noticing(proxy, user):
    """Logins go on across several token lifetimes; each succeeds, and the
    proxy has asked the provider again meanwhile."""
    uid, _, secret = user
    first = tokens_obtained(proxy)
    deadline = time.monotonic() + DEADLINE
    logins = 0
    while tokens_obtained(proxy) < first + 2:
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        client = imap(proxy)
        assert client.login(uid, secret)[0] == "OK"
        client.logout()
        logins += 1
        time.sleep(0.5)
    assert logins >= 2
    assert not [e for e in audit(proxy) if e["event"] == "backend_login"]


def test_a_revoked_client_secret_is_a_temporary_failure_then_recovery(proxy, idp, user):
    uid, _, secret = user
    idp.set_secret(CLIENT_ID, "rotated-away")
    try:
        # Once the cached token has ended, the provider refuses the old
        # secret: every protocol's temporary failure, audited, counted.
        deadline = time.monotonic() + DEADLINE
        while True:
            assert time.monotonic() < deadline, proxy.log()[-3000:]
            client = imap(proxy)
            try:
                client.login(uid, secret)
            except imaplib.IMAP4.error as e:
                assert "[UNAVAILABLE]" in str(e)
                break
            client.logout()
            time.sleep(0.5)
        client.logout()
        with smtplib.SMTP("127.0.0.1", proxy.ports["submission"], timeout=30) as smtp:
            smtp.starttls(context=context(proxy))
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                smtp.login(uid, secret)
            assert refused.value.smtp_code == 454
        pop = poplib.POP3("127.0.0.1", proxy.ports["pop3"], timeout=30)
        pop.stls(context(proxy))
        pop.user(uid)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            pop.pass_(secret)
        pop.quit()
        deadline = time.monotonic() + DEADLINE
        while not (events := [e for e in audit(proxy) if e["event"] == "backend_login"
                              and e["user"] == uid and e["protocol"] == "pop3"]):
            assert time.monotonic() < deadline, "no backend_login audit event"
            time.sleep(0.1)
        assert events[-1]["reason"] == "token_unavailable"
        assert "invalid_client" in events[-1]["detail"] or "401" in events[-1]["detail"]
        assert events[-1]["user"] == uid and events[-1]["outcome"] == "temporary_failure"
        assert "rotated-away" not in proxy.log() and SECRET not in proxy.log()
        assert metric(proxy, "legacy_auth_proxy_token_failures_total") >= 1
    finally:
        idp.set_secret(CLIENT_ID, SECRET)
    # The secret is good again: within a few seconds, logins work again.
    deadline = time.monotonic() + DEADLINE
    while True:
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        client = imap(proxy)
        try:
            assert client.login(uid, secret)[0] == "OK"
            client.logout()
            break
        except imaplib.IMAP4.error as e:
            assert "[UNAVAILABLE]" in str(e)
            client.logout()
            time.sleep(0.5)


def imap_answer(proxy, uid: str, secret: str) -> str:
    """"OK", or the code of the refusal (UNAVAILABLE, AUTHENTICATIONFAILED)."""
    client = imap(proxy)
    try:
        client.login(uid, secret)
        return "OK"
    except imaplib.IMAP4.error as e:
        found = re.search(r"\[([A-Z]+)\]", str(e))
        return found.group(1) if found else str(e)
    finally:
        client.logout()


def wait_for_answer(proxy, uid: str, secret: str, wanted: str) -> None:
    """IMAP logins until one is answered ``wanted`` (each other answer must
    be OK or UNAVAILABLE: nothing else comes of a token's life)."""
    deadline = time.monotonic() + DEADLINE
    while (answer := imap_answer(proxy, uid, secret)) != wanted:
        assert answer in ("OK", "UNAVAILABLE"), answer
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        time.sleep(0.5)


def reload(proxy) -> None:
    """SIGHUP, and wait until the daemon says the config was reloaded."""
    before = proxy.log().count("config reloaded from")
    proxy.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + DEADLINE
    while proxy.log().count("config reloaded from") == before:
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        time.sleep(0.1)


def test_a_rotated_secret_is_taken_with_a_reload(proxy, idp, user):
    """The operator's way out of a revoked secret: a new one at the
    provider, the same in the proxy's file, SIGHUP."""
    uid, _, secret = user
    secret_file = proxy.folder / "client-secret"
    idp.set_secret(CLIENT_ID, "rotated-by-the-operator")
    try:
        wait_for_answer(proxy, uid, secret, "UNAVAILABLE")
        secret_file.write_text("rotated-by-the-operator\n")
        reload(proxy)
        assert "a new OAuth client secret" in proxy.log()
        wait_for_answer(proxy, uid, secret, "OK")
        assert "rotated-by-the-operator" not in proxy.log()
    finally:
        secret_file.write_text(SECRET + "\n")
        idp.set_secret(CLIENT_ID, SECRET)
        reload(proxy)
    wait_for_answer(proxy, uid, secret, "OK")


def test_a_provider_that_is_down_is_a_temporary_failure_until_it_is_back(proxy, idp, user):
    uid, _, secret = user
    idp.stop()
    try:
        wait_for_answer(proxy, uid, secret, "UNAVAILABLE")
        deadline = time.monotonic() + DEADLINE
        while not (events := [e for e in audit(proxy) if e["event"] == "backend_login"
                              and e["user"] == uid]):
            assert time.monotonic() < deadline, "no backend_login audit event"
            time.sleep(0.1)
        assert events[-1]["reason"] == "token_unavailable"
        assert events[-1]["detail"].startswith("token endpoint unreachable")
    finally:
        idp.start()
    wait_for_answer(proxy, uid, secret, "OK")


# -- the other way: clients signing in with the user's own access token --------------


def user_token(idp, uid: str, password: str = PRIMARY) -> str:
    """The user's access token for the mail client, as Thunderbird gets it:
    the authorization code flow with PKCE, signed in at the provider."""
    import hashlib
    import secrets as random

    verifier = random.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    http = idp.login(uid, password)
    code = idp.authorize(http, MAIL_CLIENT, REDIRECT, code_challenge=challenge.decode(),
                         code_challenge_method="S256")["code"]
    answer = idp.session().post(idp.discovery()["token_endpoint"], auth=(MAIL_CLIENT, MAIL_SECRET),
                                data={"grant_type": "authorization_code", "code": code,
                                      "redirect_uri": REDIRECT, "code_verifier": verifier},
                                timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    return answer.json()["access_token"]


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def authentications(proxy, uid):
    return [e for e in audit(proxy) if e["event"] == "authentication" and e.get("user") == uid]


def next_reason(proxy, uid, seen: int) -> str:
    """The reason of the user's next authentication event after the first
    ``seen`` (audit lines are written in batches, off the reactor thread)."""
    deadline = time.monotonic() + DEADLINE
    while len(events := authentications(proxy, uid)) <= seen:
        assert time.monotonic() < deadline, "no audit event"
        time.sleep(0.1)
    return events[seen]["reason"]


def test_a_client_signs_in_with_the_users_access_token(proxy, idp, oauth_dovecot, user):
    uid, _, _ = user
    token = user_token(idp, uid)
    oauth_dovecot.deliver(uid, message("for thunderbird"))
    client = imap(proxy)
    assert "AUTH=XOAUTH2" in client.capabilities and "AUTH=OAUTHBEARER" in client.capabilities
    assert client.authenticate("XOAUTH2", lambda _: xoauth2(uid, token))[0] == "OK"
    assert client.select("INBOX")[0] == "OK"
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert data[0][1] == message("for thunderbird")
    client.logout()
    assert next_reason(proxy, uid, 0) == "bearer_token"
    assert token not in proxy.log() and token not in audit_text(proxy.folder / "audit.log")
    # OAUTHBEARER may leave the user out: the token names it.
    client = imap(proxy)
    assert client.authenticate("OAUTHBEARER",
                               lambda _: f"n,,\x01auth=Bearer {token}\x01\x01".encode())[0] == "OK"
    client.logout()
    assert next_reason(proxy, uid, 1) == "bearer_token"


def test_oauthbearer_on_submission_and_pop3(proxy, idp, oauth_dovecot, user):
    uid, _, _ = user
    token = user_token(idp, uid)
    before = len(oauth_dovecot.sink_messages())
    with smtplib.SMTP("127.0.0.1", proxy.ports["submission"], timeout=30) as client:
        client.starttls(context=context(proxy))
        client.ehlo()
        assert "OAUTHBEARER" in client.esmtp_features["auth"]
        code, _ = client.auth("OAUTHBEARER", lambda challenge=None: oauthbearer(uid, token).decode(),
                              initial_response_ok=True)
        assert code == 235
        client.sendmail(f"{uid}@example.test", ["someone@example.test"], message("modern"))
    got = oauth_dovecot.wait_for_messages(before + 1)
    assert got is not None and got[-1].submitted == message("modern")
    oauth_dovecot.deliver(uid, message("pop"))
    pop = poplib.POP3("127.0.0.1", proxy.ports["pop3"], timeout=30)
    pop.stls(context(proxy))
    assert "XOAUTH2" in pop.capa()["SASL"]
    answer = pop._shortcmd("AUTH XOAUTH2 " + base64.b64encode(xoauth2(uid, token)).decode())
    assert answer.startswith(b"+OK")
    pop.quit()


def test_a_token_for_another_user_or_app_is_refused(proxy, idp, slapd, user, unique):
    uid, _, _ = user
    other = unique()
    slapd.add_user(other, PRIMARY)
    theirs = user_token(idp, other)
    client = imap(proxy)
    seen = len(authentications(proxy, uid))
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.authenticate("XOAUTH2", lambda _: xoauth2(uid, theirs))
    assert next_reason(proxy, uid, seen) == "token_for_another_user"
    # The proxy's own app registration's token is not a user's sign-in.
    app = idp.client_credentials(CLIENT_ID, SECRET)["access_token"]
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.authenticate("XOAUTH2", lambda _: xoauth2(uid, app))
    assert next_reason(proxy, uid, seen + 1) == "invalid_token"
    # Nor is a token with its signature changed.
    token = user_token(idp, uid)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.authenticate("XOAUTH2", lambda _: xoauth2(uid, forged))
    assert next_reason(proxy, uid, seen + 2) == "invalid_token"
    client.logout()
