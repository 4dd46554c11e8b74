"""The Kubernetes manifests in deploy/kubernetes/: each variant rendered from its
kustomization.yaml, every object checked against the Kubernetes schema of a fixed version
(kubernetes-validate, strict: an unknown field fails), and the references between objects
followed: what a pod reads from a ConfigMap or Secret exists there, Services select pods and
reach their ports, probes hit the proxy's own endpoints, and the proxy's configuration passes
`python -m proxy --check` with the environment the pod gives it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from proxy.cli import main

from .manifests import by_kind, load, proxy_config

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"


def render(variant: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k` would send: every resource the kustomization lists."""
    folder = VARIANTS / variant
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) == {"apiVersion", "kind", "resources"}   # nothing that rewrites
    files = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files, "a file left out of the kustomization"
    return [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((folder / name).read_text()) if doc]


def pods(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, its pod template) for each Deployment."""
    for d in by_kind(objs, "Deployment").values():
        yield d, d["spec"]["template"]


def proxies(objs: list[dict[str, Any]]) -> Iterator[tuple[dict, dict, dict]]:
    for d, template in pods(objs):
        for c in template["spec"]["containers"]:
            if c["args"][:3] == ["python", "-m", "proxy"]:
                yield d, template, c


@pytest.fixture(params=["replicas", "per-host"])
def variant(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_every_object_passes_the_kubernetes_schema(variant):
    name, objs = variant
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), "two objects of one kind share a name"


def test_the_sidecar_example_passes_the_kubernetes_schema():
    for o in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()):
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_what_pods_reference_is_defined_in_the_variant(variant):
    _, objs = variant
    config_maps, secrets = by_kind(objs, "ConfigMap"), by_kind(objs, "Secret")
    for d, template in pods(objs):
        spec = template["spec"]
        assert d["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"]\
            .items()
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps, v
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, v
        for c in spec["containers"]:
            ports = {p.get("name") for p in c.get("ports", [])} | \
                {p["containerPort"] for p in c.get("ports", [])}
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, m
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in secrets[r["name"]]["stringData"], r
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in config_maps[r["name"]]["data"], r
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                action = c.get(probe, {})
                for kind in ("httpGet", "tcpSocket"):
                    if kind in action:
                        assert action[kind]["port"] in ports, (c["name"], probe)


def test_services_reach_pods_or_name_an_outside_host(variant):
    _, objs = variant
    slices = {o["metadata"]["labels"]["kubernetes.io/service-name"]
              for o in objs if o["kind"] == "EndpointSlice"}
    templates = [t for _, t in pods(objs)]
    for name, svc in by_kind(objs, "Service").items():
        spec = svc["spec"]
        if spec.get("type") == "ExternalName":
            assert spec["externalName"]
            continue
        if "selector" not in spec:
            assert name in slices, f"{name}: no selector and no EndpointSlice"
            continue
        chosen = [t for t in templates if spec["selector"].items() <= t["metadata"]["labels"]
                  .items()]
        assert chosen, f"{name} selects no pod"
        for port in spec["ports"]:
            for t in chosen:
                assert any(port["targetPort"] in (p.get("name"), p["containerPort"])
                           for c in t["spec"]["containers"] for p in c.get("ports", [])), \
                    (name, port)


def test_the_proxy_config_passes_check_and_matches_its_pod(variant, tmp_path):
    name, objs = variant
    services = by_kind(objs, "Service")
    found = list(proxies(objs))
    assert found
    for d, template, c in found:
        path, environ = proxy_config(objs, template, c, tmp_path)
        assert main(["--config", str(path), "--check"], environ=environ) == 0
        config = load(path, environ)
        http = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        assert config.server.port == http and config.server.host == "0.0.0.0"
        assert config.auth.keys and config.auth.admin_token      # from the Secret
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert template["spec"]["terminationGracePeriodSeconds"] > \
            config.server.shutdown_timeout_s + 2
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert str(Path(config.storage.path).parent) in writable   # the root is read-only
        # LM Studio is a Service of the variant, and off this pod: memory is a budget.
        upstream = urlsplit(config.upstream.url)
        assert upstream.hostname in services and config.memory.sampler == "budget"
        assert config.metrics.inference_gateway is (name == "per-host")


def test_the_replicas_share_redis(tmp_path):
    objs = render("replicas")
    (d, template, c), = proxies(objs)
    assert d["spec"]["replicas"] == 2
    path, environ = proxy_config(objs, template, c, tmp_path)
    state = load(path, environ).state
    assert state.backend == "redis", "two replicas without shared state fight each other"
    url = urlsplit(state.url)
    redis = by_kind(objs, "Service")[url.hostname]
    assert url.port in [p["port"] for p in redis["spec"]["ports"]]


def test_one_proxy_per_host_never_two_at_once():
    objs = render("per-host")
    upstreams = []
    for d, template, c in proxies(objs):
        assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
        config_map = next(v for v in template["spec"]["volumes"] if "configMap" in v)
        data = by_kind(objs, "ConfigMap")[config_map["configMap"]["name"]]["data"]
        upstreams.append(yaml.safe_load(data["proxy.yaml"])["upstream"]["url"])
    assert len(upstreams) == 2 and len(set(upstreams)) == 2
