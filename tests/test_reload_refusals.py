"""A reload of `python -m proxy` (POST /proxy/reload; SIGHUP reads the same source) refuses
what --check refuses, and the running configuration stays: a CA file that cannot be read,
two client keys with one secret, an admin token that is a client key, a key given twice in the
file — and a blank file, which a start only warns of (a file cut short while it was written
would otherwise drop every key: the client keys with it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .test_signals import MODEL, ProxyProcess

ADMIN, ALICE, BOB = "adm-secret", "sk-alice-secret", "sk-bob-secret"


def good_config(upstream: str) -> dict:
    return {"server": {"port": 0}, "upstream": {"url": upstream},
            "memory": {"sampler": "budget", "budget_gb": 64, "min_free_memory_gb": 0},
            "eviction": {"hold": 0}, "storage": {"enabled": False},
            "auth": {"admin_token": ADMIN,
                     "keys": [{"name": "alice", "key": ALICE},
                              {"name": "bob", "key": BOB, "models": [MODEL]}]}}


def with_auth(raw: dict, **auth: object) -> str:
    return yaml.safe_dump({**raw, "auth": {**raw["auth"], **auth}})


def bad_edits(raw: dict, tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name → (the file's new text, the problem the reload answers with)."""
    keys = raw["auth"]["keys"]
    missing = tmp_path / "missing-ca.pem"
    text = yaml.safe_dump(raw)
    return {
        "ca_file": (yaml.safe_dump({**raw, "upstream": {**raw["upstream"],
                                                         "ca_file": str(missing)}}),
                    f"upstream.ca_file: cannot read {missing} (No such file or directory)"),
        "duplicate_secret": (with_auth(raw, keys=[*keys, {"name": "dave", "key": ALICE,
                                                          "models": [MODEL]}]),
                             "auth.keys[2]: client key 'dave' has the same secret as client "
                             "key 'alice' (auth.keys[0])"),
        "admin_is_a_key": (with_auth(raw, admin_token=BOB),
                           "auth.keys[1]: client key 'bob' has the same secret as the admin "
                           "token (auth.admin_token)"),
        "key_given_twice": (text + "server:\n  port: 0\n",
                            "key 'server' is given again (first at line"),
        "blank": ("", "the file is empty (or only comments), as a file cut short would be: "
                      "the running configuration stays"),
    }


@pytest.mark.parametrize("edit", ["ca_file", "duplicate_secret", "admin_is_a_key",
                                  "key_given_twice", "blank"])
async def test_a_reload_refuses_it_and_the_running_configuration_stays(tmp_path, emulator,
                                                                       http, edit):
    raw = good_config(emulator.url)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    proxy = await ProxyProcess.start(path)
    try:
        await proxy.ready()
        text, problem = bad_edits(raw, tmp_path)[edit]
        path.write_text(text)
        async with http.post(f"{proxy.url}/proxy/reload",
                             headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            status, message = r.status, (await r.json())["error"]["message"]
        assert status == 400 and message.startswith("The new configuration was rejected; the "
                                                    "running one stays: ")
        assert problem in message
        assert ALICE not in message and BOB not in message
        for key, status in ((ALICE, 200), (BOB, 200), ("sk-unknown", 401)):
            async with http.get(f"{proxy.url}/v1/models",
                                headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == status
        async with http.post(f"{proxy.url}/proxy/reload",
                             headers={"Authorization": f"Bearer {BOB}"}) as r:
            assert r.status == 403          # bob is still no admin
    finally:
        await proxy.stop()
