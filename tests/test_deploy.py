"""The container and Kubernetes files are parsed and checked against the real config loader."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.cli import build_parser, main, resolve_config
from proxy.config import Config

ROOT = Path(__file__).parent.parent


def _config_of(text: str, environ: dict[str, str], tmp_path: Path) -> Config:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    return resolve_config(build_parser().parse_args(["--config", str(path)]), environ)


def test_the_dockerfile_sets_no_environment_override_and_probes_the_configured_port():
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^ENV .*PROXY_", text, re.M)
    assert "COPY deploy/container.yaml /config/proxy.yaml" in text
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["python", "-m", "proxy", "healthcheck"', text,
                     re.M)
    assert re.search(r"^VOLUME /data$", text, re.M)


def test_the_container_config_is_valid_and_needs_keys(tmp_path):
    text = (ROOT / "deploy" / "container.yaml").read_text()
    config = _config_of(text, {"PROXY_API_KEY": "k", "PROXY_ADMIN_TOKEN": "a"}, tmp_path)
    assert config.server.host == "0.0.0.0" and config.auth.keys
    assert Path(config.storage.path).parent == Path("/data")
    assert main(["--config", str(tmp_path / "proxy.yaml"), "--check"], environ={}) == 2


def _k8s() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_the_kubernetes_sidecar_example_is_consistent(tmp_path):
    objs = _k8s()
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    proxy = next(c for c in pod["containers"] if c["name"] == "proxy")
    app = next(c for c in pod["containers"] if c["name"] == "app")
    secret = objs["Secret"]["stringData"]
    # Every variable the proxy reads comes from the Secret; its config validates with them.
    environ = {e["name"]: secret[e["valueFrom"]["secretKeyRef"]["key"]] for e in proxy["env"]}
    config = _config_of(objs["ConfigMap"]["data"]["proxy.yaml"], environ, tmp_path)
    assert config.server.host == "127.0.0.1"     # pod-local: no key-less exposure
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_timeout_s + 2
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert str(Path(config.storage.path).parent) == mounts["state"]
    assert proxy["args"][-1].startswith(mounts["config"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert proxy[probe]["exec"]["command"][:4] == ["python", "-m", "proxy", "healthcheck"]
    app_env = {e["name"]: e for e in app["env"]}
    assert app_env["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{config.server.port}/v1"
    assert app_env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "app-key"


async def test_healthcheck_follows_the_configured_port(tmp_path, proxy):
    port = int(proxy.url.rsplit(":", 1)[1])
    path = tmp_path / "proxy.yaml"
    path.write_text(f"server: {{host: 0.0.0.0, port: {port}}}\n")
    import asyncio
    assert await asyncio.to_thread(main, ["healthcheck", "--config", str(path)], {}) == 0
    path.write_text("server: {port: 1}\n")
    assert await asyncio.to_thread(main, ["healthcheck", "--config", str(path)], {}) == 1
