"""The configuration the command line runs on: flags, PROXY_* variables, the file, read into a
Config (flag > environment > config file > default) and checked as a whole — by --check, at
the start and at every reload alike (`resolve_config`). The only reader of the environment
besides cli.py's own commands.

A problem with a value a flag or a variable gave names that flag or variable beside the key
(`PROXY_LOG_LEVEL (logging.level): must be one of ...`): the file may not hold the key at all."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

from .config import Config
from .configfile import BlankConfigFile, read_config_file
from .configload import load_config
from .errors import ConfigError

ENV_FLAGS = {  # environment variable → (argparse dest, config path); PROXY_URL: `status`
    "PROXY_CONFIG": ("config", None),
    "PROXY_HOST": ("host", "server.host"),
    "PROXY_PORT": ("port", "server.port"),
    "PROXY_UPSTREAM": ("upstream", "upstream.url"),
    "PROXY_UPSTREAM_API_TOKEN": ("upstream_api_token", "upstream.api_token"),
    "PROXY_LOG_LEVEL": ("log_level", "logging.level"),
    "PROXY_DEMO_UPSTREAM_PORT": ("demo_upstream_port", None),
    "PROXY_DEMO_FLAVOR": ("flavor", None),
    "PROXY_DEMO_HOSTS": ("hosts", None),
}
INT_FLAGS = frozenset({"port", "demo_upstream_port", "hosts"})
# --demo --flavor F: the emulated server, and the upstream.kind the proxy speaks to it.
DEMO_FLAVORS = {"lmstudio": "lmstudio", "ollama": "ollama", "llamacpp": "llamacpp",
                "openai": "openai"}   # openai: the LM Studio emulator's /v1 surface alone
DEMO_OVERRIDES = {
    # The emulator's memory is an account, not this host's RAM: manage it as a budget.
    "memory.sampler": "budget", "memory.budget_gb": 16.0, "memory.min_free_memory_gb": 1.0,
    "eviction.hold": 5.0,
}


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str], *,
                   reloading: bool = False) -> Config:
    """The Config to run on, or ConfigError with every problem. `reloading`: a blank file
    (cut short while written?) is refused, so the running configuration stays; at a start it
    is a warning (`resolve_with_warnings`)."""
    return _resolve(args, environ, reloading, [])


def resolve_with_warnings(args: argparse.Namespace,
                          environ: Mapping[str, str]) -> tuple[Config, list[str]]:
    """The Config and what is valid but likely a mistake: --check prints these and a start
    logs them, the same list."""
    from .configcheck import config_warnings
    from .machinecheck import machine_warnings
    from .server.auth import exposure_problems
    warnings: list[str] = []
    config = _resolve(args, environ, False, warnings)
    return config, (warnings + exposure_problems(config)[1] + config_warnings(config) +
                    machine_warnings(config))


def _resolve(args: argparse.Namespace, environ: Mapping[str, str], reloading: bool,
             warnings: list[str]) -> Config:
    given = _given(args, environ)   # dest → (value, the flag or variable that gave it)

    def value(dest: str) -> Any:
        return given[dest][0] if dest in given else None

    problems = _demo_problems(given)
    if problems:
        raise ConfigError(problems)
    path = config_path(value("config"), environ)
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = read_config_file(path)
        except BlankConfigFile as exc:
            if reloading:
                raise ConfigError([f"{p}: the running configuration stays (write {{}} to "
                                   "mean the defaults)" for p in exc.problems]) from None
            warnings += [f"{p}: every key takes its default (write {{}} to mean them)"
                         for p in exc.problems]
    overrides: dict[str, Any] = {}
    if value("demo"):
        from .store import default_path
        overrides.update(DEMO_OVERRIDES)
        overrides["upstream.kind"] = DEMO_FLAVORS[value("flavor") or "lmstudio"]
        # The demo's statistics are kept, but apart from those of a real LM Studio; a path
        # the file gives is kept (a second demo beside a running one needs a file of its own).
        if not _file_sets_storage_path(raw):
            overrides["storage.path"] = str(default_path().with_name("demo-history.sqlite3"))
    named: dict[str, str] = {}     # config path → the flag or variable that set it
    for dest, dotted in ENV_FLAGS.values():
        if dotted and dest in given:
            overrides[dotted], named[dotted] = given[dest]
    from .machinecheck import machine_problems
    from .server.auth import exposure_problems, resolve_secrets
    try:
        config = resolve_secrets(load_config(raw, overrides=overrides), environ)
        problems = exposure_problems(config)[0] + machine_problems(config)
    except ConfigError as exc:
        problems = exc.problems
    if problems:
        raise ConfigError([_naming(p, named) for p in problems])
    return config


def _file_sets_storage_path(raw: Mapping[str, Any]) -> bool:
    storage = raw.get("storage")
    return isinstance(storage, Mapping) and storage.get("path") is not None


def with_environment(args: argparse.Namespace,
                     environ: Mapping[str, str]) -> argparse.Namespace:
    """The flags as parsed, each unset one taken from its variable (flag > environment)."""
    return argparse.Namespace(**{**vars(args), **{dest: value for dest, (value, _) in
                                                   _given(args, environ).items()}})


def _given(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """Each flag's value, else its variable's, with the flag or variable it came from (args is
    left as parsed: a reload reads the environment again)."""
    given: dict[str, tuple[Any, str]] = {}
    for name, flag in vars(args).items():
        if flag is not None and flag is not False:
            given[name] = (flag, "--" + name.replace("_", "-"))
    for var, (dest, _) in ENV_FLAGS.items():
        if dest in given or not environ.get(var):
            continue
        text = environ[var]
        try:
            given[dest] = (int(text) if dest in INT_FLAGS else text, var)
        except ValueError:
            raise ConfigError([f"{var}: must be an integer (got {text!r})"]) from None
    return given


def _demo_problems(given: Mapping[str, tuple[Any, str]]) -> list[str]:
    """The demo's own settings: only with --demo, and within what it can start."""
    demo = "demo" in given
    flavor, port, hosts = (given.get(d) for d in ("flavor", "demo_upstream_port", "hosts"))
    for setting in (port, flavor, hosts):
        if setting is not None and not demo:
            return [f"{setting[1]}: only with --demo"]
    if flavor is not None and flavor[0] not in DEMO_FLAVORS:
        return [f"{flavor[1]}: must be one of {', '.join(DEMO_FLAVORS)} (got {flavor[0]!r})"]
    if hosts is not None:
        from .demofleet import demo_hosts
        if (flavor or ("lmstudio",))[0] != "lmstudio":
            return [f"{hosts[1]}: the demo fleet is of LM Studio emulators (not with "
                    f"{flavor[1] if flavor else '--flavor'})"]
        if port is not None:
            return [f"{port[1]}: not with {hosts[1]} (each host's emulator takes a free port)"]
        try:
            demo_hosts(hosts[0])
        except ValueError as exc:     # it names the flag
            return [str(exc).replace("--hosts", hosts[1], 1)]
    if port is not None and not 0 <= port[0] <= 65535:
        return [f"{port[1]}: must be 0..65535 (got {port[0]})"]
    return []


def _naming(problem: str, named: Mapping[str, str]) -> str:
    """The problem, with the flag or variable that gave its key's value named first."""
    key, sep, rest = problem.partition(": ")
    source = named.get(key)
    return f"{source} ({key}){sep}{rest}" if source and sep else problem


def config_path(flag: str | None, environ: Mapping[str, str]) -> str | None:
    path = flag or environ.get("PROXY_CONFIG")
    if path is None and Path("proxy.yaml").is_file():
        path = "proxy.yaml"
    return path
