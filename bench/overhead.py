"""Overhead of the proxy against no proxy, the floor of a Python relay, and Caddy.

    python -m bench.overhead [--rounds 3] [--duration-s 5] [--dashboard] [--json FILE]
                             [--baseline DIR] [--state redis]

Starts, each in its own process on loopback: the LM Studio emulator with no load time and no
per-token delay, the reference relay (bench/relay.py), Caddy's reverse_proxy when `caddy` is
installed (a Go proxy; the column is left out without it), and the proxy as users run it (its
default configuration, the model loaded) — once with each forwarding client (`upstream.client`
fast and aiohttp). Non-streaming load comes from wrk (a Lua body script) at concurrency 1, 16
and 64; streaming from an async Python client at concurrency 16. Targets run back to back in
rotating order (each load level on every target back to back) for several rounds; medians
are reported, with the ratios proxy / relay,
proxy / Caddy and proxy / direct, which are the figures that hold on a noisy machine.
With --dashboard a headless Chromium keeps the proxy's dashboard (/ui, live on the event
stream) open throughout, and the event stream's own figures (events per second, bytes sent per
client) are reported. With --baseline DIR, the proxy from another checkout (say the commit
before a change: `git archive HEAD~1 | tar -x -C DIR`) runs beside this one, with each client,
and the ratio proxy / baseline is reported.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil

from .jobs import machine_facts

MODEL = "qwen/qwen3-4b"
BODY = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi there"}]}
STREAM_BODY = {**BODY, "max_tokens": 24, "stream": True}     # 26 SSE events per response
CONCURRENCY = (1, 16, 64)
STREAM_CONCURRENCY = 16
TARGETS = ("direct", "relay", "caddy", "proxy", "proxy-aiohttp")
SERVED = ("relay", "caddy", "proxy", "proxy-aiohttp", "baseline",
          "baseline-aiohttp")   # CPU per request measured for these
PROXIES = (("proxy", "fast"), ("proxy-aiohttp", "aiohttp"), ("baseline", "fast"),
           ("baseline-aiohttp", "aiohttp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.1)


def post_json(url: str, data: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


class Servers:
    def __init__(self, workdir: Path, proxy_args: list[str], event_loop: str,
                 baseline: Path | None = None) -> None:
        self.event_loop = event_loop
        self.workdir = workdir
        self.baseline = baseline
        self.targets = tuple(t for t in TARGETS if t != "caddy" or shutil.which("caddy")) + \
            (("baseline", "baseline-aiohttp") if baseline else ())
        self.ports = {t: free_port() for t in self.targets}
        self.procs: dict[str, subprocess.Popen] = {}
        self.proxy_args = proxy_args

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.ports[target]}"

    def start(self) -> None:
        py = sys.executable
        emu = self.url("direct")
        self._spawn("direct", [py, "-m", "proxy.emulator", "--port", str(self.ports["direct"]),
                               "--load-time-scale", "0", "--tokens-per-s", "0",
                               "--capacity-gb", "64"], f"{emu}/lmstudio-greeting")
        self._spawn("relay", [py, "-m", "bench.relay", "--upstream", emu, "--port",
                              str(self.ports["relay"]), "--event-loop", self.event_loop],
                    f"{self.url('relay')}/v1/models")
        if "caddy" in self.targets:
            caddyfile = self.workdir / "Caddyfile"
            caddyfile.write_text("{\n\tadmin off\n\tauto_https off\n}\n"
                                 f"http://127.0.0.1:{self.ports['caddy']} {{\n"
                                 f"\treverse_proxy {emu}\n}}\n")
            self._spawn("caddy", ["caddy", "run", "--config", str(caddyfile), "--adapter",
                                  "caddyfile"], f"{self.url('caddy')}/lmstudio-greeting")
        for target, client in PROXIES:
            if target not in self.targets:
                continue
            config = self.workdir / f"{target}.yaml"
            config.write_text(f"storage:\n  path: {self.workdir / target}.sqlite3\n"
                              f"server:\n  event_loop: {self.event_loop}\n"
                              f"upstream:\n  client: {client}\n")
            self._spawn(target, [py, "-m", "proxy", "--config", str(config), "--port",
                                 str(self.ports[target]), "--upstream", emu, *self.proxy_args],
                        f"{self.url(target)}/readyz",
                        cwd=self.baseline if target.startswith("baseline") else None)
            post_json(f"{self.url(target)}/proxy/models/load", {"model": MODEL})

    def open_dashboard(self) -> None:
        from .browser import CHROMIUM_ARGS, chromium_path
        path = chromium_path()
        if path is None:
            raise RuntimeError("--dashboard needs Chromium: apt-get install chromium")
        log = open(self.workdir / "chromium.log", "w")
        self.procs["dashboard"] = subprocess.Popen(
            [path, "--headless", *CHROMIUM_ARGS, f"--user-data-dir={self.workdir / 'profile'}",
             f"{self.url('proxy')}/ui/"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not event_stats(self.url("proxy"))["clients"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard did not connect to the event stream")
            time.sleep(0.2)

    def _spawn(self, name: str, cmd: list[str], ready_url: str,
               cwd: Path | None = None) -> None:
        env = {**os.environ, "HOME": str(self.workdir), "XDG_DATA_HOME": str(self.workdir),
               "XDG_CONFIG_HOME": str(self.workdir)}
        with open(self.workdir / f"{name}.log", "w") as log:    # the child keeps its own copy
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=cwd or Path(__file__).resolve().parent.parent)
        wait_ready(ready_url)

    def process(self, target: str) -> psutil.Process:
        return psutil.Process(self.procs[target].pid)

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def event_stats(proxy_url: str) -> dict:
    with urllib.request.urlopen(f"{proxy_url}/proxy/events/stats", timeout=10) as resp:
        return json.loads(resp.read())


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, concurrency: int, duration_s: float, script: Path) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--latency", "-s",
         str(script), f"{url}/v1/chat/completions"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: float(v) * _UNITS[u] for p, v, u in
           re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50_ms": lat["50"], "p99_ms": lat["99"], "requests": total,
            "errors": int(errors.group(1)) if errors else 0}


async def stream_load(url: str, concurrency: int, per_worker: int) -> dict:
    ttfb, ttlb = [], []
    body = json.dumps(STREAM_BODY).encode()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker() -> None:
            for _ in range(per_worker):
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    first = True
                    async for _chunk in r.content.iter_any():
                        if first:
                            ttfb.append(time.perf_counter() - t0)
                            first = False
                    ttlb.append(time.perf_counter() - t0)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"ttfb_p50_ms": statistics.median(ttfb) * 1e3,
            "ttlb_p50_ms": statistics.median(ttlb) * 1e3,
            "ttfb_p99_ms": sorted(ttfb)[int(0.99 * (len(ttfb) - 1))] * 1e3,
            "requests": len(ttlb)}


def one_round(servers: Servers, order: list[str], duration_s: float, script: Path,
              stream_per_worker: int, results: dict[str, dict[str, list[float]]],
              served: dict[str, int]) -> None:
    """wrk at each concurrency, then the streaming client, on every target in `order`. Each
    load level runs on every target back to back, so the runs that a ratio compares are
    seconds apart, not a whole round."""
    for c in CONCURRENCY:
        for target in order:
            r = run_wrk(servers.url(target), c, duration_s, script)
            served[target] += r["requests"]
            for key in ("rps", "p50_ms", "p99_ms", "errors"):
                results[target].setdefault(f"{key}_c{c}", []).append(r[key])
    for target in order:
        s = asyncio.run(stream_load(servers.url(target), STREAM_CONCURRENCY, stream_per_worker))
        served[target] += s["requests"]
        for key in ("ttfb_p50_ms", "ttlb_p50_ms", "ttfb_p99_ms"):
            results[target].setdefault(key, []).append(s[key])


def measure(servers: Servers, rounds: int, duration_s: float, stream_per_worker: int,
            script: Path, soak_requests: int = 0) -> dict:
    targets = servers.targets
    results: dict[str, dict[str, list[float]]] = {t: {} for t in targets}
    procs = {t: servers.process(t) for t in SERVED if t in targets}
    proxy_proc = procs["proxy"]
    cpu = {t: [0.0, 0] for t in procs}
    rss_mb: dict = {"idle": proxy_proc.memory_info().rss / 1e6, "after_round": [],
                    "others_after": {}}
    served = {t: 0 for t in targets}
    for rnd in range(rounds):
        k = rnd % len(targets)
        order = targets[k:] + targets[:k]
        before = {t: p.cpu_times() for t, p in procs.items()}
        one_round(servers, order, duration_s, script, stream_per_worker, results, served)
        for target, p in procs.items():
            t, b = p.cpu_times(), before[target]
            cpu[target][0] += (t.user + t.system) - (b.user + b.system)
            cpu[target][1] = served[target]
        rss_mb["after_round"].append(proxy_proc.memory_info().rss / 1e6)
        print(f"round {rnd + 1}/{rounds} done; proxy RSS "
              f"{rss_mb['after_round'][-1]:.1f} MB", file=sys.stderr, flush=True)
    rss_mb["others_after"] = {t: p.memory_info().rss / 1e6 for t, p in procs.items()}
    if soak_requests:
        served, soak_start = 0, time.monotonic()
        rss_mb["soak_before"] = proxy_proc.memory_info().rss / 1e6
        while served < soak_requests:
            rate = statistics.median(results["proxy"]["rps_c64"])
            chunk_s = round(max(5.0, min(60.0, (soak_requests - served) / max(rate, 1.0))))
            served += run_wrk(servers.url("proxy"), 64, chunk_s, script)["requests"]
        rss_mb["soak_after"] = proxy_proc.memory_info().rss / 1e6
        rss_mb["soak_requests"] = served
        print(f"soak: {served} requests in {time.monotonic() - soak_start:.0f}s; proxy RSS "
              f"{rss_mb['soak_before']:.1f} → {rss_mb['soak_after']:.1f} MB", file=sys.stderr)
    medians = {t: {k: statistics.median(v) for k, v in m.items()} for t, m in results.items()}
    events = event_stats(servers.url("proxy"))
    if "dashboard" in servers.procs:   # the browser's own CPU, on the same cores as the rest
        browser = psutil.Process(servers.procs["dashboard"].pid)
        events["browser_cpu_s"] = sum(sum(p.cpu_times()[:2]) for p in
                                      [browser, *browser.children(recursive=True)])
    return {"events": events, "targets": list(targets), "medians": medians, "rounds": results, "rss_mb": rss_mb,
            "cpu_s_per_1000": {t: 1000 * c[0] / c[1] for t, c in cpu.items() if c[1]},
            "requests_per_target": {t: c[1] for t, c in cpu.items()}}


LABELS = {"direct": "direct", "relay": "reference relay", "caddy": "Caddy",
          "proxy": "proxy (fast)", "proxy-aiohttp": "proxy (aiohttp)",
          "baseline": "baseline (fast)", "baseline-aiohttp": "baseline (aiohttp)"}


def render(data: dict) -> str:
    m = data["medians"]
    targets = [t for t in data.get("targets", TARGETS) if t in m]
    p, r, d = m["proxy"], m["relay"], m["direct"]
    caddy = m.get("caddy")
    ratios = [("proxy / relay", r)] + ([("proxy / Caddy", caddy)] if caddy else []) + \
        [("proxy / direct", d)] + ([("proxy / baseline", m["baseline"])]
                                   if "baseline" in m else [])
    rows = []

    def row(label: str, key: str, fmt: str = "{:.2f}") -> None:
        cells = [fmt.format(m[t][key]) for t in targets]
        rows.append(f"| {label} | " + " | ".join(cells) + " | "
                    + " | ".join(f"{p[key] / base[key]:.3f}" for _, base in ratios) + " |")
    for c in CONCURRENCY:
        row(f"requests/s, c={c}", f"rps_c{c}", fmt="{:.0f}")
    for c in CONCURRENCY:
        row(f"latency p50 ms, c={c}", f"p50_ms_c{c}")
        row(f"latency p99 ms, c={c}", f"p99_ms_c{c}")
    row(f"stream TTFB p50 ms, c={STREAM_CONCURRENCY}", "ttfb_p50_ms")
    row(f"stream TTFB p99 ms, c={STREAM_CONCURRENCY}", "ttfb_p99_ms")
    row(f"stream last byte p50 ms, c={STREAM_CONCURRENCY}", "ttlb_p50_ms")
    head = ["| metric (median of rounds) | " + " | ".join(LABELS[t] for t in targets) + " | "
            + " | ".join(n for n, _ in ratios) + " |",
            "|---|" + "---|" * (len(targets) + len(ratios))]
    added_relay = r["p50_ms_c1"] - d["p50_ms_c1"]
    added_proxy = p["p50_ms_c1"] - d["p50_ms_c1"]
    rss = data["rss_mb"]
    cpu = data["cpu_s_per_1000"]
    tail = [
        "",
        f"- added latency at c=1 (p50 − direct p50): relay {added_relay:.3f} ms, proxy "
        f"{added_proxy:.3f} ms → proxy / relay {added_proxy / added_relay:.2f}"
        if added_relay > 0 else "- added latency at c=1: relay added none measurable",
        f"- streaming TTFB, proxy − relay: {p['ttfb_p50_ms'] - r['ttfb_p50_ms']:+.3f} ms (p50)",
        "- throughput, proxy / relay: " + ", ".join(
            f"c={c} {p[f'rps_c{c}'] / r[f'rps_c{c}']:.2f}×" for c in CONCURRENCY)
        + ("; proxy / Caddy: " + ", ".join(
            f"c={c} {p[f'rps_c{c}'] / caddy[f'rps_c{c}']:.2f}×" for c in CONCURRENCY)
           if caddy else ""),
        f"- proxy RSS: {rss['idle']:.1f} MB idle, after each round "
        + ", ".join(f"{x:.1f}" for x in rss["after_round"]) + " MB "
        f"({data['requests_per_target'].get('proxy', 0)} requests through the proxy); at the "
        "end: " + ", ".join(f"{LABELS[t]} {v:.1f} MB"
                            for t, v in rss.get("others_after", {}).items()),
        (f"- soak: {rss['soak_requests']} more requests at c=64, proxy RSS "
         f"{rss['soak_before']:.1f} → {rss['soak_after']:.1f} MB" if "soak_after" in rss
         else "- soak: not run (--soak-requests)"),
        "- CPU seconds per 1,000 requests: " + ", ".join(
            f"{LABELS[t]} {v:.3f}" for t, v in cpu.items()),
        _events_line(data.get("events")),
        "- wrk errors (non-2xx): " + ", ".join(
            f"{t} {sum(sum(v) for k, v in data['rounds'][t].items() if k.startswith('errors'))}"
            for t in targets),
    ]
    return "\n".join(head + rows + tail)


def _events_line(events: dict | None) -> str:
    if not events or not events["clients"]:
        return "- event stream: no client attached (--dashboard)"
    c = events["clients"][0]
    return (f"- event stream with the dashboard open: {events['published']} events published, "
            f"{events['events_per_s']:.1f}/s over the last minute; the dashboard received "
            f"{c['events_sent']} events, {c['bytes_sent'] / 1e3:.1f} kB in {c['connected_s']:.0f}s "
            f"({c['bytes_sent'] / max(c['connected_s'], 1) / 1e3:.2f} kB/s); "
            f"{events['dropped_clients']} clients dropped; Chromium rendering it used "
            f"{events.get('browser_cpu_s', 0):.1f} CPU-s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration-s", type=float, default=3.0, help="per wrk measurement")
    ap.add_argument("--stream-requests", type=int, default=25,
                    help="streaming requests per client worker per round")
    ap.add_argument("--proxy-arg", action="append", default=[],
                    help="extra argument for the proxy (repeatable)")
    ap.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
                    help="event loop of both the relay and the proxy")
    ap.add_argument("--soak-requests", type=int, default=0,
                    help="afterwards, send this many more requests through the proxy and "
                         "report its RSS before and after")
    ap.add_argument("--dashboard", action="store_true",
                    help="keep the dashboard open in a headless Chromium throughout")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--baseline", type=Path,
                    help="a checkout of another version of the project, run beside this one")
    ap.add_argument("--state", choices=("memory", "redis"), default="memory",
                    help="redis: the proxy with state.backend redis beside state: memory "
                         "(bench/state_overhead.py)")
    args = ap.parse_args(argv)
    if args.state == "redis":
        from . import state_overhead
        return state_overhead.main(
            ["--rounds", str(args.rounds), "--duration-s", str(args.duration_s),
             "--stream-requests", str(args.stream_requests)]
            + (["--json", args.json] if args.json else []))
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = '
                          f'"application/json"\nwrk.body = \'{json.dumps(BODY)}\'\n')
        servers = Servers(workdir, args.proxy_arg, args.event_loop,
                          args.baseline.resolve() if args.baseline else None)
        try:
            servers.start()
            if args.dashboard:
                servers.open_dashboard()
            data = measure(servers, args.rounds, args.duration_s, args.stream_requests, script,
                           args.soak_requests)
        finally:
            servers.stop()
    data["event_loop"] = args.event_loop
    data["machine"] = machine_facts()
    print(render(data))
    print(f"\n{data['machine']['cores']} cores, {data['machine']['memory_gb']} GB, "
          f"{data['machine']['cpu']}, Python {data['machine']['python']}; "
          f"{args.rounds} rounds × {args.duration_s:g}s per wrk run; {args.event_loop} event "
          f"loop for relay and proxy; Caddy "
          f"{'included' if 'caddy' in data['targets'] else 'not installed'}")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
