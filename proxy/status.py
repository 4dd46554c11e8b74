"""`python -m proxy status [--config PATH] [--url URL] [--watch]`: models, memory and pressure
at a glance, from the proxy at the config's address (as `healthcheck` finds it). A fleet
(`/proxy/stats` with `hosts`) adds one line per host: up or down, its memory, its models.

With `--watch` the table is redrawn in place whenever the proxy's event stream
(`/proxy/events`) reports a change, at most once per `--interval`, and every REFRESH_S anyway
so that ages move on.
"""
from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from typing import Any, TextIO

BAR_WIDTH = 30
REFRESH_S = 5.0
CLEAR = "\x1b[H\x1b[2J"   # cursor home, clear screen


def fetch(url: str, path: str, timeout_s: float = 5.0, api_key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url.rstrip("/") + path, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def render(stats: dict[str, Any], models: dict[str, Any], health: dict[str, Any]) -> str:
    lines = []
    mem = stats.get("system_memory")
    up = stats["upstream"]
    hosts = stats.get("hosts")
    level = f"{len(up.get('hosts', []))} of {len(hosts)} hosts up" if hosts else \
        up.get("api_level") or "-"
    lines.append(f"upstream   {'up' if up['ok'] else 'DOWN'}  ({level})"
                 + (f"  {up['error']}" if up.get("error") else ""))
    if mem:
        used = mem["used_percent"]
        filled = round(used / 100 * BAR_WIDTH)
        lines.append(f"memory     [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {used:.0f}% used, "
                     f"{mem['available_gb']:.1f} of {mem['total_gb']:.1f} GB free "
                     f"({stats['sampler']})")
    if stats.get("memory_managed") is False:
        lines.append("memory     not managed (the server loads its models itself)")
    lines.append(f"pressure   {stats['memory_pressure'] or '-'}    policy {stats['policy']}    "
                 f"queue {stats['queue_length']}    health {health.get('status', '?')}")
    if stats.get("hosts"):
        lines.append("")
        lines += _hosts(stats["hosts"])
    lines.append("")
    head = f"{'MODEL':<40} {'STATE':<10} {'OWNER':<8} {'MEM GB':>7} {'PRIO':>4} {'PIN':>3} " \
           f"{'BUSY':>4} {'REQS':>6} {'OK%':>5} {'P95 ms':>8} {'LAST USE':>9}"
    lines.append(head)
    per_model = stats.get("models", {})
    for row in models["data"]:
        s = per_model.get(row["model"], {})
        last = row["last_used_s_ago"]
        lines.append(
            f"{row['model'][:40]:<40} {row['state']:<10} {row['owner'] or '-':<8} "
            f"{_gb(row['footprint_mb']):>7} {row['priority']:>4} "
            f"{'yes' if row['pinned'] else '':>3} {row['in_flight']:>4} {row['requests']:>6} "
            f"{s.get('success_rate', 1) * 100:>5.0f} "
            f"{s.get('p95_latency_ms') if s.get('p95_latency_ms') is not None else '-':>8} "
            f"{_ago(last):>9}")
    alerts = health.get("alerts") or []
    if alerts:
        lines.append("")
        for a in alerts:
            lines.append(f"ALERT {a['severity']:<8} {a['message']}")
    return "\n".join(lines)


def _gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1000:.1f}"


HOST_BAR_WIDTH = 20


def _hosts(hosts: dict[str, Any]) -> list[str]:
    lines = [f"{'HOST':<16} {'STATE':<5} {'MEMORY':<{HOST_BAR_WIDTH + 2}} {'USED':>5} "
             f"{'FREE GB':>8} {'TOTAL GB':>8} {'QUEUE':>5}  LOADED"]
    for name, h in hosts.items():
        mem = h.get("memory")
        if mem:
            filled = round(mem["used_percent"] / 100 * HOST_BAR_WIDTH)
            bar = f"[{'#' * filled}{'.' * (HOST_BAR_WIDTH - filled)}]"
            figures = f"{mem['used_percent']:>4.0f}% {mem['available_gb']:>8.1f} " \
                      f"{mem['total_gb']:>8.1f}"
        else:
            bar, figures = f"[{'?' * HOST_BAR_WIDTH}]", f"{'-':>5} {'-':>8} {'-':>8}"
        loaded = ", ".join(h.get("loaded_models") or []) or "-"
        lines.append(f"{name[:16]:<16} {'up' if h['up'] else 'DOWN':<5} {bar} {figures} "
                     f"{h.get('queue_length', 0):>5}  {loaded}")
    return lines


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def snapshot(url: str, api_key: str | None = None) -> str:
    """The rendered table; raises OSError/ValueError when the proxy does not answer."""
    return render(fetch(url, "/proxy/stats", api_key=api_key),
                  fetch(url, "/proxy/models", api_key=api_key),
                  fetch(url, "/proxy/health", api_key=api_key))


def local_url(host: str, port: int) -> str:
    """The proxy on this host at its configured address; a wildcard host is reached on
    loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def failure(url: str, exc: Exception, api_key: str | None) -> str:
    """Why the table could not be drawn, naming what to do: a refusal is not 'unreachable'."""
    if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403):
        how = ("--api-key, PROXY_API_KEY, or auth.admin_token in the config given by --config"
               if api_key is None else "the key given was refused")
        word = "unauthorised" if exc.code == 401 else "forbidden"
        return f"{word} ({exc.code}) at {url}: pass the admin token ({how})"
    if isinstance(exc, urllib.error.HTTPError):
        return f"the proxy at {url} answered {exc.code} {exc.reason}"
    return f"cannot reach the proxy at {url}: {exc}"


def run(url: str, api_key: str | None = None) -> int:
    try:
        text = snapshot(url, api_key)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(failure(url, exc, api_key))
        return 1
    print(text)
    return 0


def watch(url: str, out: TextIO = sys.stdout, *, interval_s: float = 1.0,
          refresh_s: float = REFRESH_S, stop: threading.Event | None = None,
          api_key: str | None = None) -> int:
    """Redraw on every change the event stream reports, until Ctrl-C or `stop` is set."""
    changed, stop = threading.Event(), stop or threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
                events = urllib.request.Request(url.rstrip("/") + "/proxy/events",
                                                headers=headers)
                with urllib.request.urlopen(events, timeout=60) as resp:
                    for line in resp:
                        if stop.is_set():
                            return
                        if line.startswith(b"event:"):
                            changed.set()
            except (OSError, ValueError):
                pass
            changed.set()            # disconnected: draw the "cannot reach" frame
            stop.wait(interval_s)    # then reconnect

    threading.Thread(target=listen, name="status-events", daemon=True).start()
    try:
        while not stop.is_set():
            changed.wait(refresh_s)
            changed.clear()
            try:
                text = snapshot(url, api_key)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                text = f"{failure(url, exc, api_key)} (retrying)"
            out.write(CLEAR + text + "\n")
            out.flush()
            stop.wait(interval_s)    # coalesce bursts of events into one redraw
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
    return 0


def healthcheck(host: str, port: int, timeout_s: float = 2.0) -> int:
    """0 when GET /healthz answers 200 on the configured address (on Linux a wildcard
    address such as 0.0.0.0 connects to this host)."""
    authority = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{authority}:{port}/healthz",
                                    timeout=timeout_s) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {exc}")
        return 1
