"""The benchmarks' Markdown table and charts, from results.json."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# A series of runs whose coefficient of variation (standard deviation over
# mean) is above this decides nothing: on the shared two-core hosts the
# benchmarks run on, the relay's figures moved by 2.5x between runs.
NOISE = 0.15


def variation(values: list[float]) -> float:
    """The coefficient of variation of ``values`` (0 for fewer than two)."""
    if len(values) < 2 or not statistics.fmean(values):
        return 0.0
    return statistics.stdev(values) / statistics.fmean(values)


def verdict(ratios: list[float], target: float) -> str:
    """Whether ``ratios`` (one a repeat, each of two runs side by side)
    meet ``target`` in every run. "met" only if the least of them does and
    they agree (coefficient of variation at most NOISE); "missed" if none
    does; otherwise the runs are too noisy to decide, and it says so."""
    spread = variation(ratios)
    if max(ratios) < target:
        return "missed"
    if min(ratios) < target:
        return f"too noisy to decide: runs either side of the target (CV {spread:.2f})"
    if spread > NOISE:
        return f"too noisy to decide: met in every run, but the runs disagree (CV {spread:.2f} > {NOISE})"
    return "met"


def _span(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


def _fmt(figure: dict[str, float], unit: str = "", digits: int = 0) -> str:
    return (f"{figure['median']:.{digits}f}{unit} "
            f"({figure['min']:.{digits}f}–{figure['max']:.{digits}f})")


def floors(results: dict[str, Any], kind: str, nginx: dict[str, Any] | None) -> str:
    """CPU a login, run by run: the proxy, plain Twisted driven as the
    proxy drives it, a bare epoll loop, and nginx when it ran."""
    said = []
    for name, key in (("proxy", "proxy"), ("Twisted floor", "floor_twisted"),
                      ("raw Python floor", "floor_raw")):
        runs = results[f"warm_{kind}_{key}"]["runs"]
        said.append(f"{name} {_span([r['server_cpu_ms'] for r in runs])} ms")
    if nginx is not None:
        said.append(f"nginx {_span([r['server_cpu_ms'] for r in nginx['runs']])} ms")
    return "; ".join(said)


def floor_verdict(floor: dict[str, Any], target: float) -> str:
    """What is left of a CPU target (ms a login) for a server built on
    Twisted once Twisted's floor is paid: nothing when the floor alone is
    above it in every run."""
    cpu = floor["server_cpu_ms_per_login"]
    if cpu["min"] > target:
        return "out of reach on Twisted: its floor alone is above the target in every run"
    return (f"Twisted's floor alone takes {cpu['min'] / target:.0%}–{cpu['max'] / target:.0%} "
            "of it")


def table(results: dict[str, Any]) -> str:
    rows = ["| scenario | measured (median, min–max) | target | result |", "| --- | --- | --- | --- |"]

    def row(name: str, measured: str, target: str, ok: bool | str | None) -> None:
        said = ok if isinstance(ok, str) else "—" if ok is None else ("met" if ok else "missed")
        rows.append(f"| {name} | {measured} | {target} | {said} |")

    if "cold_app_password_binds" in results:
        cold = results["cold_app_password_binds"]
        limit = results["argon2"]
        row("1. cold app-password binds (argon2 every time)",
            f"{_fmt(cold['rate'], '/s')}; argon2 limit {_fmt(limit['limit'], '/s')} "
            f"(one thread a core at once; {_fmt(limit['verify_ms'], ' ms', 1)} a verify alone)"
            f"; ratio {cold['ratio_to_argon2_limit']:.2f}",
            "≥ 0.95 of the argon2 limit", cold["ratio_to_argon2_limit"] >= 0.95)
    if "wrong_secret_binds" in results:
        wrong = results["wrong_secret_binds"]
        cpu = wrong["proxy_cpu_ms_per_attempt"]
        row("2. wrong secrets", f"{_fmt(wrong['rate'], '/s')}; proxy CPU {_fmt(cpu, ' ms', 3)} an attempt",
            "≤ 0.3 ms CPU an attempt, no argon2", cpu["median"] <= 0.3)
    for kind in ("imap", "smtp"):
        if f"warm_{kind}_proxy" in results:
            proxy, direct = results[f"warm_{kind}_proxy"], results[f"warm_{kind}_direct"]
            nginx = results.get(f"warm_{kind}_nginx")
            cpu = proxy["server_cpu_ms_per_login"]
            measured = (f"proxy {_fmt(proxy['rate'], '/s')}, direct {_fmt(direct['rate'], '/s')}; "
                        f"proxy's ratio to direct {_span(proxy['ratios_to_direct'])}; "
                        f"proxy CPU {_fmt(cpu, ' ms', 2)} a login")
            if nginx is not None:
                measured += (f"; nginx {_fmt(nginx['rate'], '/s')}, its ratio to direct "
                             f"{_span(nginx['ratios_to_direct'])}, nginx CPU "
                             f"{_fmt(nginx['server_cpu_ms_per_login'], ' ms', 2)} a login; "
                             f"proxy/nginx {_span(proxy['ratios_to_nginx'])}")
                row(f"3. warm {kind.upper()} logins: the proxy against nginx"
                    + (" (nginx's SMTP proxy does not log in to Dovecot: bench/nginx.py)"
                       if kind == "smtp" else ""), measured,
                    "≥ nginx's ratio to direct in every run",
                    verdict(proxy["ratios_to_nginx"], 1.0))
            else:
                row(f"3. warm {kind.upper()} logins", measured + " (nginx not installed)",
                    "≥ nginx's ratio to direct in every run", None)
            row(f"3. warm {kind.upper()} logins: proxy CPU a login",
                f"{_span([r['server_cpu_ms'] for r in proxy['runs']])} ms", "≤ 0.6 ms in every run",
                cpu["max"] <= 0.6)
            if f"warm_{kind}_floor_twisted" in results:
                row(f"3. warm {kind.upper()} logins: CPU a login beside Python's floors "
                    "(bench/floor.py)", floors(results, kind, nginx), "≤ 0.6 ms in every run",
                    floor_verdict(results[f"warm_{kind}_floor_twisted"], 0.6))
    if "ldap_binds_proxy" in results:
        proxy = results["ldap_binds_proxy"]
        row("3b. warm LDAP binds, persistent connections",
            f"proxy {_fmt(proxy['rate'], '/s')}, slapd {_fmt(results['ldap_binds_slapd']['rate'], '/s')}, "
            f"ldaptor accept-all {_fmt(results['ldap_binds_ldaptor']['rate'], '/s')}; "
            f"ratio to slapd {proxy['ratio_to_slapd']:.2f}, to ldaptor {proxy['ratio_to_ldaptor']:.2f}"
            + ("; CPU a bind: proxy " + _fmt(proxy["server_cpu_us_per_bind"], " µs")
               + ", slapd " + _fmt(results["ldap_binds_slapd"]["server_cpu_us_per_bind"], " µs")
               + ", ldaptor " + _fmt(results["ldap_binds_ldaptor"]["server_cpu_us_per_bind"], " µs")
               if "server_cpu_us_per_bind" in proxy else "")
            + "".join(f"; {label} (bench/floor.py) {_fmt(results[key]['rate'], '/s')}, "
                      f"{_fmt(results[key]['server_cpu_us_per_bind'], ' µs')} a bind"
                      for label, key in (("Twisted floor", "ldap_binds_floor_twisted"),
                                         ("raw Python floor", "ldap_binds_floor_raw"))
                      if key in results),
            "≥ 1.0 of slapd", proxy["ratio_to_slapd"] >= 1.0)
    if "fairness_under_flood" in results:
        flooded, quiet = results["fairness_under_flood"], results["fairness_quiet"]
        row("4. warm binds under a flood of wrong passwords from 200 addresses",
            f"p99 {_fmt(flooded['p99_ms'], ' ms', 1)} (quiet: {_fmt(quiet['p99_ms'], ' ms', 1)}); "
            f"{_fmt(flooded['rate'], '/s')} beside {_fmt(flooded['flood_rate'], '/s')} wrong",
            "p99 < 100 ms", flooded["p99_ms"]["median"] < 100)
    for key, label, target in (("relay_proxy", "plaintext", 1.2), ("relay_proxy_tls", "TLS to the client", 1.0)):
        if key not in results:
            continue
        proxy = results[key]
        direct = results["relay_direct"]["mb_per_s"]
        measured = f"proxy {_fmt(proxy['mb_per_s'], ' MB/s')}, direct (plaintext) {_fmt(direct, ' MB/s')}"
        name = f"5. relay: 50 MB over IMAP, {label}, {len(proxy['runs'])} fetches each"
        nginx = key.replace("proxy", "nginx")
        if nginx in results:
            peer = results[nginx]
            measured += (f", nginx {_fmt(peer['mb_per_s'], ' MB/s')}; CV proxy "
                         f"{variation(proxy['runs']):.2f}, nginx {variation(peer['runs']):.2f}; "
                         f"ratio to nginx, fetch by fetch: min {min(proxy['ratios_to_nginx']):.2f}, "
                         f"median {proxy['ratio_to_nginx']['median']:.2f}, "
                         f"max {max(proxy['ratios_to_nginx']):.2f}")
            row(name, measured, f"≥ {target} of nginx in every fetch",
                verdict(proxy["ratios_to_nginx"], target))
        else:
            row(name, measured, f"≥ {target} of nginx", None)
    if "idle_sessions" in results:
        idle = results["idle_sessions"]
        row(f"6. {idle['sessions']:,} IMAP sessions in IDLE through the proxy",
            f"{idle['kib_per_session']:.1f} KiB a session (RSS {idle['rss_before_kib'] / 1024:.0f} → "
            f"{idle['rss_after_kib'] / 1024:.0f} MiB); NOOP p50 {idle['noop_p50_ms']:.1f} ms, "
            f"p99 {idle['noop_p99_ms']:.1f} ms while held",
            "≤ 4 KiB a session", idle["kib_per_session"] <= 4)
    for temperature in ("warm", "cold"):
        if f"fleet_{temperature}_binds_postgres" in results:
            pg = results[f"fleet_{temperature}_binds_postgres"]
            lite = results[f"fleet_{temperature}_binds_sqlite"]
            row(f"7. {temperature} LDAP binds, PostgreSQL store against SQLite",
                f"PostgreSQL {_fmt(pg['rate'], '/s')}, SQLite {_fmt(lite['rate'], '/s')}; "
                f"ratio {pg['ratio_to_sqlite']:.2f}",
                "warm: ≥ 0.95 (no store trip on a cached bind)" if temperature == "warm" else "—",
                pg["ratio_to_sqlite"] >= 0.95 if temperature == "warm" else None)
    if "fleet_processes_2" in results:
        two, one = results["fleet_processes_2"], results["fleet_processes_1"]
        row("7b. warm LDAP binds, two processes on one port (SO_REUSEPORT) against one",
            f"two {_fmt(two['rate'], '/s')}, one {_fmt(one['rate'], '/s')}; ratio {two['ratio_to_one']:.2f}",
            "> 1 (the generator shares the 2 cores)", two["ratio_to_one"] > 1.0)
    return "\n".join(rows) + "\n"


def charts(results: dict[str, Any], folder: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    groups = [
        ("logins.png", "Logins per second (median, min–max)",
         [("IMAP direct", "warm_imap_direct"), ("IMAP proxy", "warm_imap_proxy"),
          ("IMAP nginx", "warm_imap_nginx"), ("SMTP direct", "warm_smtp_direct"),
          ("SMTP proxy", "warm_smtp_proxy"), ("SMTP nginx", "warm_smtp_nginx")]),
        ("ldap_binds.png", "LDAP binds per second (median, min–max)",
         [("slapd", "ldap_binds_slapd"), ("proxy", "ldap_binds_proxy"),
          ("ldaptor accept-all", "ldap_binds_ldaptor"), ("proxy, cold", "cold_app_password_binds")]),
    ]
    for filename, title, bars in groups:
        bars = [(label, results[key]["rate"]) for label, key in bars if key in results]
        if not bars:
            continue
        figure, axes = plt.subplots(figsize=(7, 3.5))
        labels = [label for label, _ in bars]
        medians = [r["median"] for _, r in bars]
        errors = [[r["median"] - r["min"] for _, r in bars], [r["max"] - r["median"] for _, r in bars]]
        axes.bar(labels, medians, yerr=errors, capsize=4, color="#4c72b0")
        axes.set_title(title)
        axes.set_ylabel("per second")
        figure.tight_layout()
        figure.savefig(folder / filename, dpi=100)
        plt.close(figure)
        made.append(filename)
    return made


def write_report(results: dict[str, Any], folder: Path) -> None:
    machine = results["machine"]
    made = charts(results, folder)
    text = [
        "# Benchmark results",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['system']}, "
        f"Python {machine['python']}; {machine['runs']} runs of {machine['seconds_per_run']:g} s each.",
        "",
    ]
    if "load_average_after" in machine:
        text += [f"Load average (1, 5, 15 min) before: "
                 f"{', '.join(f'{v:.1f}' for v in machine['load_average_before'])}; after: "
                 f"{', '.join(f'{v:.1f}' for v in machine['load_average_after'])}"
                 + (" (above the cores: other work shared them, figures are noisy)."
                    if max(*machine["load_average_before"], *machine["load_average_after"])
                    > machine["cores"] else "."), ""]
    text += [
        table(results),
    ]
    text += [f"![{name}]({name})" for name in made]
    (folder / "results.md").write_text("\n".join(text) + "\n")
