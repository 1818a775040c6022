"""``location = /metrics { prometheus; }``: Prometheus's text exposition of the instance.

Built with ``prometheus_client``'s exposition (``generate_latest``) and a custom collector
over scriptlb's own shared state, not with the library's multiprocess mode. Why: every figure
already lives, summed over the workers, in the shared statistics (``scriptlb.state.stats``: per-peer
requests, responses by class, response-time buckets, health checks) and the instance counters
(``scriptlb.ops.status``), kept by the request path at a cost measured per try. The multiprocess
mode would add a second recording per request (a metric-value lookup, a lock and an mmap write
per observation, per process file), and leaves files of dead workers to merge. Here a scrape
reads the shared maps and pays everything; a request pays nothing more.

Families (the names operators' dashboards use, docs/grafana-dashboard.json):
``scriptlb_http_requests_total``, ``scriptlb_http_responses_total{server_zone,code}``,
``scriptlb_connections{state}``, ``scriptlb_upstream_server_requests_total{upstream,server}``,
``scriptlb_upstream_server_responses_total{upstream,server,code}``,
``scriptlb_upstream_server_state{upstream,server}`` (1 up, 0 otherwise),
``scriptlb_upstream_server_response_time_seconds`` (histogram),
``scriptlb_upstream_server_health_checks_fails_total``, ``scriptlb_shared_dict_bytes{name,kind}``,
``scriptlb_cluster_store_up{store,name}`` (1 reachable, 0 not: Redis per synced dict, etcd or
DNS per upstream; from the cluster process),
``scriptlb_hook_runs_total{upstream,phase,outcome}``, ``scriptlb_hook_duration_seconds``
(histogram). Hook runs are counted in plain attributes of each runner and shared through a
small JSON file per worker, written at most once a second (``HookFiguresPublisher``).
"""

from __future__ import annotations

import glob
import json
import os
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

from scriptlb.state.stats import TIME_BUCKETS

_HEADERS = f"Content-Type: {CONTENT_TYPE_LATEST}\r\n".encode("latin-1")
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class ScriptlbCollector:
    """Reads the runtime's shared figures at each scrape."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        yield from self._instance()
        yield from self._upstreams()
        yield from self._hooks()
        yield from self._shared_dicts()

    def _hooks(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("scriptlb_hook_runs", "Hook runs by outcome.",
                                   labels=["upstream", "phase", "outcome"])
        durations = HistogramMetricFamily("scriptlb_hook_duration_seconds", "CPU-budgeted hook run time.",
                                          labels=["upstream", "phase"])
        from scriptlb.hookrt.hooks import RUN_BUCKETS
        from scriptlb.state.shared_dict import zone_directory

        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for item in all_hook_figures(self.runtime, zone_directory(self.runtime.conf.prefix)):
            key = (item["upstream"], item["phase"])
            into = merged.setdefault(key, {"outcomes": {}, "buckets": [0] * (len(RUN_BUCKETS) + 1),
                                           "sum": 0.0})
            for outcome, count in item["outcomes"].items():
                into["outcomes"][outcome] = into["outcomes"].get(outcome, 0) + count
            into["buckets"] = [a + b for a, b in zip(into["buckets"], item["buckets"], strict=True)]
            into["sum"] += item["sum"]
        for (upstream, phase), item in sorted(merged.items()):
            for outcome, count in sorted(item["outcomes"].items()):
                runs.add_metric([upstream, phase, outcome], count)
            cumulative, running = [], 0
            for bound, count in zip((*RUN_BUCKETS, float("inf")), item["buckets"], strict=True):
                running += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            durations.add_metric([upstream, phase], cumulative, sum_value=item["sum"])
        yield runs
        yield durations

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
        from scriptlb.ops.plus_api import peer_state

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
        from scriptlb.hookrt import api

        for name, zone in sorted(api.shared_dicts().items()):
            family.add_metric([name, "capacity"], zone.capacity())
            family.add_metric([name, "free"], zone.free_space())
        yield family
        yield from self._cluster_stores()

    def _cluster_stores(self) -> Iterator[Metric]:
        from scriptlb.ops.cluster import ClusterStatus
        from scriptlb.state.shared_dict import zone_directory

        state = ClusterStatus.read(zone_directory(self.runtime.conf.prefix))
        if not state:
            return
        family = GaugeMetricFamily("scriptlb_cluster_store_up", "Cluster stores as this node sees them.",
                                   labels=["store", "name"])
        for store, items in sorted(state.items()):
            for name, item in sorted(items.items()):
                family.add_metric([store, name], 1 if item.get("up") else 0)
        yield family


# --------------------------------------------------------------------------- hooks


HOOKS_PUBLISH_INTERVAL = 1.0  # seconds: how late another worker's hook runs reach a scrape
_HOOK_FILE = "hook_runs.{pid}.json"


def hook_runners(runtime: Any) -> list[tuple[str, str, Any]]:
    """(upstream label, phase, runner) of every hook runner of this worker."""
    found = [(u.name, "balancer", u.hook) for u in runtime.upstreams.values() if u.hook is not None]
    found += [("", "log", runner) for runner in runtime._log_hooks.values()]
    return found


def hook_figures(runtime: Any) -> list[dict[str, Any]]:
    """This worker's hook runs, plain data (what it publishes for the other workers)."""
    figures = []
    for upstream, phase, runner in hook_runners(runtime):
        failures = dict(runner.failures)
        # compile errors and runs the circuit breaker skipped never ran
        ran_failures = sum(n for kind, n in failures.items() if kind not in ("compile_error", "breaker_open"))
        outcomes = {"ok": runner.runs - ran_failures, **failures}
        figures.append({"upstream": upstream, "phase": phase, "outcomes": outcomes,
                        "buckets": list(runner.durations), "sum": runner.duration_sum})
    return figures


class HookFiguresPublisher:
    """Writes this worker's hook figures to ``<zones>/hook_runs.PID.json`` every
    ``HOOKS_PUBLISH_INTERVAL`` (when they changed): hook runs are counted in plain attributes
    of each runner, so sharing them costs nothing per run. Removed at the worker's exit."""

    def __init__(self, runtime: Any, directory: str) -> None:
        self.runtime = runtime
        self.path = os.path.join(directory, _HOOK_FILE.format(pid=os.getpid()))
        self._last: Any = None
        self._timer: Any = None

    def start(self, loop: Any) -> None:
        self._timer = loop.call_later(HOOKS_PUBLISH_INTERVAL, self._tick, loop)

    def _tick(self, loop: Any) -> None:
        figures = hook_figures(self.runtime)
        if figures != self._last:
            self._last = figures
            try:
                tmp = self.path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(figures, f)
                os.replace(tmp, self.path)
            except OSError:
                pass  # a full disk costs the other workers' view of the hooks, nothing else
        self._timer = loop.call_later(HOOKS_PUBLISH_INTERVAL, self._tick, loop)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


def all_hook_figures(runtime: Any, directory: str) -> list[dict[str, Any]]:
    """Every live worker's hook figures: this one's live, the others' as published."""
    from scriptlb.state.stats import _alive

    figures = hook_figures(runtime)
    for path in glob.glob(os.path.join(directory, _HOOK_FILE.format(pid="*"))):
        pid_text = os.path.basename(path).split(".")[1]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or not _alive(int(pid_text)):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                figures.extend(json.load(f))
        except (OSError, ValueError):
            continue
    return figures


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
