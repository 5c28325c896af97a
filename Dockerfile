# Edge proxy for Jitsu's ingest API.
#
#   docker build -t jitsu-edge-proxy .
#   docker run -p 8080:8080 -v jitsu-proxy-buffer:/var/lib/jitsu-proxy \
#     -e PROXY_UPSTREAM_URL=http://jitsu:3049 jitsu-edge-proxy
#
# Any config key can be overridden by PROXY_<SECTION>_<KEY> (see config.yaml). The buffer must
# live on the volume: events are on disk there before a client gets its 2xx. A bind-mounted
# buffer directory must be writable by uid 10001.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Not "proxy": Debian images (python:3.11-slim included) already have a user and a group of that
# name (uid/gid 13), and groupadd would fail.
RUN groupadd --system --gid 10001 jitsuproxy \
    && useradd --system --uid 10001 --gid jitsuproxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin jitsuproxy \
    && mkdir -p /var/lib/jitsu-proxy /etc/jitsu-proxy \
    && chown jitsuproxy:jitsuproxy /var/lib/jitsu-proxy

WORKDIR /src

# Runtime dependencies first, read from pyproject.toml (no dev extra), so this layer is rebuilt
# only when pyproject.toml changes, not on every change to the code.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the package itself, as `make install` does but not editable, and the sources go again.
COPY README.md ./
COPY proxy/ proxy/
RUN pip install --no-deps . \
    && pip check \
    && cd / \
    && rm -rf /src
WORKDIR /

COPY config.yaml /etc/jitsu-proxy/config.yaml
ENV PROXY_BUFFER_PATH=/var/lib/jitsu-proxy
# Declared after the chown: a new named volume starts as a copy of this directory, owner included.
VOLUME ["/var/lib/jitsu-proxy"]

USER 10001:10001
EXPOSE 8080

# Liveness only; /readyz says whether the buffer takes writes. urllib because slim has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PROXY_SERVER_PORT', '8080'), timeout=3)"]

# On SIGTERM the proxy stops taking requests, waits for the open ones, then for forwards in
# flight (server.shutdown_timeout_s each, 10 s by default) and closes the buffer cleanly. Allow
# more than twice that before SIGKILL: docker stop -t 30, terminationGracePeriodSeconds: 30.
STOPSIGNAL SIGTERM
# The console script pip installed (python -m proxy is the same program). Exec form: it is PID 1
# and gets the SIGTERM itself.
ENTRYPOINT ["jitsu-edge-proxy", "--config", "/etc/jitsu-proxy/config.yaml"]
