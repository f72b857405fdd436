"""The embedded default: the whole proxy on one machine, in a local folder.

``legacy-auth-proxy demo`` runs, in one process: a small directory (an
in-memory LDAP server), a small mail server (IMAP and submission in memory),
and the proxy in front of them with LDAP, IMAP and submission listeners on
loopback. It keeps its config, store, certificates and audit log in a
folder of its own, enrols a demo user with a fresh app password, and prints
how to try it with curl, Python's imaplib and smtplib, and ldapwhoami.
"""

from __future__ import annotations

import datetime
import secrets
import shlex
import socket
import sys
from pathlib import Path


from proxy import config as configuration
from proxy.apppasswords import display
from proxy.bootstrap import command_line_actor, open_admin
from proxy.pki import make_pki

DEMO_USER = "demo"
DEMO_MAIL = "demo@example.test"
DEMO_DEVICE = "demo device"
DEMO_TOKEN = "demo"  # the REST API's token printed at start, read-only
PRIMARY_PASSWORD = "demo-primary-password"
HELPDESK_USER = "helpdesk"
HELPDESK_PASSWORD = "helpdesk-primary-password"
PORTS = {"ldap": 10389, "imap": 10143, "imaps": 10993, "pop3": 10110, "submission": 10587,
         "metrics": 19464, "portal": 10443}

CONFIG = """\
# Written by `legacy-auth-proxy demo` on every run (edits are lost): the demo's
# own directory and mail server listen on the loopback ports below. Paths are
# relative to this file's folder. See docs/configuration.md for every key.
workers: {workers}
store:
  path: store.sqlite3
  pepper_file: pepper
audit:
  file: audit.log
directory:
  url: ldap://127.0.0.1:{directory_port}
  start_tls: false
  bind_dn: "{service_dn}"
  bind_password_file: directory-password
  user_base: "{people}"
  mfa_group: "{mfa_group}"
  admin_group: "{admin_group}"
  account_cache: 5s
policy:
  allow_user_app_passwords: true
throttle:
  source_delay: 0.5s
  source_delay_max: 2s
metrics:
  endpoint: "tcp:{metrics}:interface=127.0.0.1"
portal:
  endpoint: "tcp:{portal}:interface=127.0.0.1"
  certificate: tls/server.pem
  private_key: tls/server.key
  title: legacy-auth-proxy demo
  # passkeys for the portal, at https://localhost:{portal}/ (WebAuthn wants a
  # host name, and a browser that trusts tls/ca.pem)
  passkeys_origin: "https://localhost:{portal}"
listeners:
  - name: ldap
    protocol: ldap
    realm: cloud
    endpoint: "tcp:{ldap}:interface=127.0.0.1"
    certificate: tls/server.pem
    private_key: tls/server.key
  - name: imap
    protocol: imap
    realm: cloud
    endpoint: "tcp:{imap}:interface=127.0.0.1"
    certificate: tls/server.pem
    private_key: tls/server.key
    backend: imap://127.0.0.1:{imap_backend}
    backend_login: dovecot
    master_user: legacy-auth-proxy
    master_password_file: master-password
    pass_client_address: false
  - name: imaps
    protocol: imap
    realm: cloud
    endpoint: "tcp:{imaps}:interface=127.0.0.1"
    tls: implicit
    certificate: tls/server.pem
    private_key: tls/server.key
    backend: imap://127.0.0.1:{imap_backend}
    backend_login: dovecot
    master_user: legacy-auth-proxy
    master_password_file: master-password
    pass_client_address: false
  - name: pop3
    protocol: pop3
    realm: cloud
    endpoint: "tcp:{pop3}:interface=127.0.0.1"
    certificate: tls/server.pem
    private_key: tls/server.key
    backend: pop3://127.0.0.1:{pop3_backend}
    backend_login: dovecot
    master_user: legacy-auth-proxy
    master_password_file: master-password
    pass_client_address: false
  - name: submission
    protocol: smtp
    realm: cloud
    endpoint: "tcp:{submission}:interface=127.0.0.1"
    certificate: tls/server.pem
    private_key: tls/server.key
    backend: smtp://127.0.0.1:{smtp_backend}
    master_user: legacy-auth-proxy
    master_password_file: master-password
    pass_client_address: false
"""


def _port(preferred: int) -> int:
    """``preferred`` if it is free on loopback, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def _secret_file(path: Path) -> str:
    """A random password kept in ``path`` (mode 0600), made on first use."""
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def run_demo(folder: Path, *, serve: bool, workers: str = "1") -> int:
    from twisted.internet import reactor

    from proxy.demo import directory, mail

    folder = folder.absolute()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    service_password = _secret_file(folder / "directory-password")
    master_password = _secret_file(folder / "master-password")
    if not (folder / "tls" / "server.pem").exists():
        make_pki(folder / "tls", organization="legacy-auth-proxy demo",
                 validity=datetime.timedelta(days=3650))

    # The demo's own directory and mail server, on loopback, in this process.
    ldap_backend = reactor.listenTCP(0, directory.build(
        user=DEMO_USER, mail=DEMO_MAIL, password=PRIMARY_PASSWORD,
        service_password=service_password, helpdesk=HELPDESK_USER,
        helpdesk_password=HELPDESK_PASSWORD), interface="127.0.0.1")
    imap_factory, pop3_factory, smtp_factory, inbox = mail.build(
        user=DEMO_USER, master_user="legacy-auth-proxy", master_password=master_password)
    imap_backend = reactor.listenTCP(0, imap_factory, interface="127.0.0.1")
    pop3_backend = reactor.listenTCP(0, pop3_factory, interface="127.0.0.1")
    smtp_backend = reactor.listenTCP(0, smtp_factory, interface="127.0.0.1")
    inbox.add(b"From: welcome@example.test\r\nTo: demo@example.test\r\n"
              b"Subject: Welcome to the legacy-auth-proxy demo\r\n\r\n"
              b"This message was fetched through the proxy with an app password.\r\n")
    ports = {name: _port(port) for name, port in PORTS.items()}
    config_path = folder / "config.yaml"
    config_path.write_text(CONFIG.format(
        directory_port=ldap_backend.getHost().port,
        imap_backend=imap_backend.getHost().port,
        pop3_backend=pop3_backend.getHost().port,
        smtp_backend=smtp_backend.getHost().port,
        service_dn=directory.SERVICE_DN, people=directory.PEOPLE, mfa_group=directory.MFA_GROUP,
        admin_group=directory.ADMIN_GROUP, workers=workers,
        **ports,
    ))

    admin = open_admin(configuration.load(config_path), command_line_actor())
    # The demo's app password cannot be shown again: every run makes a new one.
    if any(a.name == DEMO_DEVICE for a in admin.list(DEMO_USER)):
        admin.delete(DEMO_USER, DEMO_DEVICE)
    user, created = admin.enroll(DEMO_USER, DEMO_DEVICE)
    # The same for the REST API's token: a new one, shown once, every run.
    if any(t.name == DEMO_TOKEN for t in admin.api_tokens()):
        admin.revoke_api_token(DEMO_TOKEN)
    token = admin.create_api_token(DEMO_TOKEN, "read").token
    admin.close()
    _explain(folder, config_path, ports, display(created.secret), token, workers)
    if not serve:
        for port in (ldap_backend, imap_backend, pop3_backend, smtp_backend):
            port.stopListening()
        return 0
    print("The proxy runs in the foreground; Ctrl-C stops it.", flush=True)
    from proxy.runner import run_daemon

    return run_daemon(config_path, configuration.load(config_path))


def _explain(folder: Path, config_path: Path, ports: dict[str, int], secret: str,
             token: str, workers: str = "1") -> None:
    ca = shlex.quote(str(folder / "tls" / "ca.pem"))
    quoted = shlex.quote(f"{DEMO_USER}:{secret}")
    tool = f"legacy-auth-proxy --config {shlex.quote(str(config_path))}"
    lines = [
        f"Demo folder: {folder}",
        "",
        f"The demo user {DEMO_USER!r} must use MFA, so legacy clients need an app password:",
        "",
        f"    {secret}",
        "",
        "Read the demo mailbox through the proxy (IMAP with STARTTLS, then IMAPS):",
        f"    curl --ssl-reqd --cacert {ca} -u {quoted} 'imap://127.0.0.1:{ports['imap']}/INBOX;UID=1'",
        f"    curl --cacert {ca} -u {quoted} 'imaps://127.0.0.1:{ports['imaps']}/INBOX;UID=1'",
        f"    {sys.executable} -c \"import imaplib, ssl; "
        f"c = imaplib.IMAP4('127.0.0.1', {ports['imap']}); "
        f"c.starttls(ssl.create_default_context(cafile='{folder / 'tls' / 'ca.pem'}')); "
        f"print(c.login('{DEMO_USER}', '{secret}')); c.select(); print(c.fetch('1', '(BODY[HEADER.FIELDS (SUBJECT)])'))\"",
        "",
        "The same mailbox over POP3 with STLS:",
        f"    curl --ssl-reqd --cacert {ca} -u {quoted} pop3://127.0.0.1:{ports['pop3']}/1",
        "",
        "Send a message through the proxy (it lands in the same mailbox):",
        f"    printf 'Subject: hello\\r\\n\\r\\nHi.\\r\\n' | curl --ssl-reqd --cacert {ca} -u {quoted} "
        f"--mail-from {DEMO_MAIL} --mail-rcpt {DEMO_MAIL} -T - smtp://127.0.0.1:{ports['submission']}",
        "",
        "Bind over LDAP with the app password (read-only), as an appliance would:",
        f"    LDAPTLS_CACERT={ca} ldapwhoami -x -ZZ -H ldap://127.0.0.1:{ports['ldap']} "
        f"-D {DEMO_USER} -w {shlex.quote(secret)}",
        f"The primary password ({PRIMARY_PASSWORD}) is refused there: the user must use MFA.",
        "",
        "Metrics and health, as Prometheus and a load balancer see them:",
        f"    curl -s http://127.0.0.1:{ports['metrics']}/metrics | grep legacy_auth_proxy_sign_ins",
        f"    curl -s http://127.0.0.1:{ports['metrics']}/health/ready",
        "",
        *([f"Served by {workers} worker processes under one supervisor (docs/deployment.md): "
           "every worker's metrics summed,",
           f"    curl -s http://127.0.0.1:{ports['metrics']}/metrics | grep -E '_workers|_worker_restarts'",
           "and a worker killed (kill -9) is started again while the others serve on.",
           ""] if workers != "1" else []),
        f"Manage app passwords in a browser: https://127.0.0.1:{ports['portal']}/",
        f"    sign in as {DEMO_USER} with {PRIMARY_PASSWORD} (first time: set up an authenticator",
        f"    app from the QR code); the help desk is {HELPDESK_USER} with {HELPDESK_PASSWORD}.",
        f"    The certificate is the demo's own: trust {ca} or accept the browser's warning.",
        f"    Passkeys: with {ca} trusted, open https://localhost:{ports['portal']}/ and add one",
        "    under Security info; it then signs you in after the password.",
        "",
        f"List {DEMO_USER}'s app passwords through the REST API (docs/api.md), with the",
        f"demo's read-only token ({tool} api-token create makes others):",
        f"    curl -s --cacert {ca} -H {shlex.quote('Authorization: Bearer ' + token)} "
        f"https://127.0.0.1:{ports['portal']}/api/v1/users/{DEMO_USER}/app-passwords",
        "",
        "Manage app passwords in another terminal:",
        f"    {tool} app-password list {DEMO_USER}",
        f"    {tool} app-password delete {DEMO_USER} {shlex.quote(DEMO_DEVICE)}",
        f"    tail -f {shlex.quote(str(folder / 'audit.log'))}",
        "",
    ]
    print("\n".join(lines), flush=True)
