"""The one header policy of every forwarding route, both ways.

Upstream goes what the client sent, end to end: hop-by-hop headers are the connection's, the
body is sent decoded (`content-encoding` dropped), and a client's credentials (`Authorization`,
`X-Api-Key`, `Cookie`) are the proxy's business, never the upstream's: it sees
`upstream.api_token`, or nothing; so is the mark of a call the proxy makes to itself
(`X-Proxy-Own-Call`, a per-process secret). Back comes what the upstream answered, its
repeated names (Set-Cookie) kept, less hop-by-hop and the upstream's own `Date` and `Server`
(the proxy's server sets those).
"""
from __future__ import annotations

from typing import Mapping

from .auth import CREDENTIAL_HEADERS, OWN_CALL_HEADER

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host",
                        "content-length"})
REQUEST_DROP = HOP_BY_HOP | CREDENTIAL_HEADERS | {"cookie", "content-encoding",
                                                  OWN_CALL_HEADER.lower()}
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
ROUTED_HEADER = "X-Proxy-Model"   # the model `auto:<task>` picked
HOST_HEADER = "X-Proxy-Host"      # the fleet's host that served
CONTEXT_HEADER = "X-Proxy-Context-Length"   # the context the serving model was loaded with


def to_upstream(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers to send upstream (a new dict: the upstream may amend it)."""
    return {k: v for k, v in headers.items() if k.lower() not in REQUEST_DROP}


def to_client(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The upstream's response headers to pass on, repeated names kept, in their order."""
    return [(k, v) for k, v in headers.items() if k.lower() not in RESPONSE_DROP]
