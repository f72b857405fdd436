"""The OpenID Connect provider the tests use (tests/idp.py) does what the
portal's sign-in and the proxy's client-credentials tokens need of it."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time

from tests.idp import FORCE_AUTHN_INTERVAL, IdpError
from tests.integration.conftest import PRIMARY

REDIRECT = "https://127.0.0.1:9/oidc/callback"


def claims(jwt: str) -> dict:
    """The payload of a JWT, unchecked (the portal's tests check signatures)."""
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def test_discovery_names_what_the_clients_need(idp):
    found = idp.discovery()
    assert found["issuer"] == idp.issuer
    assert "S256" in found["code_challenge_methods_supported"]
    assert "authorization_code" in found["grant_types_supported"]
    for key in ("authorization_endpoint", "token_endpoint", "jwks_uri", "introspection_endpoint"):
        assert found[key].startswith(idp.issuer + "/")
    keys = idp.session().get(found["jwks_uri"], timeout=30).json()["keys"]
    assert [k["kty"] for k in keys] == ["RSA"]


def test_a_client_credentials_token_expires_and_the_old_secret_stops(idp, unique):
    client = unique("svc")
    idp.add_client(client, "first-secret", client_credentials=True, access_token_lifetime=2)
    idp.wait_for_config(lambda: _gets_token(idp, client, "first-secret"))
    answer = idp.client_credentials(client, "first-secret")
    token = claims(answer["access_token"])  # a JWT, signed with the JWKS's key
    assert token["iss"] == idp.issuer and token["client_id"] == client
    assert token["exp"] - token["iat"] == 2 and answer["expires_in"] == 2
    assert idp.introspect(answer["access_token"], client, "first-secret")["active"] is True
    deadline = time.monotonic() + 30
    while idp.introspect(answer["access_token"], client, "first-secret")["active"]:
        assert time.monotonic() < deadline, "the token never expired"
        time.sleep(0.5)
    idp.set_secret(client, "second-secret")
    idp.wait_for_config(lambda: not _gets_token(idp, client, "first-secret"))
    assert _gets_token(idp, client, "second-secret")


def _gets_token(idp, client, secret) -> bool:
    try:
        idp.client_credentials(client, secret)
    except IdpError:
        return False
    return True


def test_a_directory_user_signs_in_and_the_id_token_says_when_and_how(idp, slapd, unique):
    uid, client = unique("idp"), unique("rp")
    slapd.add_user(uid, PRIMARY)
    idp.add_client(client, "rp-secret", redirect_uris=[REDIRECT], amr=["pwd", "hwk"])
    verifier, challenge = pkce()

    def code(http, **extra):
        return idp.authorize(http, client, REDIRECT, state="s1", nonce="n1",
                             code_challenge=challenge, code_challenge_method="S256", **extra)

    # The provider knows the client; then the sign-in (amr is set at sign-in).
    idp.wait_for_config(lambda: _authorizes(lambda: code(idp.login(uid, PRIMARY))))
    http = idp.login(uid, PRIMARY)
    # Without PKCE: refused.
    assert "code" not in idp.authorize(http, client, REDIRECT, state="s1")
    got = code(http)
    assert got["state"] == "s1"
    answer = idp.session().post(idp.discovery()["token_endpoint"], timeout=30, data={
        "grant_type": "authorization_code", "code": got["code"], "redirect_uri": REDIRECT,
        "code_verifier": verifier}, auth=(client, "rp-secret"))
    assert answer.status_code == 200, answer.text
    token = claims(answer.json()["id_token"])
    assert token["iss"] == idp.issuer and client in token["aud"] and token["nonce"] == "n1"
    assert token["preferred_username"] == uid and token["acr"] == idp.acr
    assert token["amr"] == ["pwd", "hwk"]
    assert abs(token["auth_time"] - time.time()) < 120
    # prompt=login: the provider asks for the password again, not a code
    # (once the sign-in is older than FORCE_AUTHN_INTERVAL).
    time.sleep(FORCE_AUTHN_INTERVAL + 1)
    again = idp.session()
    again.cookies.update(http.cookies)
    try:
        idp.authorize(again, client, REDIRECT, prompt="login", code_challenge=challenge,
                      code_challenge_method="S256")
    except IdpError as e:
        assert "no redirect" in str(e)  # the sign-in form, answered 200/401
    else:
        raise AssertionError("prompt=login gave a code without a new sign-in")


def _authorizes(code) -> bool:
    try:
        return "code" in code()
    except IdpError:
        return False
