"""A replay from end to end: read the logs twice (learn, then replay), for one config or two.

The first pass learns the peer model from every recorded try and counts the requests of each
logged second; the second feeds the requests to the engine at their arrival times. A log with
one-second times (``$time_local``) spreads the requests of a second evenly over it; with
``$msec`` a request arrives at its logged time minus its ``$request_time``. Arrivals out of
order by up to ``REORDER`` seconds (nginx logs a request when it ends) are put back in order;
an older one arrives at once. Standard input is kept in a temporary file for the second pass.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scriptlb.config import load
from scriptlb.config.model import MainConf
from scriptlb.replay.engine import Engine, Result
from scriptlb.replay.logs import LineParser, Recorded, Timing, format_template, open_log, read_requests
from scriptlb.replay.model import Learner, PeerModel, build_models, load_file
from scriptlb.replay.offline import Offline, pick_upstream, proxying_location
from scriptlb.replay.route import Router

REORDER = 5.0  # seconds of lookahead for requests logged out of arrival order
_STATUS_BITS = {500: 0x10, 502: 0x20, 503: 0x40, 504: 0x80, 403: 0x100, 404: 0x200, 429: 0x400}


@dataclass
class Options:
    conf: str
    logs: list[str]
    upstream: str | None = None
    log_format: str | None = None
    model: str | None = None
    prefix: str | None = None  # the configs' prefix (relative paths in them)
    compare: str | None = None
    rate: float | None = None  # requests per second instead of the recorded times
    seed: int = 1
    buckets: int = 60
    decisions: bool = False
    progress: Callable[[int, int], None] | None = None


@dataclass
class Trace:
    """What the first pass found."""

    requests: int = 0
    first: float = 0.0
    last: float = 0.0
    per_second: dict[int, int] = field(default_factory=dict)
    lines: int = 0
    skipped: int = 0
    latency_samples: int = 0  # recorded try times the model learned from


def load_conf(path: str, prefix: str | None = None) -> MainConf:
    return load(os.path.abspath(path), prefix)


def _retried_statuses(conf: MainConf, upstream: str | None) -> frozenset[int]:
    location = proxying_location(conf, pick_upstream(conf, upstream).name)
    if location is None:
        return frozenset()
    mask = int(location.proxy.next_upstream)
    return frozenset(status for status, bit in _STATUS_BITS.items() if mask & bit)


def _arrival(request: Recorded | Timing) -> float:
    if request.second_only or request.request_time is None:
        return request.time
    return request.time - request.request_time


def learn(paths: list[str], parser: LineParser, learner: Learner) -> Trace:
    """Pass one: the model's tries, the time range, requests per logged second."""
    trace = Trace()
    stats: dict[str, Any] = {}
    first = last = None
    per_second = trace.per_second
    for request in read_requests(paths, parser, stats, first_pass=True):
        trace.requests += 1
        when = _arrival(request)
        learner.add(request.tries, when)
        first = when if first is None or when < first else first
        last = when if last is None or when > last else last
        if request.second_only:
            second = int(request.time)
            per_second[second] = per_second.get(second, 0) + 1
    trace.first, trace.last = first or 0.0, last or 0.0
    trace.lines, trace.skipped = stats.get("lines", 0), stats.get("skipped", 0)
    trace.latency_samples = sum(len(samples) for samples in learner.samples.values())
    return trace


def arrivals(
    paths: list[str], parser: LineParser, trace: Trace, rate: float | None
) -> Iterator[tuple[Recorded, float]]:
    """Pass two: each request with its arrival time."""
    seen_in_second: dict[int, int] = {}
    for number, request in enumerate(read_requests(paths, parser)):
        if rate:
            yield request, trace.first + number / rate
        elif request.second_only:
            second = int(request.time)
            k = seen_in_second.get(second, 0)
            seen_in_second[second] = k + 1
            if len(seen_in_second) > 4096:
                seen_in_second = {second: k + 1}
            yield request, second + k / trace.per_second.get(second, 1)
        else:
            yield request, _arrival(request)


def replay_one(
    conf: MainConf,
    options: Options,
    parser: LineParser,
    trace: Trace,
    models: dict[str, PeerModel],
    default: PeerModel,
    requests: list[Recorded] | None = None,
) -> Result:
    """The second pass for one configuration (over ``requests`` if given, else the logs)."""
    span = max(trace.last - trace.first, 1.0) if not options.rate else max(trace.requests / options.rate, 1.0)
    with Offline(conf, options.upstream, start=max(trace.first, 1.0), seed=options.seed) as offline:
        engine = Engine(
            offline,
            models,
            default,
            seed=options.seed,
            bucket_width=span / options.buckets,
            buckets=options.buckets,
            keep_decisions=options.decisions,
        )
        loop = offline.loop
        progress = options.progress
        source = (
            ((r, _arrival(r)) for r in requests)
            if requests is not None
            else arrivals(options.logs, parser, trace, options.rate)
        )
        router = Router(conf, offline.upstream_conf.name)
        routed = router.everything
        for done, (request, at) in enumerate(source, 1):
            if not routed and not router.serves(_host(request), request.target):
                engine.result.elsewhere += 1  # another location's (or a return's) request
                continue
            loop.run_until(at - REORDER)
            engine.arrive(request, at)
            if progress is not None and not done & 1023:
                progress(done, trace.requests)
        engine.drain()
        if progress is not None:
            progress(trace.requests, trace.requests)
        return engine.result


def _host(request: Recorded) -> str | None:
    for name, value in request.headers:
        if name.lower() == b"host":
            return value.decode("latin-1")
    return None


def replay(options: Options) -> tuple[list[Result], Trace, float]:
    """Replay the logs against the config (and the one to compare with). Returns the results,
    the trace and the seconds the replay took (both passes)."""
    started = time.perf_counter()
    conf = load_conf(options.conf, options.prefix)
    other = load_conf(options.compare, options.prefix) if options.compare else None
    parser = LineParser(format_template(options.log_format, conf))
    spooled = None
    if "-" in options.logs:
        spooled = _spool_stdin()
        options.logs = [spooled if p == "-" else p for p in options.logs]
    try:
        learner = Learner(random.Random(options.seed), _retried_statuses(conf, options.upstream))
        trace = learn(options.logs, parser, learner)
        data = load_file(options.model) if options.model else None
        models, default = build_models(learner.models(), learner.pooled(), data, options.model or "model")
        results = [replay_one(conf, options, parser, trace, models, default)]
        if other is not None:
            results.append(replay_one(other, options, parser, trace, models, default))
    finally:
        if spooled is not None:
            os.unlink(spooled)
    return results, trace, time.perf_counter() - started


def _spool_stdin() -> str:
    fd, path = tempfile.mkstemp(prefix="scriptlb-replay-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as out, open_log("-") as source:
        shutil.copyfileobj(source, out)
    return path


def progress_bar(stream: Any = None) -> Callable[[int, int], None]:
    """A one-line progress bar on ``stream`` (standard error), redrawn at most 10 times a second."""
    stream = stream or sys.stderr
    last = [0.0]

    def draw(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        share = done / total if total else 1.0
        filled = int(share * 30)
        stream.write(f"\rreplaying [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} requests")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return draw
