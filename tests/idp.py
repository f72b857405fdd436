"""A real OpenID Connect provider for the tests: LemonLDAP::NG (Debian
``lemonldap-ng``), its portal run by ``llng-fastcgi-server`` behind nginx
over TLS, on a free loopback port, from a temporary folder, signing in the
users of the test slapd (tests/slapd.py) with their directory password.

Why LemonLDAP::NG rather than glewlwyd: its whole configuration is one
file, ``lmConf-N.json``, written here before it starts, so a test that
needs another client, another secret or another token lifetime writes the
next ``lmConf-N.json`` (:meth:`Idp.reconfigure`) and the provider takes it
within a second (``checkTime = 1``); glewlwyd is configured through its
admin REST API after it starts, one more client to write and to get wrong.
Its sign-in page is a plain HTML form (no script needed), its LDAP backend
reads slapd as it is, and nginx is what the benchmarks use anyway. What
2.16 lacks: an ``amr`` claim of its own (its code says "TODO amr"), so
``amr`` here is a claim the fixture defines (a constant per client, as an
array), and ``acr`` is the name ``oidcServiceMetaDataAuthnContext`` gives
the session's authentication level (LDAP sign-in: level 2).

How to use it (the ``idp`` fixture in tests/integration/conftest.py is one
provider per session; make your own ``Idp(folder, slapd)`` for a test that
changes it)::

    idp.issuer                      # "https://127.0.0.1:PORT", no slash
    idp.ca_file                     # the CA of its certificate (tests/pki.py)
    idp.discovery()                 # /.well-known/openid-configuration, a dict

    # the portal's client: authorization code with PKCE (S256 required),
    # redirect URIs as given, auth_time in the ID token, max_age and
    # prompt=login honoured, acr from the session's level (idp.acr)
    idp.add_client("portal", secret, redirect_uris=[...], amr=["pwd", "otp"])

    # a confidential client with the client-credentials grant (issue #28):
    # JWT access tokens signed RS256 (keys at discovery()["jwks_uri"]), and
    # the introspection endpoint (discovery()["introspection_endpoint"],
    # client_secret_basic)
    idp.add_client("proxy", secret, client_credentials=True, access_token_lifetime=5)
    token = idp.client_credentials("proxy", secret)   # the token response, a dict
    idp.introspect(token["access_token"], "proxy", secret)

    # rotate a secret / shorten tokens: the next config, taken at once
    idp.reconfigure(lambda clients: clients["proxy"].update(secret="new"))
    idp.set_secret("proxy", "new")  # the same, shorter

    idp.login(username, password)   # a requests.Session signed in at the provider
    idp.authorize(http, "portal", redirect_uri, state=..., nonce=..., code_challenge=...)

A client's ``amr`` is set in the provider's session when the user signs in
there: add the client (and let wait_for_config see it) before the sign-in.

Everything the provider logs goes to ``folder/llng.log`` and
``folder/nginx-error.log``; an :class:`IdpError` carries their tails.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.pki import make_pki
from tests.ports import free_port
from tests.serverlog import ServerLog

FASTCGI = "/usr/sbin/llng-fastcgi-server"
NGINX = "/usr/sbin/nginx"
HTDOCS = "/usr/share/lemonldap-ng/portal/htdocs"
START_TIMEOUT = 20.0  # the first request compiles the Perl portal: seconds on a busy machine
RUN_AS = "www-data"  # llng-fastcgi-server refuses to run as root
# The names given to authentication levels, as acr values (LDAP sign-in is level 2).
# A sign-in at least this old is asked for again by prompt=login (seconds).
FORCE_AUTHN_INTERVAL = 2
AUTHN_CONTEXT = {"urn:example:loa:1": 1, "urn:example:loa:2": 2, "urn:example:loa:3": 3}


class IdpError(RuntimeError):
    """The provider did not start or answer; the message has the log tails."""


class Idp(ServerLog):
    """LemonLDAP::NG's portal as an OpenID provider, in ``folder`` (whose
    path must be reachable by www-data: made with tempfile, not pytest's
    0700 tmp_path), signing in users of ``slapd``."""

    log_name = "LemonLDAP::NG"
    log_error = IdpError

    def __init__(self, slapd: Any, folder: Path | None = None) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="lap-idp-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.slapd = slapd
        self.port = free_port()
        self.issuer = f"https://127.0.0.1:{self.port}"
        self.pki = make_pki(self.folder / "pki")
        self.ca_file = self.pki.ca_file
        self.log_path = self.folder / "llng.log"
        self.conf_dir = self.folder / "conf"
        self.auth_level = 2  # LDAP's level; its acr is acr()
        self.clients: dict[str, dict[str, Any]] = {}
        self._cfg_num = 0
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._processes: list[subprocess.Popen] = []
        self._logs: list[Any] = []

    # -- clients ------------------------------------------------------------------------

    @property
    def acr(self) -> str:
        """The acr of an ID token after a password sign-in at the provider."""
        return next(name for name, level in AUTHN_CONTEXT.items() if level == self.auth_level)

    def add_client(self, client_id: str, secret: str, *, redirect_uris: list[str] = (),
                   client_credentials: bool = False, access_token_lifetime: int = 3600,
                   id_token_lifetime: int = 3600, amr: list[str] | None = None) -> None:
        """A confidential client (client_secret_basic or _post). With
        ``redirect_uris``: the authorization code flow, PKCE required,
        consent skipped, ``amr`` (default ["pwd"]) in its ID token. With
        ``client_credentials``: that grant, JWT access tokens. Taken at once
        by a running provider."""
        self.clients[client_id] = {
            "secret": secret, "redirect_uris": list(redirect_uris),
            "client_credentials": client_credentials,
            "access_token_lifetime": access_token_lifetime,
            "id_token_lifetime": id_token_lifetime, "amr": list(amr or ["pwd"]),
        }
        if self._processes:
            self._write_config()

    def reconfigure(self, change: Callable[[dict[str, dict[str, Any]]], None]) -> None:
        """Change the clients (a dict of client id → the keywords of
        add_client, ``secret`` included) and write the next configuration:
        the provider takes it within a second or two (see wait_for_config)."""
        change(self.clients)
        self._write_config()

    def set_secret(self, client_id: str, secret: str) -> None:
        """Rotate a client's secret: the old one is refused from the next configuration."""
        self.reconfigure(lambda clients: clients[client_id].update(secret=secret))

    def set_access_token_lifetime(self, client_id: str, seconds: int) -> None:
        self.reconfigure(lambda clients: clients[client_id].update(access_token_lifetime=seconds))

    # -- configuration ------------------------------------------------------------------

    def _private_pem(self) -> str:
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()).decode()

    def _public_pem(self) -> str:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def _lmconf(self) -> dict[str, Any]:
        storage = lambda name: {"Directory": str(self.folder / name),  # noqa: E731
                                "LockDirectory": str(self.folder / f"{name}-lock")}
        options: dict[str, Any] = {}
        exported: dict[str, Any] = {}
        claims: dict[str, Any] = {}
        macros: dict[str, str] = {}
        for client_id, c in self.clients.items():
            options[client_id] = {
                "oidcRPMetaDataOptionsClientID": client_id,
                "oidcRPMetaDataOptionsClientSecret": c["secret"],
                "oidcRPMetaDataOptionsPublic": 0,
                "oidcRPMetaDataOptionsRedirectUris": " ".join(c["redirect_uris"]),
                "oidcRPMetaDataOptionsRequirePKCE": 1 if c["redirect_uris"] else 0,
                "oidcRPMetaDataOptionsBypassConsent": 1,
                "oidcRPMetaDataOptionsIDTokenSignAlg": "RS256",
                "oidcRPMetaDataOptionsIDTokenForceClaims": 1,
                "oidcRPMetaDataOptionsIDTokenExpiration": c["id_token_lifetime"],
                "oidcRPMetaDataOptionsAccessTokenExpiration": c["access_token_lifetime"],
                "oidcRPMetaDataOptionsAccessTokenJWT": 1,
                "oidcRPMetaDataOptionsAccessTokenSignAlg": "RS256",
                "oidcRPMetaDataOptionsAllowClientCredentialsGrant":
                    1 if c["client_credentials"] else 0,
                "oidcRPMetaDataOptionsUserIDAttr": "uid",
            }
            macro = f"amr_{re.sub(r'[^A-Za-z0-9]', '_', client_id)}"
            macros[macro] = json.dumps(";".join(c["amr"]))  # a Perl string expression
            exported[client_id] = {"preferred_username": "uid", "email": "mail", "name": "cn",
                                   "amr": f"{macro};string;always"}
            claims[client_id] = {"profile": "name preferred_username amr"}  # amr in scope profile
        slapd = self.slapd
        return {
            "cfgNum": self._cfg_num, "cfgAuthor": "tests/idp.py", "cfgDate": str(int(time.time())),
            "cfgVersion": "2.16.1",
            "portal": f"{self.issuer}/", "domain": "127.0.0.1", "securedCookie": 1, "httpOnly": 1,
            "cookieName": "lemonldap", "key": base64.b64encode(os.urandom(24)).decode(),
            "authentication": "LDAP", "userDB": "Same", "passwordDB": "Null",
            "registerDB": "Null",
            "ldapServer": slapd.ldaps_url, "ldapVerify": "require",
            "ldapCAFile": str(self.folder / "pki" / "slapd-ca.pem"),
            "ldapBase": slapd.people_dn,
            "managerDn": slapd.service_dn, "managerPassword": slapd.service_password,
            "AuthLDAPFilter": "(&(uid=$user)(objectClass=inetOrgPerson))",
            "mailLDAPFilter": "(&(mail=$mail)(objectClass=inetOrgPerson))",
            "ldapPpolicyControl": 1, "ldapAuthnLevel": self.auth_level,
            "ldapExportedVars": {"uid": "uid", "cn": "cn", "mail": "mail"},
            "whatToTrace": "uid", "macros": macros, "multiValuesSeparator": ";",
            "globalStorage": "Apache::Session::File", "globalStorageOptions": storage("sessions"),
            "persistentStorage": "Apache::Session::File",
            "persistentStorageOptions": storage("psessions"),
            "localSessionStorage": "Cache::FileCache",
            "localSessionStorageOptions": {"namespace": "lemonldap-ng-sessions",
                                           "cache_root": str(self.folder / "cache"),
                                           "default_expires_in": 600, "directory_umask": "007",
                                           "cache_depth": 3},
            # prompt=login forces a new sign-in unless the last one is less
            # than this old (LemonLDAP::NG's default: 5 s). Not 0 or less: the
            # provider replays the authorization request right after the new
            # sign-in, and would then ask for it again, for ever.
            "portalForceAuthnInterval": FORCE_AUTHN_INTERVAL,
            # ... and straight to the sign-in form (its script), without a
            # page asking first whether to renew the session.
            "skipRenewConfirmation": 1,
            "requireToken": 0, "loginHistoryEnabled": 0, "notification": 0,
            "portalCheckLogins": 0, "stayConnected": 0, "checkUsers": 0,
            "trustedDomains": "", "logLevel": "notice",
            "locationRules": {}, "exportedHeaders": {}, "vhostOptions": {},
            "issuerDBOpenIDConnectActivation": 1, "issuerDBOpenIDConnectPath": "^/oauth2/",
            "oidcServiceMetaDataIssuer": self.issuer,
            "oidcServiceAllowAuthorizationCodeFlow": 1,
            "oidcServiceAllowImplicitFlow": 0, "oidcServiceAllowHybridFlow": 0,
            "oidcServiceAllowDynamicRegistration": 0,
            "oidcServiceMetaDataAuthnContext": AUTHN_CONTEXT,
            "oidcServicePrivateKeySig": self._private_pem(),
            "oidcServicePublicKeySig": self._public_pem(),
            "oidcServiceKeyIdSig": "test-key-1",
            "oidcRPMetaDataOptions": options,
            "oidcRPMetaDataExportedVars": exported,
            "oidcRPMetaDataMacros": {}, "oidcRPMetaDataOptionsExtraClaims": claims,
        }

    def _write_config(self) -> None:
        self._cfg_num += 1
        self.conf_dir.mkdir(exist_ok=True)
        path = self.conf_dir / f"lmConf-{self._cfg_num}.json"
        path.write_text(json.dumps(self._lmconf(), indent=1))
        self._give(path)

    def _give(self, *paths: Path) -> None:
        """Owned by www-data, which the FastCGI server runs as."""
        if os.geteuid() != 0:
            return
        owner = pwd.getpwnam(RUN_AS)
        for path in paths:
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def _write_files(self) -> None:
        shutil.copy(self.slapd.ca_file, self.folder / "pki" / "slapd-ca.pem")
        for name in ("sessions", "sessions-lock", "psessions", "psessions-lock", "cache",
                     "nginx-tmp"):
            (self.folder / name).mkdir(exist_ok=True)
        (self.folder / "lemonldap-ng.ini").write_text(
            "[all]\nlogLevel = notice\ncheckTime = 1\n"
            "[configuration]\ntype = File\n"
            f"dirName = {self.conf_dir}\nprettyPrint = 1\n"
            "[portal]\nstaticPrefix = /static\n"
            "templateDir = /usr/share/lemonldap-ng/portal/templates\nlanguages = en\n"
            "[handler]\nstatus = 0\n")
        tmp = self.folder / "nginx-tmp"
        user = f"user {RUN_AS};\n" if os.geteuid() == 0 else ""
        (self.folder / "nginx.conf").write_text(f"""{user}worker_processes 1;
daemon off;
pid {self.folder}/nginx.pid;
error_log {self.folder}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
  include /etc/nginx/mime.types;
  access_log off;
  client_body_temp_path {tmp}/body;
  fastcgi_temp_path {tmp}/fastcgi;
  proxy_temp_path {tmp}/proxy;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream llng {{ server unix:{self.folder}/llng.sock; }}
  server {{
    listen 127.0.0.1:{self.port} ssl;
    server_name 127.0.0.1;
    ssl_certificate {self.pki.cert_file};
    ssl_certificate_key {self.pki.key_file};
    root {HTDOCS};
    if ($uri !~ ^/((static|javascript|favicon).*|.*\\.psgi)) {{
      rewrite ^/(.*)$ /index.psgi/$1 break;
    }}
    location ~ ^(?<sc>/.*\\.psgi)(?:$|/) {{
      include /etc/nginx/fastcgi_params;
      fastcgi_pass llng;
      fastcgi_param HTTP_HOST $host:$server_port;
      fastcgi_param HTTPS on;
      fastcgi_param LLTYPE psgi;
      fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
      fastcgi_split_path_info ^(.*\\.psgi)(/.*)$;
      fastcgi_param PATH_INFO $fastcgi_path_info;
    }}
    location /static/ {{ alias {HTDOCS}/static/; }}
    location /javascript/ {{ alias /usr/share/javascript/; }}
  }}
}}
""")
        self._write_config()
        if os.geteuid() == 0:
            for root, dirs, files in os.walk(self.folder):
                self._give(Path(root), *(Path(root) / f for f in files))
            os.chmod(self.folder, 0o755)

    # -- process ------------------------------------------------------------------------

    def start(self) -> None:
        for tool in (FASTCGI, NGINX):
            if not os.access(tool, os.X_OK):
                raise IdpError(f"{tool} is not installed (tests/run installs lemonldap-ng and nginx)")
        self._write_files()
        env = {**os.environ, "LLNG_DEFAULTCONFFILE": str(self.folder / "lemonldap-ng.ini"),
               "LLNG_DEFAULTLOGGER": "Lemonldap::NG::Common::Logger::Std",
               "LLNG_USERLOGGER": "Lemonldap::NG::Common::Logger::Std"}
        env.pop("USER", None)
        as_user = ["-u", RUN_AS, "-g", RUN_AS] if os.geteuid() == 0 else []
        log = open(self.log_path, "ab")
        self._logs.append(log)
        self._processes.append(subprocess.Popen(
            # One FastCGI process: each reads the configuration on its own
            # clock, so with two a request could meet the one that has not
            # taken the newest yet, after wait_for_config saw the other take it.
            [FASTCGI, "--foreground", "-n", "1", "-s", str(self.folder / "llng.sock"),
             "-p", str(self.folder / "llng.pid"), *as_user],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            start_new_session=True))
        self._processes.append(subprocess.Popen(
            [NGINX, "-p", str(self.folder), "-c", str(self.folder / "nginx.conf")],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True))
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while True:
            for process in self._processes:
                if process.poll() is not None:
                    self.stop()
                    raise IdpError(f"{process.args[0]} exited with {process.returncode}\n"
                                   f"{self._tails()}")
            try:
                if self.discovery(timeout=5).get("issuer") == self.issuer:
                    return
            except (requests.RequestException, ValueError) as e:
                last = e
            if time.monotonic() > deadline:
                self.stop()
                raise IdpError(f"no discovery document at {self.issuer} after "
                               f"{START_TIMEOUT:.0f} s ({last})\n{self._tails()}")
            time.sleep(0.2)

    def _tails(self) -> str:
        nginx = self.folder / "nginx-error.log"
        text = nginx.read_text(errors="replace").splitlines()[-20:] if nginx.exists() else []
        return self._tail() + f"\n--- {nginx} ---\n" + "\n".join(text)

    def stop(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._processes.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def remove(self) -> None:
        """Stop, and delete the folder (sessions, keys, logs)."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Idp:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- as a client would ------------------------------------------------------------

    def session(self) -> requests.Session:
        http = requests.Session()
        http.trust_env = False  # REQUESTS_CA_BUNDLE would replace the CA below; no proxy
        http.verify = str(self.ca_file)
        return http

    def discovery(self, timeout: float = 30) -> dict[str, Any]:
        answer = self.session().get(f"{self.issuer}/.well-known/openid-configuration",
                                    timeout=timeout)
        answer.raise_for_status()
        return answer.json()

    def client_credentials(self, client_id: str, secret: str, scope: str = "openid"
                           ) -> dict[str, Any]:
        """The token endpoint's answer to the client-credentials grant (raises on an error)."""
        answer = self.session().post(self.discovery()["token_endpoint"],
                                     data={"grant_type": "client_credentials", "scope": scope},
                                     auth=(client_id, secret), timeout=30)
        if answer.status_code != 200:
            raise IdpError(f"token endpoint: {answer.status_code} {answer.text[:300]}")
        return answer.json()

    def introspect(self, token: str, client_id: str, secret: str) -> dict[str, Any]:
        answer = self.session().post(self.discovery()["introspection_endpoint"],
                                     data={"token": token}, auth=(client_id, secret), timeout=30)
        answer.raise_for_status()
        return answer.json()

    def knows(self, client_id: str, secret: str) -> bool:
        """Whether the running provider takes this client and secret (its
        token endpoint answers a made-up code with invalid_grant, not
        invalid_client)."""
        answer = self.session().post(self.discovery()["token_endpoint"], timeout=30, data={
            "grant_type": "authorization_code", "code": "none", "redirect_uri": "https://x/"},
            auth=(client_id, secret))
        try:
            error = answer.json().get("error")
        except ValueError:
            return False
        return answer.status_code != 401 and error != "invalid_client"

    def wait_for_config(self, check: Callable[[], bool], timeout: float = 15.0) -> None:
        """Poll ``check`` until the running provider shows the new configuration."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise IdpError(f"configuration {self._cfg_num} not taken\n{self._tails()}")
            time.sleep(0.2)

    def login(self, username: str, password: str, http: requests.Session | None = None
              ) -> requests.Session:
        """Sign in at the provider's own page with a directory password, as
        a browser would post its form: the session holds the SSO cookie."""
        http = http or self.session()
        page = http.get(f"{self.issuer}/", timeout=30)
        answer = http.post(f"{self.issuer}/", data={**hidden_fields(page.text), "user": username,
                                                    "password": password}, timeout=30)
        if http.cookies.get("lemonldap") in (None, "0"):
            raise IdpError(f"{username} could not sign in ({answer.status_code})")
        return http

    def authorize(self, http: requests.Session, client_id: str, redirect_uri: str,
                  **params: str) -> dict[str, str]:
        """Follow the authorization endpoint with a signed-in ``http`` up to
        the redirect to ``redirect_uri``: that redirect's query (code, state)."""
        query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                 "scope": "openid profile email", **params}
        url = self.discovery()["authorization_endpoint"] + "?" + urllib.parse.urlencode(query)
        for _ in range(10):
            answer = http.get(url, allow_redirects=False, timeout=30)
            location = answer.headers.get("Location")
            if not location:
                raise IdpError(f"no redirect from {url}: {answer.status_code} {answer.text[:500]}")
            if location.startswith(redirect_uri):
                return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
            url = urllib.parse.urljoin(url, location)
        raise IdpError("too many redirects")


def hidden_fields(html: str) -> dict[str, str]:
    """The hidden inputs of a page's form (the sign-in form's url, token, ...)."""
    fields = {}
    for tag in re.findall(r"<input[^>]*type=\"hidden\"[^>]*>", html):
        name = re.search(r'name="([^"]*)"', tag)
        value = re.search(r'value="([^"]*)"', tag)
        if name:
            fields[name.group(1)] = value.group(1) if value else ""
    return fields
