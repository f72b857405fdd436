"""``legacy-auth-proxy`` and ``python -m proxy``: the daemon's reactor
(:mod:`proxy.reactor`) is put in place first, as ldaptor takes Twisted's
global reactor as soon as it is imported; then the command line tool runs."""


def main() -> int:
    from proxy.reactor import install

    install()
    from proxy.cli import main as cli

    return cli()


if __name__ == "__main__":
    raise SystemExit(main())
