#!/usr/bin/env bash
# Build the image from ./Dockerfile as shipped, run it and probe it, with Debian's podman.
#
#   make image-test        (as root: tools come from apt-get when missing)
#
# There is no Docker engine and no registry with python:3.11-slim on our machines, so the base is
# a minimal Debian bookworm (python3 and a venv at /opt/venv) built with mmdebstrap from this
# machine's apt mirrors, cached under .cache/image-test/, and tagged python:3.11-slim: the
# Dockerfile builds unchanged. The engine runs with private storage and settings in a temporary
# directory that is removed at the end. See /work/shared/docs/container-test.md for why each
# setting is there (runc not crun, ulimits, --format docker, the CA bundle for pip, host network).
# podman logs "unable to get systemd connection ... healthchecks" on run/stop: harmless, there
# is no systemd here to schedule the HEALTHCHECK; the test runs it with `podman healthcheck run`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${IMAGE_TEST_CACHE:-$ROOT/.cache/image-test}
BASE_TAG=docker.io/library/python:3.11-slim
START=$(date +%s)
STEP="setup"
WORK=""
CID=""
IMAGE=""
UPSTREAM_PID=""
COMPOSE_UP=""

say() { printf '[image-test %3ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
step() {
    STEP=$1
    say "$1"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $COMPOSE_UP ]]; then
        ((rc == 0)) || podman logs --tail 40 "$COMPOSE_UP" >&2 2>&1
        compose down -v -t 5 >/dev/null 2>&1
    fi
    if [[ -n $CID ]]; then
        if ((rc != 0)); then
            say "container logs (last 40 lines):"
            podman logs --tail 40 "$CID" >&2 2>&1
        fi
        podman rm -f -v -t 5 "$CID" >/dev/null 2>&1
    fi
    [[ -n $IMAGE ]] && podman rmi -f "$IMAGE" >/dev/null 2>&1
    if [[ -n $UPSTREAM_PID ]]; then
        kill "$UPSTREAM_PID" 2>/dev/null
        wait "$UPSTREAM_PID" 2>/dev/null
    fi
    if [[ -n $WORK ]]; then
        # Only our private storage: the base tag, dangling build layers.
        [[ -n ${CONTAINERS_STORAGE_CONF:-} ]] && podman rmi -a -f >/dev/null 2>&1
        findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | while read -r m; do umount -l "$m"; done
        rm -rf "$WORK"
    fi
    local took=$(($(date +%s) - START))
    if ((rc == 0)); then
        echo "image-test: PASS (${took}s): built from Dockerfile, served /healthz, relayed an event, non-root uid, healthcheck ok, clean stop; the compose service too"
    else
        echo "image-test: FAIL at step '$STEP' (exit $rc, ${took}s)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
    say "FAIL: $*"
    exit 1
}

# Poll "$@" once a second until it succeeds or $1 seconds have passed.
wait_for() {
    local limit=$1
    shift
    local deadline=$(($(date +%s) + limit))
    until "$@"; do
        (($(date +%s) < deadline)) || return 1
        sleep 1
    done
}

# 1. Tools.
step "tools"
missing=()
for tool in podman:podman podman-compose:podman-compose runc:runc mmdebstrap:mmdebstrap \
    findmnt:util-linux python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
    ((EUID == 0)) || fail "missing ${missing[*]}, and only root can apt-get install them"
    say "apt-get install ${missing[*]}"
    timeout 300 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "${missing[@]}" >/dev/null
fi
((EUID == 0)) || fail "run as root (podman storage, mmdebstrap)"

WORK=$(mktemp -d /var/tmp/jitsu-image-test.XXXXXX)
mkdir -p "$CACHE" "$WORK/tmp"

# 2. Engine settings, private to this run.
step "engine settings"
cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/graph"
runroot = "$WORK/run"
EOF
# runc: crun cannot set its rlimits here and does not know this VM's cgroup layout. The ulimits
# stay within the host's hard limits, which root cannot raise. No systemd: cgroupfs, file events.
hard_nofile=$(ulimit -Hn)
[[ $hard_nofile == unlimited ]] && hard_nofile=1048576
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$hard_nofile:$hard_nofile", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/libpod"

[network]
network_config_dir = "$WORK/networks"
EOF
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf CONTAINERS_CONF=$WORK/containers.conf
export TMPDIR=$WORK/tmp

# 3. The base, from this machine's own Debian mirrors (bookworm suites only).
step "base image"
mapfile -t MIRRORS < <(
    python3 - /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources <<'EOF'
import re, sys
from pathlib import Path

def debian(suite):
    return re.fullmatch(r"bookworm(-[a-z]+)?", suite) is not None

lines = []
for name in sys.argv[1:]:
    path = Path(name)
    if not path.is_file():
        continue
    text = path.read_text()
    if name.endswith(".list"):
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.fullmatch(r"deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)", line)
            if m and debian(m.group(3)):
                lines.append(line)
        continue
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.lstrip().startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        opts = f"[signed-by={fields['signed-by']}] " if "signed-by" in fields and "\n" not in fields["signed-by"] and fields["signed-by"].startswith("/") else ""
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                if debian(suite):
                    lines.append(f"deb {opts}{uri} {suite} {fields.get('components', 'main')}")
for line in dict.fromkeys(lines):
    print(line)
EOF
)
((${#MIRRORS[@]})) || fail "no Debian bookworm mirror in /etc/apt/sources.list{,.d/}"
PACKAGES=python3,python3-venv,ca-certificates
key=$(printf '%s\n' v1 "$PACKAGES" "${MIRRORS[@]}" | sha256sum | cut -c1-16)
BASE_TAR=$CACHE/base-bookworm-$key.tar
if [[ -f $BASE_TAR && -s $BASE_TAR ]]; then
    say "cached base: $BASE_TAR"
else
    say "mmdebstrap from: ${MIRRORS[*]}"
    rm -rf "$BASE_TAR.part"
    timeout 900 mmdebstrap --quiet --format=tar --variant=minbase --include="$PACKAGES" \
        --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        bookworm "$BASE_TAR.part" "${MIRRORS[@]}"
    mv "$BASE_TAR.part" "$BASE_TAR"
    # Older bases (other mirrors or packages) are of no more use.
    find "$CACHE" -maxdepth 1 -name 'base-bookworm-*.tar*' ! -name "${BASE_TAR##*/}" -delete
fi
timeout 300 podman import --quiet \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$BASE_TAR" localhost/jitsu-image-test-base:latest >/dev/null
podman tag localhost/jitsu-image-test-base:latest "$BASE_TAG"

# 4. The image, from the Dockerfile as shipped. --format docker keeps the HEALTHCHECK; pip in the
# build needs the host's CA bundle (mounted for the build only, not part of the image).
step "build"
IMAGE=localhost/jitsu-edge-proxy:image-test-$$
timeout 900 podman build --quiet --pull=never --format docker --network host \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >/dev/null
podman image inspect --format '{{.Config.User}}' "$IMAGE" | grep -qx '10001:10001' ||
    fail "image does not run as 10001:10001"
podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q healthz ||
    fail "image has no HEALTHCHECK"

# The Kubernetes manifests and the compose example against the image just built: its user,
# port, volume, buffer path, entrypoint and stop signal (tests/image_manifests.py).
step "manifests"
podman image inspect --format '{{json .Config}}' "$IMAGE" >"$WORK/image.json"
(cd "$ROOT" && "$ROOT/.venv/bin/python" -m tests.image_manifests "$WORK/image.json") ||
    fail "the manifests do not match the image"

# 5. A fake upstream on the host: records every request as a JSON line.
step "fake upstream"
cat >"$WORK/upstream.py" <<'EOF'
import base64, json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

record, port_file = sys.argv[1], sys.argv[2]

class Handler(BaseHTTPRequestHandler):
    def _record(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with open(record, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path,
                                "headers": list(self.headers.items()),
                                "body": base64.b64encode(body).decode()}) + "\n")
        return body

    def do_POST(self):
        self._record()
        self._answer(200, b'{"ok":true}', "application/json")

    def do_GET(self):
        self._record()
        self._answer(200, b"/* fake p.js */", "application/javascript")

    def _answer(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file + ".part", "w") as f:
    f.write(str(server.server_address[1]))
import os; os.rename(port_file + ".part", port_file)
server.serve_forever()
EOF
python3 "$WORK/upstream.py" "$WORK/received.jsonl" "$WORK/upstream.port" &
UPSTREAM_PID=$!
wait_for 10 test -s "$WORK/upstream.port" || fail "fake upstream did not start"
UPSTREAM_PORT=$(cat "$WORK/upstream.port")
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# 6. Run it on the host network (bridge mode leaves firewall chains behind).
step "run"
CID=$(podman run -d --network host --name "jitsu-image-test-$$" \
    -e PROXY_SERVER_HOST=127.0.0.1 -e PROXY_SERVER_PORT="$PORT" \
    -e PROXY_UPSTREAM_URL="http://127.0.0.1:$UPSTREAM_PORT" -e PROXY_LOG_FORMAT=json \
    "$IMAGE")
# healthy [CONTAINER]: still running, and /healthz on $PORT answers.
healthy() {
    local cid=${1:-$CID}
    [[ $(podman inspect --format '{{.State.Running}}' "$cid") == true ]] ||
        fail "container exited: $(podman inspect --format '{{.State.ExitCode}}' "$cid")"
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$PORT/healthz" 2>/dev/null
}
wait_for 60 healthy || fail "/healthz did not answer within 60 s"

# 7. An event goes through to the upstream, its key only in X-Write-Key.
step "relay an event"
# post_event PORT MESSAGE_ID
post_event() {
    python3 - "http://127.0.0.1:$1/api/s/s2s/track" "$2" <<'EOF'
import json, sys, urllib.request
url, message_id = sys.argv[1:]
body = json.dumps({"event": "image-test", "messageId": message_id}).encode()
req = urllib.request.Request(url, data=body, method="POST", headers={
    "Content-Type": "application/json", "X-Write-Key": "kid:secret"})
with urllib.request.urlopen(req, timeout=10) as resp:
    assert 200 <= resp.status < 300, resp.status
EOF
}
MESSAGE_ID="image-test-$(date +%s%N)-$$"
post_event "$PORT" "$MESSAGE_ID"
relayed() {
    python3 - "$WORK/received.jsonl" "$MESSAGE_ID" <<'EOF'
import base64, json, sys
from pathlib import Path
path, message_id = Path(sys.argv[1]), sys.argv[2]
if not path.exists():
    sys.exit(1)
for line in path.read_text().splitlines():
    r = json.loads(line)
    body = base64.b64decode(r["body"])
    if r["method"] != "POST" or message_id.encode() not in body:
        continue
    if r["path"].split("?")[0] != "/api/s/s2s/track":
        sys.exit(f"relayed to {r['path']}")
    keys = [v for k, v in r["headers"] if k.lower() == "x-write-key"]
    if keys != ["kid:secret"]:
        sys.exit(f"X-Write-Key upstream: {keys}")
    leaks = [k for k, v in r["headers"] if "secret" in v and k.lower() != "x-write-key"]
    if "secret" in r["path"] or b"secret" in body or leaks:
        sys.exit(f"key seen outside X-Write-Key: path={r['path']} headers={leaks} body={body!r}")
    sys.exit(0)
sys.exit(1)
EOF
}
wait_for 30 relayed || fail "the event did not reach the fake upstream as expected within 30 s"

# 8. Not root.
step "non-root"
uid=$(timeout 30 podman exec "$CID" id -u)
[[ $uid =~ ^[0-9]+$ && $uid != 0 ]] || fail "runs as uid '$uid'"
say "uid $uid"

# 9. The image's own HEALTHCHECK ("unable to get systemd connection" is noise: no systemd here).
step "healthcheck"
hc_rc=0
hc_out=$(timeout 60 podman healthcheck run "$CID" 2>&1) || hc_rc=$?
[[ -z $hc_out ]] || grep -v 'unable to get systemd connection' <<<"$hc_out" >&2 || true
((hc_rc == 0)) || fail "podman healthcheck run exited $hc_rc"

# 10. A graceful stop: SIGTERM, drain, exit 0 well within the 30 s grace.
step "stop"
timeout 60 podman stop -t 30 "$CID" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$CID")
[[ $code == 0 ]] || fail "exit code $code after SIGTERM"

podman rm -f -v "$CID" >/dev/null
CID=""

# 11. The compose example's service (deploy/compose/docker-compose.yml), with podman-compose. Only
# it: Jitsu's own images cannot be pulled here. An override file gives it the image just built,
# the host network and a free port, and points it at the fake upstream instead of ingest:3049.
step "compose"
PROJECT=jitsu-image-test-$$
# podman-compose 1.0.3 (Debian's) adds "--net <project>_default --network-alias <service>" to
# `podman run` even beside network_mode: host, which podman refuses ("cannot set multiple
# networks without bridge network mode"; containers/podman-compose#397, fixed after 1.0.3).
# Through --podman-path, this drops that pair from runs on the host network, and nothing else.
cat >"$WORK/podman-host-net" <<'EOF'
#!/usr/bin/env bash
args=("$@")
if [[ " $* " == *" --network host "* ]]; then
    args=()
    skip=0
    for a in "$@"; do
        if ((skip)); then
            skip=0
        elif [[ $a == --net || $a == --network-alias ]]; then
            skip=1
        else
            args+=("$a")
        fi
    done
fi
exec podman "${args[@]}"
EOF
chmod +x "$WORK/podman-host-net"
compose() {
    timeout 120 podman-compose --podman-path "$WORK/podman-host-net" --project-name "$PROJECT" \
        -f "$ROOT/deploy/compose/docker-compose.yml" -f "$WORK/compose.override.yml" "$@"
}
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$WORK/compose.override.yml" <<EOF
services:
  edge-proxy:
    image: $IMAGE
    network_mode: host
    environment:
      PROXY_SERVER_HOST: 127.0.0.1
      PROXY_SERVER_PORT: "$PORT"
      PROXY_UPSTREAM_URL: http://127.0.0.1:$UPSTREAM_PORT
EOF
compose up -d >"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log" >&2; fail "podman-compose up"; }
COMPOSE_UP=$(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT")
# podman-compose 1.0.3 exits 0 even when podman run fails: what ran is checked here.
[[ $COMPOSE_UP =~ ^[0-9a-f]+$ ]] || {
    cat "$WORK/compose.log" >&2
    fail "podman-compose up started '$COMPOSE_UP'"
}
wait_for 60 healthy "$COMPOSE_UP" || fail "compose: /healthz did not answer within 60 s"
MESSAGE_ID="image-test-compose-$(date +%s%N)-$$"
post_event "$PORT" "$MESSAGE_ID"
wait_for 30 relayed || fail "compose: the event did not reach the fake upstream within 30 s"
# The buffer is on the compose file's named volume, not in the container.
mounts=$(podman inspect --format '{{range .Mounts}}{{.Name}}={{.Destination}} {{end}}' "$COMPOSE_UP")
[[ $mounts == *"${PROJECT}_jitsu-proxy-buffer=/var/lib/jitsu-proxy "* ]] ||
    fail "compose: buffer mounts are '$mounts'"
# The compose file's own healthcheck, which replaces the image's.
hc_rc=0
hc_out=$(timeout 60 podman healthcheck run "$COMPOSE_UP" 2>&1) || hc_rc=$?
[[ -z $hc_out ]] || grep -v 'unable to get systemd connection' <<<"$hc_out" >&2 || true
((hc_rc == 0)) || fail "compose: the compose file's healthcheck exited $hc_rc"
# podman-compose 1.0.3 ignores stop_grace_period: the 30 s are given here.
compose stop -t 30 >/dev/null 2>&1
code=$(podman inspect --format '{{.State.ExitCode}}' "$COMPOSE_UP")
[[ $code == 0 ]] || fail "compose: exit code $code after SIGTERM"
compose down -v >/dev/null 2>&1
left=$(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT")
[[ -z $left && -z $(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT") ]] ||
    fail "compose: down -v left containers or volumes behind"
COMPOSE_UP=""

step "cleanup"
podman rmi -f "$IMAGE" >/dev/null
IMAGE=""
