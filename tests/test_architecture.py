"""The import rule, as the code has it: layers import downward only, and no module-level cycle.

    foundation   errors, inputs, schema, config, configload, configfile, configcheck,
                 authcheck, machinecheck, groupcheck, loadoptions, liveconfig, urls, origins
    backends     upstream/*, store (with storelock, storedamage, storeschema), storage,
                 state/* (the fleet's shared facts: memory or Redis)
    engine       engine/*                             (never aiohttp's web)
    fleet        fleet/*                              (one engine per host, the placer above)
    wings        library/*, observe/*                 (they wrap or watch the engine)
    server       server/*, native/*                   (the HTTP side, one request at a time)
    handlers     handlers/*
    app          app
    commands     cli, configsource, demofleet, status, mcp (a client of the HTTP API), docgen, __main__, the package's own __init__, and the emulator
                 (a server of its own, on the proxy's serving)

Imports inside functions and under TYPE_CHECKING are not edges: they run late or never.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"
LAYERS = [
    ("foundation", ("proxy.errors", "proxy.inputs", "proxy.schema", "proxy.config",
                    "proxy.configload", "proxy.configcheck", "proxy.authcheck",
                    "proxy.machinecheck",
                    "proxy.groupcheck",
                    "proxy.loadoptions", "proxy.liveconfig", "proxy.urls", "proxy.origins",
                    "proxy.configfile")),
    ("backends", ("proxy.upstream", "proxy.store", "proxy.storelock", "proxy.storedamage",
                  "proxy.storeschema",
                  "proxy.storage", "proxy.state")),
    ("engine", ("proxy.engine",)),
    ("fleet", ("proxy.fleet",)),
    ("wings", ("proxy.library", "proxy.observe")),
    ("server", ("proxy.server", "proxy.native")),
    ("handlers", ("proxy.handlers",)),
    ("app", ("proxy.app",)),
    ("commands", ("proxy.cli", "proxy.configsource", "proxy.demo", "proxy.demofleet", "proxy.status", "proxy.mcp",
                  "proxy.docgen", "proxy.__main__", "proxy", "proxy.emulator")),
]


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """proxy modules imported at module level (not in functions, not under TYPE_CHECKING)."""
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] +
                                    ([node.module] if node.module else []))
                if base == "proxy" or base.startswith("proxy."):
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() \
                            or (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                        found.add(sub if is_module else base)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("proxy"))
    visit(ast.parse(path.read_text()).body)
    found.discard(me)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): top_level_imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_runs_downward_or_within_its_layer():
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                    for m, deps in graph().items() for d in deps
                    if layer_of(d) > layer_of(m))
    assert upward == []


def test_the_module_graph_has_no_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d == m or (m.startswith(d + ".") and d in g):
                continue   # a module importing its own package's __init__ (proxy.upstream)
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d in g and not state.get(d):
                walk(d)
        stack.pop()
        state[m] = 2
    for m in sorted(g):
        if not state.get(m):
            walk(m)
    assert cycles == []


def test_the_engine_never_imports_aiohttp_web_and_upstream_never_the_engine():
    for path in (PACKAGE / "engine").rglob("*.py"):
        assert "from aiohttp import web" not in path.read_text(), path
    for path in (PACKAGE / "upstream").rglob("*.py"):
        assert not any(d.startswith("proxy.engine") for d in top_level_imports(path)), path
