"""The checks across keys, run once a Config is built (`load_config`): what no single field's
rule can say — credentials given twice, hosts and their names, the shared state's settings,
groups and load options, footprints against the memory there is. Each problem is one line
naming its path; `config_warnings` lists what is valid but can never be useful."""
from __future__ import annotations

from urllib.parse import urlsplit

from .authcheck import auth_problems
from .config import Config, HostConfig, StateConfig, TaskModel, UpstreamConfig
from .urls import (is_local_url, redact_url, server_identity, upstream_url_problem,
                   url_has_credentials)
from .origins import config_problems as browser_problems
from .groupcheck import Memory, ceiling_gb as _ceiling_gb, group_problems
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
    problems += browser_problems(config.server.allowed_hosts, config.server.allowed_origins)
    problems += auth_problems(config.auth)
    _host_checks(config, problems)
    _state_checks(config.state, problems)
    total_gb = _total_memory_gb(config)
    memories = _group_memories(config, total_gb)
    problems += _empty_ceilings(config, memories)
    problems += group_problems(config, memories)
    problems += load_option_problems(config)
    if config.upstreams:        # each host's engine goes by its own memory, not memory:'s
        problems += _host_footprint_problems(config)
    elif total_gb is not None:
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
    urls: dict[tuple[str, str, int, str], int] = {}
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
        url_problem = upstream_url_problem(h.url, h.kind)
        well_formed = url_problem is None
        if url_problem is not None:
            problems.append(f"{path}.url: {url_problem}")
        else:
            where = server_identity(h.url)
            # One server listed twice would be loaded and measured as two.
            first = urls.setdefault(where, i)
            if first != i:
                problems.append(f"{path}.url: {_url_shown(h.url)} and upstreams[{first}].url "
                                f"{_url_shown(config.upstreams[first].url)} name one server; "
                                "each host is a server of its own")
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
    if not config.upstreams:
        url_problem = upstream_url_problem(config.upstream.url, config.upstream.kind)
        if url_problem is not None:
            problems.append(f"upstream.url: {url_problem}")
        problems += one_server_host_problems(config)
        return
    hosts = {h.name: h for h in config.upstreams}
    if config.placement.native_host is not None and config.placement.native_host not in names:
        problems.append(f"placement.native_host: '{config.placement.native_host}' is not a "
                        f"host in upstreams ({', '.join(sorted(names)) or 'none'})")
    for key, m in config.models.items():
        if m.host is not None:
            _may_hold(hosts, m.host, key, key, f"models.{key}.host", problems)
    _task_host_checks(config, hosts, problems)


def _url_shown(url: str) -> str:
    default = " (the default, for a host that sets no url)" if url == UpstreamConfig.url else ""
    return f"'{redact_url(url)}'{default}"


def one_server_host_problems(config: Config) -> list[str]:
    """A host named where there are no hosts: one server (`upstream:`) has no name to give."""
    problems: list[str] = []
    why = "names a host, but there is no upstreams: list (one server, upstream:, has no " \
          "host name): remove it, or list the servers under upstreams:"
    if config.placement.native_host is not None:
        problems.append(f"placement.native_host: '{config.placement.native_host}' {why}")
    for key, m in config.models.items():
        if m.host is not None:
            problems.append(f"models.{key}.host: '{m.host}' {why}")
    for task, entries in config.tasks.items():
        for i, m in enumerate(entries):
            if isinstance(m, TaskModel) and m.host is not None:
                problems.append(f"tasks.{task}[{i}].host: '{m.host}' {why}")
    return problems


def _may_hold(hosts: dict[str, HostConfig], host: str, key: str, named: str, path: str,
              problems: list[str]) -> bool:
    """The host exists and its `models:` patterns allow the model `key` (named in the config
    as `named`: the key or one of its aliases); else a problem at `path` (False)."""
    h = hosts.get(host)
    if h is None:
        problems.append(f"{path}: '{host}' is not a host in upstreams "
                        f"({', '.join(sorted(hosts))})")
        return False
    if not h.allows(key):
        alias = f" (alias '{named}')" if named != key else ""
        problems.append(f"{path}: host '{host}' may not hold '{key}'{alias} (its models: "
                        f"{', '.join(h.models or ())})")
    return True


def _task_host_checks(config: Config, hosts: dict[str, HostConfig],
                      problems: list[str]) -> None:
    """A `tasks:` entry's host exists, may hold its model, and agrees with every other host
    named for that model (one model has one preferred host). An entry may name the model by
    an alias: what counts is the model key it stands for."""
    aliases = config.alias_map()
    named: dict[str, tuple[str, str]] = {k: (m.host, f"models.{k}.host")
                                         for k, m in config.models.items() if m.host}
    for task, entries in config.tasks.items():
        for i, m in enumerate(entries):
            if not isinstance(m, TaskModel) or m.host is None:
                continue
            path = f"tasks.{task}[{i}].host"
            key = aliases.get(m.model, m.model)
            if not _may_hold(hosts, m.host, key, m.model, path, problems):
                continue
            host, where = named.setdefault(key, (m.host, path))
            if host != m.host:
                problems.append(f"{path}: '{m.host}' for '{key}', but {where} names "
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
    """Valid but never useful, or likely a mistake: configured models whose footprint is above
    the ceiling any one model may take (they would be refused with model_too_large); in a
    fleet, on every host that may hold them; one server elsewhere whose memory is sampled
    here."""
    if config.upstreams:
        return _host_footprint_warnings(config) + load_option_warnings(config)
    warnings = _remote_sampled_warnings(config)
    total_gb = _total_memory_gb(config)
    if total_gb is None:
        return warnings + load_option_warnings(config)
    mem = config.memory
    ceiling_gb = _ceiling_gb(config, total_gb)
    return warnings + [
        f"models.{key}.footprint_gb: {m.footprint_gb:g} GB can never load: the ceiling "
        f"for one model is {ceiling_gb:.1f} GB of {total_gb:.1f} GB "
        f"(memory.max_memory_usage_percent, memory.min_free_memory_gb"
        f"{', memory.budget_gb' if mem.sampler == 'budget' else ''})"
        for key, m in config.models.items()
        if m.footprint_gb is not None and ceiling_gb < m.footprint_gb <= total_gb
        and m.fit.min_context_length is None] + \
        load_option_warnings(config)


# The names a container gives the machine it runs on: a container on Linux samples that
# machine's memory, so an LM Studio there is "here" for memory.sampler: local.
CONTAINER_HOST_NAMES = ("host.docker.internal", "host.containers.internal")


def _remote_sampled_warnings(config: Config) -> list[str]:
    """One server on another machine with memory sampled on this one: the proxy would manage
    memory the server does not use. A warning, not the refusal a fleet's host gets
    (upstreams[].budget_gb): the name may be this machine's under one the proxy cannot tell
    (a LAN name, a container's host), and such configurations worked before."""
    url = config.upstream.url
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if config.memory.sampler != "local" or is_local_url(url) or host in CONTAINER_HOST_NAMES \
            or config.upstream.kind == "openai":   # (nothing is loaded there: no memory managed)
        return []
    return [f"upstream.url: {host} is not this machine as far as the proxy can tell, but "
            "memory.sampler is 'local': the proxy would manage this machine's memory, not "
            "that server's. Set memory.sampler: budget and memory.budget_gb to the memory "
            "its models may use there (ignore this if the name is this machine's)"]


HostMemory = tuple[int, HostConfig, float | None, str]   # (index, host, GB, what sets it)


def _empty_ceilings(config: Config, memories: list[Memory]) -> list[str]:
    """A memory of which models may take nothing: every load would be refused."""
    mem = config.memory
    out = []
    for m in memories:
        if m.total_gb is None or _ceiling_gb(config, m.total_gb) > 0:
            continue
        where = "" if m.host is None else f" on '{m.host}'"
        out.append(f"memory: models may take nothing of {m.total_gb:.1f} GB ({m.source}){where}:"
                   f" min_free_memory_gb {mem.min_free_memory_gb:g}, max_memory_usage_percent "
                   f"{mem.max_memory_usage_percent:g}; every load would be refused")
    return out


def _group_memories(config: Config, total_gb: float | None) -> list[Memory]:
    if not config.upstreams:
        budget = config.memory.sampler == "budget"
        return [Memory(total_gb, "memory.budget_gb" if budget else "this machine's memory")]
    return [Memory(gb, src, h.name, h.allows) for _, h, gb, src in _host_memory(config)]


def _host_memory(config: Config) -> list[HostMemory]:
    """Each host's memory as its engine sees it (fleet/hosts.py host_config): its budget, else
    this machine's (None where it cannot be known here)."""
    machine_gb: list[float | None] = []
    out: list[HostMemory] = []
    for i, h in enumerate(config.upstreams):
        if h.budget() is not None:
            out.append((i, h, h.budget(), f"upstreams[{i}].budget_gb"))
            continue
        if not machine_gb:
            machine_gb.append(_machine_memory_gb())
        out.append((i, h, machine_gb[0], "this machine's memory"))
    return out


def _fixed_footprints(config: Config) -> dict[str, float]:
    """Configured footprints that cannot shrink (with fit, footprint_gb is its need at its
    configured context: it may)."""
    return {key: m.footprint_gb for key, m in config.models.items()
            if m.footprint_gb is not None and m.fit.min_context_length is None}


def _host_footprint_problems(config: Config) -> list[str]:
    """A footprint above the memory of every host that may hold it; footprints pinned on a
    host, together above its memory: those with that models.<key>.host, or with none where no
    other host may hold them (one pinned on every host may stay on another)."""
    hosts = _host_memory(config)
    holders = {key: [h.name for _, h, _, _ in hosts if h.allows(key)] for key in config.models}
    out = []
    for key, gb in _fixed_footprints(config).items():
        may = [(h, total, src) for _, h, total, src in hosts if h.allows(key)]
        if may and all(total is not None and gb > total for _, total, _ in may):
            listed = ", ".join(f"'{h.name}' {total:.1f} GB ({src})" for h, total, src in may)
            out.append(f"models.{key}.footprint_gb: {gb:g} exceeds the memory of every host "
                       f"that may hold it ({listed})")
    for i, h, total, src in hosts:
        pinned_gb = sum(m.footprint_gb or 0.0 for key, m in config.models.items()
                        if m.pinned and (m.host == h.name or
                                         m.host is None and holders[key] == [h.name]))
        if total is not None and pinned_gb > total:
            out.append(f"upstreams[{i}]: the footprints of the models pinned on '{h.name}' add "
                       f"up to {pinned_gb:g} GB, more than its memory ({total:.1f} GB, {src})")
    return out


def _host_footprint_warnings(config: Config) -> list[str]:
    """A footprint within the memory of some host that may hold it but above the ceiling for
    one model on each of them: no host can ever load it."""
    hosts = _host_memory(config)
    out = []
    for key, gb in _fixed_footprints(config).items():
        may = [(h, total, src) for _, h, total, src in hosts if h.allows(key)]
        if not may or any(total is None or gb <= _ceiling_gb(config, total)
                          for _, total, _ in may) or all(gb > total for _, total, _ in may):
            continue      # it fits somewhere, or cannot be judged here, or is a problem
        listed = ", ".join(f"'{h.name}' {_ceiling_gb(config, total):.1f} GB of {total:.1f} GB "
                           f"({src})" for h, total, src in may)
        barred = "".join(f"; upstreams[{i}].models keeps it off '{h.name}'"
                         for i, h, _, _ in hosts if not h.allows(key))
        out.append(f"models.{key}.footprint_gb: {gb:g} GB can never load: it is above the "
                   f"ceiling for one model on every host that may hold it: {listed} "
                   f"(memory.max_memory_usage_percent, memory.min_free_memory_gb){barred}")
    return out


def _total_memory_gb(config: Config) -> float | None:
    if config.memory.sampler == "budget":
        return config.memory.budget_gb
    return _machine_memory_gb()


def _machine_memory_gb() -> float | None:
    try:
        import psutil
        return psutil.virtual_memory().total / 1e9
    except Exception:  # psutil unavailable on an exotic platform: skip the check
        return None
