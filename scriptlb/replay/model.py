"""What each peer does with a try in a replay: its latency, failures, capacity and outages.

Learned from the log by default (``Learner``: every recorded try of a peer gives a latency
sample or a failure), and overridable per peer from a YAML, JSON or TOML file::

    default: {latency: 20ms}                    # peers the log never shows
    peers:
      "127.0.0.1:9001":
        latency: {median: 20ms, p99: 200ms}     # log-normal; or 50ms; or [0.01, 0.02, ...]
        error_rate: 0.01                        # share of tries that fail ...
        error: 502                              # ... with 502 (or "error", "timeout")
        capacity: 100                           # tries in flight before latency grows
        outages:
          - {from: 60s, to: 90s, status: 502}   # seconds from the start of the trace

Latency above ``capacity`` grows in proportion (twice the capacity, twice the latency), as a
saturated server's queue does. A failure of kind ``error`` (refused, reset) takes no time and
says nothing about latency; ``timeout`` lasts the try's read timeout.
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from dataclasses import dataclass, field
from typing import Any

from scriptlb.config.units import parse_time

ERROR = "error"  # a connection refused or reset: no response
TIMEOUT = "timeout"  # no response within the read timeout
RESERVOIR = 10_000  # latency samples kept per peer (a uniform sample of all tries)
WINDOW = 60.0  # seconds: failures are learned per window, so a bad hour stays a bad hour
_Z99 = 2.3263478740408408  # the 99th percentile of the standard normal


class ModelError(ValueError):
    """A model file that cannot be used; the message says where."""


@dataclass(slots=True)
class Outage:
    start: float  # seconds from the trace's start
    end: float
    failure: int | str  # a status, ERROR or TIMEOUT


@dataclass(slots=True)
class PeerModel:
    """One peer's behaviour. ``sample`` is called once per try."""

    samples: list[float] = field(default_factory=list)  # empirical latencies (seconds)
    lognormal: tuple[float, float] | None = None  # (mu, sigma) of log(latency)
    fixed: float | None = None
    error_rate: float = 0.0
    failures: list[int | str] = field(default_factory=lambda: [502])  # what a failure is, by frequency
    capacity: int = 0
    outages: list[Outage] = field(default_factory=list)
    # learned: the failure rate of each WINDOW of the trace (by int(time // WINDOW)) in which
    # the peer was tried; other windows use error_rate
    windows: dict[int, float] | None = None

    def latency(self, rng: random.Random) -> float:
        if self.fixed is not None:
            return self.fixed
        if self.lognormal is not None:
            return rng.lognormvariate(*self.lognormal)
        samples = self.samples
        if not samples:
            return 0.0
        return samples[int(rng.random() * len(samples))]

    def failure_at(self, now: float, elapsed: float, rng: random.Random) -> int | str | None:
        """The failure of a try starting at ``now``, ``elapsed`` seconds into the trace, or None."""
        for outage in self.outages:
            if outage.start <= elapsed < outage.end:
                return outage.failure
        rate = self.error_rate
        if self.windows is not None:
            rate = self.windows.get(int(now // WINDOW), rate)
        if rate and rng.random() < rate:
            failures = self.failures
            return failures[int(rng.random() * len(failures))]
        return None


class Learner:
    """Peer models from a log's recorded tries (one reservoir of latencies per peer)."""

    def __init__(self, rng: random.Random, next_upstream_statuses: frozenset[int]) -> None:
        self._rng = rng
        self._retried_statuses = next_upstream_statuses  # proxy_next_upstream's http_NNN
        self.tries: dict[str, int] = {}
        self.failed: dict[str, list[int | str]] = {}
        self.samples: dict[str, list[float]] = {}
        self._seen: dict[str, int] = {}
        self._window_tries: dict[tuple[str, int], int] = {}  # (peer, window) -> tries
        self._window_failures: dict[tuple[str, int], int] = {}

    def add(self, tries: list[tuple[str, int, float | None]], when: float = 0.0) -> None:
        """One request's tries, at ``when``. A 5xx try followed by another try was retried: by
        a status ``proxy_next_upstream`` lists, or else it was nginx's own 502 (error) / 504
        (timeout)."""
        window = int(when // WINDOW)
        counts = self._window_tries
        if len(tries) == 1:  # most requests: one try that got an answer
            addr, status, duration = tries[0]
            if 0 < status < 500 and duration is not None and addr in self.tries:
                self.tries[addr] += 1
                key = (addr, window)
                counts[key] = counts.get(key, 0) + 1
                self._sample(addr, duration)
                return
        last = len(tries) - 1
        for i, (addr, status, duration) in enumerate(tries):
            if addr.startswith("unix:") is False and ":" not in addr:
                continue  # "no live upstreams": the upstream's name, not a peer
            self.tries[addr] = self.tries.get(addr, 0) + 1
            key = (addr, window)
            counts[key] = counts.get(key, 0) + 1
            if status >= 500 or status == 0:
                self._window_failures[key] = self._window_failures.get(key, 0) + 1
                failure: int | str = status
                if status == 0 or (i < last and status not in self._retried_statuses):
                    failure = TIMEOUT if status == 504 else ERROR
                self.failed.setdefault(addr, []).append(failure)
                if len(self.failed[addr]) > RESERVOIR:
                    self.failed[addr].pop(int(self._rng.random() * RESERVOIR))
                continue
            if duration is not None:
                self._sample(addr, duration)

    def _sample(self, addr: str, duration: float) -> None:
        seen = self._seen[addr] = self._seen.get(addr, 0) + 1
        kept = self.samples.get(addr)
        if kept is None:
            kept = self.samples[addr] = []
        if seen <= RESERVOIR:
            kept.append(duration)
            return
        slot = int(self._rng.random() * seen)  # reservoir sampling: each try kept with equal chance
        if slot < RESERVOIR:
            kept[slot] = duration

    def models(self) -> dict[str, PeerModel]:
        found: dict[str, PeerModel] = {}
        for addr, count in self.tries.items():
            failures = self.failed.get(addr, [])
            found[addr] = PeerModel(
                samples=self.samples.get(addr, []),
                error_rate=len(failures) / count,
                failures=failures or [502],
                windows={} if failures else None,
            )
        for (addr, window), tried in self._window_tries.items():
            windows = found[addr].windows
            if windows is not None:
                windows[window] = self._window_failures.get((addr, window), 0) / tried
        return found

    def pooled(self) -> PeerModel:
        """A peer the log never shows: every peer's latencies, no failures."""
        pooled: list[float] = []
        for samples in self.samples.values():
            pooled.extend(samples[: RESERVOIR // max(len(self.samples), 1)])
        return PeerModel(samples=pooled)


# --------------------------------------------------------------------------- the model file


def load_file(path: str) -> dict[str, Any]:
    """A model file's data (by extension: .toml, .json, else YAML)."""
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            try:
                import yaml
            except ImportError:
                raise ModelError(
                    f"{path}: YAML needs PyYAML (pip install 'scriptlb[replay]'), "
                    "or write the model as .json or .toml"
                ) from None
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"{path}: {err}") from None
    except Exception as err:  # yaml.YAMLError, without importing yaml when it is not used
        raise ModelError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a mapping with 'peers' and/or 'default'")
    return data


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ModelError(f"{where}: a duration expected, got {value!r}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ModelError(f"{where}: a duration expected, got {value!r}")
        return float(value)
    if isinstance(value, str):
        parsed = parse_time(value.strip())
        if parsed is not None:
            return parsed
    raise ModelError(f"{where}: a duration expected (seconds, or like 20ms), got {value!r}")


def _failure(value: Any, where: str) -> int | str:
    if value in (ERROR, TIMEOUT):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 999:
        return value
    raise ModelError(f'{where}: a status (502) or "error" or "timeout" expected, got {value!r}')


def apply_overrides(model: PeerModel, spec: Any, where: str) -> PeerModel:
    """``model`` with the fields ``spec`` (one peer's mapping in the file) sets."""
    if not isinstance(spec, dict):
        raise ModelError(f"{where}: a mapping expected")
    unknown = set(spec) - {"latency", "error_rate", "error", "capacity", "outages"}
    if unknown:
        raise ModelError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if "latency" in spec:
        _set_latency(model, spec["latency"], f"{where}.latency")
    if "error_rate" in spec:
        rate = spec["error_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ModelError(f"{where}.error_rate: a number from 0 to 1 expected, got {rate!r}")
        model.error_rate = float(rate)
        model.windows = None  # the file's rate holds for the whole trace
    if "error" in spec:
        model.failures = [_failure(spec["error"], f"{where}.error")]
    if "capacity" in spec:
        capacity = spec["capacity"]
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ModelError(f"{where}.capacity: a whole number >= 0 expected, got {capacity!r}")
        model.capacity = capacity
    if "outages" in spec:
        model.outages = [
            _outage(item, f"{where}.outages[{i}]") for i, item in enumerate(spec["outages"] or [])
        ]
    return model


def _set_latency(model: PeerModel, value: Any, where: str) -> None:
    model.fixed = model.lognormal = None
    if isinstance(value, list):
        model.samples = [_seconds(v, where) for v in value]
        if not model.samples:
            raise ModelError(f"{where}: an empty list")
    elif isinstance(value, dict):
        if set(value) != {"median", "p99"}:
            raise ModelError(f"{where}: {{median: ..., p99: ...}} expected")
        median, p99 = _seconds(value["median"], where), _seconds(value["p99"], where)
        if not 0 < median <= p99:
            raise ModelError(f"{where}: 0 < median <= p99 expected")
        model.lognormal = (math.log(median), math.log(p99 / median) / _Z99)
    else:
        model.fixed = _seconds(value, where)


def _outage(item: Any, where: str) -> Outage:
    if not isinstance(item, dict) or "from" not in item or "to" not in item:
        raise ModelError(f"{where}: {{from: ..., to: ..., status: ...}} expected")
    start, end = _seconds(item["from"], f"{where}.from"), _seconds(item["to"], f"{where}.to")
    if end <= start:
        raise ModelError(f"{where}: 'to' must come after 'from'")
    return Outage(start, end, _failure(item.get("status", ERROR), f"{where}.status"))


def build_models(
    learned: dict[str, PeerModel], pooled: PeerModel, data: dict[str, Any] | None, source: str = "model"
) -> tuple[dict[str, PeerModel], PeerModel]:
    """(per-peer models, the default model) from what was learned and the file's overrides."""
    models = dict(learned)
    default = pooled
    if data:
        unknown = set(data) - {"peers", "default"}
        if unknown:
            raise ModelError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        if "default" in data:
            default = apply_overrides(
                PeerModel(samples=list(pooled.samples)), data["default"], f"{source}: default"
            )
        peers = data.get("peers") or {}
        if not isinstance(peers, dict):
            raise ModelError(f"{source}: peers: a mapping of address -> settings expected")
        for name, spec in peers.items():
            base = models.get(str(name))
            if base is None:
                base = PeerModel(
                    samples=list(default.samples), fixed=default.fixed, lognormal=default.lognormal
                )
            models[str(name)] = apply_overrides(base, spec, f"{source}: peers.{name}")
    return models, default
