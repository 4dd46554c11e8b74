"""Every Kubernetes object under deploy/, grouped as one `kubectl apply` sends them (a
kustomization's folder, or a single file), with what a check needs to follow them: each pod's
containers (init and sidecar containers included), the security context the kubelet applies to
each, the command it runs (the image's CMD when the manifest gives none), and the proxy
configuration a proxy container reads with the environment its pod gives it."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from proxy.cli import build_parser, resolve_config
from proxy.config import Config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
PROXY_IMAGE = "lmstudio-proxy"          # what the Dockerfile builds (docs/deployment.md)
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


@dataclass
class Unit:
    name: str                           # the folder or file, relative to the repository
    objects: list[dict[str, Any]]


def _documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def units() -> list[Unit]:
    """The Kubernetes objects under deploy/: a folder with a kustomization.yaml is one unit
    (`kubectl apply -k`), any other file one of its own (`kubectl apply -f`)."""
    found: dict[Path, list[dict[str, Any]]] = {}
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        objects = [d for d in _documents(path) if "apiVersion" in d and "kind" in d]
        objects = [d for d in objects if d["kind"] != "Kustomization"]
        if objects:
            key = path.parent if (path.parent / "kustomization.yaml").exists() else path
            found.setdefault(key, []).extend(objects)
    return [Unit(str(k.relative_to(ROOT)), v) for k, v in found.items()]


def proxy_config_files() -> list[Path]:
    """The files under deploy/ that are proxy configurations, not Kubernetes objects."""
    return [p for p in sorted(DEPLOY.rglob("*.y*ml"))
            if all("apiVersion" not in d for d in _documents(p))]


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod (metadata and spec) a workload runs; None for an object that runs none."""
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    if obj["kind"] in WORKLOADS:
        return obj["spec"]["template"]
    return None


def containers(objs: list[dict[str, Any]]) -> Iterator[tuple[dict, dict, dict]]:
    """(workload, its pod template, container) for every container, init containers too."""
    for obj in objs:
        if (template := pod_template(obj)) is not None:
            spec = template["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield obj, template, c


def is_proxy(container: dict[str, Any]) -> bool:
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == PROXY_IMAGE


def security(template: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The security context the kubelet applies: the container's fields over the pod's."""
    pod = {k: v for k, v in template["spec"].get("securityContext", {}).items()
           if k in ("runAsUser", "runAsGroup", "runAsNonRoot")}
    return {**pod, **container.get("securityContext", {})}


def dockerfile_user() -> str:
    """The image's USER: the last USER instruction of the Dockerfile."""
    users = re.findall(r"^USER\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M)
    assert users, "the Dockerfile sets no USER: the image runs as root"
    return users[-1]


def image_cmd() -> list[str]:
    cmd = re.findall(r"^CMD\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.M)
    return json.loads(cmd[-1])


def argv(container: dict[str, Any]) -> list[str]:
    """What the proxy image runs in this container (it has no ENTRYPOINT)."""
    if "command" in container:
        return container["command"] + container.get("args", [])
    return container.get("args") or image_cmd()


def config_path(container: dict[str, Any]) -> Path:
    args = argv(container)
    return Path(args[args.index("--config") + 1])


def environment(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The variables the pod gives the container, values from the unit's Secrets."""
    secrets, environ = by_kind(objs, "Secret"), {}
    for e in container.get("env", []):
        if "value" in e:
            environ[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            environ[e["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
    return environ


def proxy_config(objs: list[dict[str, Any]], template: dict, container: dict,
                 tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The proxy.yaml the container reads (the ConfigMap mounted where --config points),
    copied to tmp_path, and the environment its pod gives it."""
    path = config_path(container)
    mount = next((m for m in container.get("volumeMounts", [])
                  if path.parent == Path(m["mountPath"])), None)
    assert mount, f"{container['name']}: nothing is mounted at {path.parent}"
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    assert "configMap" in volume, f"{container['name']}: {path.parent} is not a ConfigMap"
    data = by_kind(objs, "ConfigMap")[volume["configMap"]["name"]]["data"]
    assert path.name in data, f"{container['name']} reads {path}, the ConfigMap has {set(data)}"
    copy = tmp_path / f"{container['name']}-{volume['configMap']['name']}.yaml"
    copy.write_text(data[path.name])
    return copy, environment(objs, container)


def load(path: Path, environ: dict[str, str]) -> Config:
    return resolve_config(build_parser().parse_args(["--config", str(path)]), environ)


def quantity_bytes(text: str) -> float:
    """A Kubernetes memory quantity (128Mi, 1G, 512M, 1e9) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"([0-9.e+]+)([KMGT]i?|k)?", str(text))
    assert m, f"not a memory quantity: {text}"
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


def image_ids() -> tuple[int | None, int | None]:
    """(uid, gid) the Dockerfile gives its user (useradd --uid, groupadd/useradd --gid)."""
    text = DOCKERFILE.read_text()
    uid = re.search(r"\buseradd\b[^\n]*--uid (\d+)", text)
    gid = re.search(r"\b(?:groupadd|useradd)\b[^\n]*--gid (\d+)", text)
    return (int(uid.group(1)) if uid else None), (int(gid.group(1)) if gid else None)
