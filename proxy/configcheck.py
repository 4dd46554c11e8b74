"""The checks across keys, run once a Config is built (`load_config`): what no single field's
rule can say — credentials given twice, hosts and their names, the shared state's settings,
groups and load options, footprints against the memory there is. Each problem is one line
naming its path; `config_warnings` lists what is valid but can never be useful."""
from __future__ import annotations

import fnmatch
from urllib.parse import urlsplit

from .config import AuthConfig, Config, StateConfig, TaskModel
from .urls import is_local_url, redact_url, url_has_credentials
from .groupcheck import group_problems
from .loadoptions import load_option_problems, load_option_warnings


def cross_checks(config: Config, problems: list[str]) -> None:
    mem = config.memory
    if config.upstream.api_token and url_has_credentials(config.upstream.url):
        problems.append(f"upstream.url: {redact_url(config.upstream.url)} carries credentials "
                        "(user:password@) and upstream.api_token is set; both would be the "
                        "Authorization header LM Studio sees: keep one")
    if mem.sampler == "budget" and mem.budget_gb is None:
        problems.append("memory.budget_gb: required when memory.sampler is 'budget'")
    seen: dict[str, str] = {}
    for key, model in config.models.items():
        for alias in model.aliases:
            if alias in config.models:
                problems.append(f"models.{key}.aliases: '{alias}' is itself a model key")
            elif alias in seen:
                problems.append(f"models.{key}.aliases: '{alias}' is already an alias of "
                                f"'{seen[alias]}'")
            seen[alias] = key
    for task, entries in config.tasks.items():
        problems += [f"tasks.{task}[{i}].model: required (the model key that serves it)"
                     for i, m in enumerate(entries) if isinstance(m, TaskModel) and not m.model]
    _auth_checks(config.auth, problems)
    _host_checks(config, problems)
    _state_checks(config.state, problems)
    total_gb = _total_memory_gb(config)
    problems += group_problems(config, total_gb)
    problems += load_option_problems(config)
    if total_gb is not None:
        for key, model in config.models.items():
            # With fit, footprint_gb is its need at its configured context: it may shrink.
            if model.footprint_gb is not None and model.footprint_gb > total_gb and \
                    model.fit.min_context_length is None:
                problems.append(f"models.{key}.footprint_gb: {model.footprint_gb:g} exceeds total "
                                f"memory ({total_gb:.1f} GB)")
        pinned_gb = sum(m.footprint_gb or 0.0 for m in config.models.values() if m.pinned)
        if pinned_gb > total_gb:
            problems.append(f"models: pinned footprints add up to {pinned_gb:g} GB, more than "
                            f"the memory available ({total_gb:.1f} GB)")


def _host_checks(config: Config, problems: list[str]) -> None:
    names: set[str] = set()
    for i, h in enumerate(config.upstreams):
        path = f"upstreams[{i}]"
        if not h.name:
            problems.append(f"{path}.name: required (it labels the host everywhere)")
        elif not all(c.isalnum() or c in "-_." for c in h.name) or len(h.name) > 64:
            problems.append(f"{path}.name: '{h.name[:64]}' must be letters, digits, '-', '_' "
                            "or '.', at most 64")
        elif h.name in names:
            problems.append(f"{path}.name: '{h.name}' names another host too")
        names.add(h.name)
        try:
            parts = urlsplit(h.url)
            well_formed = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port   # noqa: B018 - raises for a port out of range
        except ValueError:
            well_formed = False
        if not well_formed:
            problems.append(f"{path}.url: '{redact_url(h.url)}' is not an http(s) URL "
                            "with a host")
        if h.api_token and h.api_token_env:
            problems.append(f"{path}: api_token and api_token_env are exclusive")
        if (h.api_token or h.api_token_env) and url_has_credentials(h.url):
            problems.append(f"{path}.url: carries credentials (user:password@) and an API "
                            "token is set too: keep one")
        if h.sampler == "budget" and h.budget_gb is None:
            problems.append(f"{path}.budget_gb: required when its sampler is 'budget'")
        if h.sampler == "local" and well_formed and not is_local_url(h.url):
            problems.append(f"{path}.sampler: 'local' measures this machine, but the host "
                            f"is {urlsplit(h.url).hostname}: give it a budget_gb")
        if h.sampler == "auto" and h.budget_gb is None and well_formed \
                and not is_local_url(h.url):
            problems.append(f"{path}.budget_gb: required for a host on another machine "
                            "(its memory cannot be sampled from here)")
        if h.models is not None and not h.models:
            problems.append(f"{path}.models: empty list allows no model; omit it to allow all")
    if not names:
        return   # one server: host names in placement and models have nothing to name
    if config.placement.native_host is not None and config.placement.native_host not in names:
        problems.append(f"placement.native_host: '{config.placement.native_host}' is not a "
                        f"host in upstreams ({', '.join(sorted(names)) or 'none'})")
    for key, m in config.models.items():
        if m.host is not None and m.host not in names:
            problems.append(f"models.{key}.host: '{m.host}' is not a host in upstreams "
                            f"({', '.join(sorted(names)) or 'none'})")
    _task_host_checks(config, names, problems)


def _task_host_checks(config: Config, names: set[str], problems: list[str]) -> None:
    """A `tasks:` entry's host exists, may hold its model, and agrees with every other host
    named for that model (one model has one preferred host)."""
    patterns = {h.name: h.models for h in config.upstreams}
    named: dict[str, tuple[str, str]] = {k: (m.host, f"models.{k}.host")
                                         for k, m in config.models.items() if m.host}
    for task, entries in config.tasks.items():
        for i, m in enumerate(entries):
            if not isinstance(m, TaskModel) or m.host is None:
                continue
            path = f"tasks.{task}[{i}].host"
            if m.host not in names:
                problems.append(f"{path}: '{m.host}' is not a host in upstreams "
                                f"({', '.join(sorted(names))})")
                continue
            allowed = patterns[m.host]
            if allowed is not None and not any(fnmatch.fnmatchcase(m.model, p) for p in allowed):
                problems.append(f"{path}: host '{m.host}' may not hold '{m.model}' (its models: "
                                f"{', '.join(allowed)})")
            host, where = named.setdefault(m.model, (m.host, path))
            if host != m.host:
                problems.append(f"{path}: '{m.host}' for '{m.model}', but {where} names "
                                f"'{host}'; a model has one preferred host")


def _state_checks(state: StateConfig, problems: list[str]) -> None:
    if state.backend == "memory":
        return
    if (state.url is None) == (state.url_env is None):
        problems.append("state: backend redis needs exactly one of url, url_env")
    if state.url is not None and \
            state.url.partition("://")[0].lower() not in ("redis", "rediss", "unix"):
        problems.append(f"state.url: '{redact_url(state.url)}' must start with redis://, "
                        "rediss:// or unix://")
    if state.lock_ttl_s <= state.lease_ttl_s / 3:
        problems.append("state.lock_ttl_s: must be above a third of state.lease_ttl_s "
                        "(a lock is renewed as often as a lease)")


def config_warnings(config: Config) -> list[str]:
    """Valid but never useful: configured models whose footprint is above the ceiling any one
    model may take (they would be refused with model_too_large)."""
    total_gb = _total_memory_gb(config)
    if total_gb is None:
        return load_option_warnings(config)
    mem = config.memory
    ceiling_gb = min(total_gb - mem.min_free_memory_gb,
                     total_gb * mem.max_memory_usage_percent / 100.0)
    return [f"models.{key}.footprint_gb: {m.footprint_gb:g} GB can never load: the ceiling "
            f"for one model is {ceiling_gb:.1f} GB of {total_gb:.1f} GB "
            f"(memory.max_memory_usage_percent, memory.min_free_memory_gb"
            f"{', memory.budget_gb' if mem.sampler == 'budget' else ''})"
            for key, m in config.models.items()
            if m.footprint_gb is not None and ceiling_gb < m.footprint_gb <= total_gb
            and m.fit.min_context_length is None] + \
        load_option_warnings(config)

def _auth_checks(auth: AuthConfig, problems: list[str]) -> None:
    names: set[str] = set()
    for i, k in enumerate(auth.keys):
        path = f"auth.keys[{i}]"
        if not k.name:
            problems.append(f"{path}.name: required (it labels the key in stats and logs)")
        elif k.name in names:
            problems.append(f"{path}.name: '{k.name}' is used by another key")
        elif k.name == "admin":
            problems.append(f"{path}.name: 'admin' is the admin token's label; pick another")
        names.add(k.name)
        given = [f for f in ("key", "key_sha256", "key_env") if getattr(k, f)]
        if len(given) != 1:
            problems.append(f"{path}: needs exactly one of key, key_sha256, key_env "
                            f"(got {', '.join(given) or 'none'})")
        if k.key_sha256 and (len(k.key_sha256) != 64 or
                             any(c not in "0123456789abcdefABCDEF" for c in k.key_sha256)):
            problems.append(f"{path}.key_sha256: must be 64 hex digits (sha256 of the key)")
        if k.models is not None and not k.models:
            problems.append(f"{path}.models: empty list allows no model; omit it to allow all")
    if auth.admin_token and auth.admin_token_env:
        problems.append("auth: admin_token and admin_token_env are exclusive")


def _total_memory_gb(config: Config) -> float | None:
    if config.memory.sampler == "budget":
        return config.memory.budget_gb
    try:
        import psutil
        return psutil.virtual_memory().total / 1e9
    except Exception:  # psutil unavailable on an exotic platform: skip the check
        return None
