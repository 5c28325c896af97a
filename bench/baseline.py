"""The baselines of `make bench`, each a bare aiohttp server on the proxy's event loop (uvloop):

- raw: parses each POST body as JSON and answers {"ok":true}; no auth, no buffer, no upstream.
  With --reuse-port, several of them share one port (SO_REUSEPORT), as the proxy's workers do.
- relay (--relay URL): the naive non-durable relay; sends each request on to URL and waits,
  then answers with upstream's answer. Nothing kept, nothing retried.

Run as `python -m bench.baseline --port N [--reuse-port] [--relay URL]`; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web

OK = b'{"ok":true}'
CLIENT = web.AppKey("client", aiohttp.ClientSession)
RELAYED_HEADERS = (hdrs.CONTENT_TYPE, "X-Write-Key")


async def accept(request: web.Request) -> web.Response:
    # Parse as the proxy must: the raw figure is "HTTP plus JSON", the least any server does.
    json.loads(await request.read())
    return web.Response(body=OK, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"pass"}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", accept)
    return app


def create_relay(upstream: str) -> web.Application:
    async def relay(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k in RELAYED_HEADERS if (v := request.headers.get(k)) is not None}
        async with request.app[CLIENT].post(
            upstream + request.path_qs, data=body, headers=headers
        ) as resp:
            answer = await resp.read()
        return web.Response(body=answer, status=resp.status, content_type="application/json")

    async def client(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            app[CLIENT] = session
            yield

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", relay)
    return app


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed, as the proxy runs (proxy/__main__.py): the same loop on both
    sides, so that the ratio is the proxy's work and not the loop's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse-port", action="store_true", help="share the port (SO_REUSEPORT)")
    parser.add_argument("--relay", metavar="URL", help="relay to URL instead of answering")
    args = parser.parse_args(argv)
    web.run_app(
        create_relay(args.relay.rstrip("/")) if args.relay else create_app(),
        host=args.host,
        port=args.port,
        reuse_port=args.reuse_port or None,
        access_log=None,
        print=None,
        loop=event_loop(),
    )


if __name__ == "__main__":
    main()
