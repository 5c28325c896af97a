"""The null upstream of `make bench`: answers {"ok":true} to any POST (single events, /v1/batch
bodies of many) and counts the distinct messageIds of the current run, so that a relay's or the
proxy's figure only stands if the events really went through.

Run as `python -m bench.upstream --port N`; GET /_bench/stats reads the counts, POST
/_bench/reset?run=N starts a new run. A process of its own, so that it takes no CPU from the
load generator.
"""

from __future__ import annotations

import argparse
import re
import time

from aiohttp import web

from bench.baseline import OK, event_loop, healthz

# The bench's messageIds: b<run>-<seq>, seq unique within a run (bench/post.lua, generator.py).
MESSAGE_ID = re.compile(rb'"messageId"\s*:\s*"b(\d+)-(\d+)"')


class Counts:
    """Distinct events of one run in a bitmap indexed by seq: a million events in 128 KiB."""

    def __init__(self) -> None:
        self.last_any = time.monotonic()
        self.reset(0)

    def reset(self, run: int) -> None:
        self.run = run
        self.seen = bytearray()
        self.events = 0  # every messageId of this run, duplicates included
        self.distinct = 0
        self.other = 0  # messageIds of another run (a late retry) or of no run at all
        self.requests = 0
        self.first = 0.0
        self.last = 0.0  # the run's first and last event (the drain's span)

    def add(self, body: bytes) -> None:
        now = time.monotonic()
        self.requests += 1
        ids = MESSAGE_ID.findall(body)
        self.last_any = now
        if not self.first and ids:
            self.first = now
        if ids:
            self.last = now
        run = str(self.run).encode()
        for run_id, seq_text in ids:
            if run_id != run:
                self.other += 1
                continue
            seq = int(seq_text)
            byte, bit = divmod(seq, 8)
            if byte >= len(self.seen):
                self.seen.extend(bytes(max(byte + 1 - len(self.seen), len(self.seen))))
            self.events += 1
            if not self.seen[byte] & (1 << bit):
                self.seen[byte] |= 1 << bit
                self.distinct += 1
        if not ids:
            self.other += 1

    def stats(self) -> dict[str, float]:
        return {
            "run": self.run,
            "requests": self.requests,
            "events": self.events,
            "distinct": self.distinct,
            "duplicates": self.events - self.distinct,
            "other": self.other,
            "span_s": self.last - self.first,
            # Since the last request of any run: how long upstream has been left alone.
            "idle_s": time.monotonic() - self.last_any,
        }


COUNTS = web.AppKey("counts", Counts)


async def accept(request: web.Request) -> web.Response:
    request.app[COUNTS].add(await request.read())
    return web.Response(body=OK, content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS].stats())


async def reset(request: web.Request) -> web.Response:
    request.app[COUNTS].reset(int(request.query.get("run", "0")))
    return web.json_response({"ok": True})


def create_app(run_id: int = 0) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[COUNTS] = Counts()
    app[COUNTS].reset(run_id)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/_bench/stats", stats)
    app.router.add_post("/_bench/reset", reset)
    app.router.add_post("/{tail:.*}", accept)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.upstream", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--run", type=int, default=0, help="the run whose events to count")
    args = parser.parse_args(argv)
    web.run_app(
        create_app(args.run),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=event_loop(),
    )


if __name__ == "__main__":
    main()
