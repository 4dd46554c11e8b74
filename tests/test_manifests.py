"""Every container of every Kubernetes manifest under deploy/ (tests/manifests.py finds them):
a non-root container has a numeric user the kubelet can check, the proxy runs everywhere as the
image's user with one security context, its probes are HTTP GETs of routes the proxy serves
without a key on the port it listens on, it reads its configuration where that is mounted, and
every container requests CPU and memory. The configurations (the files and the ConfigMaps) give
a budget where LM Studio's memory cannot be measured. tests/test_k8s.py holds the variants to the
Kubernetes schema; tests/test_deploy.py builds and runs the image."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.cli import main
from proxy.origins import is_loopback
from proxy.server.auth import PROBES

from .manifests import (ROOT, Unit, containers, dockerfile_user, image_ids,
                        is_proxy, load, proxy_config, proxy_config_files, security, units)

UNITS = {u.name: u for u in units()}
PROBE_KINDS = ("startupProbe", "livenessProbe", "readinessProbe")


@pytest.fixture(params=sorted(UNITS))
def unit(request) -> Unit:
    return UNITS[request.param]


def proxies(unit: Unit):
    found = [(t, c) for _, t, c in containers(unit.objects) if is_proxy(c)]
    assert found, f"{unit.name} runs no proxy"
    return found


def test_every_manifest_and_configuration_under_deploy_is_checked():
    assert set(UNITS) == {"deploy/kubernetes.yaml", "deploy/kubernetes/replicas",
                          "deploy/kubernetes/per-host"}
    assert [p.relative_to(ROOT).as_posix() for p in proxy_config_files()] == \
        ["deploy/container.yaml"]


def test_the_image_user_is_numeric_and_is_the_user_it_creates():
    user = dockerfile_user()
    # A kubelet told runAsNonRoot cannot tell whether a user name is root, and refuses to
    # start the container: "image has non-numeric user (lmproxy), cannot verify user is
    # non-root" (CreateContainerConfigError).
    assert re.fullmatch(r"[1-9]\d*:\d+", user), f"USER {user} is not a numeric uid:gid"
    assert tuple(int(i) for i in user.split(":")) == image_ids()


def test_a_non_root_container_has_a_numeric_user(unit):
    for _, template, c in containers(unit.objects):
        sc = security(template, c)
        if not sc.get("runAsNonRoot"):
            continue
        if "runAsUser" in sc:
            assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, (unit.name, c)
            continue
        image_user = dockerfile_user().split(":")[0] if is_proxy(c) else None
        assert image_user is not None and image_user.isdigit(), (
            f"{unit.name}: {c['name']} has runAsNonRoot and no runAsUser, and its image's user "
            f"({image_user or 'unknown'}) is not numeric: the kubelet refuses to start it")


def test_the_proxy_runs_as_the_image_user_with_one_security_context(unit):
    uid, gid = image_ids()
    for template, c in proxies(unit):
        sc = security(template, c)
        assert {k: sc.get(k) for k in ("runAsNonRoot", "runAsUser", "runAsGroup",
                                       "readOnlyRootFilesystem", "allowPrivilegeEscalation")} \
            == {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid,
                "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}, \
            (unit.name, c["name"])
        # A PersistentVolumeClaim on /data is writable by the image's group.
        assert template["spec"].get("securityContext", {}).get("fsGroup") == gid, unit.name


async def test_proxy_probes_get_routes_it_serves_openly_on_its_port(unit, tmp_path):
    for template, c in proxies(unit):
        path, environ = proxy_config(unit.objects, template, c, tmp_path)
        config = load(path, environ)
        served = {r.resource.canonical for r in create_app(config).router.routes()
                  if r.method == "GET" and isinstance(r.resource, web.PlainResource)}
        # The kubelet connects to the pod's IP address: a loopback-only proxy never answers.
        assert not is_loopback(config.server.host), (unit.name, config.server.host)
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        assert config.server.port in ports.values(), (unit.name, ports)
        wanted = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
        for kind in PROBE_KINDS:
            if kind not in c and kind not in wanted:
                continue
            where = f"{unit.name}: {c['name']}.{kind}"
            get = c[kind].get("httpGet")
            # An exec probe starts a Python process each time (~0.5 s of CPU, ~44 MB).
            assert get, f"{where} is not an httpGet"
            assert get["path"] in served, f"{where}: the proxy serves no GET {get['path']}"
            assert get["path"] in PROBES, f"{where}: {get['path']} needs a key; probes send none"
            assert get["path"] == wanted.get(kind, get["path"]), where
            assert ports.get(get["port"], get["port"]) == config.server.port, where


def test_other_probes_reach_a_port_of_their_container(unit):
    for _, _, c in containers(unit.objects):
        ports = {p.get("name") for p in c.get("ports", [])} | \
            {p["containerPort"] for p in c.get("ports", [])}
        for kind in PROBE_KINDS:
            for action in ("httpGet", "tcpSocket", "grpc"):
                if action in c.get(kind, {}):
                    assert c[kind][action]["port"] in ports, (unit.name, c["name"], kind)


def test_the_proxy_reads_its_configuration_where_it_is_mounted(unit, tmp_path):
    for template, c in proxies(unit):
        path, environ = proxy_config(unit.objects, template, c, tmp_path)
        assert main(["--config", str(path), "--check"], environ=environ) == 0, unit.name
        config = load(path, environ)
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert str(config.storage.path).rsplit("/", 1)[0] in writable, unit.name


def test_every_container_requests_cpu_and_memory(unit):
    for _, _, c in containers(unit.objects):
        requests = c.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), f"{unit.name}: {c['name']} requests {requests}"


def _configurations(tmp_path):
    environ = {"PROXY_API_KEY": "k", "PROXY_ADMIN_TOKEN": "a"}
    for path in proxy_config_files():
        yield path.relative_to(ROOT).as_posix(), load(path, environ)
    for name, unit in UNITS.items():
        for template, c in proxies(unit):
            yield f"{name} ({c['name']})", load(*proxy_config(unit.objects, template, c, tmp_path))


def test_a_configuration_whose_lm_studio_is_elsewhere_gives_its_memory_budget(tmp_path):
    # The proxy measures the memory of the machine it runs on: in a container or a pod that
    # is not LM Studio's (Docker Desktop runs containers in a VM of its own).
    for name, config in _configurations(tmp_path):
        if is_loopback(urlsplit(config.upstream.url).hostname or ""):
            continue
        assert config.memory.sampler == "budget" and config.memory.budget_gb, name
