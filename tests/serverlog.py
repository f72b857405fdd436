"""What the test servers (slapd, Dovecot) share about their log file."""

from __future__ import annotations

import re
import time
from pathlib import Path


class ServerLog:
    """A mixin for a server fixture that logs to ``self.log_path``. The
    fixture names itself in ``log_name`` and its error class in ``log_error``."""

    log_path: Path
    log_name = "server"
    log_error: type[Exception] = RuntimeError

    def log_text(self) -> str:
        """Everything logged so far, over all the server's runs."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_since(self, offset: int) -> str:
        """What was logged after ``offset`` bytes."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(tail)

    def wait_for_log(self, pattern: str, timeout: float = 5.0, since: int = 0) -> re.Match:
        """The first match of ``pattern`` in log_text()[since:] (``since`` being,
        say, len(log_text()) before the test acted), waiting for it to appear:
        servers write some lines (slapd's RESULT, Dovecot's login lines) a
        moment after the client got its answer."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if match := regex.search(self.log_text(), since):
                return match
            if time.monotonic() > deadline:
                raise self.log_error(
                    f"nothing matches {pattern!r} in the {self.log_name} log\n{self._tail()}"
                )
            time.sleep(0.02)
