"""The Dockerfile, the Kubernetes manifests and the compose file agree with the proxy."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.app import create_app
from proxy.config import build_config, load_config

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


# Jitsu's self-hosted stack (jitsucom/jitsu, docker/docker-compose.yml at 56b5a268): its services,
# and the port its ingest service listens on inside the compose network ("ingest:3049/health").
JITSU_SERVICES = {
    "kafka",
    "clickhouse",
    "mongo",
    "postgres",
    "console",
    "sync-catalog-init",
    "bulker",
    "rotor",
    "ingest",
    "syncctl",
}
JITSU_INGEST = ("ingest", 3049)
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"


def compose_default(value: str) -> str:
    """A compose value with its ${VAR:-default} interpolated as if VAR were unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_service_matches_the_proxy_and_jitsus_stack(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    ((name, service),) = compose["services"].items()
    assert name not in JITSU_SERVICES
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_env = dict(re.findall(r"(PROXY_\w+)=(\S+)", dockerfile))
    env = {k: compose_default(str(v)) for k, v in service["environment"].items()}
    # Every override names a real config key with a valid value, over the image's config.yaml.
    config = load_config(ROOT / "config.yaml", {**image_env, **env})
    upstream = urlsplit(config.upstream.url)
    assert (upstream.hostname, upstream.port) == JITSU_INGEST
    # The buffer on the named volume, where the image puts it.
    (mount,) = service["volumes"]
    volume, target = mount.split(":")
    assert target == config.buffer.path == image_env["PROXY_BUFFER_PATH"]
    assert volume in compose["volumes"]
    (port,) = service["ports"]
    assert compose_default(port).split(":")[-1] == str(config.server.port)
    assert compose_default(port).split(":")[0] != "8080", "Jitsu's ingest publishes 8080"
    # The healthcheck asks the app for a route it serves, on the port it listens on.
    check = " ".join(service["healthcheck"]["test"][1:])
    path = re.search(r"127\.0\.0\.1:%s(/\w+)'", check)
    assert path is not None and "'PROXY_SERVER_PORT', '8080'" in check
    served = {r.resource.canonical for r in create_app(config).router.routes() if r.method == "GET"}
    assert path.group(1) == "/healthz" and path.group(1) in served
    # Room for the two drain phases of a graceful stop.
    assert service["stop_signal"] == "SIGTERM"
    assert (
        int(service["stop_grace_period"].removesuffix("s")) > 2 * config.server.shutdown_timeout_s
    )
    assert service["pull_policy"] == "never"


def test_image_starts_the_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert entrypoint is not None
    program, *args = json.loads(entrypoint.group(1))
    assert scripts[program] == "proxy.__main__:main"
    assert args == ["--config", "/etc/jitsu-proxy/config.yaml"]


def test_the_image_check_names_what_the_manifests_get_wrong() -> None:
    """tests/image_manifests.py, which `make image-test` runs on the image it built, passes the
    image as the Dockerfile describes it and names each thing that differs."""
    from tests.image_manifests import mismatches

    image = {
        "User": "10001:10001",
        "ExposedPorts": {"8080/tcp": {}},
        "Env": ["PATH=/usr/bin", "PROXY_BUFFER_PATH=/var/lib/jitsu-proxy"],
        "Volumes": {"/var/lib/jitsu-proxy": {}},
        "Entrypoint": ["jitsu-edge-proxy", "--config", "/etc/jitsu-proxy/config.yaml"],
        "StopSignal": "SIGTERM",
    }
    assert mismatches(image) == []
    moved = {**image, "User": "10002:10002", "Env": ["PROXY_BUFFER_PATH=/data"]}
    found = " ".join(mismatches(moved))
    for what in ("runAsUser", "runAsGroup", "buffer mount", "a volume of the image"):
        assert what in found
