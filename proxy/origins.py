"""Which `Host` and `Origin` headers name this proxy: the one rule against DNS rebinding and
cross-site requests. server/browser.py applies it to every route, /mcp included.

A web page can make the browser send requests here without asking anyone: a POST with a
`text/plain` body is a CORS "simple request" (no preflight), and a websocket needs no CORS at
all. Through DNS rebinding, a page's own name can come to resolve to 127.0.0.1, which makes its
requests same-origin, answers readable. The browser always says who is asking: `Host` is the
name the page used, `Origin` the site the page came from. So:

- Host: on a loopback proxy (and on any proxy once `server.allowed_hosts` is set) the name must
  be a loopback one (localhost, 127.0.0.0/8, ::1), the address the proxy listens on or the one
  the connection arrived at, or one of `server.allowed_hosts`. A rebinding page has its own
  name. Bound wider, by default every name is answered: the proxy cannot know the names it is
  reached by (a Service, a pod IP, a LAN name), and there it needs client keys, which no page has.
- Origin: a request that changes state (POST, PUT, PATCH, DELETE, a websocket's upgrade) and
  carries an Origin must come from the proxy's own origin (scheme://host:port of the request's
  Host) or one of `server.allowed_origins`. Clients other than browsers send no Origin.

Pure functions of strings: no I/O, no aiohttp; `--check` validates the configured lists here.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import urlsplit

ANY = "*"
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def is_loopback(host: str) -> bool:
    """A bind address or host name that only this machine reaches."""
    if host.lower().rstrip(".") == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(name.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped   # ::ffff:127.0.0.1, as a socket bound to :: reports it
    return ip


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header, `name[:port]` or `[v6][:port]`, as (lower-case name without a final dot,
    port or None); None when it is neither."""
    value = value.strip()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or _ip(name) is None or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        name, colon, port_text = value.partition(":")
        if ":" in port_text:
            return None     # an IPv6 address without brackets is no Host
    name = name.lower().rstrip(".")
    if not name or any(c in name for c in "/@\\ \t?#"):
        return None
    if not port_text:
        return name, None
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        return None
    return name, int(port_text)


def normalize_origin(value: str) -> str | None:
    """`scheme://host[:port]` in one spelling (lower case, no default port), or None for
    anything that is not an origin (`null`, a path, credentials)."""
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc or parts.path not in ("", "/") or parts.query \
            or parts.fragment or "@" in parts.netloc:
        return None
    scheme = parts.scheme.lower()
    where = split_host(parts.netloc)
    if where is None:
        return None
    name, port = where
    if port is not None and port == DEFAULT_PORTS.get(scheme):
        port = None
    shown = f"[{name}]" if ":" in name else name
    return f"{scheme}://{shown}" + (f":{port}" if port is not None else "")


ALLOWED_CACHE_MAX = 64


@dataclass(frozen=True)
class BrowserRule:
    """The running rule, built from `server:` (rebuilt by a reload)."""
    listen: str                     # server.host, as it binds
    check_host: bool
    hosts: frozenset[str]           # allowed names, exact
    suffixes: tuple[str, ...]       # "*.example.com" → ".example.com"
    any_host: bool
    origins: frozenset[str]         # normalized
    any_origin: bool
    # (Host, local address) pairs already allowed: every request asks, most with one Host.
    _allowed: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, listen: str, allowed_hosts: Iterable[str],
           allowed_origins: Iterable[str]) -> "BrowserRule":
        named = [h.strip().lower().rstrip(".") for h in allowed_hosts]
        origins = [o.strip() for o in allowed_origins]
        normalized = (normalize_origin(o) for o in origins if o != ANY)
        return cls(listen=listen.lower().rstrip("."),
                   check_host=is_loopback(listen) or bool(named),
                   hosts=frozenset(h for h in named if not h.startswith("*")),
                   suffixes=tuple(h[1:] for h in named if h.startswith("*.")),
                   any_host=ANY in named,
                   origins=frozenset(o for o in normalized if o is not None),
                   any_origin=ANY in origins)

    def host_allowed(self, header: str | None, local_address: str | None = None) -> bool:
        """May a request with this Host header be answered? `local_address`: the address the
        connection arrived at (a pod's IP, which kubelet and a bare `curl <ip>` send)."""
        if not self.check_host or self.any_host or header is None:
            return True     # no Host at all: HTTP/1.0, never a browser
        if (header, local_address) in self._allowed:
            return True
        if self._host_allowed(header, local_address):
            if len(self._allowed) < ALLOWED_CACHE_MAX:   # refusals are not kept: no flooding
                self._allowed[header, local_address] = True
            return True
        return False

    def _host_allowed(self, header: str, local_address: str | None) -> bool:
        where = split_host(header)
        if where is None:
            return False
        name = where[0]
        if is_loopback(name) or name in self.hosts or name.endswith(self.suffixes):
            return True
        if self.listen not in WILDCARD_BINDS and name == self.listen:
            return True
        ip = _ip(name)
        return ip is not None and local_address is not None and ip == _ip(local_address)

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        """May a state-changing request from a page of this Origin go on? Its own origin: the
        same host and port as the request's Host (a page the proxy served itself)."""
        if self.any_origin:
            return True
        normal = normalize_origin(origin)
        if normal is None:
            return False    # "null": a sandboxed frame or a file, never the proxy's own page
        if normal in self.origins:
            return True
        own = split_host(host_header) if host_header else None
        if own is None:
            return False
        scheme, _, netloc = normal.partition("://")
        theirs = split_host(netloc)
        if theirs is None:
            return False
        default = DEFAULT_PORTS.get(scheme)
        return theirs[0] == own[0] and (theirs[1] or default) == (own[1] or default)


def config_problems(allowed_hosts: Iterable[str], allowed_origins: Iterable[str],
                    path: str = "server") -> list[str]:
    """What `--check` says about the lists: each entry a name, `*.suffix` or `*`; each origin
    `scheme://host[:port]` or `*`."""
    problems = []
    for i, host in enumerate(allowed_hosts):
        bare = host.strip()
        name = bare[2:] if bare.startswith("*.") else bare
        where = split_host(name) if bare != ANY else (ANY, None)
        if where is None or where[1] is not None or "*" in where[0] and bare != ANY:
            problems.append(f"{path}.allowed_hosts[{i}]: '{host[:100]}' is not a host name: give "
                            "a name or address as in the Host header, without scheme or port "
                            "('proxy.lan', '10.0.0.5', '*.svc.cluster.local', or '*' for any)")
    for i, origin in enumerate(allowed_origins):
        if origin.strip() != ANY and normalize_origin(origin) is None:
            problems.append(f"{path}.allowed_origins[{i}]: '{origin[:100]}' is not an origin: "
                            "give scheme://host[:port] as a browser sends it, with no path "
                            "('https://chat.example.com', 'http://localhost:3000', or '*')")
    return problems
