"""The tries loop in virtual time: each recorded request goes through the upstream's hook (or
its balancing method), its tries get an outcome and a duration from the peer model, and
failures, retries, ``max_fails``/``fail_timeout``, the peer statistics and the log hook all
advance on the virtual clock.

The decisions are the proxy's own code: ``HookRunner.run`` (the sandbox and the hook API),
the balancer's ``new_request``/``get``/``free``/``observe``, the statistics' recorder, and the
retry rules of ``scriptlb.request.retry``. What this module adds is the order the proxy calls them in
(``proxy.UpstreamRequest._next_try``, ``upstream_head``, ``_try_failed``) with a model in place
of the network.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass, field
from typing import Any, Literal

from scriptlb.config.model import NextUpstream
from scriptlb.replay.logs import Recorded
from scriptlb.replay.model import ERROR, TIMEOUT, PeerModel
from scriptlb.replay.offline import Offline
from scriptlb.replay.synthetic import TryRecord
from scriptlb.request.headers_filter import request_header
from scriptlb.request.retry import (
    RETRY,
    Failure,
    decide,
    failure_for_status,
    is_counted_failure,
    is_idempotent,
    last_failure_state,
    last_failure_status,
)

_FAILURE_OF = {ERROR: Failure.ERROR, TIMEOUT: Failure.TIMEOUT}
NO_PEER = -1  # Result.first_peer of a request that reached no peer


@dataclass
class Result:
    """What a replay measured. Indexes into ``peer_names`` stand for peers."""

    config: str
    upstream: str
    peer_names: list[str] = field(default_factory=list)
    tries: list[int] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    requests: int = 0
    elsewhere: int = 0  # logged requests routed to another location or upstream: not replayed
    total_tries: int = 0
    retries: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)  # hook outcome error -> runs
    log_hook_errors: dict[str, int] = field(default_factory=dict)  # log_by_python error -> runs
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: array[float] = field(default_factory=lambda: array("d"))  # per request, seconds
    first_peer: array[int] = field(default_factory=lambda: array("i"))  # per request (NO_PEER: none)
    lines: array[int] = field(default_factory=lambda: array("i"))  # per request: its log line
    buckets: list[list[int]] = field(default_factory=list)  # per time bucket: tries per peer
    bucket_latencies: list[list[float]] = field(default_factory=list)  # a sample per bucket
    bucket_width: float = 60.0
    start: float = 0.0
    hook_logs: int = 0
    decisions: list[list[int]] | None = None  # every try's peer, per request (when asked)

    def peer_index(self, name: str) -> int:
        try:
            return self.peer_names.index(name)
        except ValueError:
            self.peer_names.append(name)
            self.tries.append(0)
            self.failures.append(0)
            for bucket in self.buckets:
                bucket.append(0)
            return len(self.peer_names) - 1


class ReplayExchange:
    """A recorded request as the hook API and variables see it (``SyntheticExchange``'s
    attributes; what no recorded request varies is shared by the class)."""

    __slots__ = (
        "args",
        "connect_timeout",
        "ctx",
        "headers",
        "last_failure",
        "location",
        "method",
        "proxy_host",
        "read_timeout",
        "remote_addr",
        "request_uri",
        "send_timeout",
        "start_time",
        "status",
        "tries",
        "tries_cap",
        "tries_left",
        "upstream_name",
        "uri",
    )
    is_stream: Literal[False] = False  # (request_view: an http request)
    http_version = "1.1"
    remote_port = 40000
    server_addr, server_port, server_name = "127.0.0.1", 80, "localhost"
    scheme = "http"
    body_bytes_sent = bytes_sent = request_length = 0
    conn_id = conn_requests = 1
    upstream_headers: tuple[()] = ()
    response_headers = b""

    def header(self, name_lower: str) -> str | None:
        """A request header's value (the first; Cookie lines joined with "; " as nginx)."""
        return request_header(self.headers, name_lower)

    def __init__(
        self, recorded: Recorded, now: float, upstream: str, location: Any, conf: Any, cap: int
    ) -> None:
        self.method = recorded.method
        target = self.request_uri = recorded.target
        path, sep, query = target.partition("?")
        self.uri = path or "/"
        self.args = query if sep else None
        self.headers = recorded.headers
        self.remote_addr = recorded.remote_addr
        self.start_time = now
        self.status = 0
        self.upstream_name = self.proxy_host = upstream
        self.location = location
        self.ctx: dict[str, Any] = {}
        self.tries: list[TryRecord] = []
        self.last_failure: tuple[str, int] | None = None
        self.connect_timeout, self.send_timeout, self.read_timeout = (
            conf.connect_timeout,
            conf.send_timeout,
            conf.read_timeout,
        )
        self.tries_cap = cap
        self.tries_left = 0

    @property
    def host(self) -> str:
        return (self.header("host") or "localhost").split(":")[0].lower()


class _Flight:
    """One request in flight: the proxy's UpstreamRequest, with a model for a network."""

    __slots__ = (
        "arrival",
        "bucket",
        "ex",
        "failure",
        "first",
        "index",
        "peer",
        "peers",
        "record",
        "recorded",
        "state",
        "stats_index",
        "status",
    )

    def __init__(self, ex: ReplayExchange, recorded: Recorded, arrival: float) -> None:
        self.ex = ex
        self.recorded = recorded
        self.arrival = arrival
        self.bucket = 0  # the time bucket of its arrival (the plot's)
        self.state: Any = None
        self.peer: Any = None  # the balancer's peer of the try in progress (None: a hook's address)
        self.record: TryRecord | None = None
        self.stats_index = -1
        self.index = -1  # Result's index of the try's peer
        self.failure: Any = None  # the try's failure (a Failure) or None
        self.status = 0  # the try's status when it got a response
        self.first = NO_PEER
        self.peers: list[int] | None = None


class Engine:
    """Replays requests against one ``Offline`` upstream."""

    def __init__(
        self,
        offline: Offline,
        models: dict[str, PeerModel],
        default: PeerModel,
        *,
        seed: int = 1,
        bucket_width: float = 60.0,
        buckets: int = 60,
        keep_decisions: bool = False,
        latency_samples: int = 2000,
        tries_cap: int | None = None,
    ) -> None:
        self.offline = offline
        self.loop = offline.loop
        self.upstream = offline.upstream
        self.conf = offline.proxy
        self.models = models
        self.default = default
        self.rng = random.Random(seed)
        self.result = Result(
            config=offline.conf.conf_file,
            upstream=offline.upstream_conf.name,
            bucket_width=bucket_width,
            start=offline.loop.now,
        )
        if keep_decisions:
            self.result.decisions = []
        for peer in [*self.upstream.peers.primary, *self.upstream.peers.backup]:
            self.result.peer_index(peer.name)
        self._index: dict[str, int] = {name: i for i, name in enumerate(self.result.peer_names)}
        self._peer_models: dict[str, PeerModel] = {}
        self._active: dict[int, int] = {}
        self._latency_every = latency_samples
        self._buckets = buckets  # requests after the last bucket's end count in the last one
        # proxy_next_upstream_tries (a walk in the test kit may impose its own)
        self._tries_cap = self.conf.next_upstream_tries if tries_cap is None else tries_cap
        self._log_hook = offline.log_hook
        self._stats = self.upstream.stats
        # every try's decision, when asked (the test kit's and `hook run --tries`' walk):
        # (hook outcome or None, peer name or None, logged lines of the hook run)
        self.trace: list[tuple[Any, str | None, int]] | None = None
        self.finished: ReplayExchange | None = None  # the last request that ended

    # ------------------------------------------------------------------ arrivals

    def arrive(self, recorded: Recorded, at: float) -> None:
        """Schedule a recorded request to arrive at virtual time ``at``."""
        self.loop.at(at, self._begin, recorded)

    def _begin(self, recorded: Recorded) -> None:
        now = self.loop.now
        conf = self.conf
        ex = ReplayExchange(recorded, now, self.upstream.name, self.offline.location, conf, self._tries_cap)
        flight = _Flight(ex, recorded, now)
        flight.bucket = self._bucket_number(now)
        if self.result.decisions is not None:
            flight.peers = []
        flight.state = self.upstream.balancer_request(self._tries_cap, ex)
        self._next_try(flight)

    # ------------------------------------------------------------------ one try

    def _next_try(self, flight: _Flight) -> None:
        """proxy.UpstreamRequest._next_try: the hook, else the balancer; then the model."""
        ex = flight.ex
        upstream = self.upstream
        state = flight.state
        now = self.loop.now
        ex.tries_left = state.tries
        addr = None
        hook = upstream.hook
        outcome = None
        if hook is not None:
            outcome = hook.run(ex, upstream)
            if outcome.error is not None:
                fallbacks = self.result.fallbacks
                fallbacks[outcome.error] = fallbacks.get(outcome.error, 0) + 1
            if outcome.exit_status is not None:
                if self.trace is not None:
                    self.trace.append((outcome, None, len(self.offline.logs)))
                self._finish(flight, outcome.exit_status)
                return
            if outcome.addr is not None:
                addr = outcome.addr
                state.tries += outcome.more_tries
        stats = self._stats
        if addr is None:
            peer = upstream.balancer.get(state, now)
            if self.trace is not None:
                self.trace.append((outcome, peer.name if peer is not None else None, len(self.offline.logs)))
            if peer is None:
                ex.tries.append(TryRecord(upstream.name, now, 502, 0.0))  # no live upstreams
                self._finish(flight, 502)
                return
            name = peer.name
            flight.peer = peer
            if stats is not None:
                flight.stats_index = peer.stats_index
                stats.start(peer.stats_index)
        else:
            name = addr.name
            if self.trace is not None:
                self.trace.append((outcome, name, len(self.offline.logs)))
            flight.peer = None
            if stats is not None:
                flight.stats_index = stats.start_address(name)
        record = flight.record = TryRecord(name, now)
        ex.tries.append(record)
        index = self._index.get(name)
        if index is None:
            index = self._index[name] = self.result.peer_index(name)
        flight.index = index
        if flight.first == NO_PEER:
            flight.first = index
        if flight.peers is not None:
            flight.peers.append(index)
        active = self._active
        active[index] = in_flight = active.get(index, 0) + 1
        self.loop.at(now + self._outcome(flight, name, in_flight), self._try_ended, flight)

    def _model(self, name: str) -> PeerModel:
        model = self._peer_models.get(name)
        if model is None:
            model = self._peer_models[name] = self.models.get(name, self.default)
        return model

    def _outcome(self, flight: _Flight, name: str, in_flight: int) -> float:
        """The try's failure or status (on the flight) and its duration, from the model."""
        model = self._model(name)
        ex = flight.ex
        failure = (
            model.failure_at(self.loop.now, self.loop.now - self.result.start, self.rng)
            if model.error_rate or model.outages
            else None
        )
        if failure is None or type(failure) is int:
            duration = model.latency(self.rng)
            if model.capacity and in_flight > model.capacity:
                duration *= in_flight / model.capacity  # a saturated peer's queue
        else:
            duration = 0.0
        if failure == TIMEOUT or duration > ex.read_timeout:
            flight.failure, flight.status = Failure.TIMEOUT, 0
            timeout: float = ex.read_timeout
            return timeout
        if failure == ERROR:
            flight.failure, flight.status = Failure.ERROR, 0
            return 0.0
        if failure is None:
            recorded = flight.recorded.status
            flight.status = recorded if 0 < recorded < 500 else 200
        elif isinstance(failure, int):  # a status the model answers with
            flight.status = failure
        flight.failure = None
        return duration

    # ------------------------------------------------------------------ a try's end

    def _try_ended(self, flight: _Flight) -> None:
        now = self.loop.now
        record = flight.record
        assert record is not None
        record.response_time = record.header_time = now - record.started
        record.connect_time = 0.0
        self._active[flight.index] -= 1
        result = self.result
        result.tries[flight.index] += 1
        result.total_tries += 1
        self._bucket(flight.bucket)[flight.index] += 1
        failure = flight.failure
        if failure is not None or flight.status >= 500:
            result.failures[flight.index] += 1
        if failure is None:
            self._got_response(flight, record)
        else:
            self._failed(flight, record, failure)

    def _got_response(self, flight: _Flight, record: TryRecord) -> None:
        """proxy.UpstreamRequest.upstream_head (and upstream_complete)."""
        status = flight.status
        record.status = status
        conf = self.conf
        now = self.loop.now
        failure = failure_for_status(status)
        if failure is not None and conf.next_upstream & NextUpstream(int(failure)):
            verdict = decide(
                failure,
                flight.state.tries - 1,
                flight.arrival,
                now,
                conf,
                is_idempotent(flight.ex.method),
                request_sent=True,
            )
            if verdict == RETRY:
                failed = is_counted_failure(failure, True)
                self._observe(flight, record)
                self._finish_stats(flight, status, record.response_time, failed)
                self._free(flight, failed, failure)
                self._next_try(flight)
                return
        self._observe(flight, record)
        self._finish_stats(flight, status, record.response_time, False)
        if flight.peer is not None:
            self.upstream.balancer.free(flight.state, flight.peer, False, now)
        self._finish(flight, status)

    def _failed(self, flight: _Flight, record: TryRecord, failure: Failure) -> None:
        """proxy.UpstreamRequest._try_failed."""
        record.status = last_failure_status(failure)
        self._finish_stats(flight, 0, record.response_time if failure is Failure.TIMEOUT else None, True)
        self._free(flight, True, failure)
        verdict = decide(
            failure,
            flight.state.tries,
            flight.arrival,
            self.loop.now,
            self.conf,
            is_idempotent(flight.ex.method),
            request_sent=failure is not Failure.ERROR,
        )
        if verdict == RETRY:
            self._next_try(flight)
        else:
            self._finish(flight, verdict)

    def _observe(self, flight: _Flight, record: TryRecord) -> None:
        if flight.peer is not None:
            self.upstream.balancer.observe(
                flight.peer, record.connect_time, record.header_time, record.response_time, self.loop.now
            )

    def _finish_stats(self, flight: _Flight, status: int, sample: float | None, failed: bool) -> None:
        index = flight.stats_index
        if index >= 0:
            flight.stats_index = -1
            if self._stats is not None:  # (an index is only given out with statistics)
                self._stats.finish(index, status, sample, failed)

    def _free(self, flight: _Flight, failed: bool, failure: Failure) -> None:
        """proxy.UpstreamRequest._free_try: the balancer's peer, or a hook's address."""
        if flight.peer is not None:
            peer, flight.peer = flight.peer, None
            self.upstream.balancer.free(flight.state, peer, failed, self.loop.now)
            return
        state = flight.state
        if state.tries:
            state.tries -= 1
        flight.ex.last_failure = (last_failure_state(failure), last_failure_status(failure))

    # ------------------------------------------------------------------ the request's end

    def _finish(self, flight: _Flight, status: int) -> None:
        now = self.loop.now
        result = self.result
        ex = flight.ex
        ex.status = status
        self.finished = ex
        result.requests += 1
        tries = len(ex.tries)
        if tries > 1:
            result.retries += tries - 1
        result.statuses[status] = result.statuses.get(status, 0) + 1
        latency = now - flight.arrival
        result.latencies.append(latency)
        result.first_peer.append(flight.first)
        result.lines.append(flight.recorded.line)
        if result.decisions is not None:
            result.decisions.append(flight.peers or [])
        self._bucket_latency(flight.bucket, latency)
        log_hook = self._log_hook
        if log_hook is not None:
            error = log_hook.run(ex, now)
            if error is not None:
                result.log_hook_errors[error] = result.log_hook_errors.get(error, 0) + 1

    def _bucket_number(self, when: float) -> int:
        number = int((when - self.result.start) / self.result.bucket_width)
        return 0 if number < 0 else number if number < self._buckets else self._buckets - 1

    def _bucket(self, number: int) -> list[int]:
        buckets = self.result.buckets
        while len(buckets) <= number:
            buckets.append([0] * len(self.result.peer_names))
        return buckets[number]

    def _bucket_latency(self, number: int, latency: float) -> None:
        samples = self.result.bucket_latencies
        while len(samples) <= number:
            samples.append([])
        kept = samples[number]
        if len(kept) < self._latency_every:
            kept.append(latency)
        else:
            slot = int(self.rng.random() * len(kept) * 2)
            if slot < len(kept):
                kept[slot] = latency

    def drain(self) -> None:
        self.loop.run_all()
        if self.offline.recorder is not None:
            self.offline.recorder.flush()
        self.result.hook_logs = len(self.offline.logs)
