"""Connection limits: slow and silent clients, idle keep-alive, the connection cap, a client
that stops reading a stream, and the open-file limit."""
from __future__ import annotations

import asyncio
import logging
import resource
import socket

import orjson
import pytest

from proxy.server.serving import PROBE_ROOM, connection_cap, raise_fd_limit

MODEL = "qwen/qwen3-4b"


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (bounded by the test timeout)."""
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
    return data


async def taken_by_server(proxy) -> None:
    """Until the server's one connection has read what was sent (server and client share this
    event loop: it reads on a later turn), bounded by a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    (proto,) = proxy.served.runner.server.connections
    while not proto._head_seen and loop.time() < deadline:
        await asyncio.sleep(0)


async def test_a_silent_connection_is_closed_at_the_header_deadline(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"server.header_timeout_s": 0.2})
    reader, writer = await connect(proxy.url)
    assert await asyncio.wait_for(closed_by_server(reader), 5) == b""
    writer.close()


async def test_slow_headers_are_cut_off(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"server.header_timeout_s": 0.2})
    reader, writer = await connect(proxy.url)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert await asyncio.wait_for(closed_by_server(reader), 5) == b""
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"server.keepalive_timeout_s": 0.2})
    reader, writer = await connect(proxy.url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = await asyncio.wait_for(closed_by_server(reader), 5)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}')
    writer.close()


async def test_connections_past_the_cap_get_503_and_the_proxy_recovers(make_proxy, emulator,
                                                                      http):
    proxy = await make_proxy(emulator.url, **{"server.max_connections": 3})
    held = [await connect(proxy.url) for _ in range(3)]
    answers = []
    for request in (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b""):   # b"": silent
        reader, writer = await connect(proxy.url)
        writer.write(request)
        answers.append(await closed_by_server(reader))
        writer.close()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert orjson.loads(body)["error"]["code"] == "too_many_connections"
    for _, w in held:
        w.close()
        await w.wait_closed()
    for _ in range(50):   # the server notices the closes on its next loop turns
        async with http.get(f"{proxy.url}/v1/models") as resp:
            if resp.status == 200:
                break
    assert resp.status == 200


async def test_probes_are_answered_while_the_connection_cap_is_reached(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"server.max_connections": 3})
    held = [await connect(proxy.url) for _ in range(3 + PROBE_ROOM // 2)]   # idle, past the cap
    for probe in (b"GET /healthz", b"GET /readyz", b"HEAD /healthz", b"GET /healthz?x=1"):
        reader, writer = await connect(proxy.url)
        writer.write(probe + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await closed_by_server(reader)     # one request, then the server closes
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
    reader, writer = await connect(proxy.url)       # a probe's room serves nothing else
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v1/models HTTP/1.1\r\n"
                 b"Host: 127.0.0.1\r\n\r\n")
    answer = await closed_by_server(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
    for _, w in held:
        w.close()


async def test_a_silent_connection_in_the_probes_room_is_let_go_within_seconds(make_proxy,
                                                                              emulator):
    """Past the cap a connection is held a second at most for its probe's head, however long
    server.header_timeout_s gives an ordinary one."""
    proxy = await make_proxy(emulator.url, **{"server.max_connections": 1,
                                              "server.header_timeout_s": 30})
    _, ordinary = await connect(proxy.url)           # silent: holds the cap for 30 s
    reader, writer = await connect(proxy.url)        # silent, in the probes' room
    answer = await asyncio.wait_for(closed_by_server(reader), 5)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    writer.close()
    ordinary.close()


async def test_a_client_that_stops_reading_has_its_stream_ended_and_lease_released(
        make_proxy, emulator, caplog):
    # A stream large enough to fill every socket buffer on the way, to a client that reads
    # none of it.
    proxy = await make_proxy(emulator.url, **{"server.stall_timeout_s": 0.3})
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # fills at once
    sock.connect((host, int(port)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    body = orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 200_000,
                         "messages": [{"role": "user", "content": "go"}]})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    state = emulator.state
    await state.wait_for(lambda: state.cancelled_streams == 1)   # the proxy let go upstream
    assert proxy.engine.active_leases() == []
    assert proxy.engine.usage(MODEL).requests == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]   # no traceback
    writer.close()
    reader, writer = await connect(proxy.url)             # and the proxy serves on
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 200")
    writer.close()


@pytest.fixture
def restore_fd_limit():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_fd_soft_limit_is_raised_to_the_hard_limit(restore_fd_limit):
    soft, hard = restore_fd_limit
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip("needs a finite hard limit of at least 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    assert raise_fd_limit() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_the_connection_cap_fits_the_fd_limit(restore_fd_limit):
    soft, hard = restore_fd_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 264), hard))
    assert connection_cap(1000) == (min(hard, 264) - 64) // 2
    resource.setrlimit(resource.RLIMIT_NOFILE, restore_fd_limit)
    assert connection_cap(10) == 10


async def test_a_crowd_of_slow_and_silent_clients_is_shed_while_others_are_served(
        make_proxy, emulator, http):
    proxy = await make_proxy(emulator.url, **{"server.header_timeout_s": 0.5,
                                              "server.body_timeout_s": 0.5})
    silent = [await connect(proxy.url) for _ in range(60)]
    slow_headers = [await connect(proxy.url) for _ in range(60)]
    trickling = [await connect(proxy.url) for _ in range(30)]
    for _, w in slow_headers:
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for _, w in trickling:
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Length: 500\r\n\r\n{")
    async with http.get(f"{proxy.url}/healthz") as resp:     # served while the crowd waits
        assert resp.status == 200
    answers = await asyncio.wait_for(asyncio.gather(
        *(closed_by_server(r) for r, _ in silent + slow_headers + trickling)), 10)
    assert set(answers[:120]) == {b""}
    assert all(a.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in a
               for a in answers[120:])
    for _, w in silent + slow_headers + trickling:
        w.close()
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": []}) as resp:
        assert resp.status == 200
    assert proxy.engine.active_leases() == []


def test_the_aiohttp_internals_the_server_builds_on_are_pinned_and_in_place():
    """aiohttp has no public hook for its parser's 400, so serving.py subclasses its
    RequestHandler and starts a SockSite its own way: an aiohttp that changes either must fail
    here, and the pin in pyproject.toml keeps an untried one from being installed."""
    import inspect
    import tomllib
    from pathlib import Path

    import aiohttp
    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (pin,) = [Requirement(d) for d in pyproject["project"]["dependencies"]
              if d.startswith("aiohttp")]
    assert any(s.operator == "<" for s in pin.specifier), "aiohttp needs an upper bound"
    assert aiohttp.__version__ in pin.specifier
    assert list(inspect.signature(RequestHandler.handle_error).parameters) == [
        "self", "request", "status", "exc", "message"]
    assert list(inspect.signature(RequestHandler.data_received).parameters) == ["self", "data"]
    assert {"manager", "loop", "keepalive_timeout", "lingering_time", "access_log",
            "access_log_class", "auto_decompress"} <= set(
        inspect.signature(RequestHandler.__init__).parameters)
    assert callable(RequestHandler.force_close) and callable(RequestHandler.close)
    assert callable(web.AppRunner._reg_site)
    source = inspect.getsource(web.SockSite)
    assert "self._sock = sock" in source and "self._backlog" in inspect.getsource(web.BaseSite)


async def test_a_probe_past_the_cap_may_arrive_in_pieces(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"server.max_connections": 2})
    held = [await connect(proxy.url) for _ in range(2)]
    reader, writer = await connect(proxy.url)
    for piece in (b"GET /hea", b"lthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 3000 + b"\r",
                  b"\n\r", b"\n"):
        writer.write(piece)
        await writer.drain()
    assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 200")
    writer.close()
    for _, w in held:
        w.close()


async def test_a_head_whose_end_arrives_split_meets_the_header_deadline(make_proxy, emulator):
    """CRLF CRLF across two packets still ends the head: the deadline does not later cut the
    kept-alive connection it already served."""
    proxy = await make_proxy(emulator.url, **{"server.header_timeout_s": 0.2,
                                              "server.keepalive_timeout_s": 30})
    reader, writer = await connect(proxy.url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r")
    await writer.drain()
    await taken_by_server(proxy)                      # the second piece comes on its own
    writer.write(b"\n")
    assert (await reader.readuntil(b'{"status":"ok"}')).startswith(b"HTTP/1.1 200")
    with pytest.raises(asyncio.TimeoutError):         # past the deadline, still open
        await asyncio.wait_for(reader.read(1), 1.0)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await reader.readuntil(b'{"status":"ok"}')).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_probe_path_with_another_method_is_no_probe(make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"server.max_connections": 2})
    held = [await connect(proxy.url) for _ in range(2)]
    reader, writer = await connect(proxy.url)
    writer.write(b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
    answer = await closed_by_server(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
    for _, w in held:
        w.close()


async def test_healthz_answers_while_slow_clients_keep_every_probe_room_filled(make_proxy,
                                                                              emulator):
    """An attacker keeps more connections than the cap and the probes' room open, each with
    a probe's request line and never the rest of its head, reopening every one the proxy
    closes: each /healthz still gets its 200 (an unfinished head in a probe's room gives way
    to the newest connection)."""
    cap = 2
    proxy = await make_proxy(emulator.url, **{"server.max_connections": cap,
                                              "server.header_timeout_s": 30})
    server = proxy.served.runner.server
    open_now: set[asyncio.StreamWriter] = set()

    async def slow_client() -> None:   # one attacker's socket, reopened as soon as it closes
        while True:
            reader, writer = await connect(proxy.url)
            open_now.add(writer)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            await closed_by_server(reader)
            open_now.discard(writer)
            writer.close()

    attackers = [asyncio.create_task(slow_client()) for _ in range(cap + PROBE_ROOM + 8)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(server.connections) < cap + PROBE_ROOM and loop.time() < deadline:
        await asyncio.sleep(0)          # until the server holds the cap and the whole room
    assert len(server.connections) >= cap + PROBE_ROOM
    answers = []
    for _ in range(10):
        reader, writer = await connect(proxy.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answers.append((await closed_by_server(reader)).split(b"\r\n", 1)[0])
        writer.close()
    for task in attackers:
        task.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    for w in open_now:
        w.close()
    assert answers == [b"HTTP/1.1 200 OK"] * 10


async def test_a_burst_of_connections_does_not_pass_the_cap(make_proxy, emulator):
    """Connections the kernel queued all at once are accepted in one pass of the loop, before
    aiohttp lists any of them: they are counted as they are accepted, so the cap and the
    probes' room hold and the rest are answered 503."""
    cap, extra = 2, 10
    proxy = await make_proxy(emulator.url, **{"server.max_connections": cap})
    host, port = proxy.url.removeprefix("http://").split(":")
    burst = [socket.create_connection((host, int(port))) for _ in range(cap + PROBE_ROOM + extra)]
    for s in burst:
        s.setblocking(False)

    def refused() -> int:
        count = 0
        for s in burst:
            try:
                count += s.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 503"
            except BlockingIOError:
                pass
        return count

    server = proxy.served.runner.server
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(server.connections) + refused() < len(burst) and loop.time() < deadline:
        await asyncio.sleep(0)
    assert (len(server.connections), refused()) == (cap + PROBE_ROOM, extra)
    for s in burst:
        s.close()
