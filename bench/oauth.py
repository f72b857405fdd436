"""The warm IMAP login with backend_login: oauth2 beside the master user's:
the same proxy config but for how it logs in to the backend, each in front
of a Dovecot of its own (one with master users, one taking nothing but the
proxy's OAuth tokens, checked locally against LemonLDAP::NG's keys), run in
turns in every repeat. The token is cached, so the proxy's work a login
should be the same; Dovecot's is not (an RS256 check instead of a PLAIN
compare), and the figures say by how much.

Run as part of bench.run (``--only oauth``), which passes itself in.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import requests

CLIENT_ID = "legacy-auth-proxy-bench"
SECRET = "bench-app-registration-secret"


def warm_oauth2(bench: Any, master: Any) -> None:
    """``master``: the bench's proxy, logging in to its Dovecot as a master user."""
    from bench.cpu import group_cpu_seconds, process_cpu_seconds
    from bench.harness import BENCH_LIMITS, load, summary
    from tests.dovecot import Dovecot
    from tests.idp import Idp
    from tests.proxyd import ProxyDaemon

    idp = Idp(bench.slapd, Path(tempfile.mkdtemp(prefix="lap-bench-idp-")))
    idp.add_client(CLIENT_ID, SECRET, client_credentials=True, access_token_lifetime=3600)
    idp.start()
    dovecot = daemon = None
    try:
        discovery = idp.discovery()
        jwks = requests.get(discovery["jwks_uri"], verify=str(idp.ca_file), timeout=30).json()
        sample = idp.client_credentials(CLIENT_ID, SECRET)["access_token"]
        issuer = discovery["issuer"]
        dovecot = Dovecot(bench.folder / "dovecot-oauth", oauth2={})
        dovecot.oauth2 = dovecot.oauth2_settings(issuer=issuer, client_id=CLIENT_ID)
        dovecot.oauth2["debug"] = "no"
        dovecot.trust_provider(jwks, sample)
        dovecot.start()
        folder = bench.folder / "proxy-oauth"
        folder.mkdir(parents=True, exist_ok=True)
        secret = folder / "client-secret"
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        daemon = ProxyDaemon(folder, bench.slapd, {
            "imap": {"protocol": "imap", "realm": "cloud", "tls": "none",
                     "allow_plaintext_auth": True, "max_connections_per_source": 100000,
                     "backend": f"imap://127.0.0.1:{dovecot.imap_port}",
                     "backend_login": "oauth2", "oauth2_token_url": discovery["token_endpoint"],
                     "oauth2_client_id": CLIENT_ID, "oauth2_client_secret_file": str(secret),
                     "oauth2_scope": "openid", "oauth2_ca_file": str(idp.ca_file)},
        }, hashing="  threads: 0",
            throttle="  source_delay: 0\n  source_delay_max: 0\n  account_failures: 10000",
            account_cache="60", extra=BENCH_LIMITS)
        daemon.start()
        secrets = {uid: daemon.create_app_password(uid, "bench") for uid in bench.users}
        paths = {
            "master": (master.ports["imap"], [(u, master.secrets[u]) for u in bench.users],
                       master.process.pid, bench.dovecot._process.pid),
            "oauth2": (daemon.ports["imap"], [(u, secrets[u]) for u in bench.users],
                       daemon.process.pid, dovecot._process.pid),
        }
        for port, credentials, _, _ in paths.values():  # the token obtained, caches filled
            load("imap", port, credentials, connections=8, seconds=1)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for _ in range(bench.repeat):
            for name, (port, credentials, proxy_pid, dovecot_pid) in paths.items():
                before = (process_cpu_seconds(proxy_pid), group_cpu_seconds(dovecot_pid))
                result = load("imap", port, credentials, connections=8, seconds=bench.seconds)
                done = max(1, result["operations"])
                result["proxy_cpu_ms"] = (process_cpu_seconds(proxy_pid) - before[0]) * 1000 / done
                result["dovecot_cpu_ms"] = (group_cpu_seconds(dovecot_pid) - before[1]) * 1000 / done
                runs[name].append(result)
        for name, values in runs.items():
            figure = bench.measure(f"warm_imap_backend_{name}", values)
            figure["proxy_cpu_ms_per_login"] = summary([r["proxy_cpu_ms"] for r in values])
            figure["dovecot_cpu_ms_per_login"] = summary([r["dovecot_cpu_ms"] for r in values])
        oauth2 = bench.results["warm_imap_backend_oauth2"]
        oauth2["ratios_to_master"] = [o["rate"] / m["rate"] for o, m in
                                      zip(runs["oauth2"], runs["master"])]
        oauth2["ratio_to_master"] = summary(oauth2["ratios_to_master"])
        oauth2["tokens_obtained"] = daemon.log().count("access token obtained for")
        print(f"warm IMAP login, oauth2 / master user: "
              f"{oauth2['ratio_to_master']['median']:.2f} (each repeat: "
              + ", ".join(f"{r:.2f}" for r in oauth2["ratios_to_master"])
              + f"); tokens obtained: {oauth2['tokens_obtained']}", flush=True)
    finally:
        if daemon is not None:
            daemon.stop()
        if dovecot is not None:
            dovecot.stop()
        idp.stop()
