"""Every inference request writes one access-log line, refusals before the relay included: the
key (401, 403), the Host (421) and Origin (403), the body (408, 413, 415). A line names the
client's address and the key's name, never its secret."""
from __future__ import annotations

import logging

import pytest

from .conftest import proxy_config
from .test_hostile import raw_request
from .test_relay import access_lines

MODEL = "qwen/qwen3-4b"
OTHER = "google/gemma-3-12b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ALICE, BOB, WRONG = "sk-alice-secret", "sk-bob-secret", "sk-not-a-key"
URL = "/v1/chat/completions"


@pytest.fixture
async def keyed(make_proxy, emulator):
    config = proxy_config(emulator.url, **{
        "auth.keys": [{"name": "alice", "key": ALICE},
                      {"name": "bob", "key": BOB, "models": [OTHER]}],
        "server.max_body_bytes": 4096, "server.body_timeout_s": 0.3})
    return await make_proxy(emulator.url, config=config)


def no_secret_logged(caplog) -> None:
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(s in text for s in (ALICE, BOB, WRONG))


async def test_a_served_request_names_its_client_and_key(keyed, http, caplog):
    caplog.set_level(logging.DEBUG)
    async with http.post(keyed.url + URL, json=CHAT,
                         headers={"Authorization": f"Bearer {ALICE}"}) as r:
        assert r.status == 200
    (line,) = access_lines(keyed, caplog)
    assert line.startswith(f"POST {URL} {MODEL} 200 ")
    assert " client=127.0.0.1 key=alice ttft=- tokens=1/2" in line
    no_secret_logged(caplog)


@pytest.mark.parametrize("headers, status, key", [
    ({}, 401, "-"),                                          # no key
    ({"Authorization": f"Bearer {WRONG}"}, 401, "-"),        # a wrong key
    ({"x-api-key": WRONG}, 401, "-"),
    ({"Authorization": f"Bearer {BOB}"}, 403, "bob"),        # a key limited to another model
])
async def test_an_auth_refusal_writes_its_line(keyed, http, caplog, headers, status, key):
    caplog.set_level(logging.DEBUG)
    async with http.post(keyed.url + URL, json=CHAT, headers=headers) as r:
        assert r.status == status
    (line,) = access_lines(keyed, caplog)
    model = MODEL if status == 403 else "-"     # a 401 comes before the body is read
    assert line.startswith(f"POST {URL} {model} {status} ")
    assert f" client=127.0.0.1 key={key} ttft=- tokens=0/0" in line
    no_secret_logged(caplog)


async def test_a_refused_host_or_origin_writes_its_line(keyed, http, caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    port = keyed.served.port
    auth = {"Authorization": f"Bearer {ALICE}"}
    async with http.post(keyed.url + URL, json=CHAT,
                         headers={**auth, "Host": f"rebind.example:{port}"}) as r:
        assert r.status == 421
    async with http.post(keyed.url + URL, json=CHAT,
                         headers={**auth, "Origin": "http://evil.example"}) as r:
        assert r.status == 403
    assert [line.split()[:4] for line in access_lines(keyed, caplog)] == [
        ["POST", URL, "-", "421"], ["POST", URL, "-", "403"]]


async def test_a_refused_body_writes_its_line(keyed, http, caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    auth = {"Authorization": f"Bearer {ALICE}"}
    async with http.post(keyed.url + URL, data=b" " * 5000, headers=auth) as r:
        assert r.status == 413
    async with http.post(keyed.url + URL, data=b"{}",
                         headers={**auth, "Content-Encoding": "br"}) as r:
        assert r.status == 415
    head = (f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALICE}\r\n"
            "Content-Length: 100\r\n\r\n").encode()
    status, _ = await raw_request(keyed.url, head, b'{"model":')   # the rest never comes
    assert status.startswith(b"HTTP/1.1 408")
    lines = access_lines(keyed, caplog)
    assert [line.split()[3] for line in lines] == ["413", "415", "408"]
    assert all(" client=127.0.0.1 key=alice " in line for line in lines)


async def test_refusals_of_other_routes_write_no_access_line(keyed, http, caplog):
    caplog.set_level(logging.INFO, logger="proxy.request")
    async with http.get(keyed.url + "/v1/models") as r:
        assert r.status == 401
    async with http.post(keyed.url + "/proxy/models/load", json={"model": MODEL}) as r:
        assert r.status == 401
    assert access_lines(keyed, caplog) == []
