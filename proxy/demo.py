"""The embedded default: the whole proxy on one machine, in a local folder.

``legacy-auth-proxy demo`` writes a config and its state into a folder of
its own (nothing under /etc or /var), enrols a demo user with a fresh app
password, prints how to try it, and runs the proxy in the foreground. Each
front end, as it arrives, adds itself here.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from proxy import config as configuration
from proxy.apppasswords import display
from proxy.cli import Context
from proxy.runner import run_daemon

DEMO_USER = "demo@example.test"
DEMO_DEVICE = "demo device"

CONFIG = """\
# The demo's config, written by `legacy-auth-proxy demo`. Paths are relative
# to this file's folder. See docs/configuration.md for every key.
store:
  path: store.sqlite3
  pepper_file: pepper
policy:
  allow_user_app_passwords: false
  block_legacy_auth: false
  max_app_passwords_per_user: 40
audit:
  file: audit.log
"""


def prepare(folder: Path) -> Path:
    """Create the folder and its config if they do not exist; return the config's path."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / "config.yaml"
    if not path.exists():
        path.write_text(CONFIG, encoding="utf-8")
    return path.absolute()


def run_demo(folder: Path, *, serve: bool) -> int:
    config_path = prepare(folder)
    ctx = Context(config_path)
    admin = ctx.admin()
    # The secret of the demo's app password cannot be shown again, so every
    # run replaces it with a new one.
    if any(a.name == DEMO_DEVICE for a in admin.list(DEMO_USER)):
        admin.delete(DEMO_USER, DEMO_DEVICE)
    user, created = admin.enroll(DEMO_USER, DEMO_DEVICE)
    ctx.close()
    tool = f"legacy-auth-proxy --config {shlex.quote(str(config_path))}"
    print(f"Demo folder: {config_path.parent}")
    print()
    print(f"{user.username} is registered for MFA and has this app password:")
    print()
    print(f"    {display(created.secret)}    (id {created.record.id}, device {DEMO_DEVICE!r})")
    print()
    print("Try the command line tool on the demo's store:")
    print(f"    {tool} app-password list {DEMO_USER}")
    print(f"    {tool} app-password create {DEMO_USER} --name 'Outlook 2010' --protocols imap,smtp")
    print(f"    {tool} user show {DEMO_USER}")
    print(f"    tail {shlex.quote(str(config_path.parent / 'audit.log'))}")
    print()
    if not serve:
        return 0
    print("The proxy runs in the foreground; Ctrl-C stops it.", flush=True)
    return run_daemon(config_path, configuration.load(config_path))
