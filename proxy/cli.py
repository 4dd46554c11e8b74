"""Command line: `python -m proxy [--config PATH] [--host H] [--port P] [--upstream URL]
[--demo [--flavor F] [--hosts N] [--demo-upstream-port P]] [--check]`, `python -m proxy status`,
`python -m proxy healthcheck`, `python -m proxy mcp`. With configsource.py, the only module that
reads the environment: every flag also has a PROXY_* variable (flag > environment > config file >
default)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any, Callable, Mapping

from .config import Config
from .configfile import BlankConfigFile, read_config_file
from .configload import load_config, replace_config
from .configsource import (DEMO_FLAVORS, config_path, resolve_config, resolve_with_warnings,
                           with_environment)
from .urls import proxy_url_problem, redact_url
from .demo import demo_banner, start_demo_emulator
from .errors import ConfigError

log = logging.getLogger("proxy")


COMMANDS_HELP = """commands (each with its own --help):
  python -m proxy status [--watch]  models, memory and pressure of a running proxy
  python -m proxy healthcheck       exit 0 when the proxy at server.port answers /healthz
  python -m proxy mcp --url URL     the proxy's tools for agents over MCP (stdio)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m proxy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="OpenAI-compatible proxy in front of LM Studio that manages model memory.",
        # The subcommands are dispatched before this parser (main): name them here, or
        # --help never shows they exist.
        epilog=COMMANDS_HELP)
    p.add_argument("--config", help="YAML config file (default: ./proxy.yaml if present)")
    p.add_argument("--host", help="address to listen on")
    p.add_argument("--port", type=int, help="port to listen on (0 = any free port)")
    p.add_argument("--upstream", help="LM Studio base URL, e.g. http://127.0.0.1:1234")
    p.add_argument("--upstream-api-token", help="bearer token LM Studio requires")
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--demo", action="store_true",
                   help="start the built-in LM Studio emulator and put the proxy in front of it")
    p.add_argument("--flavor", choices=tuple(DEMO_FLAVORS),
                   help="with --demo: the server to emulate (default: lmstudio; "
                        "PROXY_DEMO_FLAVOR)")
    p.add_argument("--hosts", type=int, metavar="N",
                   help="with --demo: a fleet of N emulated hosts of different memory and load "
                        "speed behind the proxy (upstreams:), 1..8 (PROXY_DEMO_HOSTS)")
    p.add_argument("--demo-upstream-port", type=int, metavar="P",
                   help="with --demo: the emulator's port (default: any free port; "
                        "PROXY_DEMO_UPSTREAM_PORT)")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration and exit (0 valid, 2 invalid)")
    return p


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if argv[:1] == ["status"]:
        return _status(argv[1:], env)
    if argv[:1] == ["healthcheck"]:
        return _healthcheck(argv[1:], env)
    if argv[:1] == ["mcp"]:
        return _mcp(argv[1:], env)
    args = build_parser().parse_args(argv)
    try:
        # --check and a start refuse and warn of the same things.
        config, warnings = resolve_with_warnings(args, env)
        given = with_environment(args, env)
    except ConfigError as exc:
        print("configuration is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    if args.check:
        for warning in warnings:
            print(f"warning: {warning}")
        print("configuration is valid")
        return 0
    logging.basicConfig(level=config.logging.level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in warnings:
        log.warning("%s", warning)
    rc = 0
    with contextlib.suppress(KeyboardInterrupt):
        with asyncio.Runner(loop_factory=_loop_factory(config.server.event_loop)) as runner:
            rc = runner.run(_run(config, demo=args.demo, flavor=given.flavor or "lmstudio",
                                 source=lambda: resolve_config(args, env, reloading=True),
                                 demo_upstream_port=given.demo_upstream_port or 0,
                                 hosts=given.hosts))
    return rc


def _loop_factory(choice: str) -> Any:
    """uvloop cuts the proxy's CPU per request by ~9% (bench/overhead.py); optional (its
    absence with `uvloop` chosen is a configuration problem: machinecheck.py)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _local_config(flag: str | None, environ: Mapping[str, str],
                  sections: tuple[str, ...]) -> Config:
    """Sections of the proxy's config, for the commands that talk to a running proxy on this
    host (status, healthcheck): they follow its port (and admin token) instead of guessing."""
    path = config_path(flag, environ)
    try:
        raw = read_config_file(path) if path else {}
    except BlankConfigFile:
        raw = {}
    return load_config({k: raw[k] for k in sections if isinstance(raw.get(k), dict)})


def _local_address(config: Config, environ: Mapping[str, str]) -> tuple[str, int]:
    host = environ.get("PROXY_HOST") or config.server.host
    try:
        port = int(environ.get("PROXY_PORT") or config.server.port)
    except ValueError:
        raise ConfigError([f"PROXY_PORT: must be an integer "
                           f"(got {environ['PROXY_PORT']!r})"]) from None
    return host, port


def _status(argv: list[str], environ: Mapping[str, str]) -> int:
    from .status import local_url, run
    p = argparse.ArgumentParser(prog="python -m proxy status",
                                description="Show models, memory and pressure of a running proxy.")
    p.add_argument("--config", help="the proxy's config: its server.host/port and admin token "
                                    "are used (default: PROXY_CONFIG, else ./proxy.yaml)")
    p.add_argument("--url", default=environ.get("PROXY_URL"),
                   help="the proxy's address (PROXY_URL; default: from the config)")
    p.add_argument("--watch", action="store_true",
                   help="redraw in place as the proxy's event stream reports changes")
    p.add_argument("--interval", type=float, default=1.0,
                   help="with --watch: at most one redraw per this many seconds")
    p.add_argument("--api-key", default=environ.get("PROXY_API_KEY"),
                   help="a client key or the admin token, when auth is on (PROXY_API_KEY; "
                        "default: the config's admin token)")
    args = p.parse_args(argv)
    url, api_key = args.url, args.api_key
    if url is None or api_key is None:
        try:
            config = _local_config(args.config, environ, ("server", "auth"))
            host, port = _local_address(config, environ)
        except ConfigError as exc:
            print("configuration is invalid:", *exc.problems, sep="\n  ")
            return 2
        url = url or local_url(host, port)
        if api_key is None:
            auth = config.auth
            api_key = (environ.get(auth.admin_token_env) if auth.admin_token_env
                       else auth.admin_token) or None
    if args.watch:
        from .status import watch
        return watch(url, interval_s=args.interval, api_key=api_key)
    return run(url, api_key)


def _healthcheck(argv: list[str], environ: Mapping[str, str]) -> int:
    """For container and pod probes: GET /healthz on the port the configuration says, so the
    probe follows the config instead of hard-coding a port."""
    from .status import healthcheck
    p = argparse.ArgumentParser(prog="python -m proxy healthcheck")
    p.add_argument("--config")
    args = p.parse_args(argv)
    try:
        host, port = _local_address(_local_config(args.config, environ, ("server",)),
                                    environ)
    except ConfigError as exc:
        print("configuration is invalid:", *exc.problems, sep="\n  ")
        return 2
    return healthcheck(host, port)


def _mcp(argv: list[str], environ: Mapping[str, str]) -> int:
    """An MCP server on stdin/stdout for an MCP host (LM Studio, Claude Desktop, an IDE) that
    starts it, against a running proxy: its tools are calls to that proxy's HTTP API."""
    p = argparse.ArgumentParser(prog="python -m proxy mcp",
                                description="Serve the proxy's model tools over MCP (stdio).")
    p.add_argument("--url", default=environ.get("PROXY_URL"),
                   required=not environ.get("PROXY_URL"),
                   help="the running proxy's address, e.g. http://127.0.0.1:8080 (PROXY_URL)")
    p.add_argument("--api-key", default=environ.get("PROXY_API_KEY"),
                   help="sent as 'Authorization: Bearer': a client key to read, the admin "
                        "token to load, unload, pin and optimize (PROXY_API_KEY)")
    args = p.parse_args(argv)
    problem = proxy_url_problem(args.url)
    if problem is not None:   # else every tool call would fail, each with a puzzle of its own
        p.error(f"--url (PROXY_URL): {problem}")
    try:
        from .mcp.server import run_stdio
    except ImportError:
        print("the MCP server needs the mcp extra: pip install 'lmstudio-memory-proxy[mcp]'",
              file=sys.stderr)
        return 2
    return run_stdio(args.url, args.api_key)


async def _run(config: Config, *, demo: bool, flavor: str = "lmstudio",
               source: Callable[[], Config] | None = None, demo_upstream_port: int = 0,
               hosts: int | None = None) -> int:
    from .app import create_app
    from .server.reload import RELOADER
    from .server.serving import CannotListen, raise_fd_limit, serve
    from .store import StorageInUse

    raise_fd_limit()   # every connection is a file descriptor; 1,024 goes quickly
    emulator = None
    emulators: list[Any] = []   # one per host of a demo fleet
    where: dict[str, Any] = {}  # what the demo's emulators put into the config
    if demo and hosts:
        from .demofleet import demo_hosts, hosts_lines, start_demo_fleet, upstreams
        fleet = demo_hosts(hosts)
        try:
            emulators = await start_demo_fleet(fleet)
        except OSError as exc:
            print(f"cannot start the demo's emulators: {exc.strerror or exc}", file=sys.stderr)
            return 1
        where = {"upstreams": upstreams(fleet, emulators)}
    elif demo:
        try:
            emulator = await start_demo_emulator(flavor, demo_upstream_port)
        except OSError as exc:
            print(f"cannot start the demo's emulator on port {demo_upstream_port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        emulators = [emulator]
        where = {"upstream.url": emulator.url}
    if where:
        config = replace_config(config, where)

    def reread() -> Config:
        assert source is not None
        new = source()
        if where:
            new = replace_config(new, where)
        return new

    app = create_app(config, config_source=reread if source is not None else None)
    try:   # MCP over streamable HTTP at /mcp, when the optional mcp extra is installed
        from .mcp.http import PATH, mount_mcp
    except ImportError:
        log.info("MCP at /mcp is off: pip install 'lmstudio-memory-proxy[mcp]' to serve it")
    else:
        mount_mcp(app)
        log.info("MCP (streamable HTTP) at %s", PATH)
    host, port = config.server.host, config.server.port
    try:
        served = await serve(app, host, port, shutdown_timeout_s=config.server.shutdown_timeout_s)
    except (OSError, StorageInUse) as exc:
        # Only a bind failure is about the address; any other (a file the start reads) is not.
        print(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
              if isinstance(exc, CannotListen) else f"cannot start: {exc}", file=sys.stderr)
        for emu in emulators:
            await emu.close()
        return 1
    # Signals are handled before anyone is told the proxy listens: a SIGHUP or SIGTERM sent
    # on that word must not meet the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, _reload_on_signal, app, app[RELOADER])
    log.info("proxy listening on %s, %s (%s event loop)", served.url,
             f"hosts {', '.join(f'{h.name} {redact_url(h.url)}' for h in config.upstreams)}"
             if config.upstreams else f"upstream {redact_url(config.upstream.url)}",
             type(asyncio.get_running_loop()).__module__.split(".")[0])
    if demo and hosts:
        print(demo_banner(served.url, "", config, flavor,
                           fleet=hosts_lines(fleet, emulators)), flush=True)
    elif demo:
        print(demo_banner(served.url, emulator.url if emulator else "", config, flavor),
              flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining requests (up to %gs)", config.server.shutdown_timeout_s)
        await served.close()
        for emu in emulators:
            await emu.close()
        log.info("stopped")
    return 0


def _reload_on_signal(app: Any, reloader: Any) -> None:
    log.info("SIGHUP: reloading the configuration")
    try:
        reloader.reload(app)
    except Exception:   # a signal handler must never take the proxy down
        log.exception("reload failed; the running configuration stays")
