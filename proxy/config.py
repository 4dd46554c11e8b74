"""Typed, frozen configuration, validated as a whole so that every problem is reported at once.

`load_config(raw)` (configload.py) walks the dataclasses below; an unknown key, a wrong type or
a value out of range becomes one line naming its path, e.g.
`models.qwen/qwen3-8b.priority: must be 1..10 (got 12)`.
Range and choice rules live in each field's metadata (schema.rule) so the dataclasses are the
single source of truth; schema.py is the engine that walks them.
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from .schema import rule

SAMPLERS = ("local", "budget")
LOADING_PROGRESS = ("comments", "content", "off")
# The eviction policies (engine/policy.py has one value function for each of these names).
POLICIES = ("lru", "priority", "cost-aware", "predictive")
# When models an LM Studio SDK client loaded through the proxy may be evicted.
CLIENT_EVICT_MODES = ("never", "after_disconnect", "always")
UPSTREAM_KINDS = ("lmstudio", "llamacpp", "ollama", "openai")
UPSTREAM_CLIENTS = ("fast", "aiohttp")
GROUP_POLICIES = ("together", "exclusive")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=rule(0, 65535))
    max_body_bytes: int = field(default=32 * 1024 * 1024, metadata=rule(1024))
    shutdown_timeout_s: float = field(default=30.0, metadata=rule(0))
    # auto: uvloop when installed (pip install '.[fast]'), else asyncio's own loop.
    event_loop: str = field(default="auto", metadata=rule(choices=("auto", "asyncio", "uvloop")))
    # A non-loopback host with no auth.keys refuses to start unless this is true.
    allow_unauthenticated: bool = False
    # Host names, besides loopback ones and the listening address, that requests may name
    # (DNS rebinding: origins.py). Checked on a loopback host, and on any host once set.
    allowed_hosts: tuple[str, ...] = ()
    # Origins of web pages, besides the proxy's own, that may send it state-changing requests.
    allowed_origins: tuple[str, ...] = ()
    max_model_name_chars: int = field(default=256, metadata=rule(1, 65536))
    header_timeout_s: float = field(default=10.0, metadata=rule(0, exclusive_lo=True))
    body_timeout_s: float = field(default=60.0, metadata=rule(0, exclusive_lo=True))
    keepalive_timeout_s: float = field(default=15.0, metadata=rule(0, exclusive_lo=True))
    # A client that takes no stream bytes for this long has its stream ended.
    stall_timeout_s: float = field(default=30.0, metadata=rule(0, exclusive_lo=True))
    max_connections: int = field(default=1000, metadata=rule(1))
    # A stream that waits for its model's load gets notes on it (server/progress.py): SSE
    # comments, or reasoning content on chat completions (comments elsewhere), or nothing.
    loading_progress: str = field(default="comments",
                                  metadata=rule(choices=LOADING_PROGRESS))
    loading_progress_interval_s: float = field(default=2.0, metadata=rule(0.1))


@dataclass(frozen=True)
class UpstreamConfig:
    kind: str = field(default="lmstudio", metadata=rule(choices=UPSTREAM_KINDS))
    url: str = "http://127.0.0.1:1234"
    api_token: str | None = None
    connect_timeout_s: float = field(default=5.0, metadata=rule(0, exclusive_lo=True))
    # Time allowed between two bytes of a response; generations can be long, pauses cannot.
    read_timeout_s: float = field(default=300.0, metadata=rule(0, exclusive_lo=True))
    load_timeout_s: float = field(default=600.0, metadata=rule(0, exclusive_lo=True))
    max_connections: int = field(default=256, metadata=rule(1))
    # The client that forwards requests (management calls always use aiohttp's): fast is the
    # pooled httptools client in upstream/fastclient.py.
    client: str = field(default="fast", metadata=rule(choices=UPSTREAM_CLIENTS))
    ca_file: str | None = None   # CA bundle to verify an https:// upstream (else the system's)
    reconcile_interval_s: float = field(default=15.0, metadata=rule(0, exclusive_lo=True))
    # Circuit breaker: after this many connection failures in a row, fail fast for a cool-down.
    breaker_failures: int = field(default=5, metadata=rule(1))
    breaker_cooldown_s: float = field(default=5.0, metadata=rule(0, exclusive_lo=True))
    # /readyz asks the upstream again (one model-list call) when its last answer is older.
    readiness_max_age_s: float = field(default=2.0, metadata=rule(0, exclusive_lo=True))
    # A health look (the model list the reconcile loop and /readyz ask for) not answered
    # within this long counts the server as down: a frozen server is not waited on for
    # read_timeout_s, and in a fleet its requests go to other hosts.
    probe_timeout_s: float = field(default=5.0, metadata=rule(0, exclusive_lo=True))


HOST_SAMPLERS = ("auto", "local", "budget")


@dataclass(frozen=True)
class HostConfig(UpstreamConfig):
    """One server of a fleet (`upstreams:`). Keys it does not set come from `upstream:`,
    so timeouts and limits are written once; `url` and `name` are its own."""
    name: str = ""
    api_token_env: str | None = None   # read from this environment variable at start
    # The memory this host's models may use. A remote host's memory cannot be sampled from
    # here: give it a budget. auto: budget when budget_gb is set, else this machine's memory
    # (only for a host on this machine).
    budget_gb: float | None = field(default=None, metadata=rule(0, exclusive_lo=True))
    sampler: str = field(default="auto", metadata=rule(choices=HOST_SAMPLERS))
    # Requests one loaded instance serves at once before another host's copy is preferred.
    parallel: int = field(default=4, metadata=rule(1, 1024))
    labels: Mapping[str, str] = field(default_factory=dict)
    # Patterns (fnmatch, e.g. "qwen/*") of the models it may hold; None: whatever it lists.
    models: tuple[str, ...] | None = None

    def allows(self, key: str) -> bool:
        """May it hold the model (a model key, not an alias): its patterns decide."""
        return self.models is None or any(fnmatch.fnmatchcase(key, p) for p in self.models)

    def budget(self) -> float | None:
        """The budget (GB) its engine goes by; None: this machine's memory, sampled."""
        return self.budget_gb if self.sampler != "local" else None


@dataclass(frozen=True)
class PlacementConfig:
    """How a fleet (`upstreams:`) chooses the host for a model."""
    # A model loading on one host is joined by every request for it, unless this many wait
    # for it already and another host has free room: then a second copy loads there, for the
    # serving capacity of two (a copy loads no sooner than the first is done). 0: never.
    replicate_after_waiters: int = field(default=0, metadata=rule(0))
    # The host an LM Studio SDK client reaches without ?host= (default: the first).
    native_host: str | None = None


STATE_BACKENDS = ("memory", "redis")


@dataclass(frozen=True)
class StateConfig:
    """Facts shared by several proxy replicas (locks, reservations, leases, leader, events)."""
    # memory: this process alone (no coordination). redis: replicas share one Redis.
    backend: str = field(default="memory", metadata=rule(choices=STATE_BACKENDS))
    url: str | None = None            # redis://[user:password@]host:port/db (or rediss://)
    url_env: str | None = None        # ... read from this environment variable at start
    key_prefix: str = "lmproxy:"
    replica_id: str | None = None     # default: host name, process id and a random suffix
    # A replica's heartbeat, its leases and the leader's lease live this long unrenewed
    # (renewed every third of it): a dead replica's hold on the fleet lapses within it.
    lease_ttl_s: float = field(default=6.0, metadata=rule(0.5))
    # A load's single-flight lock, renewed while the load runs: a replica that died while
    # loading lets another take over within it.
    lock_ttl_s: float = field(default=10.0, metadata=rule(0.5))
    # While Redis cannot be reached, a load waits this long for it, then 503 state_unavailable.
    unavailable_wait_s: float = field(default=10.0, metadata=rule(0))
    timeout_s: float = field(default=2.0, metadata=rule(0, exclusive_lo=True))


@dataclass(frozen=True)
class MemoryConfig:
    max_memory_usage_percent: float = field(default=80.0, metadata=rule(1, 100))
    min_free_memory_gb: float = field(default=4.0, metadata=rule(0))
    monitoring_interval: float = field(default=30.0, metadata=rule(0, exclusive_lo=True))
    sampler: str = field(default="local", metadata=rule(choices=SAMPLERS))
    budget_gb: float | None = field(default=None, metadata=rule(0, exclusive_lo=True))
    # Memory a model takes per byte of its file, until its real footprint has been measured.
    footprint_factor: float = field(default=1.2, metadata=rule(0, exclusive_lo=True))
    reclaim_timeout_s: float = field(default=10.0, metadata=rule(0))


@dataclass(frozen=True)
class EvictionConfig:
    # Keys of earlier releases: a config file kept across an upgrade is told what to write.
    RETIRED: ClassVar[dict[str, str]] = {
        "min_residency_s": "replaced by eviction.hold (since 2026-12-01): seconds a freshly "
        "loaded model is spared, e.g. 'hold: 60' as 'min_residency_s: 60' did (now also ending "
        "once the load that wants its memory has waited as long); 'off', the default, spares "
        "none"}
    policy: str = field(default="cost-aware", metadata=rule(choices=POLICIES))
    model_timeout_hours: float = field(default=2.0, metadata=rule(0))
    # Anti-thrash hold: a freshly loaded model is spared this many seconds, but never past the
    # moment the load that wants its memory has waited as long; "adaptive": 60 s, only while
    # the engine is thrashing (reloading models it evicted within 30 s); "expected": each model
    # for its reload seconds × learned chance of reuse within a minute, and only while the
    # waiting it causes (waiters × seconds waited) is less; "off": no hold.
    # Off by default: on the eviction benchmark no hold shortened the total wait.
    hold: float | str = field(default="off", metadata={**rule(0), "words": (
        "adaptive", "expected", "off")})
    queue_timeout_s: float = field(default=120.0, metadata=rule(0))
    # A load waiting this long gets first claim on memory as it frees: nothing starves.
    fairness_s: float = field(default=30.0, metadata=rule(0))
    manage_external: bool = False


@dataclass(frozen=True)
class FitConfig:
    """Load a model that does not fit at its context with a smaller one (engine/fit.py)."""
    # The smallest context it may be loaded with; None: never shrink it.
    min_context_length: int | None = field(default=None, metadata=rule(1))


@dataclass(frozen=True)
class ModelConfig:
    priority: int = field(default=5, metadata=rule(1, 10))
    pinned: bool = False
    ttl_s: float | None = field(default=None, metadata=rule(0, exclusive_lo=True))
    aliases: tuple[str, ...] = ()
    footprint_gb: float | None = field(default=None, metadata=rule(0, exclusive_lo=True))
    # Passed to the load call as-is: LM Studio's context_length, flash_attention,
    # eval_batch_size, offload_kv_cache_to_gpu, num_experts (loadoptions.py checks them).
    load: Mapping[str, Any] = field(default_factory=dict)
    fit: FitConfig = field(default_factory=FitConfig)
    # In a fleet: the host its pin and priority apply to (elsewhere it is unpinned, at the
    # default priority), and the host preferred when it has room.
    host: str | None = None


@dataclass(frozen=True)
class TaskModel:
    """A `tasks:` entry that names the host its model should live on: `{model, host}`."""
    model: str = ""
    # In a fleet: the host preferred for the model when it has room (as models.<key>.host).
    host: str | None = None


@dataclass(frozen=True)
class GroupConfig:
    """Models that live and leave together, or never together (engine/groups.py)."""
    name: str = ""
    members: tuple[str, ...] = ()     # model keys or their aliases
    policy: str = field(default="together", metadata=rule(choices=GROUP_POLICIES))


@dataclass(frozen=True)
class PreloadConfig:
    # Load what the usage model expects next (see engine/preload.py for when it may evict).
    enabled: bool = True
    # Preload B after a request for A when B followed A within a minute this often.
    min_probability: float = field(default=0.6, metadata=rule(0, 1, exclusive_lo=True))
    # Preload a model due by its rhythm: asked for in this hour of the week this many times
    # a week (per week observed).
    rhythm_min_rate: float = field(default=1.0, metadata=rule(0, exclusive_lo=True))


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = field(default=15.0, metadata=rule(0, exclusive_lo=True))
    error_rate_threshold: float = field(default=0.5, metadata=rule(0, 1))
    error_window_s: float = field(default=300.0, metadata=rule(60))
    min_requests: int = field(default=5, metadata=rule(1))
    latency_regression_factor: float = field(default=2.0, metadata=rule(1, exclusive_lo=True))
    latency_window_s: float = field(default=300.0, metadata=rule(0, exclusive_lo=True))
    # A request with no byte from the upstream for this long, or a load queued this long,
    # while the upstream still answers: the silent hang.
    hang_threshold_s: float = field(default=120.0, metadata=rule(0, exclusive_lo=True))
    probe_interval_s: float = field(default=0.0, metadata=rule(0))   # 0: no probes
    webhook_url: str | None = None
    webhook_timeout_s: float = field(default=5.0, metadata=rule(0, exclusive_lo=True))
    webhook_max_attempts: int = field(default=5, metadata=rule(1, 20))


@dataclass(frozen=True)
class StorageConfig:
    enabled: bool = True
    path: str | None = None          # default: ~/.local/state/lmstudio-proxy/history.sqlite3
    retention_days: float = field(default=30.0, metadata=rule(0, exclusive_lo=True))
    flush_interval_s: float = field(default=1.0, metadata=rule(0, exclusive_lo=True))


@dataclass(frozen=True)
class LoggingConfig:
    level: str = field(default="INFO", metadata=rule(
        choices=("DEBUG", "INFO", "WARNING", "ERROR"), upper=True))


ACCESS_LEVELS = ("open", "key", "admin")


@dataclass(frozen=True)
class ClientKeyConfig:
    name: str = ""
    key: str | None = None           # plain: quick starts only
    key_sha256: str | None = None    # hex digest: the config can be committed
    key_env: str | None = None       # read from this environment variable at start and reload
    models: tuple[str, ...] | None = None   # None: every model


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[ClientKeyConfig, ...] = ()
    admin_token: str | None = None
    admin_token_env: str | None = None
    # Who may read GET /proxy/* and GET /metrics: anyone, any client key, the admin token.
    read_only_access: str = field(default="key", metadata=rule(choices=ACCESS_LEVELS))
    metrics_access: str = field(default="open", metadata=rule(choices=ACCESS_LEVELS))

    @property
    def enabled(self) -> bool:
        return bool(self.keys) or bool(self.admin_token or self.admin_token_env)


@dataclass(frozen=True)
class CompatConfig:
    """Repairs of LM Studio's OpenAI-compatibility bugs (proxy/compat.py), each switchable."""
    embeddings_base64: bool = True    # encode float vectors when the client asked for base64
    embedding_usage: bool = True      # count embedding tokens when the upstream reports 0
    models_retrieve: bool = True      # serve GET /v1/models/{id} from the model list


@dataclass(frozen=True)
class NativeConfig:
    """LM Studio's own websocket protocol through the proxy (proxy/native/)."""
    # Largest websocket message either way; a bigger one closes the connection with 1009.
    # The SDKs' largest are file uploads (`uploadFileBase64`: the whole file, base64), so the
    # default matches server.max_body_bytes, which bounds a base64 image in a chat request.
    max_frame_bytes: int = field(default=32 * 1024 * 1024, metadata=rule(1024))
    # When models an SDK client loaded through the proxy may be evicted: never; once the
    # client's connections are all gone (before that only at critical pressure); always.
    evict: str = field(default="after_disconnect", metadata=rule(choices=CLIENT_EVICT_MODES))


@dataclass(frozen=True)
class MetricsConfig:
    """What GET /metrics exposes besides the proxy's own series (observe/gateway.py)."""
    # vLLM's series that a Kubernetes inference gateway's endpoint picker routes on.
    inference_gateway: bool = False


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # Several servers (a fleet): each entry a host, its unset keys taken from `upstream:`.
    upstreams: tuple[HostConfig, ...] = ()
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    state: StateConfig = field(default_factory=StateConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    # Task → models that serve it, best first (recommendations and `auto:<task>` routing);
    # an entry is a model key, or `{model, host}` to prefer a host for it in a fleet.
    tasks: Mapping[str, tuple[str | TaskModel, ...]] = field(default_factory=dict)
    groups: tuple[GroupConfig, ...] = ()
    preload: PreloadConfig = field(default_factory=PreloadConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    native: NativeConfig = field(default_factory=NativeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def model(self, key: str) -> ModelConfig:
        return self.models.get(key) or _DEFAULT_MODEL

    @functools.cached_property
    def task_models(self) -> Mapping[str, tuple[str, ...]]:
        """Task → the model keys its entries name, in order."""
        return {task: tuple(m if isinstance(m, str) else m.model for m in models)
                for task, models in self.tasks.items()}

    @functools.cached_property
    def task_hosts(self) -> Mapping[str, str]:
        """Model key → the host a `tasks:` entry names for it (an entry may name the model
        by an alias: the fleet asks by key)."""
        aliases = self.alias_map()
        return {aliases.get(m.model, m.model): m.host for models in self.tasks.values()
                for m in models if isinstance(m, TaskModel) and m.host is not None}

    def preferred_host(self, key: str) -> str | None:
        """The host a fleet prefers for the model: models.<key>.host, else its tasks' host."""
        return self.model(key).host or self.task_hosts.get(key)

    def alias_map(self) -> dict[str, str]:
        return {alias: key for key, m in self.models.items() for alias in m.aliases}


_DEFAULT_MODEL = ModelConfig()
