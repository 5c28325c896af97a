"""Configures structlog once at start: JSON lines in production, a readable console on a TTY."""

from __future__ import annotations

import datetime
import functools
import logging
import sys
import time
from typing import Any, TextIO

import orjson
import structlog


def _fallback(obj: Any) -> Any:
    """What structlog's JSONRenderer writes for a value JSON has no type for."""
    structlog_repr = getattr(obj, "__structlog__", None)
    return structlog_repr() if structlog_repr is not None else repr(obj)


_SLOW_JSON = structlog.processors.JSONRenderer()
# Dataclasses and datetimes as json.dumps sees them (through the fallback), not orjson's way.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def render_json(logger: Any, name: str, event_dict: structlog.typing.EventDict) -> str:
    """The line structlog's JSONRenderer writes, the same keys and values in the same order,
    written by orjson (issue 9: a few µs less per request line): compact, non-ASCII as UTF-8.
    What orjson refuses (a lone surrogate from a client's header, an int past 64 bits) goes
    through json as before."""
    try:
        return orjson.dumps(event_dict, default=_fallback, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        return str(_SLOW_JSON(logger, name, event_dict))  # json.dumps: a str


def add_timestamp(
    logger: Any, name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """structlog's TimeStamper(fmt="iso", utc=True), the same text, 3 µs less per line (issue 9)."""
    event_dict["timestamp"] = iso_timestamp(time.time_ns())
    return event_dict


def iso_timestamp(nanos: int) -> str:
    """datetime's isoformat() of this moment in UTC, with Z: microseconds floored, as
    datetime.now() takes them, and no fraction when they are 0. The second's text is kept."""
    second, rest = divmod(nanos, 1_000_000_000)
    micros = rest // 1000
    text = _iso_second(second)
    return f"{text}.{micros:06d}Z" if micros else f"{text}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


class LineLogger:
    """Writes each line, its newline included, in one write: several workers share stdout,
    and print()'s two writes (the line, then the newline) interleaved between them when
    stdout is unbuffered, as the image runs it (attack pass: 42 broken lines in 6,019)."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        self._file.write(message + "\n")
        self._file.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def configure_logging(
    level: str = "info", fmt: str = "auto", *, cache: bool = True, stream: TextIO | None = None
) -> None:
    """`cache`: each logger is built once, on first use (issue 9: a log line per request).
    Tests that reconfigure structlog on the fly turn it off. `stream`: stdout unless given (an
    offline command whose output is on stdout logs to stderr)."""
    renderer: structlog.typing.Processor
    if fmt == "console" or (fmt == "auto" and (stream or sys.stdout).isatty()):
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = render_json
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_args: LineLogger(sys.stdout if stream is None else stream),
        cache_logger_on_first_use=cache,
    )
    # aiohttp and asyncio speak through the standard library; render their warnings the same way.
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                add_timestamp,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
