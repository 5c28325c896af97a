"""nginx `proxy_pass` to the null upstream, a reference relay where Debian's nginx is installed
(the bench does not install it: `apt-get install nginx-light` or `nginx`). It runs as a child
of the bench on a loopback port with its own config and temp dirs: no daemon, no service."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Debian's nginx has no `user` compiled in: as root its workers would run as nobody, who may
# not write to our temp dirs. Bodies stay in memory anyway (client_body_buffer_size).
CONFIG = """\
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_body_buffer_size 1m;
    upstream null {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location = /healthz {{
            default_type application/json;
            return 200 '{{"status":"pass"}}';
        }}
        location / {{
            proxy_pass http://null;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def find() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
    )


def config(prefix: Path, port: int, upstream_port: int, workers: int) -> str:
    return CONFIG.format(
        prefix=prefix,
        port=port,
        upstream_port=upstream_port,
        workers=workers,
        user="user root root;" if os.geteuid() == 0 else "",
    )


def argv(nginx: str, prefix: Path, port: int, upstream_port: int, workers: int) -> list[str]:
    """Writes the config under `prefix` and returns the command that runs nginx on it."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(config(prefix, port, upstream_port, workers))
    # -e: the error log before the config is read, else nginx tries /var/log/nginx.
    return [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
