import re
from pathlib import Path

import pytest

from proxy import config
from proxy.config import Config, ConfigError, load, parse, parse_duration, schema_keys

ROOT = Path(__file__).resolve().parents[2]


def error(text, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load(path)
    return raised.value


def test_an_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("# nothing\n")
    loaded = load(path)
    assert loaded.policy == Config().policy
    assert loaded.policy.max_app_passwords_per_user == 40
    assert loaded.policy.allow_user_app_passwords is False
    assert loaded.policy.block_legacy_auth is False
    assert loaded.policy.revoke_app_passwords_on_password_change is True
    assert loaded.source == path


def test_relative_paths_are_taken_from_the_config_folder(tmp_path):
    path = tmp_path / "etc" / "config.yaml"
    path.parent.mkdir()
    path.write_text("store:\n  path: state/store.sqlite3\naudit:\n  file: null\n")
    loaded = load(path)
    assert loaded.store.path == tmp_path / "etc" / "state" / "store.sqlite3"
    assert loaded.audit.file is None


@pytest.mark.parametrize(
    "text, line, key, problem",
    [
        ("policy:\n  max_app_passwords_per_user: forty\n", 2,
         "policy.max_app_passwords_per_user", "expected an integer from 1 to 1000, got 'forty'"),
        ("policy:\n  max_app_passwords_per_user: 0\n", 2,
         "policy.max_app_passwords_per_user", "expected an integer from 1 to 1000, got 0"),
        ("policy:\n  block_legacy_auth: 1\n", 2, "policy.block_legacy_auth",
         "expected true or false, got '1'"),
        ("\npolicy:\n  block_legacy_auht: true\n", 3, "policy.block_legacy_auht",
         "did you mean 'block_legacy_auth'?"),
        ("stroe:\n  path: x\n", 1, "stroe", "did you mean 'store'?"),
        ("store: /tmp/x\n", 1, "store", "expected a mapping of settings, got '/tmp/x'"),
        ("store:\n  path: 5\n", 2, "store.path", "expected a string, got '5'"),
        ("store:\n  path: ''\n", 2, "store.path", "expected a non-empty string"),
        ("policy:\n  block_legacy_auth: true\n  block_legacy_auth: false\n", 3,
         "policy.block_legacy_auth", "set twice"),
        ("hashing:\n  threads: [1, 2]\n", 2, "hashing.threads", "got a list"),
        ("- a\n- b\n", 1, "", "expected a mapping of settings, got a list"),
        ("store:\n  path: [x\n", 3, "", "not valid YAML"),
        ("source: x\n", 1, "source", "unknown setting"),
    ],
)
def test_errors_name_file_line_key_and_what_was_expected(tmp_path, text, line, key, problem):
    e = error(text, tmp_path)
    assert e.source == str(tmp_path / "config.yaml")
    assert (e.line, e.key) == (line, key)
    assert problem in e.problem
    assert str(e).startswith(f"{tmp_path / 'config.yaml'}:{line}: ")


def test_a_missing_file_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as raised:
        load(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(raised.value)


def test_yaml_tags_that_construct_objects_are_refused(tmp_path):
    e = error("store:\n  path: !!python/object:os.system ls\n", tmp_path)
    assert e.key == "store.path"


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("3h", 10800),
                                           ("2d", 172800), ("1w", 604800), (" 1.5h ", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_expiry_takes_a_duration_or_a_date():
    assert config.parse_expiry("1h", now=1000.0) == 4600.0
    assert config.parse_expiry("2027-01-31", now=0.0) == 1801353600.0
    with pytest.raises(ValueError):
        config.parse_expiry("soon", now=0.0)


def test_the_example_config_is_valid_and_holds_the_defaults():
    import attrs

    loaded = load(ROOT / "config" / "example.yaml")
    assert attrs.evolve(loaded, source=Config().source, directory=None, listeners=(),
                        webhooks=(), oauth=None) == Config()
    # The oauth section has no defaults for which provider; the rest are the defaults.
    oauth = loaded.oauth
    assert oauth == config.OAuthConfig(oauth.issuer, oauth.audiences, oauth.jwks_url)
    # A webhook has no defaults for where and with which secret; the rest are the defaults.
    [hook] = loaded.webhooks
    assert hook == config.WebhookConfig(hook.name, hook.url, hook.secret_file)
    # Listeners have no defaults for what and where; the first shows every key at its default.
    first = loaded.listeners[0]
    required = {"protocol", "realm", "endpoint", "name", "certificate", "private_key"}
    assert first.protocol == "ldap"
    assert first == config.ListenerConfig(**{k: getattr(first, k) for k in required})
    # The directory has no defaults for where it is; the rest are the defaults.
    example = loaded.directory
    required = {"url", "bind_dn", "bind_password_file", "user_base"}
    defaults = config.DirectoryConfig(**{k: getattr(example, k) for k in required})
    assert example == defaults


def test_every_key_is_documented_and_in_the_example():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    example = (ROOT / "config" / "example.yaml").read_text()
    documented = set(re.findall(r"^\| `([a-z_0-9]+(?:\[\])?(?:\.[a-z_0-9]+){1,2})` \|", docs,
                                re.MULTILINE))
    keys = {name for name, _ in schema_keys()}
    # Keys of their own at the top (workers) have a section and a table of their own.
    documented |= {name for name in keys if "." not in name
                   and re.search(rf"^## `{name}`\n(.|\n)*?^\| `{name}` \|", docs, re.MULTILINE)}
    assert documented == keys
    for name in keys:
        if "." not in name:  # a key of its own at the top (workers)
            assert re.search(rf"^{name}:", example, re.MULTILINE), name
            continue
        if name.count(".") == 2:
            # A section within a section (portal.oidc), off in the example:
            # its keys are there, commented out, under it.
            section, sub, key = name.split(".")
            pattern = rf"^{section}:$(.|\n)*?^  {sub}:(.|\n)*?^  #   {key}:"
            assert re.search(pattern, example, re.MULTILINE), name
            continue
        section, key = name.split(".")
        if section.endswith("[]"):
            pattern = rf"^{section[:-2]}:$(.|\n)*?^  (- |  ){key}:"
        else:
            pattern = rf"^{section}:$(.|\n)*?^  {key}:"
        assert re.search(pattern, example, re.MULTILINE), name


def test_parse_takes_text(tmp_path):
    assert parse("", tmp_path / "c.yaml").policy.max_app_passwords_per_user == 40


def test_a_setting_of_another_protocol_is_refused_by_name(tmp_path):
    text = ("directory:\n  url: ldap://d\n  bind_dn: cn=p\n  bind_password_file: p\n"
            "  user_base: dc=x\nlisteners:\n  - protocol: ldap\n    realm: cloud\n"
            "    endpoint: tcp:389\n    tls: none\n    max_literal_size: 100\n")
    e = error(text, tmp_path)
    assert "max_literal_size is not a setting of ldap listeners" in e.problem
    assert e.line == 7


def test_every_listener_setting_belongs_to_the_registry():
    import attrs

    from proxy import protocols

    fields = {f.name for f in attrs.fields(config.ListenerConfig)}
    registered = set(protocols.COMMON_SETTINGS).union(
        *(p.settings for p in protocols.REGISTRY.values()))
    assert fields == registered


def test_the_dashboard_and_the_alert_rules_use_only_families_the_daemon_exports():
    import json

    from proxy.metrics import Metrics

    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name)
        if family.type == "counter":
            exported.add(family.name + "_total")
        exported.update(sample.name for sample in family.samples)
    for name in ("connections", "sessions", "relayed_bytes_total", "relayed_sessions_total", "pool_calls", "pool_capacity",
                 "pool_refusals_total", "connections_before_login", "bytes_before_login",
                 "directory_up", "lockouts", "backend_up", "ready"):
        exported.add("legacy_auth_proxy_" + name)  # read at scrape time from the daemon
    from proxy.daemon.webhooks import Counts

    for family in Counts().families(0.0, ["siem"]):  # the webhooks', read at scrape time
        exported.update({family.name, family.name + "_total"} if family.type == "counter"
                        else {family.name})
    exported |= {f"legacy_auth_proxy_{n}_bucket" for n in (
        "decision_seconds", "directory_seconds", "backend_login_seconds")}
    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    texts = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    texts.append((ROOT / "config" / "alerts.yml").read_text())
    used = set(re.findall(r"legacy_auth_proxy_[a-z_]+", "\n".join(texts)))
    assert used and used <= exported, used - exported


AD_DIRECTORY = ("directory:\n  kind: active_directory\n  url: ldaps://dc.example.test\n"
                "  bind_dn: CN=proxy-svc,DC=example,DC=test\n  bind_password_file: /dev/null\n"
                "  user_base: DC=example,DC=test\n")
LDAP_LISTENER = ("listeners:\n  - name: ldap\n    protocol: ldap\n    endpoint: tcp:3389\n"
                 "    realm: cloud\n    tls: none\n")


def test_active_directory_reads_for_app_passwords_as_a_search_account(tmp_path):
    # Without an LDAP listener no search account is needed.
    assert parse(AD_DIRECTORY, tmp_path / "c.yaml").directory.app_password_reads == "search_account"
    problem = error(AD_DIRECTORY + LDAP_LISTENER, tmp_path)
    assert "needs directory.search_bind_dn" in str(problem)
    problem = error(AD_DIRECTORY + "  app_password_reads: proxied_authorization\n", tmp_path)
    assert problem.key == "directory" and "no proxied authorization" in problem.problem
    loaded = parse(AD_DIRECTORY + "  search_bind_dn: CN=LDAP Proxy,OU=Service Accounts,DC=example,"
                   "DC=test\n  search_bind_password_file: /dev/null\n" + LDAP_LISTENER,
                   tmp_path / "c.yaml")
    assert loaded.directory.search_bind_dn.startswith("CN=LDAP Proxy")


@pytest.mark.parametrize("text, problem", [
    ("webhooks:\n  - name: a\n    url: ftp://x/\n    secret_file: s\n", "webhooks[0].url: expected"),
    ("webhooks:\n  - name: a\n    url: https://u:p@x/\n    secret_file: s\n", "holds a user or password"),
    ("webhooks:\n  - name: a b\n    url: https://x/\n    secret_file: s\n", "webhooks[0].name: expected"),
    ("webhooks:\n  - name: a\n    url: https://x/\n", "'secret_file' is required"),
    ("webhooks:\n  - name: a\n    url: https://x/\n    secret_file: s\n    retry_initial: 1h\n"
     "    retry_max: 1m\n", "retry_max must be at least retry_initial"),
    ("webhooks:\n  - {name: a, url: 'https://x/', secret_file: s}\n"
     "  - {name: a, url: 'https://y/', secret_file: t}\n", "two have the same name"),
])
def test_webhooks_are_checked(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse(text, tmp_path / "c.yaml")
