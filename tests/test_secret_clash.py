"""One secret, one credential: two client keys with the same secret, or an admin token that is a
client's key, are refused by --check, at the start and on reload (test_reload_refusals.py),
whether the secrets are written in the file, as digests, or read from the environment. The
problem names the entries, never the secret. They were accepted: the later key won (an
unrestricted key given again as a limited one got 403 on its models), and the client whose key
was the admin token was the admin."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from proxy.cli import build_parser, main, resolve_config
from proxy.configload import load_config
from proxy.errors import ConfigError

ALICE, BOB = "sk-alice-secret", "sk-bob-secret"


def check(tmp_path: Path, auth: dict, environ: dict | None = None) -> int:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"auth": auth}))
    return main(["--config", str(path), "--check"], environ=environ or {})


def test_two_keys_with_one_secret_are_refused_naming_both(tmp_path, capsys):
    rc = check(tmp_path, {"keys": [{"name": "alice", "key": ALICE},
                                      {"name": "bob", "key": BOB},
                                      {"name": "dave", "key": ALICE, "models": ["m"]}]})
    assert rc == 2
    err = capsys.readouterr().err
    assert "auth.keys[2]: client key 'dave' has the same secret as client key 'alice' " \
           "(auth.keys[0])" in err
    assert ALICE not in err


def test_an_admin_token_that_is_a_client_key_is_refused(tmp_path, capsys):
    rc = check(tmp_path, {"admin_token": BOB, "keys": [{"name": "alice", "key": ALICE},
                                                         {"name": "bob", "key": BOB}]})
    assert rc == 2
    err = capsys.readouterr().err
    assert "auth.keys[1]: client key 'bob' has the same secret as the admin token " \
           "(auth.admin_token): that client would be the admin" in err
    assert BOB not in err


def test_a_digest_of_another_keys_secret_is_the_same_secret():
    digest = hashlib.sha256(ALICE.encode()).hexdigest()
    with pytest.raises(ConfigError) as info:
        load_config({"auth": {"keys": [{"name": "alice", "key": ALICE},
                                       {"name": "carol", "key_sha256": digest.upper()}]}})
    assert info.value.problems == [
        "auth.keys[1]: client key 'carol' has the same secret as client key 'alice' "
        "(auth.keys[0]): a request with it would count as one of them only, with that one's "
        "models; give each key its own secret"]


@pytest.mark.parametrize("when", ["check", "reload"])
def test_secrets_read_from_the_environment_are_compared_too(tmp_path, capsys, when):
    auth = {"admin_token_env": "ADMIN_TOKEN",
            "keys": [{"name": "alice", "key": ALICE}, {"name": "ci", "key_env": "CI_KEY"}]}
    environ = {"ADMIN_TOKEN": ALICE, "CI_KEY": ALICE}
    if when == "check":
        rc = check(tmp_path, auth, environ)
        assert rc == 2
        err = capsys.readouterr().err
    else:     # the source a reload reads (SIGHUP, POST /proxy/reload)
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"auth": auth}))
        with pytest.raises(ConfigError) as info:
            resolve_config(build_parser().parse_args(["--config", str(path)]), environ,
                           reloading=True)
        err = "\n".join(info.value.problems)
    assert "auth.keys[0]: client key 'alice' has the same secret as the admin token " \
           "(auth.admin_token, from ADMIN_TOKEN)" in err
    assert "auth.keys[1]: client key 'ci' (from CI_KEY) has the same secret as the admin " \
           "token (auth.admin_token, from ADMIN_TOKEN)" in err
    assert ALICE not in err


def test_distinct_secrets_pass(tmp_path, capsys):
    auth = {"admin_token_env": "ADMIN_TOKEN",
            "keys": [{"name": "alice", "key": ALICE}, {"name": "ci", "key_env": "CI_KEY"}]}
    rc = check(tmp_path, auth, {"ADMIN_TOKEN": "adm-x", "CI_KEY": BOB})
    assert rc == 0
