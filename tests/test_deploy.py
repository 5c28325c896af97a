"""The Dockerfile and the Kubernetes manifests agree with the proxy they deploy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from proxy.app import create_app
from proxy.config import build_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"


def manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_statefulset_matches_the_proxy(tmp_path: Path) -> None:
    docs = manifests()
    assert {"StatefulSet", "Service", "PodDisruptionBudget", "Kustomization"} <= set(docs)
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # Every override names a real config key (unknown PROXY_* variables are refused).
    config = build_config({"buffer": {"path": str(tmp_path)}}, env)
    (port,) = container["ports"]
    assert port["containerPort"] == config.server.port
    # Probes hit routes the app serves.
    app = create_app(config)
    served = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in served
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Room for the two drain phases of a graceful stop.
    assert pod["terminationGracePeriodSeconds"] > 2 * config.server.shutdown_timeout_s
    # The buffer lives on the pod's own volume, where the image puts it.
    dockerfile = (ROOT / "Dockerfile").read_text()
    buffer_path = re.search(r"PROXY_BUFFER_PATH=(\S+)", dockerfile)
    assert buffer_path is not None
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == buffer_path.group(1)
    (claim,) = docs["StatefulSet"]["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mount["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pod["securityContext"]["runAsUser"] == 10001
    assert "USER 10001:10001" in dockerfile


def test_kustomization_lists_every_manifest() -> None:
    listed = set(manifests()["Kustomization"]["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
