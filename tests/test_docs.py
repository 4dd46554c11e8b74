"""The docs stay true to the code: the configuration page is the generator's output, every
config key is described, the site builds with no broken link, and the README's test command is
the one CI runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from proxy import docgen

ROOT = Path(__file__).resolve().parent.parent


def test_the_configuration_page_is_current():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == docgen.render((ROOT / "proxy.yaml").read_text(encoding="utf-8")), (
        "docs/configuration.md is out of date: run python -m proxy.docgen")


def test_the_generator_check_mode_tells_a_stale_page(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert docgen.main(["--out", str(out)]) == 0
    assert docgen.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert docgen.main(["--check", "--out", str(out)]) == 1
    assert "run python -m proxy.docgen" in capsys.readouterr().err


def test_every_config_key_is_described_in_proxy_yaml():
    assert docgen.undocumented((ROOT / "proxy.yaml").read_text(encoding="utf-8")) == []


def test_the_page_shows_types_defaults_and_rules_from_the_schema():
    page = docgen.render((ROOT / "proxy.yaml").read_text(encoding="utf-8"))
    assert ("| `models.<key>.priority` | integer | `5` | 1 to 10 | 1..10; higher is kept longer |"
            in page)
    assert "| `eviction.hold` | number or string | `off` | ≥ 0 or `adaptive`, `expected`, `off` |" \
        in page
    assert "| `--port` | `PROXY_PORT` | `server.port` |" in page


def test_comments_are_read_with_continuations_examples_and_blocks_above():
    notes = docgen.yaml_comments(
        "# header prose\n"
        "\n"
        "server:                # the socket\n"
        "  port: 8080           # where to listen\n"
        "                       # (0: any free port)\n"
        "  host: 127.0.0.1\n"
        "auth:\n"
        "  keys: []\n"
        "#  - name: alice       # labels the key\n"
        "#    key_env: A_KEY    # from the environment\n"
        "#  - name: bob\n"
        "# Per-model settings.\n"
        "models: {}\n"
        "#  qwen/qwen3-8b:\n"
        "#    priority: 8       # 1..10\n"
        "#    load:\n"
        "#      context_length: 8192   # passed on\n")
    assert notes[("server",)] == "the socket"
    assert notes[("server", "port")] == "where to listen (0: any free port)"
    assert notes[("server", "host")] == ""
    assert notes[("auth", "keys", "[]", "name")] == "labels the key"
    assert notes[("auth", "keys", "[]", "key_env")] == "from the environment"
    assert notes[("models",)] == "Per-model settings."
    assert notes[("models", "qwen/qwen3-8b", "priority")] == "1..10"
    assert notes[("models", "qwen/qwen3-8b", "load", "context_length")] == "passed on"


def test_the_docs_site_builds_strictly(tmp_path):
    """mkdocs --strict fails on a broken link or anchor between pages, a page missing from the
    navigation, or a bad config; nothing is fetched (no social or privacy plugin)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
         "--config-file", str(ROOT / "mkdocs.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_the_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to the docs"
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```sh\n(pip install -e '\.\[test\]'[^\n]*)\n```", readme)
    assert len(commands) == 1, "the README shows one test command"
    assert commands[0] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_configuration_example_is_valid():
    import yaml
    from proxy.configload import load_config
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert blocks
    for block in blocks:
        load_config(yaml.safe_load(block))


def _error_codes_the_proxy_answers() -> set[str]:
    """Every code of the proxy's own errors: its ProxyError classes, and the few bodies
    written directly (at the connection level, before any handler)."""
    from proxy import errors
    codes: set[str] = set()
    pending = [errors.ProxyError]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls is not errors.ProxyError and cls is not errors.PermissionDenied:
            codes.add(cls.code)      # PermissionDenied: a base, only its subclasses are raised
    written = re.findall(r'"code": "([a-z_]+)"',
                         (ROOT / "proxy" / "server" / "serving.py").read_text())
    return codes | set(written)


def test_the_http_api_errors_table_names_every_code_the_proxy_answers():
    """README: "Every endpoint, its access rule and every error code: docs/http-api.md"."""
    page = (ROOT / "docs" / "http-api.md").read_text()
    table = page.split("## Errors", 1)[1]
    listed = set(re.findall(r"\| `([a-z_]+)` \|", table))
    missing = _error_codes_the_proxy_answers() - listed
    assert not missing, f"codes the proxy answers that docs/http-api.md does not list: {missing}"


def test_the_architecture_page_names_every_module_of_the_package():
    """docs/architecture.md says what lives where "as the code has it today": each top-level
    module (`name.py`) and package (`name/`) of proxy/ is named in it."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([a-z_]+(?:\.py|/))", page))
    package = ROOT / "proxy"
    present = {p.name for p in package.glob("*.py")} | \
        {p.name + "/" for p in package.iterdir() if (p / "__init__.py").exists()}
    missing = present - named - {"py.typed"}
    assert not missing, f"proxy/ modules docs/architecture.md does not name: {sorted(missing)}"
