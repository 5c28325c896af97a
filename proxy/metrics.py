"""Prometheus metrics of one proxy instance, in a registry of its own (tests run many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# The *_created series double the output and nobody alerts on them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        self.events_refused = Counter(
            "proxy_events_refused",
            "Events refused at the edge (bad input, no room)",
            ["reason"],
            registry=r,
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

    def gauges(self, gauges: Reads) -> None:
        self.registry.register(_Callbacks(GaugeMetricFamily, gauges))

    def counters(self, counters: Reads) -> None:
        self.registry.register(_Callbacks(CounterMetricFamily, counters))

    def render(self) -> bytes:
        return generate_latest(self.registry)
