"""Typed application keys shared by the app factory and the handlers."""
from __future__ import annotations

from aiohttp import web

from ..observe.accesslog import AccessLog
from .compat import Compat
from .auth import STATE as AUTH_STATE
from .browser import BrowserGuard
from ..observe.health import ModelHealthMonitor
from ..engine.face import Engine
from ..observe.events import EventHub
from ..liveconfig import LiveConfig
from ..observe.metrics import ProxyMetrics
from ..upstream.base import Upstream

# The running configuration: read `app[CONFIG].current`; a reload swaps it (reload.py).
CONFIG = web.AppKey("config", LiveConfig)
ENGINE = web.AppKey("engine", Engine)
UPSTREAM = web.AppKey("upstream", Upstream)
# A fleet's hosts by name, each its backend (empty for a single server: UPSTREAM is it).
HOSTS = web.AppKey("hosts", dict)
# This process among the replicas sharing state (None: state.backend memory, it is alone).
REPLICA = web.AppKey("replica", object)
METRICS = web.AppKey("metrics", ProxyMetrics)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
HEALTH = web.AppKey("health", ModelHealthMonitor)
COMPAT = web.AppKey("compat", Compat)
EVENTS = web.AppKey("events", EventHub)
AUTH = AUTH_STATE
# The Host and Origin rule (DNS rebinding, cross-site changes), checked before AUTH.
BROWSER = web.AppKey("browser", BrowserGuard)
# Set on a request once its response headers are sent: errors can no longer become a response.
RESPONSE_STARTED = web.RequestKey("response_started", bool)
# The task a request was tagged with, and the model `auto:<task>` picked for it.
TASK = web.RequestKey("task", object)
ROUTED_TO = web.RequestKey("routed_to", str)
