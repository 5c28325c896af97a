"""The baseline for `bench.load`: a bare aiohttp server that reads each POST body and answers
{"ok":true}, with no auth, parsing or buffering. Whatever the proxy costs is measured against it.

Run as `python -m bench.baseline --port N`; stops on SIGTERM.
"""

from __future__ import annotations

import argparse

from aiohttp import web

OK = b'{"ok":true}'


async def accept(request: web.Request) -> web.Response:
    # Read the body as the proxy must, so both sides move the same bytes.
    await request.read()
    return web.Response(body=OK, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"pass"}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/{tail:.*}", accept)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
