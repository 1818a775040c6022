"""``location = /metrics { prometheus; }``: Prometheus's text exposition of the instance.

Built with ``prometheus_client``'s exposition (``generate_latest``) and a custom collector
over scriptlb's own shared state, not with the library's multiprocess mode. Why: every figure
already lives, summed over the workers, in the shared statistics (``scriptlb.stats``: per-peer
requests, responses by class, response-time buckets, health checks) and the instance counters
(``scriptlb.status``), kept by the request path at a cost measured per try. The multiprocess
mode would add a second recording per request (a metric-value lookup, a lock and an mmap write
per observation, per process file), and leaves files of dead workers to merge. Here a scrape
reads the shared maps and pays everything; a request pays nothing more.

Families (the names operators' dashboards use, docs/grafana-dashboard.json):
``scriptlb_http_requests_total``, ``scriptlb_http_responses_total{server_zone,code}``,
``scriptlb_connections{state}``, ``scriptlb_upstream_server_requests_total{upstream,server}``,
``scriptlb_upstream_server_responses_total{upstream,server,code}``,
``scriptlb_upstream_server_state{upstream,server}`` (1 up, 0 otherwise),
``scriptlb_upstream_server_response_time_seconds`` (histogram),
``scriptlb_upstream_server_health_checks_fails_total``, ``scriptlb_shared_dict_bytes{name,kind}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from scriptlb.stats import TIME_BUCKETS

_HEADERS = f"Content-Type: {CONTENT_TYPE_LATEST}\r\n".encode("latin-1")
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class ScriptlbCollector:
    """Reads the runtime's shared figures at each scrape."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        yield from self._instance()
        yield from self._upstreams()
        yield from self._shared_dicts()

    def _instance(self) -> Iterator[Metric]:
        status = self.runtime.status
        totals = status.totals() if status is not None else {}
        yield CounterMetricFamily("scriptlb_http_requests", "Client requests (stub_status's requests).",
                                  value=totals.get("requests", 0))
        connections = GaugeMetricFamily("scriptlb_connections", "Client connections by state.",
                                        labels=["state"])
        for state in ("active", "reading", "writing", "waiting", "accepted", "handled"):
            connections.add_metric([state], totals.get(state, 0))
        yield connections
        responses = CounterMetricFamily("scriptlb_http_responses", "Responses by server zone and class.",
                                        labels=["server_zone", "code"])
        zones = status.zone_totals() if status is not None else {}
        for zone, classes in sorted(zones.items()):
            for name, count in zip(_CLASSES, classes, strict=True):
                responses.add_metric([zone, name], count)
        yield responses

    def _upstreams(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("scriptlb_upstream_server_requests", "Tries sent to the server.",
                                       labels=["upstream", "server"])
        responses = CounterMetricFamily("scriptlb_upstream_server_responses", "Server responses by class.",
                                        labels=["upstream", "server", "code"])
        state = GaugeMetricFamily("scriptlb_upstream_server_state", "1 when the server is up, else 0.",
                                  labels=["upstream", "server"])
        times = HistogramMetricFamily("scriptlb_upstream_server_response_time_seconds",
                                      "Response time of the tries ($upstream_response_time).",
                                      labels=["upstream", "server"])
        checks = CounterMetricFamily("scriptlb_upstream_server_health_checks_fails",
                                     "Failed active health checks.", labels=["upstream", "server"])
        from scriptlb.plus_api import peer_state

        now = self.runtime.loop.time()
        for upstream in self.runtime.upstreams.values():
            stats = upstream.stats
            for peer in [*upstream.peers.primary, *upstream.peers.backup]:
                labels = [upstream.name, peer.name]
                state.add_metric(labels, 1 if peer_state(upstream, peer, None, now) == "up" else 0)
                if stats is None:
                    continue
                requests.add_metric(labels, stats.figures(peer)[0])
                for name, count in zip(_CLASSES, stats.classes(peer), strict=True):
                    responses.add_metric([*labels, name], count)
                buckets, total = stats.histogram(peer)
                cumulative, running = [], 0
                for bound, count in zip((*TIME_BUCKETS, float("inf")), buckets, strict=True):
                    running += count
                    cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
                times.add_metric(labels, cumulative, sum_value=total)
                if upstream.conf.health_checks:
                    words = stats.stats.health(stats.slot_of(peer))
                    checks.add_metric(labels, int(words[2]))
        yield from (requests, responses, state, times, checks)

    def _shared_dicts(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("scriptlb_shared_dict_bytes", "python_shared_dict zones: capacity, free.",
                                   labels=["name", "kind"])
        from scriptlb import api

        for name, zone in sorted(api.shared_dicts().items()):
            family.add_metric([name, "capacity"], zone.capacity())
            family.add_metric([name, "free"], zone.free_space())
        yield family


def prometheus(exchange: Any) -> None:
    """The ``prometheus;`` location's content handler."""
    if exchange.method not in ("GET", "HEAD"):
        exchange.finish_with_page(405)
        return
    runtime = exchange.runtime
    registry = runtime.metrics
    if registry is None:
        registry = runtime.metrics = CollectorRegistry(auto_describe=False)
        registry.register(ScriptlbCollector(runtime))  # type: ignore[arg-type]
    exchange.respond(200, _HEADERS, generate_latest(registry))
