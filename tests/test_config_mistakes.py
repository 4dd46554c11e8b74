"""Mistakes --check let through: a key given twice in one mapping (YAML keeps the last), a blank
file (every key at its default, as a file cut short would have it), a log level in lower case,
and a value from a flag or PROXY_* variable reported under the config key alone."""
from __future__ import annotations

import logging

import pytest

from proxy.cli import build_parser, main, resolve_config
from proxy.errors import ConfigError


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("server:\n  port: 42210\nmodels:\n  a/b: {priority: 3, priority: 4}\n"
                    "server:\n  port: 42299\n")
    assert main(["--config", str(path), "--check"], environ={}) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"  {path}: line 4: key 'priority' is given again (first at line 4); only one of them "
        "would count",
        f"  {path}: line 5: key 'server' is given again (first at line 1); only one of them "
        "would count"]


def test_a_merge_key_may_be_overridden(tmp_path):
    """`<<:` brings keys in that the mapping may override: that is its point, not a repeat."""
    path = tmp_path / "p.yaml"
    path.write_text("x-server: &s {port: 9000, host: 127.0.0.1}\n"
                    "server:\n  <<: *s\n  port: 9001\n")
    args = build_parser().parse_args(["--config", str(path)])
    with pytest.raises(ConfigError) as info:    # x-server is no key of the proxy's
        resolve_config(args, {})
    assert [p.split(":")[0] for p in info.value.problems] == ["x-server"]
    path.write_text("models:\n  a/b: {<<: {priority: 2}, "
                    "priority: 3}\n")
    assert resolve_config(args, {}).models["a/b"].priority == 3


@pytest.mark.parametrize("text", ["", "# everything commented out\n#server:\n#  port: 1\n"])
def test_a_blank_file_is_a_warning_at_check_and_start(tmp_path, capsys, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert main(["--config", str(path), "--check"], environ={}) == 0
    out = capsys.readouterr().out
    assert f"warning: {path}: the file is empty (or only comments), as a file cut short " \
           "would be: every key takes its default (write {} to mean them)" in out


def test_an_explicit_empty_mapping_means_the_defaults_without_a_warning(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("{}\n")
    assert main(["--config", str(path), "--check"], environ={}) == 0
    assert "warning" not in capsys.readouterr().out


def test_a_blank_file_on_reload_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("")
    args = build_parser().parse_args(["--config", str(path)])
    with pytest.raises(ConfigError) as info:
        resolve_config(args, {}, reloading=True)
    assert info.value.problems == [
        f"{path}: the file is empty (or only comments), as a file cut short would be: the "
        "running configuration stays (write {} to mean the defaults)"]


@pytest.mark.parametrize("argv, environ", [
    ([], {"PROXY_LOG_LEVEL": "debug"}), (["--log-level", "debug"], {}), ([], {})])
def test_log_levels_are_taken_in_any_case(tmp_path, argv, environ):
    path = tmp_path / "p.yaml"
    path.write_text("logging: {level: Debug}\n" if not argv and not environ else "{}\n")
    config = resolve_config(build_parser().parse_args(["--config", str(path), *argv]),
                            environ)
    assert config.logging.level == "DEBUG"
    assert logging.getLevelName(config.logging.level) == logging.DEBUG


@pytest.mark.parametrize("environ, problem", [
    ({"PROXY_LOG_LEVEL": "loud"},
     "PROXY_LOG_LEVEL (logging.level): must be one of DEBUG, INFO, WARNING, ERROR "
     "(got 'LOUD')"),
    ({"PROXY_UPSTREAM": "localhost:42201"},
     "PROXY_UPSTREAM (upstream.url): 'localhost:42201' is not an http(s) URL with a host: "
     "write http://localhost:42201"),
    ({"PROXY_UPSTREAM": "http://localhost:42201/v1"},
     "PROXY_UPSTREAM (upstream.url): "),
    ({"PROXY_PORT": "70000"}, "PROXY_PORT (server.port): must be 0..65535 (got 70000)"),
    ({"PROXY_PORT": "eighty"}, "PROXY_PORT: must be an integer (got 'eighty')"),
    ({"PROXY_HOST": "0.0.0.0"}, "PROXY_HOST (server.host): 0.0.0.0 is reachable from other "
                                "machines"),
    ({"PROXY_DEMO_FLAVOR": "vllm"}, "PROXY_DEMO_FLAVOR: only with --demo"),
])
def test_a_bad_value_from_the_environment_names_the_variable(tmp_path, capsys, environ,
                                                             problem):
    """PROXY_LOG_LEVEL=debug was refused as `logging.level`, a key the file did not hold."""
    path = tmp_path / "p.yaml"
    path.write_text("{}\n")
    assert main(["--config", str(path), "--check"], environ=environ) == 2
    assert f"\n  {problem}" in capsys.readouterr().err


def test_a_bad_value_from_a_flag_names_the_flag(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("{}\n")
    assert main(["--config", str(path), "--upstream", "localhost:1", "--check"],
                environ={}) == 2
    assert "\n  --upstream (upstream.url): 'localhost:1' is not an http(s) URL" in \
        capsys.readouterr().err


def test_the_same_value_in_the_file_is_named_by_its_key(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("upstream: {url: 'localhost:1'}\n")
    assert main(["--config", str(path), "--check"], environ={"PROXY_PORT": "8080"}) == 2
    assert "\n  upstream.url: 'localhost:1' is not an http(s) URL" in capsys.readouterr().err


def test_a_key_an_earlier_release_took_names_what_to_write_instead(tmp_path, capsys):
    """The first release's eviction.min_residency_s: before, 'unknown key (known: ...)' left
    the operator to guess that eviction.hold is its successor."""
    path = tmp_path / "p.yaml"
    path.write_text("eviction:\n  policy: cost-aware\n  min_residency_s: 60\n")
    assert main(["--config", str(path), "--check"], environ={}) == 2
    (problem,) = capsys.readouterr().err.splitlines()[1:]
    assert problem.startswith("  eviction.min_residency_s: replaced by eviction.hold")
    assert "'hold: 60' as 'min_residency_s: 60' did" in problem and "unknown key" not in problem
