"""The IMAP backend's login: what it tells the backend about the session."""

import subprocess
import sys

from proxy.backends.imap import session_id


def test_each_login_has_its_own_session_id_and_each_process_its_own_prefix():
    ids = [session_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(i.isalnum() and len(i) <= 24 for i in ids)
    other = subprocess.run(
        [sys.executable, "-c", "from proxy.backends.imap import session_id; print(session_id().decode())"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert other.encode() not in ids and other[:8] != ids[0][:8].decode()
