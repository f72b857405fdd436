"""The OAuth keys of the config: backend_login: oauth2 on a listener, and
the oauth section; errors name the file, line and key."""

import pytest

from proxy.config import ConfigError, parse

HEAD = ("directory:\n  url: ldap://d\n  bind_dn: cn=p\n  bind_password_file: p\n"
        "  user_base: dc=x\nlisteners:\n  - protocol: imap\n    realm: cloud\n"
        "    endpoint: tcp:143\n    tls: none\n    backend: imaps://outlook.office365.com\n")
OAUTH = ("    backend_login: oauth2\n"
         "    oauth2_token_url: https://login.microsoftonline.com/t/oauth2/v2.0/token\n"
         "    oauth2_client_id: app\n    oauth2_client_secret_file: secret\n")


def error(text, tmp_path):
    with pytest.raises(ConfigError) as e:
        parse(text, tmp_path / "c.yaml")
    return e.value


def test_a_complete_oauth2_listener(tmp_path):
    listener = parse(HEAD + OAUTH + "    oauth2_scope: https://outlook.office365.com/.default\n",
                     tmp_path / "c.yaml").listeners[0]
    assert listener.backend_login == "oauth2" and listener.oauth2_mechanism == "xoauth2"
    assert listener.oauth2_client_secret_file == tmp_path / "secret"
    assert listener.oauth2_client_auth == "client_secret_basic"


@pytest.mark.parametrize("text, problem", [
    (HEAD + "    backend_login: oauth2\n",
     "backend_login: oauth2 needs oauth2_token_url, oauth2_client_id, oauth2_client_secret_file"),
    (HEAD + OAUTH + "    master_user: m\n", "no master_user or master_password_file"),
    (HEAD + "    master_user: m\n    master_password_file: p\n    oauth2_client_id: app\n",
     "oauth2_client_id is only for backend_login: oauth2"),
])
def test_incomplete_or_mixed_settings_are_refused(tmp_path, text, problem):
    e = error(text, tmp_path)
    assert problem in e.problem and e.line == 7


@pytest.mark.parametrize("url", ["http://idp.example/token", "ftp://idp/token", "https://u:p@idp/token",
                                 "token"])
def test_the_token_endpoint_is_https_without_credentials(tmp_path, url):
    e = error(HEAD + OAUTH.replace("https://login.microsoftonline.com/t/oauth2/v2.0/token", url),
              tmp_path)
    assert e.key == "listeners[0].oauth2_token_url"
    assert "p@" not in str(e) or "credentials" in e.problem


def test_http_only_to_loopback(tmp_path):
    text = HEAD + OAUTH.replace("https://login.microsoftonline.com/t/oauth2/v2.0/token",
                                "http://127.0.0.1:8080/token")
    assert parse(text, tmp_path / "c.yaml").listeners[0].oauth2_token_url.startswith("http://")


def test_the_oauth_section(tmp_path):
    text = ("oauth:\n  issuer: https://idp.example\n  audiences: [mail]\n"
            "  jwks_url: https://idp.example/jwks\n")
    oauth = parse(text, tmp_path / "c.yaml").oauth
    assert oauth.username_claims == ("preferred_username", "upn", "email") and oauth.leeway == 30
    e = error(text.replace("[mail]", "[]"), tmp_path)
    assert "audiences" in e.problem
    e = error("oauth:\n  issuer: https://idp.example\n", tmp_path)
    assert "audiences" in e.problem or "jwks_url" in e.problem
