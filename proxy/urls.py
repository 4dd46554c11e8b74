"""Facts about a server's URL: fit to show with its credentials hidden, on this machine or not,
carrying credentials or not, and which server it names however it is spelled."""
from __future__ import annotations

import ipaddress
import socket
from typing import Callable
from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL fit to show (logs, errors, status, /readyz): `user:password@` becomes `***@`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.rpartition("@")[2] if "@" in url else url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def normal_url(url: str) -> str:
    """The server a URL names, written one way (replicas compare their hosts by it): scheme and
    host in lower case, the port said (80 or 443 when left out), no credentials, query or
    trailing '/'."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return redact_url(url)
    host = (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def is_local_url(url: str) -> bool:
    """Does this URL point at this host (so that its loads show up in local memory)?"""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")   # `localhost.` too
    if host in ("localhost", socket.gethostname().lower()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_has_credentials(url: str) -> bool:
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


# The names of this machine's loopback: a server on one is reached by the others' spelling.
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def server_identity(url: str) -> tuple[str, str, int, str]:
    """The server a URL names, the same for every spelling of it: scheme and host in lower
    case, the default port spelled out, no trailing slash, and `localhost`, 127.0.0.1 and ::1
    one loopback. ValueError: not a URL with a valid port."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    if host in _LOOPBACK_NAMES:
        host = "loopback"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), host, port, parts.path.rstrip("/")


# Paths the proxy adds to a server's URL itself, by kind: OpenAI's /v1 for every kind, and
# LM Studio's (/api/v1, /api/v0) and Ollama's (/api) management paths for theirs. A URL that
# ends in one makes every request ask /v1/v1/... (longest first: /api/v1 before /v1).
_API_SUFFIXES = {"lmstudio": ("/api/v1", "/api/v0", "/api", "/v1"),
                 "ollama": ("/api/v1", "/api/v0", "/api", "/v1")}
_EXAMPLE_PATHS = {"/v1": "/v1/chat/completions", "/api/v1": "/api/v1/models",
                  "/api/v0": "/api/v0/models", "/api": "/api/tags"}


def upstream_url_problem(url: str, kind: str) -> str | None:
    """Why `url` cannot be the address of a server of this kind (None: it can): an http(s)
    URL with a host and a valid port, naming the server's root rather than one of the API
    paths the proxy adds to it itself."""
    return _address_problem(url) or _suffix_problem(
        url, _API_SUFFIXES.get(kind, ("/v1",)),
        lambda suffix: f", which the proxy adds itself (it asks {_EXAMPLE_PATHS[suffix]} and "
                       f"the like of the server): give the server's address without it")


# What a proxy's own address may not end in: the tools add /proxy/... themselves, and /v1 and
# /mcp are its other doors (pasted from a client's or an MCP host's configuration).
_PROXY_SUFFIXES = ("/proxy", "/mcp", "/v1")


def proxy_url_problem(url: str) -> str | None:
    """Why `url` cannot be a running proxy's address for its API's clients (None: it can)."""
    return _address_problem(url) or _suffix_problem(
        url, _PROXY_SUFFIXES, lambda _: ": give the proxy's own address, without it")


def _address_problem(url: str) -> str | None:
    """Not an http(s) URL with a host and a valid port: why."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port   # noqa: B018 -- raises ValueError when out of range
    except ValueError:
        return f"'{shown}' has no valid port (0..65535)"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        hint = f": write http://{shown}" if "://" not in url else ""
        return f"'{shown}' is not an http(s) URL with a host{hint}"
    return None


def _suffix_problem(url: str, suffixes: tuple[str, ...],
                    advice: Callable[[str], str]) -> str | None:
    """`url`'s path ends in one of `suffixes` (longest first): why it may not, and the root."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    for suffix in suffixes:
        if path.lower().endswith(suffix):
            root = redact_url(urlunsplit(parts._replace(path=path[:-len(suffix)])))
            return f"'{redact_url(url)}' ends in {suffix}{advice(suffix)}, {root}"
    return None
