"""Reaching an upstream the way on-prem networks need (issue 10): a private CA, mTLS, and an
egress proxy from HTTPS_PROXY / NO_PROXY. Against a real TLS fake Jitsu on loopback with a CA
of its own (trustme), and a real CONNECT proxy written here."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization

from proxy.config import build_config
from proxy.errors import ConfigError
from tests.conftest import ProxyFactory, state, until
from tests.fakejitsu import SCRIPT, FakeJitsu
from tests.procs import refused_start

KEY = "kid:sUperSecretValue123"
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "REQUEST_METHOD")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pems(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """The CA's certificate, and a client certificate and key it signed, as PEM files."""
    client = ca.issue_cert("edge-proxy.example")
    files = {
        "ca_file": tmp_path / "ca.pem",
        "client_cert_file": tmp_path / "client.pem",
        "client_key_file": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca_file"]))
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(files["client_cert_file"]), append=True)
    client.private_key_pem.write_to_path(str(files["client_key_file"]))
    return {k: str(v) for k, v in files.items()}


def server_context(ca: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the machine running the tests has set, each test sets its own."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
async def upstream(ca: trustme.CA) -> AsyncIterator[FakeJitsu]:
    """The fake Jitsu behind TLS, its certificate from a CA no system trusts (make_proxy's)."""
    fake = FakeJitsu(server_context(ca))
    await fake.start()
    yield fake
    await fake.stop()


async def send(proxy: TestClient[Any, Any], message_id: str) -> None:
    resp = await proxy.post(
        "/api/s/s2s/track",
        headers={"X-Write-Key": KEY},
        json={"event": "e", "messageId": message_id},
    )
    assert resp.status == 200


async def refused_for_a_while(proxy: TestClient[Any, Any], upstream: FakeJitsu) -> None:
    """Several attempts failed before any request reached upstream; the event stays buffered."""
    forwarder = state(proxy).forwarder
    assert forwarder is not None
    await until(lambda: forwarder.failures >= 3)
    buffer = state(proxy).buffer
    assert upstream.received == []
    assert (buffer.rows, buffer.dead_rows) == (1, 0), "kept, not dead-lettered"


async def test_private_ca_file_lets_events_and_the_script_through(
    make_proxy: ProxyFactory, upstream: FakeJitsu, pems: dict[str, str]
) -> None:
    proxy = await make_proxy(upstream={"ca_file": pems["ca_file"]})
    await send(proxy, "m-ca")
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["m-ca"]
    resp = await proxy.get("/p.js")
    assert resp.status == 200 and await resp.read() == SCRIPT


async def test_without_the_ca_the_certificate_is_refused_and_events_wait(
    make_proxy: ProxyFactory, upstream: FakeJitsu, pems: dict[str, str], logs: io.StringIO
) -> None:
    proxy = await make_proxy()
    await send(proxy, "m-wait")
    await refused_for_a_while(proxy, upstream)
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    retries = [x["reason"] for x in lines if x["event"] == "upstream_retry"]
    assert retries and all("CERTIFICATE_VERIFY_FAILED" in r for r in retries), "the log says why"
    assert retries[0].startswith("TLS error: ")
    assert not [x for x in lines if x["event"] == "event_dead_lettered"]
    assert (await proxy.get("/p.js")).status == 503, "the script is fetched the same way"
    await proxy.close()
    # Once the operator adds the CA, the waiting event goes.
    fixed = await make_proxy(upstream={"ca_file": pems["ca_file"]})
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["m-wait"]
    await until(lambda: state(fixed).buffer.rows == 0)


@pytest.fixture
async def mtls_upstream(ca: trustme.CA) -> AsyncIterator[FakeJitsu]:
    fake = FakeJitsu(server_context(ca, require_client_cert=True))
    await fake.start()
    yield fake
    await fake.stop()


async def test_mtls_upstream_wants_the_client_certificate(
    make_proxy: ProxyFactory, mtls_upstream: FakeJitsu, pems: dict[str, str]
) -> None:
    url = mtls_upstream.url
    proxy = await make_proxy(upstream={"url": url, "ca_file": pems["ca_file"]})
    await send(proxy, "m-mtls")
    await refused_for_a_while(proxy, mtls_upstream)
    await proxy.close()
    await make_proxy(upstream={"url": url, **pems})
    (got,) = await mtls_upstream.wait_delivered(1)
    assert got.message_ids == ["m-mtls"]


async def test_mtls_with_an_encrypted_key_and_its_password(
    make_proxy: ProxyFactory, mtls_upstream: FakeJitsu, pems: dict[str, str], tmp_path: Path
) -> None:
    encrypted = _encrypted_key(pems["client_key_file"], tmp_path, b"open sesame")
    proxy = await make_proxy(
        upstream={
            "url": mtls_upstream.url,
            **pems,
            "client_key_file": encrypted,
            "client_key_password": "open sesame",
        }
    )
    await send(proxy, "m-encrypted")
    (got,) = await mtls_upstream.wait_delivered(1)
    assert got.message_ids == ["m-encrypted"]


def _encrypted_key(path: str, tmp_path: Path, password: bytes) -> str:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    out = tmp_path / "client-encrypted.key"
    out.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
    )
    return str(out)


class ConnectProxy:
    """An egress proxy as on-prem networks have them: CONNECT host:port, then bytes both ways.
    Records each CONNECT's target and Proxy-Authorization."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.authorizations: list[str | None] = []
        self.port = 0
        # An answer to every CONNECT instead of a tunnel (a proxy that wants other credentials).
        self.refuse: bytes | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        # Cut every tunnel (cancelling the handlers instead upsets asyncio's streams in 3.11).
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ")
            headers = dict(line.split(": ", 1) for line in header_lines if ": " in line)
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.targets.append(target)
            self.authorizations.append(headers.get("Proxy-Authorization"))
            if self.refuse is not None:
                writer.write(self.refuse)
                return
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self._writers.add(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await reader.read(64 * 1024):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()


# The egress proxy's credentials, as an on-prem HTTPS_PROXY carries them.
PROXY_USER, PROXY_PASSWORD = "relay", "pa55word"


@pytest.fixture
async def egress_proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ConnectProxy]:
    """A CONNECT proxy named, with credentials, in this test's HTTPS_PROXY."""
    proxy = ConnectProxy()
    await proxy.start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://{PROXY_USER}:{PROXY_PASSWORD}@{proxy.host_port}")
    yield proxy
    await proxy.stop()


@pytest.mark.parametrize(
    ("trust_env", "no_proxy", "via_proxy"),
    [(True, "", True), (True, "127.0.0.1,localhost", False), (False, "", False)],
    ids=["https-proxy", "no-proxy-matches", "trust-env-off"],
)
async def test_egress_proxy_from_the_environment(
    make_proxy: ProxyFactory,
    upstream: FakeJitsu,
    egress_proxy: ConnectProxy,
    pems: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    logs: io.StringIO,
    trust_env: bool,
    no_proxy: str,
    via_proxy: bool,
) -> None:
    host_port = egress_proxy.host_port
    if no_proxy:
        monkeypatch.setenv("NO_PROXY", no_proxy)
    # The script from another name of the same host: its CONNECT tells it from the events'.
    script_host = f"localhost:{upstream.port}"
    proxy = await make_proxy(
        upstream={"ca_file": pems["ca_file"], "trust_env": trust_env},
        script={"origin": f"https://{script_host}/p.js"},
    )
    await send(proxy, "m-egress")
    (got,) = await upstream.wait_delivered(1)
    assert got.message_ids == ["m-egress"]
    resp = await proxy.get("/p.js")
    assert resp.status == 200 and await resp.read() == SCRIPT
    events_host = f"127.0.0.1:{upstream.port}"
    if via_proxy:
        assert {events_host, script_host} <= set(egress_proxy.targets)
        basic = "Basic " + base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
        assert set(egress_proxy.authorizations) == {basic}
        assert f'"proxy":"http://{host_port}","event":"upstream_via_proxy"' in logs.getvalue()
    else:
        assert egress_proxy.targets == []
    assert PROXY_PASSWORD not in logs.getvalue()


async def test_a_refusing_egress_proxy_never_gets_its_password_into_the_logs(
    make_proxy: ProxyFactory,
    upstream: FakeJitsu,
    egress_proxy: ConnectProxy,
    pems: dict[str, str],
    logs: io.StringIO,
) -> None:
    """aiohttp's proxy errors quote the proxy's URL, credentials and all: they reached the
    upstream_retry and script_fetch_failed lines (attack pass, issue 10)."""
    egress_proxy.refuse = (
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 0\r\n\r\n'
    )
    host_port = egress_proxy.host_port
    proxy = await make_proxy(upstream={"ca_file": pems["ca_file"], "trust_env": True})
    await send(proxy, "m-refused")
    await until(lambda: "upstream_retry" in logs.getvalue(), timeout=10)
    assert (await proxy.get("/p.js")).status == 503
    ready = await (await proxy.get("/readyz")).text()
    assert upstream.received == [] and state(proxy).buffer.rows == 1
    assert "407" in logs.getvalue()
    assert PROXY_PASSWORD not in logs.getvalue() + ready
    assert f"http://***@{host_port}" in logs.getvalue()


# ---- validation at start ----------------------------------------------------------------------


def _config(upstream: dict[str, Any], environ: dict[str, str] | None = None) -> None:
    build_config({"upstream": {"url": "https://jitsu.internal", **upstream}}, environ or {})


def test_tls_keys_default_to_todays_behaviour() -> None:
    config = build_config({}, {})
    assert (config.upstream.ca_file, config.upstream.client_cert_file) == ("", "")
    assert config.upstream.trust_env is False


def test_tls_keys_come_from_the_environment_too(pems: dict[str, str]) -> None:
    env = {"PROXY_UPSTREAM_CA_FILE": pems["ca_file"], "PROXY_UPSTREAM_TRUST_ENV": "true"}
    config = build_config({}, env)
    assert config.upstream.ca_file == pems["ca_file"] and config.upstream.trust_env
    with pytest.raises(ConfigError, match=r"upstream\.ca_file"):
        build_config({}, {"PROXY_UPSTREAM_CA_FILE": "/nonexistent/ca.pem"})


@pytest.fixture
def garbage(tmp_path: Path) -> str:
    path = tmp_path / "garbage.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return str(path)


def test_bad_tls_files_name_their_key(pems: dict[str, str], garbage: str, tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"ca_file": str(tmp_path / "missing.pem")}, "upstream.ca_file: cannot read"),
        ({"ca_file": str(tmp_path)}, "upstream.ca_file: cannot read"),
        ({"ca_file": garbage}, "upstream.ca_file: .* holds no PEM certificate"),
        ({"ca_file": pems["client_key_file"]}, "upstream.ca_file"),
        ({"client_cert_file": pems["client_cert_file"]}, "upstream.client_key_file: required"),
        ({"client_key_file": pems["client_key_file"]}, "upstream.client_cert_file: required"),
        (
            {"client_cert_file": garbage, "client_key_file": pems["client_key_file"]},
            "upstream.client_cert_file: cannot use",
        ),
        (
            {"client_cert_file": pems["client_cert_file"], "client_key_file": pems["ca_file"]},
            "upstream.client_cert_file: cannot use",
        ),
        ({"client_key_password": "x"}, "upstream.client_key_password"),
    ]
    for upstream, message in cases:
        with pytest.raises(ConfigError, match=message):
            _config(upstream)


def test_a_key_for_another_certificate_is_refused(
    ca: trustme.CA, pems: dict[str, str], tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    ca.issue_cert("someone-else.example").private_key_pem.write_to_path(str(other))
    with pytest.raises(ConfigError, match=r"upstream\.client_cert_file: cannot use"):
        _config({**pems, "client_key_file": str(other)})


def test_encrypted_key_needs_the_right_password_which_is_never_shown(
    pems: dict[str, str], tmp_path: Path
) -> None:
    encrypted = _encrypted_key(pems["client_key_file"], tmp_path, b"open sesame")
    _config({**pems, "client_key_file": encrypted, "client_key_password": "open sesame"})
    for password in ("", "wrong guess"):
        with pytest.raises(ConfigError, match="client_key_password") as exc:
            _config({**pems, "client_key_file": encrypted, "client_key_password": password})
        assert "open sesame" not in str(exc.value)
        assert not password or password not in str(exc.value)


def test_egress_proxy_variables_are_checked_when_trusted() -> None:
    socks = {"HTTPS_PROXY": "socks5://u:secret@proxy.corp:1080"}
    with pytest.raises(ConfigError, match="HTTPS_PROXY") as exc:
        _config({"trust_env": True}, socks)
    assert "secret" not in str(exc.value)
    _config({"trust_env": False}, socks)  # not read unless trusted
    # No scheme: an http proxy, as curl takes it.
    _config({"trust_env": True}, {"https_proxy": "proxy.corp:3128"})


@pytest.mark.parametrize(
    ("upstream", "env", "needle"),
    [
        ({"ca_file": "/nonexistent/ca.pem"}, {}, "upstream.ca_file: cannot read"),
        ({"client_cert_file": "CERT"}, {}, "upstream.client_key_file: required"),
        ({"ca_file": "GARBAGE"}, {}, "holds no PEM certificate"),
        ({"trust_env": "true"}, {"HTTPS_PROXY": "socks5://proxy.corp:1080"}, "HTTPS_PROXY"),
    ],
    ids=["missing-file", "cert-without-key", "garbage-pem", "unusable-https-proxy"],
)
def test_bad_tls_config_exits_1_with_one_clear_line(
    tmp_path: Path,
    pems: dict[str, str],
    garbage: str,
    upstream: dict[str, str],
    env: dict[str, str],
    needle: str,
) -> None:
    files = {"CERT": pems["client_cert_file"], "GARBAGE": garbage}
    upstream = {k: files.get(v, v) for k, v in upstream.items()}
    lines = "".join(f"  {k}: {v}\n" for k, v in upstream.items())
    path = tmp_path / "config.yaml"
    path.write_text(f"upstream:\n  url: https://jitsu.internal\n{lines}")
    assert needle in refused_start(path, env)
