"""Soak: minutes of mixed traffic through real proxy processes, with client aborts and faults.

    python -m bench.soak [--duration-s 180 | --minutes M] [--concurrency 24] [--json FILE]
                         [--replicas N --state redis]

Starts the LM Studio emulator and the proxy (with client keys and an admin token) as their own
processes — with `--replicas 2 --state redis`, two replicas sharing a throwaway `redis-server`
— then runs workers that each pick, per request and replica: a plain or streamed completion,
an embedding, a stream the client aborts after its first event, a client that stalls
mid-stream (for longer than `server.stall_timeout_s`), a gzip body, a malformed body, an
unknown model, a wrong key, an admin load/unload, a cold model that does not fit beside the
others (a load that evicts). Every few seconds a fault is switched on in the emulator for a
while (inference 500s, streams cut mid-way, a slow first token). It samples each replica's RSS
and open file descriptors, and Redis's key count, every few seconds, once more at the end and
after an idle while, judges them flat or not (bench/soak_samples.py), and reports outcomes by
kind: statuses, and client-side errors (expected for aborts and cut streams).
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from . import soak_samples
from .overhead import Servers, free_port

KEY, ADMIN = "sk-soak", "soak-admin"
MODELS = ["qwen/qwen3-4b", "google/gemma-3-12b"]
COLD = "openai/gpt-oss-20b"        # 13.5 GB: beside the two above it overflows the 24 GB budget
PREFIX = "soak:"
FAULTS = [{"inference_status": 500}, {"drop_stream_after_chunks": 3},
          {"first_token_delay_s": 1.0}]
CLEAR = {"inference_status": 0, "drop_stream_after_chunks": None, "first_token_delay_s": 0}
STALL_TIMEOUT_S = 2


class Soak:
    def __init__(self, workdir: Path, seed: int, storage: bool = True, replicas: int = 1,
                 state: str = "memory") -> None:
        self.workdir = workdir
        self.storage = storage
        self.state = state
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.per_replica: Counter[int] = Counter()      # requests sent to each replica
        self.emulator_port = free_port()
        self.proxy_ports = [free_port() for _ in range(replicas)]
        self.procs: Servers | None = None
        self.redis: Any = None       # tests.redis_server.RedisServer with --state redis
        self.sampler: soak_samples.Sampler | None = None

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.proxy_ports]

    @property
    def emulator_url(self) -> str:
        return f"http://127.0.0.1:{self.emulator_port}"

    def start(self) -> None:
        servers = Servers(self.workdir, [], "asyncio")
        py = sys.executable
        servers._spawn("emulator", [py, "-m", "proxy.emulator", "--port",
                                    str(self.emulator_port), "--load-time-scale", "0.02",
                                    "--tokens-per-s", "200", "--capacity-gb", "64"],
                       f"{self.emulator_url}/lmstudio-greeting")
        state: dict[str, Any] = {"backend": self.state}
        if self.state == "redis":
            import shutil
            from tests.redis_server import INSTALL_HINT, RedisServer
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit(f"--state redis needs redis-server ({INSTALL_HINT})")
            (self.workdir / "redis").mkdir()
            self.redis = RedisServer(binary, self.workdir / "redis").start()
            state.update(url=self.redis.url, key_prefix=PREFIX)
        self.procs = servers
        for i, port in enumerate(self.proxy_ports):
            config = self.workdir / f"proxy{i}.yaml"
            replica = {"replica_id": f"replica-{i + 1}"} if self.state == "redis" else {}
            config.write_text(json.dumps({
                "server": {"port": port, "stall_timeout_s": STALL_TIMEOUT_S,
                           "max_body_bytes": 1 << 20, "shutdown_timeout_s": 5},
                "upstream": {"url": self.emulator_url},
                "memory": {"sampler": "budget", "budget_gb": 24, "min_free_memory_gb": 0},
                "eviction": {"hold": 0, "queue_timeout_s": 5},
                "storage": {"path": str(self.workdir / f"history{i}.sqlite3"),
                            "enabled": self.storage},
                "state": {**state, **replica},
                "logging": {"level": "WARNING"},
                "auth": {"keys": [{"name": "soak", "key": KEY}], "admin_token": ADMIN}}))
            servers._spawn(f"proxy{i}", [py, "-m", "proxy", "--config", str(config)],
                           f"{self.urls[i]}/healthz")
        self.sampler = soak_samples.Sampler(
            [servers.procs[f"proxy{i}"].pid for i in range(len(self.proxy_ports))],
            self.redis.port if self.redis is not None else None, PREFIX)

    async def one(self, http: aiohttp.ClientSession) -> None:
        rng = self.rng
        kind = rng.choices(["chat", "stream", "embed", "abort", "stall", "gzip", "bad",
                            "unknown", "wrong_key", "admin", "cold"],
                           [30, 25, 8, 10, 1, 5, 6, 5, 5, 2, 2])[0]
        replica = rng.randrange(len(self.urls))
        url = self.urls[replica]
        self.per_replica[replica] += 1
        auth = {"Authorization": f"Bearer {ADMIN if kind == 'admin' else KEY}"}
        if kind == "wrong_key":
            auth = {"Authorization": "Bearer sk-nope"}
        model = COLD if kind == "cold" else rng.choice(MODELS)
        body: Any = {"model": model, "max_tokens": rng.randint(1, 40),
                     "messages": [{"role": "user", "content": "soak"}],
                     "stream": kind in ("stream", "abort", "stall")}
        path, data = "/v1/chat/completions", None
        headers = dict(auth)
        if kind == "embed":
            path, body = "/v1/embeddings", {"model": "text-embedding-nomic-embed-text-v1.5",
                                            "input": "soak"}
        elif kind == "unknown":
            body["model"] = "no/such-model"
        elif kind == "stall":
            return await self.stall(url, orjson.dumps({**body, "max_tokens": 1000}))
        elif kind == "admin":
            path = rng.choice(["/proxy/models/load", "/proxy/models/unload"])
            body = {"model": model}
        raw = orjson.dumps(body)
        if kind == "gzip":
            data, headers["Content-Encoding"] = gzip.compress(raw), "gzip"
        elif kind == "bad":
            data = raw[: rng.randrange(len(raw))]
        else:
            data = raw
        try:
            async with http.post(url + path, data=data, headers=headers) as resp:
                if kind == "abort" and resp.status == 200:
                    await resp.content.readuntil(b"\n\n")
                    resp.close()                  # the client goes away mid-stream
                    self.outcomes[f"{kind} aborted"] += 1
                    return
                raw_body = await resp.read()
                label = f"{kind} {resp.status}"
                if resp.status >= 500:     # whose: the proxy's code, or LM Studio's message
                    label += " " + _error_code(raw_body)
                self.outcomes[label] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.outcomes[f"{kind} client error {type(exc).__name__}"] += 1

    async def stall(self, url: str, body: bytes) -> None:
        """A client with a tiny receive buffer that stops reading a stream for a while. Whether
        the proxy has to cut it depends on whether the kernel's buffers filled meanwhile (at
        this pace they mostly do not: it then completes); either way nothing may be held."""
        import socket
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", int(url.rsplit(":", 1)[1])))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: "
                     b"Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                     b"\r\n\r\n%s" % (KEY.encode(), len(body), body))
        await asyncio.sleep(STALL_TIMEOUT_S * 4)         # reads nothing meanwhile
        data = b""
        try:
            async with asyncio.timeout(10):
                while chunk := await reader.read(1 << 20):
                    data += chunk
                    if data.endswith(b"0\r\n\r\n"):    # the chunked stream's end
                        break
            outcome = "completed after the pause" if b"[DONE]" in data else "cut before [DONE]"
        except (ConnectionError, TimeoutError) as exc:
            outcome = f"client error {type(exc).__name__}"
        finally:
            writer.close()
        self.outcomes[f"stall {outcome}"] += 1

    async def faults(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.rng.uniform(4, 8))
            fault = self.rng.choice(FAULTS)
            async with http.post(f"{self.emulator_url}/__emulator__/faults", json=fault):
                self.outcomes[f"fault {next(iter(fault))}"] += 1
            await asyncio.sleep(self.rng.uniform(1, 3))
            async with http.post(f"{self.emulator_url}/__emulator__/faults", json=CLEAR):
                pass

    async def run(self, duration_s: float, concurrency: int, idle_s: float
                  ) -> dict[str, Any]:
        stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(50):    # warm up: both models loaded, pools filled
                await self.one(http)
            self.outcomes.clear()
            self.per_replica.clear()
            assert self.sampler is not None
            started = time.monotonic()
            self.sampler.sample("start", 0.0)
            every_s = min(5.0, max(0.5, duration_s / 30))

            async def worker() -> None:
                while not stop.is_set():
                    await self.one(http)

            async def sampler() -> None:
                while not stop.is_set():
                    await asyncio.sleep(every_s)
                    t_s = time.monotonic() - started
                    self.sampler.sample(f"{t_s:.0f}s", t_s)

            tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
            side = [asyncio.create_task(self.faults(http, stop)),
                    asyncio.create_task(sampler())]
            await asyncio.sleep(duration_s)
            stop.set()
            await asyncio.gather(*tasks)
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            async with http.post(f"{self.emulator_url}/__emulator__/faults", json=CLEAR):
                pass
            elapsed = time.monotonic() - started
            await asyncio.sleep(STALL_TIMEOUT_S + 1)     # let closing connections settle
            self.sampler.sample("end", None)
            healthy = []
            for url in self.urls:
                async with http.get(f"{url}/readyz") as resp:
                    healthy.append(resp.status == 200)
        # Pooled keep-alive connections (to LM Studio: 30 s) close when idle, and leases lapse
        # (state.lease_ttl_s); then, again.
        await asyncio.sleep(idle_s)
        self.sampler.sample("idle", None)
        samples = self.sampler.samples
        total = sum(v for k, v in self.outcomes.items() if not k.startswith("fault"))
        # 5xx the proxy made itself: those with one of its error codes (LM Studio's injected
        # failures carry none and pass through unchanged).
        server_errors = {k: v for k, v in self.outcomes.items()
                         if " 5" in k and not k.endswith(" upstream")}
        return {"duration_s": round(elapsed, 1), "concurrency": concurrency,
                "replicas": len(self.urls), "state": self.state,
                "requests": total, "requests_per_s": round(total / elapsed, 1),
                "requests_per_replica": [self.per_replica[i] for i in range(len(self.urls))],
                "healthy_after": healthy, "server_errors": server_errors,
                "verdict": soak_samples.verdict(samples),
                "outcomes": dict(sorted(self.outcomes.items())), "samples": samples}

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        if self.procs is not None:
            self.procs.stop()
        if self.redis is not None:
            self.redis.stop()


def _error_code(raw: bytes) -> str:
    try:
        error = orjson.loads(raw)["error"]
        return str(error.get("code")) if error.get("code") else "upstream"
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "upstream"


def render(r: dict[str, Any]) -> str:
    lines = [f"{r['requests']} requests in {r['duration_s']} s ({r['requests_per_s']}/s) at "
             f"concurrency {r['concurrency']}, {r['replicas']} replica(s) (requests: "
             f"{', '.join(map(str, r['requests_per_replica']))}), state: {r['state']}; "
             f"ready after: {r['healthy_after']}",
             f"5xx made by the proxy: {r['server_errors'] or 'none'}", "",
             soak_samples.render(r), "", "outcomes:"]
    lines += [f"  {k:<45} {v}" for k, v in r["outcomes"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=180.0)
    p.add_argument("--minutes", type=float, help="the duration in minutes instead")
    p.add_argument("--replicas", type=int, default=1, help="proxy processes, all under load")
    p.add_argument("--state", choices=("memory", "redis"), default="memory",
                   help="redis: the replicas share a throwaway redis-server")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--idle-s", type=float, default=35.0,
                   help="sample once more after this long idle (pools drain)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--no-storage", action="store_true",
                   help="run the proxy without its SQLite history (tells its memory apart)")
    args = p.parse_args(argv)
    if args.replicas > 1 and args.state != "redis":
        p.error("--replicas above 1 needs --state redis (replicas alone would fight)")
    duration_s = args.minutes * 60 if args.minutes is not None else args.duration_s
    with tempfile.TemporaryDirectory() as tmp:
        soak = Soak(Path(tmp), args.seed, storage=not args.no_storage,
                    replicas=args.replicas, state=args.state)
        try:
            soak.start()
            result = asyncio.run(soak.run(duration_s, args.concurrency, args.idle_s))
        finally:
            soak.stop()
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
