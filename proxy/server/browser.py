"""The Host and Origin rule (origins.py) at the HTTP edge: requests that name another host
(DNS rebinding) or that another site's page sent to change state are refused, before
authentication, on every route but the probes. Browsers cannot hide either header from a
page's requests; clients other than browsers send no Origin and their own Host, unaffected."""
from __future__ import annotations

import logging

from aiohttp import web

from ..config import Config
from ..errors import HostNotAllowed, OriginNotAllowed, ProxyError, clip
from ..liveconfig import LiveConfig
from ..origins import BrowserRule
from .auth import AuthCounters

log = logging.getLogger("proxy.browser")

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# kubelet's httpGet probes send the pod's IP as Host; liveness says nothing worth rebinding for.
EXEMPT = frozenset({"/healthz", "/readyz"})


def _rule(config: Config) -> BrowserRule:
    server = config.server
    return BrowserRule.of(server.host, server.allowed_hosts, server.allowed_origins)


class BrowserGuard:
    """What the middleware asks on every request; the rule is rebuilt by each config swap."""

    def __init__(self, live: LiveConfig) -> None:
        self._rule = live.derive(_rule)

    @property
    def rule(self) -> BrowserRule:
        return self._rule.value

    def check(self, request: web.BaseRequest, counters: AuthCounters) -> None:
        """Raise HostNotAllowed (421) or OriginNotAllowed (403), counted as an auth refusal."""
        if request.path in EXEMPT:
            return
        try:
            self._check(request)
        except ProxyError as exc:
            counters.reject(exc.code or "refused")
            log.warning("%s %s refused: %s", clip(request.method, 20), clip(request.path, 80),
                        exc.message)
            raise

    def _check(self, request: web.BaseRequest) -> None:
        rule = self.rule
        host = request.headers.get("Host")
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        local = sock[0] if isinstance(sock, tuple) and sock else None
        if not rule.host_allowed(host, local):
            raise HostNotAllowed(
                f"Host '{clip(host or '', 100)}' is not a name of this proxy (it listens on "
                f"{rule.listen or '*'}): a web page that reached it through DNS rebinding sends "
                "its own name. To serve requests that name this host, add it to "
                "server.allowed_hosts.")
        origin = request.headers.get("Origin")
        if origin is None or not _changes_state(request):
            return
        if not rule.origin_allowed(origin, host):
            raise OriginNotAllowed(
                f"Origin '{clip(origin, 100)}' may not {clip(request.method, 10)} "
                f"{clip(request.path, 80)}: a page of another site asked the browser for a "
                "change here. To allow that site, add its origin to server.allowed_origins.")


def _changes_state(request: web.BaseRequest) -> bool:
    # A websocket's upgrade is a GET, but what follows drives loads and unloads; browsers send
    # it cross-site with no CORS check.
    return request.method in STATE_CHANGING or \
        request.headers.get("Upgrade", "").lower() == "websocket"
