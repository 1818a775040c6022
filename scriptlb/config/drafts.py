"""Mutable drafts the directive handlers fill while the tree is walked.

A draft is one block being configured (main, http, server, location, upstream). Handlers only
record what they read (parsed and validated); cross-block work (inheritance, proxy_pass ->
upstream resolution, listen conflicts, hook timeouts) happens once the whole tree is read, in
``builder.py``, because nginx allows forward references (an upstream defined after its use, an
http-level ``balancer_by_python_timeout`` after the upstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scriptlb.config.model import (
    AccessLogConf,
    BalancerMethodConf,
    ErrorLogConf,
    GeoConf,
    ListenConf,
    ListenKey,
    LogFormat,
    MapConf,
    ReturnConf,
    SharedDictConf,
    Source,
    Template,
    UpstreamServerConf,
)

Header = tuple[str, str, Template]  # (lower-case name, name as written, value)


@dataclass(eq=False)
class LevelDraft:
    """Settings that http, server and location share and inherit (nginx's merge_loc_conf)."""

    values: dict[str, Any] = field(default_factory=dict)  # directive name -> parsed value
    set_headers: list[Header] | None = None  # None: not defined here, inherit
    access_logs: list[AccessLogConf] | None = None  # None: inherit; []: access_log off
    log_hook: HookDraft | None = None  # log_by_python_*; None: inherit


@dataclass(eq=False)
class LocationDraft(LevelDraft):
    modifier: str = ""
    pattern: str = ""
    source: Source | None = None
    proxy_pass: tuple[str, Source] | None = None  # the URL as written
    proxy_pass_template: Any = None  # the URL's Template when it has variables
    return_: ReturnConf | None = None
    locations: list[LocationDraft] = field(default_factory=list)  # nested locations


@dataclass(eq=False)
class ServerDraft(LevelDraft):
    source: Source | None = None
    listens: list[ListenConf] = field(default_factory=list)
    server_names: list[str] = field(default_factory=list)
    locations: list[LocationDraft] = field(default_factory=list)
    return_: ReturnConf | None = None  # server-level return: answers every request


@dataclass(eq=False)
class HookDraft:
    name: str  # the directive, for messages
    kind: str  # "file" | "block"
    path: str | None
    code: str | None
    source: Source
    code_line: int = 0
    phase: str = "balancer"  # "balancer" | "log": HookConf.phase


@dataclass(eq=False)
class UpstreamDraft:
    name: str
    source: Source
    close: Source | None = None
    servers: list[UpstreamServerConf] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    hook: HookDraft | None = None  # None also when a later balancing method replaced it
    hook_declared: bool = False  # a second hook directive is "is duplicate" even then
    method: BalancerMethodConf = field(default_factory=BalancerMethodConf)
    method_declared: bool = False
    # server parameters the current method supports on the lines that follow (None: all)
    allowed_params: frozenset[str] | None = None


@dataclass(eq=False)
class HttpDraft(LevelDraft):
    close: Source | None = None  # the block's "}": where merge-time checks point, as nginx
    prefix: str = ""  # where relative default paths (client_body_temp) live
    upstreams: dict[str, UpstreamDraft] = field(default_factory=dict)
    servers: list[ServerDraft] = field(default_factory=list)
    log_formats: dict[str, LogFormat] = field(default_factory=dict)
    shared_dicts: dict[str, SharedDictConf] = field(default_factory=dict)
    matches: dict[str, MatchDraft] = field(default_factory=dict)
    maps: dict[str, MapConf | GeoConf] = field(default_factory=dict)  # map, geo: by variable name
    limit_zones: dict[str, Any] = field(default_factory=dict)  # LimitZoneConf by name


@dataclass(eq=False)
class MatchDraft:
    """A ``match`` block being read (nginx Plus)."""

    name: str
    source: Source
    statuses: list[tuple[bool, int, int]] = field(default_factory=list)
    headers: list[tuple[str, str, str]] = field(default_factory=list)
    bodies: list[tuple[bool, str]] = field(default_factory=list)
    send: str | None = None
    expect: str | None = None


@dataclass(eq=False)
class MainDraft:
    values: dict[str, Any] = field(default_factory=dict)
    error_logs: list[ErrorLogConf] = field(default_factory=list)
    events: bool = False
    http: HttpDraft | None = None
    stream: StreamDraft | None = None


@dataclass(eq=False)
class StreamServerDraft:
    source: Source | None = None
    values: dict[str, Any] = field(default_factory=dict)
    listens: list[ListenConf] = field(default_factory=list)
    proxy_pass: tuple[str, Source] | None = None
    access_logs: list[AccessLogConf] | None = None
    proxy_protocol_listens: list[ListenKey] = field(default_factory=list)
    return_text: tuple[str, Source] | None = None
    content: str = ""  # "proxy_pass" or "return": the last one read is the handler, as nginx
    sets: list[tuple[str, Any]] = field(default_factory=list)  # `set $name value`, in order


@dataclass(eq=False)
class StreamDraft:
    """The ``stream`` block: its own upstreams, servers and log formats (nginx keeps them apart
    from http's)."""

    values: dict[str, Any] = field(default_factory=dict)
    upstreams: dict[str, UpstreamDraft] = field(default_factory=dict)
    servers: list[StreamServerDraft] = field(default_factory=list)
    log_formats: dict[str, LogFormat] = field(default_factory=dict)
    access_logs: list[AccessLogConf] | None = None
    maps: dict[str, Any] = field(default_factory=dict)  # variable name -> MapConf
    # variables named before any map defined them, checked at the block's end
    deferred_names: list[tuple[str, Source]] = field(default_factory=list)
    split_clients: dict[str, Any] = field(default_factory=dict)  # variable name -> StreamSplitConf
    # names a session stores itself: `set` targets and map regexes' named captures
    stored: set[str] = field(default_factory=set)
    limit_zones: dict[str, Any] = field(default_factory=dict)  # limit_conn_zone: LimitZoneConf by name
