"""`python -m proxy --config PATH`: load config, set up logging, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from proxy import __version__, deadletters, salvage, supervisor
from proxy.app import create_app, server_options
from proxy.auth import mask_key
from proxy.config import Config, load_config
from proxy.errors import BufferError_, ConfigError, ProxyError, UsageError
from proxy.fleet import Worker
from proxy.logs import configure_logging
from proxy.shards import offline_lock, worker_count

COMMANDS = frozenset({"salvage", "dead-letters"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The console script's own name in its usage line; "proxy" under `python -m proxy`.
    prog = "jitsu-edge-proxy" if Path(sys.argv[0]).name == "jitsu-edge-proxy" else "proxy"
    parser = _Parser(prog=prog, description=__doc__)
    parser.add_argument(
        "--config", default=os.environ.get("PROXY_CONFIG"), help="path to config.yaml"
    )
    argv = _command_first(argv)
    # Offline tools on a stopped proxy's buffer; without one of these words, serve.
    command = argv[0] if argv and argv[0] in COMMANDS else None
    sub = ""
    if command == "salvage":
        parser.prog, parser.description = f"{prog} salvage", salvage.__doc__
        parser.add_argument("file", type=Path, help="a quarantined buffer.db")
    elif command == "dead-letters":
        sub, argv = deadletters.split_subcommand(argv[1:])
        argv.insert(0, command)
        parser.prog, parser.description = f"{prog} dead-letters {sub}", deadletters.__doc__
        deadletters.add_arguments(parser, sub)
    args = parser.parse_args(argv[1:] if command else argv)
    # dead-letters writes its rows on stdout: its log lines (the summary too) go to stderr.
    log_stream = sys.stderr if command == "dead-letters" else None
    try:
        # The offline commands never talk to upstream: its TLS files need not be readable.
        config = load_config(args.config, egress=command is None)
    except ConfigError as exc:
        configure_logging(stream=log_stream)
        structlog.get_logger("proxy").error("config_invalid", error=str(exc))
        return 1
    configure_logging(config.log.level, config.log.format, stream=log_stream)
    log = structlog.get_logger("proxy")
    if command is not None:
        return _offline(config, command, sub, args, log)
    upstream = urlsplit(config.upstream.url)
    server = config.server
    count = worker_count(server.workers)
    log.info(
        "proxy_starting",
        version=__version__,
        host=server.host,
        port=server.port,
        admin=f"{server.admin_host}:{server.admin_port}" if server.admin_port else "",
        upstream=f"{upstream.scheme}://{upstream.hostname}:{upstream.port or ''}".rstrip(":"),
        buffer=config.buffer.path,
        workers=count,
    )
    if count > 1:
        return _supervise(config, count, log)
    try:
        # One app on both listeners; the app tells them apart by the port a request came in on.
        admin = [_listen(server.admin_host, server.admin_port)] if server.admin_port else []
        loop = _event_loop()
        # aiohttp drains on SIGTERM and SIGINT; SIGHUP would kill the process without a drain.
        loop.add_signal_handler(signal.SIGHUP, _hang_up)
        web.run_app(
            create_app(config),
            host=server.host,
            port=server.port,
            sock=admin,
            loop=loop,
            **_run_options(config),
        )
    except BufferError_ as exc:
        log.error("buffer_unusable", error=str(exc))
        return 1
    except ConfigError as exc:  # a TLS file that went away since the config was checked
        log.error("config_invalid", error=str(exc))
        return 1
    except OSError as exc:
        log.error("listen_failed", error=str(exc))
        return 1
    log.info("proxy_stopped")
    return 0


def _offline(
    config: Config,
    command: str,
    sub: str,
    args: argparse.Namespace,
    log: structlog.typing.FilteringBoundLogger,
) -> int:
    """salvage or dead-letters, on a stopped proxy's buffer: one line when it fails."""
    name = command.replace("-", "_")
    try:
        # The supervisor's lock too: with several workers, none holds a shard's own lock
        # while the supervisor waits to restart one.
        with offline_lock(config.buffer.path):
            if command == "salvage":
                result = asyncio.run(salvage.salvage(config, args.file))
                if "error" in result:  # the live buffer filled up: a re-run continues
                    log.error("salvage_incomplete", **result)
                    return 1
                log.info("salvage_done", **result)
            else:
                deadletters.run(config, sub, args)
    except UsageError as exc:
        log.error(f"{name}_failed", error=str(exc))
        return 2
    except ProxyError as exc:
        log.error(f"{name}_failed", error=str(exc))
        return 1
    except BrokenPipeError:
        # Its reader went away (`| head`): quietly, by Python's recipe (the docs of `signal`,
        # "Note on SIGPIPE"), stdout pointed at devnull so the flush at exit cannot fail again.
        _stdout_to_devnull()
        return 1
    except OSError as exc:  # stdout on a full disk
        _stdout_to_devnull()
        log.error(f"{name}_failed", error=f"cannot write to stdout: {exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        # What a replay or a purge committed before it stays committed.
        again = "`dead-letters list` shows what is left" if sub else "running it again goes on"
        log.error(f"{name}_interrupted", error=f"interrupted: {again}")
        return 130
    return 0


def _stdout_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _command_first(argv: list[str]) -> list[str]:
    """`--config PATH dead-letters list` as `dead-letters list --config PATH`: the image's
    ENTRYPOINT passes --config before whatever `docker run IMAGE ...` adds."""
    if not argv or not argv[0].startswith("--config"):
        return argv
    head = 1 if "=" in argv[0] else 2
    if len(argv) > head and argv[head] in COMMANDS:
        return [argv[head], *argv[head + 1 :], *argv[:head]]
    return argv


def _hang_up() -> None:
    raise web.GracefulExit()


def _run_options(config: Config) -> dict[str, Any]:
    return {
        "shutdown_timeout": config.server.shutdown_timeout_s,
        "access_log": None,
        "print": None,
        **server_options(config),
    }


def _supervise(config: Config, count: int, log: structlog.typing.FilteringBoundLogger) -> int:
    def serve(worker: Worker, socks: list[socket.socket], beat: Callable[[], None]) -> int:
        return _serve_worker(config, worker, socks, beat)

    workers = supervisor.Supervisor(config, count, serve)
    try:
        workers.start()
    except supervisor.StartError as exc:
        log.error(exc.event, error=str(exc))
        return 1
    code = workers.run()
    log.info("proxy_stopped", exit_code=code)
    return code


def _serve_worker(
    config: Config, worker: Worker, socks: list[socket.socket], beat: Callable[[], None]
) -> int:
    """One worker process: the app on its own sockets of the port's SO_REUSEPORT group."""
    log = structlog.get_logger("proxy")
    app = create_app(config, worker)

    async def beating(_app: web.Application) -> AsyncIterator[None]:
        # The supervisor hears from a worker that serves, for as long as its loop runs.
        async def beat_on() -> None:
            while True:
                beat()
                await asyncio.sleep(supervisor.BEAT_EVERY_S)

        task = asyncio.create_task(beat_on(), name="beat")
        yield
        task.cancel()

    app.cleanup_ctx.append(beating)
    loop = _event_loop()
    _drain_on_first_signal(loop)
    try:
        web.run_app(app, sock=socks, loop=loop, handle_signals=False, **_run_options(config))
    except BufferError_ as exc:
        log.error("buffer_unusable", error=str(exc))
        return 1
    log.info("worker_drained")
    return 0


def _drain_on_first_signal(loop: asyncio.AbstractEventLoop) -> None:
    """SIGTERM (from the supervisor), SIGINT (a terminal's Ctrl-C reaches the whole group) or
    SIGHUP: the first starts the drain, later ones must not cut it short."""

    def first() -> None:
        for sig in supervisor.DRAIN_SIGNALS:
            loop.add_signal_handler(sig, lambda: None)
        raise web.GracefulExit()

    for sig in supervisor.DRAIN_SIGNALS:
        loop.add_signal_handler(sig, first)


class _Parser(argparse.ArgumentParser):
    """argparse repeats what it did not understand: a key given without --write-key would be
    printed whole. Anything shaped like keyId:secret is masked first."""

    def error(self, message: str) -> NoReturn:
        super().error(re.sub(r"(\S+?):\S+", lambda m: mask_key(m.group(0)), message))


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (Linux, macOS: a dependency there), else
    asyncio's. Same behaviour, less time per request in the loop itself (issue 9)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for the admin listener (the public one aiohttp opens itself)."""
    family, addr = supervisor.address(host, port)
    return socket.create_server(addr, family=family)


if __name__ == "__main__":
    sys.exit(main())
