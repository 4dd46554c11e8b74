"""The container and Kubernetes files are parsed and checked against the real config loader."""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from proxy.cli import build_parser, main, resolve_config
from proxy.config import Config

from .container import Podman, missing_tools
from .manifests import containers, is_proxy, load, proxy_config, quantity_bytes, units

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


def test_the_deployment_page_names_every_variable_the_image_needs(capsys):
    image_config = ROOT / "deploy" / "container.yaml"
    auth = yaml.safe_load(image_config.read_text())["auth"]
    needed = [k["key_env"] for k in auth["keys"]] + [auth["admin_token_env"]]
    page = (ROOT / "docs" / "deployment.md").read_text()
    section = page.split("## As a container", 1)[1].split("\n## ", 1)[0]
    refusal = " ".join(s for s in re.split(r"(?<=\.)\s", section) if "refuses to start" in s)
    for var in needed:
        # Alone missing, it stops the start, named; the page's run line and its refusal say so.
        environ = {v: "set" for v in needed if v != var}
        assert main(["--config", str(image_config), "--check"], environ=environ) == 2
        assert f"environment variable {var} is not set" in capsys.readouterr().err
        assert f"-e {var}=" in section and var in refusal, var


def _k8s() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_the_kubernetes_sidecar_example_is_consistent(tmp_path):
    objs = _k8s()
    template = objs["Deployment"]["spec"]["template"]
    pod = template["spec"]
    (proxy,), (app,) = pod["initContainers"], pod["containers"]
    # A native sidecar: it answers before the app starts and gets SIGTERM only once the app has
    # exited, so the app's own drain still reaches it.
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"]["path"] == "/healthz"
    path, environ = proxy_config(list(objs.values()), template, proxy, tmp_path)
    config = load(path, environ)
    assert set(environ) == {"PROXY_APP_KEY", "PROXY_ADMIN_TOKEN"}
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_timeout_s + 2
    app_env = {e["name"]: e for e in app["env"]}
    assert app_env["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{config.server.port}/v1"
    assert app_env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "app-key"
    # It listens on the pod's address for the kubelet's probes: every call but those needs a
    # key, and no other pod may reach its port.
    assert config.auth.keys and config.auth.metrics_access != "open"
    policy = objs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert "Ingress" in policy["policyTypes"]
    proxy_ports = {p["name"] for p in proxy["ports"]} | {p["containerPort"] for p in proxy["ports"]}
    for rule in policy.get("ingress", []):
        assert rule.get("ports"), "an ingress rule without ports admits the proxy's too"
        assert not {p["port"] for p in rule["ports"]} & proxy_ports, rule


async def test_healthcheck_follows_the_configured_port(tmp_path, proxy):
    port = int(proxy.url.rsplit(":", 1)[1])
    path = tmp_path / "proxy.yaml"
    path.write_text(f"server: {{host: 0.0.0.0, port: {port}}}\n")
    import asyncio
    assert await asyncio.to_thread(main, ["healthcheck", "--config", str(path)], {}) == 0
    path.write_text("server: {port: 1}\n")
    assert await asyncio.to_thread(main, ["healthcheck", "--config", str(path)], {}) == 1


def _http(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_healthy(url: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            status = _http(url + "/healthz")[0]
            if status == 200:
                return
            problem: Exception = AssertionError(f"/healthz answered {status}")
        except (urllib.error.URLError, ConnectionError) as exc:   # not listening yet
            problem = exc
        if time.monotonic() > deadline:
            raise problem
        time.sleep(0.2)


@pytest.mark.timeout(900)     # the first run makes the base image (debootstrap): ~2 minutes
def test_the_image_builds_and_serves(tmp_path):
    if missing := missing_tools():
        if os.environ.get("REQUIRE_CONTAINER"):   # CI installs them: absence is a failure
            raise RuntimeError(f"REQUIRE_CONTAINER is set but {missing} are missing")
        pytest.skip(f"no container builder here (apt-get install {' '.join(missing)} runc)")
    podman = Podman()
    podman.ensure_base()
    podman.build(ROOT, tmp_path)
    name = f"lmstudio-proxy-test-{uuid.uuid4().hex[:8]}"
    try:
        # The image's own configuration and keys, the built-in emulator as LM Studio, the
        # container port published on the host, a named volume on /data.
        podman.run(name, "-p", "127.0.0.1::8080", "-v", f"{name}:/data",
                   "-e", "PROXY_API_KEY=sk-image", "-e", "PROXY_ADMIN_TOKEN=image-admin",
                   "localhost/lmstudio-proxy:test",
                   "python", "-m", "proxy", "--config", "/config/proxy.yaml", "--demo")
        url = f"http://127.0.0.1:{podman.host_port(name, 8080)}"
        _wait_healthy(url, 30)
        chat = {"model": "qwen/qwen3-4b", "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}
        status, body = _http(url + "/v1/chat/completions", chat, key="sk-image")
        assert status == 200 and body["choices"][0]["message"]["content"], body
        status, body = _http(url + "/v1/chat/completions", chat)
        assert status == 401 and body["error"]["code"], body
        # The HEALTHCHECK instruction, as the image carries it.
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        # Numeric, so that a kubelet told runAsNonRoot can verify it.
        image_user = podman("image", "inspect", "localhost/lmstudio-proxy:test", "--format",
                            "{{.Config.User}}").stdout.strip()
        assert image_user == "10001:10001"
        user = podman("exec", name, "sh", "-c", "id -u && id -g && touch /data/written").stdout
        assert user.split() == ["10001", "10001"]
        # The most the proxy has held resident (VmHWM) through a burst of concurrent requests
        # (with --demo its emulator's memory too): every manifest requests half as much again.
        burst = {**chat, "max_tokens": 16, "messages": [{"role": "user", "content": "hi " * 3000}]}
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda _: _http(url + "/v1/chat/completions", burst,
                                                    key="sk-image")[0], range(64)))
        assert answers == [200] * 64, answers
        status = podman("exec", name, "cat", "/proc/1/status").stdout
        peak_bytes = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
        for unit in units():
            for _, _, c in containers(unit.objects):
                if is_proxy(c):
                    requested = quantity_bytes(c["resources"]["requests"]["memory"])
                    assert requested >= 1.5 * peak_bytes, (unit.name, requested, peak_bytes)
        # SIGTERM (the image's STOPSIGNAL) drains and exits cleanly well within the grace time.
        podman("stop", "-t", "35", name, timeout_s=60)
        state = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert state == "0", podman("logs", name, check=False).stderr[-3000:]
    finally:
        podman("rm", "-f", name, check=False)
        podman("volume", "rm", "-f", name, check=False)
