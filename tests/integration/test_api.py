"""The REST API end to end: the real daemon's portal listener, tokens made
with the real command line tool, calls made with curl (the flows docs/api.md
shows), and schemathesis holding every operation to the OpenAPI document
the daemon serves."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import audit_text, require_tool
from tests.integration.conftest import PRIMARY
from tests.proxyd import ProxyDaemon, free_port


@pytest.fixture(scope="module")
def proxy(slapd, tmp_path_factory):
    require_tool("curl")
    folder = tmp_path_factory.mktemp("proxy-api")
    port = free_port()
    daemon = ProxyDaemon(folder, slapd, {
        "ldap": {"protocol": "ldap", "realm": "cloud", "tls": "none",
                 "allow_plaintext_auth": True},
    }, extra=(
        "portal:\n"
        f"  endpoint: tcp:{port}:interface=127.0.0.1\n"
        f"  certificate: {folder / 'pki' / 'server.pem'}\n"
        f"  private_key: {folder / 'pki' / 'server.key'}\n"))
    daemon.ports["portal"] = port
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def token(proxy, name, scope, *extra) -> str:
    done = proxy.cli("api-token", "create", name, "--scope", scope, "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["token"]


def curl(proxy, method, path, token=None, body=None, headers=()):
    """(status, headers, body as JSON or None) of one call made with curl."""
    command = ["curl", "-sS", "--cacert", str(proxy.pki.ca_file), "-X", method, "-D", "-",
               f"https://127.0.0.1:{proxy.ports['portal']}/api/v1{path}"]
    if token is not None:
        command += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        command += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    for header in headers:
        command += ["-H", header]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    head, _, text = done.stdout.partition("\n\n")  # text mode: CRLF read as LF
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    found = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return status, found, json.loads(text) if text else None


def audit(proxy):
    return [json.loads(line) for line in audit_text(proxy.folder / "audit.log").splitlines()]


def test_without_a_token_every_call_is_401_as_a_problem(proxy):
    status, headers, body = curl(proxy, "GET", "/app-passwords")
    assert status == 401
    assert headers["content-type"] == "application/problem+json"
    assert headers["www-authenticate"].startswith("Bearer")
    assert body["type"] == "urn:legacy-auth-proxy:problem:unauthenticated"
    assert body["status"] == 401
    status, headers, body = curl(proxy, "GET", "/app-passwords", token="lap_not-a-token")
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]


def test_a_printer_gets_an_app_password_which_is_listed_used_and_deleted(proxy, slapd, unique):
    uid = unique("printer")
    slapd.add_user(uid, PRIMARY)
    fleet = unique("fleet")
    manage = token(proxy, fleet, "manage")
    status, _, page = curl(proxy, "GET", f"/users/{uid}/app-passwords", manage)
    assert (status, page) == (200, {"items": [], "next_page_token": None})

    status, headers, made = curl(proxy, "POST", f"/users/{uid}/app-passwords", manage,
                                 {"name": "Printer, 2nd floor", "protocols": ["smtp"],
                                  "expires": "365d"})
    assert status == 201, made
    assert headers["location"] == f"/api/v1/users/{uid}/app-passwords/{made['id']}"
    assert made["protocols"] == ["smtp"] and made["created_by"] == f"api:{fleet}"
    secret = made.pop("secret")
    assert len(secret) == 19
    # The secret is in that answer only: never in the audit log, never listed.
    assert secret not in audit_text(proxy.folder / "audit.log")
    status, _, one = curl(proxy, "GET", f"/users/{uid}/app-passwords/{made['id']}", manage)
    assert (status, one) == (200, made)
    # Every user's, filtered: unused for 0 days matches it, for 1 day does not.
    status, _, page = curl(proxy, "GET", f"/app-passwords?user={uid}&protocol=smtp&unused_days=0",
                           manage)
    assert [a["id"] for a in page["items"]] == [made["id"]]
    _, _, page = curl(proxy, "GET", f"/app-passwords?user={uid}&unused_days=1", manage)
    assert page["items"] == []
    _, _, page = curl(proxy, "GET", f"/app-passwords?user={uid}&protocol=imap", manage)
    assert page["items"] == []

    status, _, body = curl(proxy, "DELETE", f"/users/{uid}/app-passwords/{made['id']}", manage)
    assert (status, body) == (204, None)
    status, _, problem = curl(proxy, "DELETE", f"/users/{uid}/app-passwords/{made['id']}", manage)
    assert status == 404 and problem["type"].endswith(":not-found")
    events = [e for e in audit(proxy) if e.get("user") == uid]
    assert [e["event"] for e in events] == ["app_password_created", "app_password_deleted"]
    assert {e["actor"] for e in events} == {f"api:{fleet}"}
    calls = [e for e in audit(proxy) if e["event"] == "api_request" and uid in e["path"]]
    assert [(e["method"], e["status"]) for e in calls] == [
        ("GET", 200), ("POST", 201), ("GET", 200), ("DELETE", 204), ("DELETE", 404)]
    assert {e["actor"] for e in calls} == {f"api:{fleet}"}


def test_pages_revoke_all_and_bulk_forms(proxy, slapd, unique):
    users = [unique("bulk") for _ in range(3)]
    for uid in users:
        slapd.add_user(uid, PRIMARY)
    manage = token(proxy, unique("bulk"), "manage")
    made = {}
    for uid in users:
        for device in ("phone", "laptop"):
            status, _, record = curl(proxy, "POST", f"/users/{uid}/app-passwords", manage,
                                     {"name": device})
            assert status == 201
            made[record["id"]] = uid
    seen, page_token = [], None
    while True:
        query = "/app-passwords?page_size=2" + (f"&page_token={page_token}" if page_token else "")
        status, _, page = curl(proxy, "GET", query, manage)
        assert status == 200 and len(page["items"]) <= 2
        seen += [a["id"] for a in page["items"]]
        page_token = page["next_page_token"]
        if page_token is None:
            break
    assert set(made) <= set(seen) and seen == sorted(seen)

    status, _, done = curl(proxy, "POST", f"/users/{users[0]}/app-passwords/revoke-all", manage)
    assert status == 200 and len(done["deleted"]) == 2
    first_of_second = next(i for i, u in made.items() if u == users[1])
    status, _, done = curl(proxy, "POST", "/app-passwords/bulk-delete", manage, {"items": [
        {"user": users[1], "id": first_of_second}, {"user": users[1], "id": "0000000000"}]})
    assert status == 200
    assert [r["status"] for r in done["results"]] == [200, 404]
    status, _, done = curl(proxy, "POST", "/app-passwords/bulk-revoke", manage,
                           {"users": [users[1], users[2]]})
    assert [len(r["deleted"]) for r in done["results"]] == [1, 2]
    for uid in users:
        assert curl(proxy, "GET", f"/users/{uid}/app-passwords", manage)[2]["items"] == []


def test_a_read_token_reads_and_may_not_write(proxy, slapd, unique):
    uid = unique("reader")
    slapd.add_user(uid, PRIMARY)
    read = token(proxy, unique("audit"), "read")
    assert curl(proxy, "GET", f"/users/{uid}", read)[0] == 200
    status, _, problem = curl(proxy, "POST", f"/users/{uid}/app-passwords", read, {"name": "x"})
    assert status == 403 and problem["type"].endswith(":forbidden")
    manage = token(proxy, unique("fleet"), "manage")
    status, _, problem = curl(proxy, "POST", f"/users/{uid}/unlock", manage)
    assert status == 403 and "helpdesk" in problem["detail"]


def test_a_users_mfa_state_changes_only_as_read(proxy, slapd, unique):
    uid = unique("mfa")
    slapd.add_user(uid, PRIMARY)
    desk = token(proxy, unique("desk"), "helpdesk")
    status, headers, mfa = curl(proxy, "GET", f"/users/{uid}/mfa", desk)
    assert status == 200 and mfa["state"] == "disabled"
    tag = headers["etag"]
    assert curl(proxy, "PUT", f"/users/{uid}/mfa", desk, {"state": "enforced"})[0] == 428
    status, headers, mfa = curl(proxy, "PUT", f"/users/{uid}/mfa", desk, {"state": "enforced"},
                                [f"If-Match: {tag}"])
    assert status == 200 and mfa["state"] == "enforced" and headers["etag"] != tag
    # Another help desk that read it before this change is refused.
    status, _, problem = curl(proxy, "PUT", f"/users/{uid}/mfa", desk, {"state": "disabled"},
                              [f"If-Match: {tag}"])
    assert status == 412 and problem["type"].endswith(":precondition-failed")
    assert json.loads(proxy.cli("user", "show", uid, "--json").stdout)["mfa_state"] == "enforced"
    assert curl(proxy, "POST", f"/users/{uid}/unlock", desk)[0] == 204
    status, _, body = curl(proxy, "POST", f"/users/{uid}/reset-second-factor", desk)
    assert (status, body) == (200, {"user": uid, "had_one": False})
    status, _, body = curl(proxy, "POST", f"/users/{uid}/reset-passkeys", desk)
    assert (status, body) == (200, {"user": uid, "removed": 0})
    assert curl(proxy, "GET", f"/users/{unique('nobody')}", desk)[0] == 404


def test_past_its_rate_a_token_gets_429_with_retry_after(proxy, unique):
    slow = token(proxy, unique("slow"), "read", "--rate", "3")
    statuses = [curl(proxy, "GET", "/app-passwords?page_size=1", slow)[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    status, headers, problem = curl(proxy, "GET", "/app-passwords?page_size=1", slow)
    assert status == 429 and problem["type"].endswith(":rate-limited")
    assert 1 <= int(headers["retry-after"]) <= 20


def test_a_revoked_token_is_refused_at_once(proxy, unique):
    name = unique("gone")
    secret = token(proxy, name, "read")
    assert curl(proxy, "GET", "/app-passwords", secret)[0] == 200
    assert proxy.cli("api-token", "revoke", name).returncode == 0
    assert curl(proxy, "GET", "/app-passwords", secret)[0] == 401
    listed = json.loads(proxy.cli("api-token", "list", "--json").stdout)
    assert name not in [t["name"] for t in listed]
    assert secret not in audit_text(proxy.folder / "audit.log")
    assert secret not in proxy.log()


MAKING = "POST /users/{user}/app-passwords"


def test_the_api_keeps_to_its_openapi_document(proxy, slapd, unique):
    """schemathesis: every operation, with bodies and parameters drawn from
    the document (and some that break it), answered as the document says."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    uid = unique("schema")
    slapd.add_user(uid, PRIMARY)
    desk = token(proxy, unique("schema"), "helpdesk", "--rate", "100000")
    base = f"https://127.0.0.1:{proxy.ports['portal']}/api/v1"
    status, _, document = curl(proxy, "GET", "/openapi.json")
    assert status == 200 and document["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(document)
    # A well-formed change of the MFA state with an ETag that is not the
    # current one is refused with 412, as it should be.
    schema.config.checks.positive_data_acceptance.expected_statuses = [
        "2xx", "401", "403", "404", "409", "412", "429"]
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=12, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            if "user" in (case.path_parameters or {}):
                case.path_parameters["user"] = uid  # a real user, so operations get past 404
            if case.query:
                case.query.pop("page_token", None)  # only ever one a page gave (tested above)
            # What makes an app password (an expiry, networks in CIDR form, a
            # name without control or space characters at its ends) is more
            # than JSON Schema says: such a body may be refused with 400.
            excluded = [positive_data_acceptance] if operation.label == MAKING else []
            try:
                case.call_and_validate(base_url=base,
                                       headers={"Authorization": f"Bearer {desk}"},
                                       verify=str(proxy.pki.ca_file), excluded_checks=excluded)
            except Exception as e:  # schemathesis' failed checks, or no answer at all
                failures.append(f"{operation.label}: {e!r}")
                raise

        try:
            check()
        except Exception:
            pass
    assert not failures, "\n\n".join(failures[:5])
    assert "Traceback" not in proxy.log()
