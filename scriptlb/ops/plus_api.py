"""nginx Plus's REST API (``api [write=on];``, version 9 paths) over scriptlb's shared state.

Read: ``/``, ``/9``, ``/9/nginx``, ``/9/connections``, ``/9/workers[/ID]``, ``/9/http``,
``/9/http/requests``, ``/9/http/upstreams[/NAME]``, ``/9/http/upstreams/NAME/servers[/ID]``,
``/9/stream/upstreams[/NAME]``.
Write (``write=on``): ``DELETE /9/workers[/ID]`` (their counters restart from zero),
``POST .../servers``, ``PATCH|DELETE .../servers/ID``, applied through
``scriptlb.state.peer_lists`` (every worker within its poll interval, this one at once, persisted in
the upstream's ``state`` file). A write is validated completely before anything changes, and
the change itself is one atomic read-modify-write: a refused request changes nothing and
concurrent writers never half-apply.

Errors are nginx Plus's JSON: ``{"error": {"status", "text", "code"}, "request_id", "href"}``.
Figures: peers' requests, active, fails, responses (by class and by code), sent, received,
unavail and header_time (mean, ms) come from the shared statistics (all workers). In a
``zone`` upstream the passive health (``max_fails``) is one state for all workers, as in
nginx's zone: ``unavail`` counts the times the instance disabled the peer, and ``state`` is
the same whichever worker answers (each takes the shared state within 100 ms). Without
``zone`` each worker keeps its own, as nginx does, and ``state`` is the answering worker's.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import scriptlb
from scriptlb.config.errors import ConfigError
from scriptlb.config.units import parse_time
from scriptlb.state.peer_lists import PeerList, PeerListStore, ServerEntry

if TYPE_CHECKING:
    from scriptlb.config.model import UpstreamConf
    from scriptlb.state.peers import Peer

# The request layer's objects this handler reads (its Runtime, Exchange and UpstreamRuntime):
# a lower layer cannot name their types.
Runtime = Any
Exchange = Any
UpstreamRuntime = Any

API_VERSION = 9
_HREF = "https://nginx.org/en/docs/http/ngx_http_api_module.html"
_JSON = b"Content-Type: application/json\r\n"
_SERVER_FIELDS = {"server", "weight", "max_conns", "max_fails", "fail_timeout", "slow_start", "backup",
                  "down", "drain", "route", "service"}
_BODY_MAX = 64 * 1024


class ApiError(Exception):
    def __init__(self, status: int, text: str, code: str) -> None:
        super().__init__(text)
        self.status, self.text, self.code = status, text, code


def _not_found() -> ApiError:
    return ApiError(404, "path not found", "PathNotFound")


def _format_error(text: str) -> ApiError:
    return ApiError(400, text, "UpstreamConfFormatError")


class Api:
    """The content handler of an ``api`` location."""

    def __init__(self, runtime: Runtime, write: bool) -> None:
        self.runtime = runtime
        self.write = write
        self.started = time.time()

    def __call__(self, exchange: Exchange) -> None:
        try:
            status, payload = self.handle(exchange.method, self._path(exchange), exchange.request.take_body())
        except ApiError as err:
            status, payload = err.status, {
                "error": {"status": err.status, "text": err.text, "code": err.code},
                "request_id": uuid.uuid4().hex, "href": _HREF,
            }
        body = b"" if status == 204 else json.dumps(payload, separators=(",", ":")).encode()
        exchange.respond(status, _JSON if body else b"", body)

    @staticmethod
    def _path(exchange: Exchange) -> list[str]:
        conf = exchange.location.conf
        prefix = conf.pattern if conf.modifier in ("", "^~", "=") else ""
        rest = exchange.uri[len(prefix):] if exchange.uri.startswith(prefix) else exchange.uri
        return [part for part in rest.split("/") if part]

    # ----------------------------------------------------------------- routing

    def handle(self, method: str, path: list[str], body: bytes) -> tuple[int, Any]:
        if method not in ("GET", "HEAD", "POST", "PATCH", "DELETE"):
            raise ApiError(405, "method not supported", "MethodNotSupported")
        if method not in ("GET", "HEAD") and not self.write:
            raise ApiError(405, "method disabled", "MethodDisabled")
        if not path:
            return self._get_only(method, list(range(1, API_VERSION + 1)))
        if not path[0].isdigit() or not 1 <= int(path[0]) <= API_VERSION:
            raise ApiError(404, "unknown version", "UnknownVersion")
        rest = path[1:]
        if not rest:
            return self._get_only(method, ["nginx", "connections", "http", "stream", "workers"])
        head = rest[0]
        if head == "nginx" and len(rest) == 1:
            return self._get_only(method, self._nginx())
        if head == "connections" and len(rest) == 1:
            return self._get_only(method, self._connections())
        if head == "http":
            return self._http(method, rest[1:], body)
        if head == "stream":
            return self._get_only(method, self._stream(rest[1:]))
        if head == "workers" and len(rest) <= 2:
            if method == "DELETE":
                self._reset_workers(rest[1:])
                return 204, None
            return self._get_only(method, self._workers(rest[1:]))
        raise _not_found()

    @staticmethod
    def _get_only(method: str, payload: Any) -> tuple[int, Any]:
        if method not in ("GET", "HEAD"):
            raise ApiError(405, "method not supported", "MethodNotSupported")
        return 200, payload

    def _http(self, method: str, rest: list[str], body: bytes) -> tuple[int, Any]:
        if not rest:
            return self._get_only(method, ["requests", "server_zones", "upstreams"])
        if rest[0] == "server_zones" and len(rest) <= 2:
            zones = self._server_zones()
            if len(rest) == 1:
                return self._get_only(method, zones)
            if rest[1] not in zones:
                raise ApiError(404, "server zone not found", "ServerZoneNotFound")
            return self._get_only(method, zones[rest[1]])
        if rest[0] == "requests" and len(rest) == 1:
            totals = self._totals()
            return self._get_only(method, {"total": totals["requests"], "current": totals["writing"]})
        if rest[0] != "upstreams":
            raise _not_found()
        if len(rest) == 1:
            everything = {name: self._upstream(up) for name, up in self._upstreams().items()}
            return self._get_only(method, everything)
        upstream = self._upstreams().get(rest[1])
        if upstream is None:
            raise ApiError(404, "upstream not found", "UpstreamNotFound")
        if len(rest) == 2:
            return self._get_only(method, self._upstream(upstream))
        if rest[2] != "servers" or len(rest) > 4:
            raise _not_found()
        if len(rest) == 3:
            if method == "POST":
                return 201, self._add_server(upstream, body)
            return self._get_only(method, [_server_json(e) for e in self._list(upstream).servers])
        server_id = _server_id(rest[3])
        if method == "PATCH":
            return 200, self._patch_server(upstream, server_id, body)
        if method == "DELETE":
            self._delete_server(upstream, server_id)
            return 200, [_server_json(e) for e in self._list(upstream).servers]
        return self._get_only(method, _server_json(self._entry(upstream, server_id)))

    # ----------------------------------------------------------------- reads

    def _reset_workers(self, rest: list[str]) -> None:
        """``DELETE /workers[/ID]`` (write=on): their counters start again from zero."""
        worker_id = _worker_id(rest[0]) if rest else None
        status = self.runtime.status
        if status is None or not status.reset_workers(worker_id):
            raise ApiError(404, "worker not found", "WorkerNotFound")

    def _workers(self, rest: list[str]) -> Any:
        """``/workers`` (every live worker process, by id) or ``/workers/ID``."""
        status = self.runtime.status
        workers = status.workers() if status is not None else []
        if not rest:
            return workers
        worker_id = _worker_id(rest[0])
        found = [w for w in workers if w["id"] == worker_id]
        if not found:
            raise ApiError(404, "worker not found", "WorkerNotFound")
        return found[-1]  # (during a reload two processes share an id: the last listed)

    def _stream(self, rest: list[str]) -> Any:
        """``/stream``, ``/stream/upstreams[/NAME]``: the stream block's upstreams (read only:
        their server lists come from the config)."""
        stream = getattr(self.runtime, "stream", None)
        upstreams = {name: up for name, up in stream.upstreams.items() if not up.conf.implicit} \
            if stream is not None else {}
        if not rest:
            return ["upstreams"]
        if rest[0] != "upstreams" or len(rest) > 2:
            raise _not_found()
        if len(rest) == 1:
            return {name: _stream_upstream(up) for name, up in upstreams.items()}
        upstream = upstreams.get(rest[1])
        if upstream is None:
            raise ApiError(404, "upstream not found", "UpstreamNotFound")
        return _stream_upstream(upstream)

    def _upstreams(self) -> dict[str, Any]:
        return {name: up for name, up in self.runtime.upstreams.items() if not up.conf.implicit}

    def _totals(self) -> dict[str, int]:
        status = self.runtime.status
        if status is None:
            return dict.fromkeys(("accepted", "handled", "requests", "active", "reading", "writing",
                                  "waiting"), 0)
        totals: dict[str, int] = status.totals()
        return totals

    def _server_zones(self) -> dict[str, Any]:
        """``status_zone`` figures: responses by class (and so requests) of every worker."""
        status = self.runtime.status
        zones = status.zone_totals() if status is not None else {}
        result = {}
        for name, classes in zones.items():
            responses: dict[str, Any] = {f"{c + 1}xx": n for c, n in enumerate(classes)}
            responses["total"] = sum(classes)
            result[name] = {"requests": sum(classes), "responses": responses}
        return result

    def _nginx(self) -> dict[str, Any]:
        now = time.time()
        return {"version": scriptlb.version(), "build": "scriptlb", "address": "127.0.0.1",
                "load_timestamp": _iso(self.started), "timestamp": _iso(now), "pid": os.getpid(),
                "ppid": os.getppid()}

    def _connections(self) -> dict[str, int]:
        t = self._totals()
        return {"accepted": t["accepted"], "dropped": t["accepted"] - t["handled"],
                "active": t["reading"] + t["writing"], "idle": t["waiting"]}

    def _list(self, upstream: UpstreamRuntime) -> PeerList:
        store = self._store()
        return store.current(self._loaded(upstream)) if store is not None else _static_list(upstream)

    def _upstream(self, upstream: UpstreamRuntime) -> dict[str, Any]:
        entries = self._list(upstream).servers
        by_address: dict[str, list[ServerEntry]] = {}
        for listed in entries:
            by_address.setdefault(listed.server, []).append(listed)
        now = self.runtime.loop.time()
        peers = []
        for peer in [*upstream.peers.primary, *upstream.peers.backup]:
            candidates = by_address.get(peer.name) or []
            entry = candidates.pop(0) if candidates else None
            peers.append(_peer_json(upstream, peer, entry, now))
        result = {"peers": peers, "keepalive": len(upstream.pool), "zombies": 0,
                  "zone": upstream.conf.zone or upstream.name}
        membership = self._membership(upstream.name)
        if membership is not None:  # a scriptlb extension: servers from etcd or DNS
            result["membership"] = membership
        return result

    def _membership(self, name: str) -> dict[str, Any] | None:
        """Whether the store an upstream's servers come from is reachable (the cluster process's
        ``cluster_status.json``): ``{"store", "up", "since", "error"}``."""
        from scriptlb.ops.cluster import ClusterStatus
        from scriptlb.state.shared_dict import zone_directory

        for store, items in ClusterStatus.read(zone_directory(self.runtime.conf.prefix)).items():
            item = items.get(name)
            if store in ("etcd", "dns") and item is not None:
                return {"store": store, "up": bool(item.get("up")), "since": _iso(item.get("since", 0)),
                        "error": item.get("error", "")}
        return None

    def _entry(self, upstream: UpstreamRuntime, server_id: int) -> ServerEntry:
        for entry in self._list(upstream).servers:
            if entry.id == server_id:
                return entry
        raise ApiError(404, "server not found", "UpstreamServerNotFound")

    # ----------------------------------------------------------------- writes

    def _store(self) -> PeerListStore | None:
        watcher = self.runtime.peer_lists
        return watcher.store if watcher is not None else None

    def _loaded(self, upstream: UpstreamRuntime) -> UpstreamConf:
        """The upstream's block as the config loaded it (the store keys lists by it)."""
        watcher = self.runtime.peer_lists
        conf: UpstreamConf = watcher.http.upstreams[upstream.name] if watcher is not None else upstream.conf
        return conf

    def _change(self, upstream: UpstreamRuntime, edit: Callable[[PeerList], PeerList]) -> PeerList:
        store = self._store()
        if store is None:
            raise ApiError(500, "run-time upstream changes are unavailable", "InternalError")
        loaded = self._loaded(upstream)
        before: list[PeerList] = []

        def recorded(current: PeerList) -> PeerList:
            before.append(current)
            return edit(current)

        result = store.change(loaded, recorded)
        self.runtime.peer_lists.check()  # this worker at once; the others at their next poll
        if loaded.discovery is not None:  # etcd-backed: the other nodes learn it through etcd
            from scriptlb.ops.discovery import write_through

            write_through(self.runtime.loop, loaded, before[0], result)
        return result

    def _add_server(self, upstream: UpstreamRuntime, body: bytes) -> dict[str, Any]:
        fields = _parse_fields(body, require_server=True)
        added: list[ServerEntry] = []

        def edit(current: PeerList) -> PeerList:
            entry = _entry_from(ServerEntry(id=current.next_id, server=fields["server"]), fields)
            added.append(entry)
            return PeerList((*current.servers, entry), current.next_id + 1, current.generation,
                            current.fingerprint)

        self._change(upstream, edit)
        return _server_json(added[0])

    def _patch_server(self, upstream: UpstreamRuntime, server_id: int, body: bytes) -> dict[str, Any]:
        fields = _parse_fields(body, require_server=False)
        changed: list[ServerEntry] = []

        def edit(current: PeerList) -> PeerList:
            servers = []
            for entry in current.servers:
                if entry.id == server_id:
                    entry = _entry_from(entry, fields, patch=True)
                    changed.append(entry)
                servers.append(entry)
            if not changed:
                raise ApiError(404, "server not found", "UpstreamServerNotFound")
            return PeerList(tuple(servers), current.next_id, current.generation, current.fingerprint)

        self._change(upstream, edit)
        return _server_json(changed[0])

    def _delete_server(self, upstream: UpstreamRuntime, server_id: int) -> None:
        def edit(current: PeerList) -> PeerList:
            servers = tuple(e for e in current.servers if e.id != server_id)
            if len(servers) == len(current.servers):
                raise ApiError(404, "server not found", "UpstreamServerNotFound")
            if not any(not e.backup for e in servers):
                raise ApiError(400, "cannot remove the last primary server", "UpstreamServerImmutable")
            return PeerList(servers, current.next_id, current.generation, current.fingerprint)

        self._change(upstream, edit)


# --------------------------------------------------------------------------- JSON shapes


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}Z"


def _seconds_text(value: float) -> str:
    return f"{value:g}s"


def _server_json(entry: ServerEntry) -> dict[str, Any]:
    return {"id": entry.id, "server": entry.server, "weight": entry.weight, "max_conns": entry.max_conns,
            "max_fails": entry.max_fails, "fail_timeout": _seconds_text(entry.fail_timeout),
            "slow_start": _seconds_text(entry.slow_start), "route": "", "backup": entry.backup,
            "down": entry.down, "drain": entry.drain}


def _static_list(upstream: UpstreamRuntime) -> PeerList:
    from scriptlb.state.peer_lists import entries_from_conf, fingerprint

    entries = entries_from_conf(upstream.conf)
    return PeerList(entries, len(entries), 0, fingerprint(upstream.conf))


def peer_state(upstream: UpstreamRuntime, peer: Peer, entry: ServerEntry | None, now: float) -> str:
    if entry is not None and entry.drain:
        return "draining"
    if peer.config_down:
        return "down"
    if upstream.conf.health_checks and upstream.stats is not None:
        from scriptlb.ops.health import HealthView

        health = HealthView.state(upstream, peer)
        if health != "up":
            return health
    if peer.max_fails and peer.fails >= peer.max_fails and now - peer.checked <= peer.fail_timeout:
        return "unavail"
    return "up"


def _peer_json(upstream: UpstreamRuntime, peer: Peer, entry: ServerEntry | None,
               now: float) -> dict[str, Any]:
    stats = upstream.stats
    requests = failures = active = 0
    classes = [0, 0, 0, 0, 0]
    codes: dict[int, int] = {}
    traffic: list[float] = [0, 0, 0, 0, 0.0]  # TRAFFIC_FIELDS
    response_ms = None
    if stats is not None:
        requests, failures, active, _status, _failure, ewma, _peak, _stamp, _ = stats.figures(peer)
        classes = stats.classes(peer)
        codes = stats.codes(peer)
        traffic = stats.traffic(peer)
        response_ms = round(ewma * 1000) if ewma is not None else None
    sent, received, unavail, header_samples, header_sum = traffic
    responses: dict[str, Any] = {f"{c + 1}xx": n for c, n in enumerate(classes)}
    responses["codes"] = {str(code): codes[code] for code in sorted(codes)}
    responses["total"] = sum(classes)
    checked = bool(upstream.conf.health_checks) and stats is not None
    if checked:
        from scriptlb.ops.health import HealthView
    result = {
        "id": entry.id if entry is not None else peer.id, "server": peer.name, "name": peer.server,
        "backup": peer.backup, "weight": peer.weight, "state": peer_state(upstream, peer, entry, now),
        "active": active, "requests": requests, "responses": responses, "sent": int(sent),
        "received": int(received), "fails": failures, "unavail": int(unavail),
        "health_checks": HealthView.figures(upstream, peer) if checked else
        {"checks": 0, "fails": 0, "unhealthy": 0},
        "downtime": round(HealthView.downtime(upstream, peer, time.time()) * 1000) if checked else 0,
    }
    if peer.max_conns:
        result["max_conns"] = peer.max_conns
    selected = stats.selected(peer) if stats is not None else None
    if selected is not None:
        result["selected"] = _iso(selected)
    if header_samples:
        result["header_time"] = round(header_sum / header_samples * 1000)  # mean, milliseconds
    if response_ms is not None:
        result["response_time"] = response_ms
    return result


def _stream_upstream(upstream: Any) -> dict[str, Any]:
    """nginx Plus's stream upstream: its peers count ``connections`` (no HTTP responses)."""
    now = upstream.loop.time()
    peers = []
    for peer in [*upstream.peers.primary, *upstream.peers.backup]:
        figures = _peer_json(upstream, peer, None, now)
        figures["connections"] = figures.pop("requests")
        del figures["responses"]
        if "header_time" in figures:  # the time to the peer's first byte
            figures["first_byte_time"] = figures.pop("header_time")
        peers.append(figures)
    return {"peers": peers, "zombies": 0, "zone": upstream.conf.zone or upstream.name}


# --------------------------------------------------------------------------- input


def _worker_id(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise ApiError(400, "invalid worker id", "WorkerBadId")
    return int(text)


def _server_id(text: str) -> int:
    if not text.isdigit():
        raise ApiError(400, "invalid server id", "UpstreamBadServerId")
    return int(text)


def _parse_fields(body: bytes, require_server: bool) -> dict[str, Any]:
    """The JSON object of a POST/PATCH, every field checked (nothing is applied on error)."""
    if len(body) > _BODY_MAX:
        raise _format_error("request body too large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # hostile nesting included
        raise ApiError(400, "invalid JSON", "UpstreamConfFormatError") from None
    if not isinstance(data, dict):
        raise _format_error("JSON object expected")
    for key in data:
        if key not in _SERVER_FIELDS:
            raise _format_error(f'unknown parameter "{key}"')
    if "route" in data or "service" in data:
        raise _format_error('"route" and "service" are not supported by scriptlb')
    fields: dict[str, Any] = {}
    if "server" in data:
        fields["server"] = _address(data["server"])
    elif require_server:
        raise _format_error('"server" field is missing')
    for key in ("weight", "max_conns", "max_fails"):
        if key in data:
            value = data[key]
            low = 1 if key == "weight" else 0
            if type(value) is not int or not low <= value <= 1_000_000:
                raise _format_error(f'invalid "{key}" field')
            fields[key] = value
    for key in ("fail_timeout", "slow_start"):
        if key in data:
            fields[key] = _duration(key, data[key])
    for key in ("backup", "down", "drain"):
        if key in data:
            if type(data[key]) is not bool:
                raise _format_error(f'invalid "{key}" field')
            fields[key] = data[key]
    return fields


def _address(value: Any) -> str:
    """An IP:port (port 80 by default) or unix: path. Not a host name: resolving one would
    block the worker's loop for as long as a (client-chosen) DNS server takes."""
    if type(value) is not str or not value or len(value) > 256:
        raise _format_error('invalid "server" field')
    import ipaddress

    from scriptlb.config.addresses import AddressError, resolve_upstream_address, split_host_port

    try:
        target = split_host_port(value)
        if target.unix_path is None:
            ipaddress.ip_address(target.host)
    except (AddressError, ValueError):
        raise ApiError(400, "invalid server address (an IP address or unix: path)",
                       "UpstreamBadAddress") from None

    try:
        addrs = resolve_upstream_address(value)
    except ConfigError:
        raise ApiError(400, "invalid server address", "UpstreamBadAddress") from None
    if len(addrs) != 1:
        raise ApiError(400, "the server name resolves to several addresses", "UpstreamBadAddress")
    return addrs[0].name


def _duration(key: str, value: Any) -> float:
    if type(value) is int and value >= 0:
        return float(value)
    seconds = parse_time(value, seconds_only=True) if type(value) is str else None
    if seconds is None:
        raise _format_error(f'invalid "{key}" field')
    return seconds


def _entry_from(entry: ServerEntry, fields: dict[str, Any], patch: bool = False) -> ServerEntry:
    """``entry`` with the request's fields; a PATCH may not move a server between the primary
    and backup lists (nginx Plus refuses it too)."""
    import dataclasses

    if patch and "backup" in fields and fields["backup"] != entry.backup:
        raise ApiError(400, 'server "backup" flag is immutable', "UpstreamServerImmutable")
    return dataclasses.replace(entry, **fields)
