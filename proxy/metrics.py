"""Prometheus metrics of one proxy instance, in a registry of its own (tests run many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.errors import REFUSAL_REASONS

# The *_created series double the output and nobody alerts on them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upstream answers in seconds, from a loopback 5 ms to upstream.timeout_s's default of 30 s.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The classes of proxy_upstream_responses_total: an HTTP status class, or no answer at all.
RESPONSE_CLASSES = ("2xx", "3xx", "4xx", "5xx", "other", "error", "timeout")


Reads = dict[str, tuple[str, Callable[[], float]]]


class _Callbacks(Collector):
    """Values kept by the components themselves (buffer, forwarder), read at scrape time."""

    def __init__(
        self, family: type[GaugeMetricFamily] | type[CounterMetricFamily], reads: Reads
    ) -> None:
        self._family = family
        self._reads = reads

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for name, (doc, read) in self._reads.items():
            yield self._family(name, doc, value=read())


def _every_value(counter: Counter, values: Iterable[str]) -> Counter:
    """A counter of one label whose every value is shown from the start, at 0: a rate over
    a series that appears only with its first event misses that event."""
    for value in values:
        counter.labels(value)
    return counter


def response_class(status: int) -> str:
    """A status's class label; "other" for what HTTP has no class for (000, 600, 999)."""
    return f"{status // 100}xx" if 200 <= status <= 599 else "other"


def status_label(status: int | None) -> str:
    """A dead letter's status label: the status as Jitsu answered it (100-999: what aiohttp
    reads), "none" when no answer came (a row that cannot be sent)."""
    return "none" if status is None else str(status)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "proxy_ingest_requests", "Ingest requests answered", ["route", "status"], registry=r
        )
        self.events_accepted = Counter(
            "proxy_events_accepted", "Events committed to the buffer", registry=r
        )
        self.events_refused = _every_value(
            Counter(
                "proxy_events_refused",
                "Events refused at the edge (bad input, no room)",
                ["reason"],
                registry=r,
            ),
            REFUSAL_REASONS,
        )
        self.upstream_requests = Counter(
            "proxy_upstream_requests", "Forwarding attempts by outcome", ["outcome"], registry=r
        )
        self.events_delivered = Counter(
            "proxy_events_delivered", "Events upstream accepted", registry=r
        )
        self.browser_answers = Counter(
            "proxy_browser_answers",
            "Browser-route events answered with Jitsu's own answer (upstream) or {ok:true}"
            " from the proxy (edge: upstream late, failing, or not a verdict)",
            ["source"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "proxy_events_dead_lettered", "Events moved to the dead-letter store", registry=r
        )
        self.events_dead_lettered_by_status = Counter(
            "proxy_events_dead_lettered_by_status",
            "Events moved to the dead-letter store, by upstream's HTTP status"
            " (none: no answer, e.g. a row that cannot be sent)",
            ["status"],
            registry=r,
        )
        # Each HTTP attempt, in-request retries (aiohttp-retry) included.
        self.upstream_duration = Histogram(
            "proxy_upstream_request_duration_seconds",
            "Upstream HTTP attempts: time until the answer's headers (or the failure)",
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.upstream_responses = _every_value(
            Counter(
                "proxy_upstream_responses",
                "Upstream HTTP attempts by answer: status class, or error / timeout (no answer)",
                ["class"],
                registry=r,
            ),
            RESPONSE_CLASSES,
        )
        self.upstream_retries = Counter(
            "proxy_upstream_retries",
            "Upstream HTTP attempts that resend a row already sent at least once",
            registry=r,
        )
        self.script_requests = Counter(
            "proxy_script_requests",
            "Tracking-script requests by answer: hit (from the cache, 200 or 304), miss"
            " (waited for the first fetch), unavailable (none fetched yet: 503)",
            ["script", "result"],
            registry=r,
        )
        self.script_refreshes = Counter(
            "proxy_script_refreshes",
            "Fetches of the tracking script from upstream: updated, unchanged (304), failed",
            ["script", "result"],
            registry=r,
        )

    def dead_lettered(self, status: int | None, events: int) -> None:
        """Count events gone to the dead-letter store (both counters: the plain one stays)."""
        self.events_dead_lettered.inc(events)
        if events:
            self.events_dead_lettered_by_status.labels(status_label(status)).inc(events)

    def gauges(self, gauges: Reads) -> None:
        self.registry.register(_Callbacks(GaugeMetricFamily, gauges))

    def counters(self, counters: Reads) -> None:
        self.registry.register(_Callbacks(CounterMetricFamily, counters))

    def render(self) -> bytes:
        return generate_latest(self.registry)
