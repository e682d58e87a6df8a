"""The Helm chart rendered by the real Helm engine, and the pieces of a render tests read.

helm-python-sdk bundles Helm's Go SDK; ``render`` gives the chart's files as Helm writes them,
``manifests`` the Kubernetes objects in them, and ``env_of``/``fake_environ`` the gateway
container's environment as the pod would get it.
"""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import yaml

from gateway_tests.conftest import REPO

CHART = REPO / "helm" / "codex-app-gateway"
RELEASE = "cxg"
NAMESPACE = "agents"
SECRET_DIR = "/etc/codex-app-gateway/secrets"


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """The chart's files rendered with ``values`` as an install of ``RELEASE`` would be."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt and empty templates left out)."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one object of ``kind`` in a render."""
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Deployment's one container, the gateway."""
    containers = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return containers[0]


def env_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gateway container's env entries by name (each name once)."""
    entries = container(objects)["env"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate env entries: {names}"
    return {entry["name"]: entry for entry in entries}


# What the downward API gives a pod, for the fields the chart reads.
POD_FIELDS = {"metadata.name": "cxg-codex-app-gateway-7d9f8-x2k4q", "status.podIP": "10.1.2.3"}


def fake_environ(env: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The process environment the pod would get, with a stand-in for each secret's value.

    A secret given as a file (``CXG_<NAME>_FILE``) stands in as ``CXG_<NAME>``, as the daemon
    reads it. Downward-API fields get ``POD_FIELDS``, and ``$(VAR)`` references to variables
    defined earlier are expanded, as the kubelet does.
    """
    environ: dict[str, str] = {}
    for name, entry in env.items():
        if name.endswith("_FILE") and entry["value"].startswith(SECRET_DIR + "/"):
            environ[name.removesuffix("_FILE")] = f"stand-in-file-{entry['value']}"
        elif "valueFrom" in entry and "fieldRef" in entry["valueFrom"]:
            environ[name] = POD_FIELDS[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            environ[name] = f"stand-in-{ref['name']}-{ref['key']}"
        else:
            environ[name] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda match: environ.get(match.group(1), match.group(0)),
                entry["value"],
            )
    return environ
