"""`python -m tests.image_manifests IMAGE_CONFIG.json`: the Kubernetes manifests and the compose
example checked against the image `make image-test` built (its `podman image inspect` Config),
not against the Dockerfile's text: the user, port, volume, buffer path, entrypoint and stop
signal they assume are the ones the image really has. Exits 1 naming each mismatch."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tests.test_deploy import COMPOSE, ROOT, manifests


def mismatches(image: dict[str, Any]) -> list[str]:
    found: list[str] = []

    def expect(what: str, seen: object, wanted: object) -> None:
        if seen != wanted:
            found.append(f"{what}: the image has {wanted!r}, the manifest {seen!r}")

    env = dict(e.split("=", 1) for e in image.get("Env") or [])
    buffer_path = env.get("PROXY_BUFFER_PATH")
    uid, _, gid = (image.get("User") or "0").partition(":")
    ports = {int(p.split("/")[0]) for p in image.get("ExposedPorts") or {}}
    volumes = set(image.get("Volumes") or {})
    expect("buffer path is a volume of the image", buffer_path in volumes, True)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    expect("entrypoint program", (image.get("Entrypoint") or [""])[0] in scripts, True)
    expect("stop signal", image.get("StopSignal"), "SIGTERM")

    pod = manifests()["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    expect("kubernetes runAsUser", str(pod["securityContext"].get("runAsUser")), uid)
    if "runAsGroup" in pod["securityContext"]:
        expect("kubernetes runAsGroup", str(pod["securityContext"]["runAsGroup"]), gid)
    expect("kubernetes containerPort", {p["containerPort"] for p in container["ports"]}, ports)
    expect("kubernetes buffer mount", container["volumeMounts"][0]["mountPath"], buffer_path)
    k8s_env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if "PROXY_BUFFER_PATH" in k8s_env:
        expect("kubernetes PROXY_BUFFER_PATH", k8s_env["PROXY_BUFFER_PATH"], buffer_path)

    (service,) = yaml.safe_load(COMPOSE.read_text())["services"].values()
    mounts = {v.split(":", 1)[1] for v in service["volumes"]}
    expect("compose buffer mount", buffer_path in mounts, True)
    published = {int(str(p).rsplit(":", 1)[-1]) for p in service["ports"]}
    expect("compose container port", published, ports)
    return found


def main() -> int:
    image = json.loads(Path(sys.argv[1]).read_text())
    found = mismatches(image)
    for line in found:
        print(f"manifest mismatch: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
