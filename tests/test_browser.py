"""Web pages against a proxy with no auth: requests another site's page sends (a text/plain POST
and a websocket need no CORS permission) and DNS rebinding (a page whose own name comes to
resolve to 127.0.0.1) are refused by Host and Origin, with real sockets; clients that are not
browsers (no Origin, a loopback Host) are not affected. The same in a real Chromium:
test_dashboard.py."""
from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from proxy.app import create_app
from proxy.configload import load_config
from proxy.errors import ConfigError
from proxy.server.serving import serve

from .conftest import Proxy, proxy_config

MODEL = "qwen/qwen3-4b"
EVIL = "https://evil.example"
REBIND = "attacker.rebind.example"
CHANGES = [("/proxy/models/unload", {"model": MODEL}), ("/proxy/models/load", {"model": MODEL}),
           ("/proxy/models/pin", {"model": MODEL}), ("/proxy/optimize", {}),
           ("/proxy/clear", {}), ("/proxy/reload", {}),
           ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": []})]


def text_plain(body: dict) -> dict:
    """What `fetch(url, {method: "POST", mode: "no-cors", body})` sends: no preflight."""
    import orjson
    return {"data": orjson.dumps(body), "headers": {"Content-Type": "text/plain;charset=UTF-8"}}


async def load(http, proxy: Proxy) -> None:
    async with http.post(f"{proxy.url}/proxy/models/load", json={"model": MODEL}) as r:
        assert r.status == 200, await r.text()


async def error_of(resp: aiohttp.ClientResponse) -> dict:
    return (await resp.json())["error"]


@pytest.mark.parametrize("path, body", CHANGES)
async def test_another_sites_page_changes_nothing(proxy, emulator, http, path, body):
    """The reported hole: `curl -H 'Origin: https://evil.example' -H 'content-type:
    text/plain'` unloaded a model. Now a 403 naming the key that would allow that origin."""
    await load(http, proxy)
    loads, unloads = dict(emulator.state.load_calls), dict(emulator.state.unload_calls)
    kw = text_plain(body)
    kw["headers"]["Origin"] = EVIL
    async with http.post(proxy.url + path, **kw) as r:
        assert r.status == 403
        error = await error_of(r)
    assert error["code"] == "origin_not_allowed" and error["type"] == "invalid_request_error"
    assert EVIL in error["message"] and "server.allowed_origins" in error["message"]
    assert r.headers["x-should-retry"] == "false"
    assert [i.model.key for i in emulator.state.instances_of(MODEL)] == [MODEL]
    assert (dict(emulator.state.load_calls), dict(emulator.state.unload_calls)) == (loads, unloads)
    assert not proxy.engine.pinned(MODEL)
    async with http.get(f"{proxy.url}/proxy/stats") as r:
        assert (await r.json())["auth"]["rejected"] == {"origin_not_allowed": 1}


@pytest.mark.parametrize("origin", ["null", "http://localhost:{port}", "https://127.0.0.1:{port}x",
                                    "http://127.0.0.1:{other}", "http://127.0.0.1"])
async def test_an_origin_that_is_not_the_proxys_own_is_refused(proxy, http, origin):
    """`null` is a sandboxed frame or a file; localhost:port is another origin than the
    127.0.0.1:port the request names (a different site to the browser)."""
    """Another port of the same name is another site too (any local web app)."""
    port = proxy.served.port
    headers = {"Origin": origin.format(port=port, other=port + 1 if port < 65535 else 1)}
    async with http.post(f"{proxy.url}/proxy/optimize", headers=headers) as r:
        assert r.status == 403 and (await error_of(r))["code"] == "origin_not_allowed"


async def test_the_proxys_own_page_no_origin_and_allowed_origins_go_on(make_proxy, emulator,
                                                                        http):
    proxy = await make_proxy(emulator.url, **{
        "server.allowed_origins": ["http://localhost:3000", "https://chat.example.com:443"]})
    own = f"http://127.0.0.1:{proxy.served.port}"
    for origin in (own, own.upper(), "http://localhost:3000", "https://chat.example.com", None):
        headers = {"Origin": origin} if origin else {}
        async with http.post(f"{proxy.url}/proxy/models/load", json={"model": MODEL},
                             headers=headers) as r:
            assert r.status == 200, (origin, await r.text())
    async with http.post(f"{proxy.url}/proxy/optimize",
                         headers={"Origin": "http://localhost:3001"}) as r:
        assert r.status == 403


async def test_reads_from_another_site_are_left_to_the_browser(proxy, http):
    """A GET changes nothing, and without CORS headers no other site's page may read the
    answer: an Origin on a GET is no reason to refuse (the dashboard's own fetches carry none)."""
    async with http.get(f"{proxy.url}/proxy/stats", headers={"Origin": EVIL}) as r:
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_a_websocket_from_another_site_is_refused_before_the_upgrade(proxy):
    """LM Studio's protocol over a websocket drives loads; browsers open websockets to any
    site with no CORS check, but send their Origin."""
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"{proxy.url}/llm", headers={"Origin": EVIL})
        assert refused.value.status == 403
        for headers in ({}, {"Origin": f"http://127.0.0.1:{proxy.served.port}"}):
            async with s.ws_connect(f"{proxy.url}/llm", headers=headers) as ws:
                assert not ws.closed


ROUTES = [("GET", "/proxy/stats"), ("GET", "/proxy/models"), ("GET", "/proxy/events"),
          ("GET", "/proxy/timeline"), ("GET", "/proxy/health"), ("GET", "/metrics"),
          ("GET", "/ui/"), ("GET", "/v1/models"), ("GET", "/lmstudio-greeting"),
          ("POST", "/v1/chat/completions"), ("POST", "/proxy/models/unload")]


@pytest.mark.parametrize("method, path", ROUTES)
async def test_a_rebound_name_is_refused_on_every_route(proxy, http, method, path):
    """DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends it as Host,
    and its requests are same-origin (Origin equals Host): only the Host can tell."""
    port = proxy.served.port
    headers = {"Host": f"{REBIND}:{port}", "Origin": f"http://{REBIND}:{port}"}
    kw = {"json": {"model": MODEL}} if method == "POST" else {}
    async with http.request(method, proxy.url + path, headers=headers, **kw) as r:
        assert r.status == 421
        error = await error_of(r)
    assert error["code"] == "host_not_allowed"
    assert REBIND in error["message"] and "server.allowed_hosts" in error["message"]


async def test_a_rebound_name_cannot_open_a_websocket(proxy):
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"{proxy.url}/llm", headers={"Host": REBIND})
        assert refused.value.status == 421


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}",
                                  "localhost", "127.0.0.2", "[::1]:{port}", "proxy.lan:8080",
                                  "a.svc.cluster.local", "[::ffff:127.0.0.1]:{port}"])
async def test_loopback_names_and_configured_names_are_answered(make_proxy, emulator, http,
                                                                 host):
    proxy = await make_proxy(emulator.url, **{
        "server.allowed_hosts": ["proxy.lan", "*.svc.cluster.local"]})
    async with http.get(f"{proxy.url}/proxy/stats",
                        headers={"Host": host.format(port=proxy.served.port)}) as r:
        assert r.status == 200, await r.text()
    # ... and names no browser sends: unparsable Hosts are no name of this proxy
    for other in ("svc.cluster.local", "proxy.lan.evil.example", "10.0.0.5", "localhost:99999",
                  "[localhost]", "localhost:http"):
        async with http.get(f"{proxy.url}/proxy/stats", headers={"Host": other}) as r:
            assert r.status == 421, other


async def test_a_request_without_host_is_no_browser_and_goes_on(proxy):
    """HTTP/1.0 has no Host; no browser sends such a request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.served.port)
    writer.write(b"GET /proxy/stats HTTP/1.0\r\n\r\n")
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.split()[1] == b"200"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_answer_whatever_host_they_name(proxy, http, path):
    """kubelet's httpGet probes send the pod's IP as Host."""
    async with http.get(proxy.url + path, headers={"Host": "10.244.1.7:8080"}) as r:
        assert r.status == 200


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_bound_wider_every_name_is_answered_until_names_are_configured(emulator, http):
    """Behind a Service or on a LAN the proxy is reached by names it cannot know (and needs
    keys there); once allowed_hosts is set, other names are refused, while the address the
    connection arrived at (a pod's IP, as kubelet and `curl <ip>` send it) still answers."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    for allowed, name, status in (((), "lmstudio-proxy.default.svc:8080", 200),
                                  (("proxy.lan",), "other.example", 421),
                                  (("proxy.lan",), "proxy.lan", 200),
                                  (("proxy.lan",), "{address}:{port}", 200),
                                  (("proxy.lan",), "10.9.9.9", 421),
                                  # the wildcard bind is no name clients use
                                  (("proxy.lan",), "0.0.0.0:{port}", 421)):
        config = proxy_config(emulator.url, **{"server.host": "0.0.0.0",
                                               "server.allowed_hosts": list(allowed)})
        served = await serve(create_app(config), host="0.0.0.0")
        try:
            host = name.format(address=address, port=served.port)
            async with http.get(f"http://{address}:{served.port}/v1/models",
                                headers={"Host": host}) as r:
                assert r.status == status, (allowed, host)
        finally:
            await served.close()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
async def test_an_admin_body_that_is_not_json_is_refused(proxy, emulator, http, content_type):
    """The kinds of body a page elsewhere can send without a preflight (a Blob: no type at
    all) are refused even with no Origin; a JSON type needs a preflight, never granted."""
    await load(http, proxy)
    headers = {"Content-Type": content_type} if content_type else {}
    async with http.post(f"{proxy.url}/proxy/models/unload", data=b'{"model": "%s"}' %
                         MODEL.encode(), headers=headers,
                         skip_auto_headers=["Content-Type"]) as r:
        assert r.status == 415
        error = await error_of(r)
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"] and (content_type or "none") in error["message"]
    assert emulator.state.instances_of(MODEL)


async def test_json_bodies_and_bodyless_admin_posts_go_on(proxy, emulator, http):
    async with http.post(f"{proxy.url}/proxy/models/load", data=b'{"model": "%s"}' %
                         MODEL.encode(), headers={"Content-Type": "application/json; "
                                                  "charset=utf-8"}) as r:
        assert r.status == 200
    async with http.post(f"{proxy.url}/proxy/optimize") as r:     # curl -X POST
        assert r.status == 200
    async with http.post(f"{proxy.url}/proxy/models/unload", data=b'{"model": "%s"}' %
                         MODEL.encode(), headers={"Content-Type":
                                                  "application/merge-patch+json"}) as r:
        assert r.status == 200 and not emulator.state.instances_of(MODEL)   # a JSON type too


def test_allowed_hosts_and_origins_are_validated_with_their_paths():
    with pytest.raises(ConfigError) as bad:
        load_config({"server": {"allowed_hosts": ["proxy.lan", "http://x", "a:80", "*.ok", "*",
                                                  "proxy lan", "[proxy.lan]"],
                                "allowed_origins": ["https://a.example/x", "null",
                                                    "http://localhost:3000", "*",
                                                    "http://localhost:70000", "http://a b"]}})
    assert [p.split(":")[0] for p in bad.value.problems] == [
        "server.allowed_hosts[1]", "server.allowed_hosts[2]", "server.allowed_hosts[5]",
        "server.allowed_hosts[6]", "server.allowed_origins[0]", "server.allowed_origins[1]",
        "server.allowed_origins[4]", "server.allowed_origins[5]"]


async def test_a_star_in_the_lists_allows_any_name_and_any_origin(make_proxy, emulator, http):
    """allowed_hosts: ['*'] on loopback (a reverse proxy in front, naming it as it likes);
    allowed_origins: ['*'] (the operator's choice: any page may change state)."""
    proxy = await make_proxy(emulator.url, **{"server.allowed_hosts": ["*"],
                                              "server.allowed_origins": ["*"]})
    async with http.get(f"{proxy.url}/proxy/stats", headers={"Host": REBIND}) as r:
        assert r.status == 200, await r.text()
    async with http.post(f"{proxy.url}/proxy/models/load", json={"model": MODEL},
                         headers={"Origin": EVIL}) as r:
        assert r.status == 200, await r.text()
    assert emulator.state.instances_of(MODEL)


async def raw_status(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return (await asyncio.wait_for(reader.readline(), 10)).split()[1]
    finally:
        writer.close()


async def test_a_websocket_upgrade_is_known_in_any_spelling(proxy):
    """Upgrade's value is case-insensitive (RFC 9110): 'WebSocket' opens a websocket too."""
    port = proxy.served.port
    status = await raw_status(port, (
        f"GET /llm HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: WebSocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {EVIL}\r\n\r\n").encode())
    assert status == b"403"


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
async def test_every_state_changing_method_is_checked(emulator, http, method):
    """Not only POST: a route that takes any method (/mcp ends sessions with DELETE) gets the
    same rule for the others."""
    from proxy.mcp.http import mount_mcp
    app = create_app(proxy_config(emulator.url))
    mount_mcp(app)
    served = await serve(app)
    try:
        async with http.request(method, f"http://127.0.0.1:{served.port}/mcp",
                                headers={"Origin": EVIL}) as r:
            assert r.status == 403, await r.text()
            assert (await error_of(r))["code"] == "origin_not_allowed"
    finally:
        await served.close()


def test_the_rule_remembers_only_hosts_it_allowed_and_only_so_many():
    from proxy.origins import ALLOWED_CACHE_MAX, BrowserRule
    rule = BrowserRule.of("127.0.0.1", (), ())
    for _ in range(2):                   # asked again, a refused name is still refused
        assert not rule.host_allowed("evil.example", "127.0.0.1")
        assert rule.host_allowed("127.0.0.1:8080", "127.0.0.1")
    for port in range(2 * ALLOWED_CACHE_MAX):
        assert rule.host_allowed(f"localhost:{port}", "127.0.0.1")
    assert len(rule._allowed) == ALLOWED_CACHE_MAX
