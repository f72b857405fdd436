"""The daemon's log lines: priorities for the journal, no port noise."""

import time

from twisted.logger import LogLevel, PredicateResult

from proxy.runner import journal_line, quiet_ports


def event(level, text="the directory answers again", namespace="legacy_auth_proxy.directory"):
    return {"log_format": text, "log_level": level, "log_namespace": namespace,
            "log_time": time.time()}


def test_journal_lines_carry_their_priority_and_no_time():
    assert journal_line(event(LogLevel.warn)) == (
        "<4>[legacy_auth_proxy.directory#warn] the directory answers again\n")
    assert journal_line(event(LogLevel.error)).startswith("<3>")
    assert journal_line(event(LogLevel.info)).startswith("<6>")
    assert journal_line(event(LogLevel.critical)).startswith("<2>")


def test_port_noise_is_dropped():
    noise = {"log_namespace": "log_legacy", "log_format": "{log_text}",
             "log_text": "IMAPListener starting on 10143", "message": ("IMAPListener starting on 10143",)}
    assert quiet_ports(noise) is PredicateResult.no
    assert quiet_ports(event(LogLevel.info)) is PredicateResult.maybe


def test_directory_reconnection_attempts_are_not_logged_one_by_one():
    retry = event(LogLevel.info, "Scheduling retry 1 to connect",
                  "twisted.application._client_service.ClientService")
    assert quiet_ports(retry) is PredicateResult.no


def test_a_workers_lines_name_the_worker(monkeypatch):
    import io

    from twisted.logger import LogLevel

    from proxy import runner

    out = io.StringIO()
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setattr(runner.sys, "stdout", out)
    observer = runner.log_observer(worker=1)
    observer({"log_namespace": "legacy_auth_proxy.service", "log_level": LogLevel.info,
              "log_format": "listening: {label}", "label": "imap", "log_time": 0.0})
    assert "[worker 1 legacy_auth_proxy.service#info] listening: imap" in out.getvalue()
