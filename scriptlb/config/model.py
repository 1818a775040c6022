"""Typed, frozen configuration objects: the only form of the config that runtime code reads.

The config package turns directive text into these objects once, at load time (lexer ->
parser -> directives -> model). Inheritance (http -> server -> location) is resolved by the
builder, so every ``LocationConf`` carries the *effective* value of each setting and the hot
path never walks parent blocks or re-parses strings.

Units: every duration is a float in seconds, every size an int in bytes.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from enum import IntFlag

# ListenConf.key: (host, port, unix path), the identity of a listening socket; a datagram
# socket (stream's `listen ... udp`) has UDP_KEY in the path's place, a text no path can be
# (NUL ends a socket path), so `listen 53` and `listen 53 udp` are two sockets, as in nginx
ListenKey = tuple[str | None, int, str | None]
UDP_KEY = "\x00udp"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a directive was written, for ``file:line`` in messages."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True, slots=True)
class Template:
    """A string with nginx ``$variables``, split once at load time.

    ``parts`` alternates literals (str) and variable references (``Var``). A template without
    variables has ``static`` set to its text, so callers can skip evaluation entirely.
    """

    raw: str
    parts: tuple[str | Var, ...]
    static: str | None

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts if isinstance(p, Var))


@dataclass(frozen=True, slots=True)
class Var:
    name: str  # without the '$', lower-cased, e.g. "http_user_agent", "upstream_addr"
    # "": a built-in variable; "set": one a `set` directive declares; "capture": $1..$9
    kind: str = ""


# --------------------------------------------------------------------------- main context


@dataclass(frozen=True, slots=True)
class SyslogConf:
    """``syslog:server=ADDR[,facility=F][,tag=T][,nohostname]`` (nginx's ngx_syslog_process_conf):
    where the datagrams go and their header's fields."""

    host: str | None  # an IP literal (a name is resolved at load time), None for a unix socket
    port: int = 514
    unix_path: str | None = None
    facility: int = 23  # local7
    tag: str = "nginx"
    hostname: bool = True  # nohostname leaves the HOSTNAME field out


@dataclass(frozen=True, slots=True)
class ErrorLogConf:
    path: str  # absolute path, "stderr", or the "syslog:..." text of a syslog target
    level: str = "error"  # debug info notice warn error crit alert emerg
    syslog: SyslogConf | None = None


@dataclass(frozen=True, slots=True)
class MainConf:
    """The whole configuration, as loaded from one file (plus includes)."""

    conf_file: str  # absolute path of the main config file
    prefix: str  # absolute prefix (-p), relative paths in the config are resolved against it
    worker_processes: int = 1  # "auto" is resolved to os.cpu_count() by the builder
    daemon: bool = True
    master_process: bool = True
    pid: str | None = None  # absolute path (default: <prefix>/logs/scriptlb.pid); None: no pid file
    error_log: tuple[ErrorLogConf, ...] = ()
    worker_connections: int = 512
    # `user USER [GROUP]`: what a master started as root runs its workers as (uid, gid); None:
    # workers keep the master's identity (nginx would default to nobody; see docs/directives.md)
    user: tuple[int, int] | None = None
    http: HttpConf | None = None
    stream: StreamConf | None = None  # the `stream` block (TCP balancing), None when absent
    # how long old workers keep established connections after a reload or QUIT; 0: no limit
    worker_shutdown_timeout: float = 0.0
    files: tuple[str, ...] = ()  # every config file read (main first, then includes), for -T
    warnings: tuple[str, ...] = ()  # nginx's [warn] lines from loading, e.g. '[warn] duplicate value ...'


# --------------------------------------------------------------------------- http context


@dataclass(frozen=True, slots=True)
class LogFormat:
    name: str
    template: Template
    escape: str = "default"  # default | json | none


@dataclass(frozen=True, slots=True)
class AccessLogConf:
    path: str  # absolute path, or "stderr"/"stdout"
    format: LogFormat
    buffer: int = 0  # access_log ... buffer=SIZE: bytes kept before a write; 0 = write per request
    flush: float = 0.0  # access_log ... flush=TIME: the longest a buffered line may wait
    condition: Template | None = None  # access_log ... if=COND: logged unless "" or "0"
    gzip: int = 0  # access_log ... gzip[=LEVEL]: each buffer written as one gzip member
    path_template: Template | None = None  # a path with variables: opened for each line
    file_cache: LogFileCacheConf | None = None  # open_log_file_cache, for a path_template


@dataclass(frozen=True, slots=True)
class LogFileCacheConf:
    """``open_log_file_cache max=N [inactive=T] [min_uses=N] [valid=T]``: descriptors of log
    files whose names have variables, kept open (nginx's defaults)."""

    max: int
    inactive: float = 10.0  # a file unused this long is closed
    min_uses: int = 1  # uses within `inactive` before its descriptor is kept
    valid: float = 60.0  # a kept descriptor is reopened after this long


@dataclass(frozen=True, slots=True)
class BreakerConf:
    """``balancer_by_python_breaker fails=N window=T cooldown=T``: after ``fails`` failed runs
    (errors, budget overruns) within ``window`` seconds, the hook is skipped for ``cooldown``
    seconds, then tried again one request at a time (scriptlb.hookrt.hooks.Breaker)."""

    fails: int = 10
    window: float = 10.0
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class HookConf:
    """A ``balancer_by_python_*`` or ``log_by_python_*`` hook (``phase`` says which)."""

    kind: str  # "file" | "block"
    path: str | None  # absolute path for "file"
    code: str | None  # dedented Python source for "block"
    source: Source  # the directive's file:line; a block's code starts on source.line + 1
    timeout: float = 0.010  # balancer_by_python_timeout: CPU budget of one run
    # conf line of the block's first code line: source.line + 1 in the usual layout (nothing
    # after "{" on its line); source.line for a one-line block. 0 for "file" hooks.
    first_line: int = 0
    phase: str = "balancer"  # "balancer" (UpstreamConf.hook) | "log" (LocationConf.log_hook)
    # balancer_by_python_fallback: a failed run falls back to the upstream's balancer (on) or
    # answers 500 as OpenResty does (off)
    fallback: bool = True
    breaker: BreakerConf | None = BreakerConf()  # balancer_by_python_breaker; None = off

    @property
    def chunk_name(self) -> str:
        """The name used in tracebacks and logs, like ngx_lua's chunk names:
        the file's path, or ``balancer_by_python(/abs/x.conf:12)`` / ``log_by_python(...)``."""
        if self.kind == "file":
            assert self.path is not None
            return self.path
        return f"{self.phase}_by_python({self.source.file}:{self.source.line})"


DEFAULT_MEMORY_LIMIT = 1 << 30  # an idle worker maps about 40 MiB


@dataclass(frozen=True, slots=True)
class PythonConf:
    """http-level settings of the hook runtime."""

    package_path: tuple[str, ...] = ()  # absolute patterns, e.g. "/srv/hooks/?.py"
    code_cache: bool = True
    # python_memory_limit: the address space a worker running hooks may use beyond its shared
    # dict maps (RLIMIT_AS, the sandbox's last-resort memory fuse); 0 = off
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    # python_peer_stats: keep live per-peer statistics (scriptlb.state.stats) for hooks; off saves
    # about a microsecond per try for configs whose hooks never read them
    peer_stats: bool = True


@dataclass(frozen=True, slots=True)
class DiscoveryConf:
    """``discovery etcd=URL prefix=PREFIX [timeout=T]`` in an upstream (scriptlb.ops.discovery)."""

    etcd: str  # http://HOST:PORT (etcd's v3 HTTP/JSON gateway)
    prefix: str  # each key below it is one server
    timeout: float = 3.0


@dataclass(frozen=True, slots=True)
class ResolverConf:
    """``resolver ADDR[:PORT] ... [valid=T] [ipv6=on|off]; resolver_timeout T;`` (nginx's)."""

    addresses: tuple[tuple[str, int], ...]  # name servers, tried in order
    valid: float | None = None  # overrides the answers' TTL
    ipv4: bool = True
    ipv6: bool = True
    timeout: float = 30.0  # resolver_timeout


@dataclass(frozen=True, slots=True)
class DictSyncConf:
    """``python_shared_dict ... sync=URL``: the zone is merged with Redis by the node's sync
    process (``scriptlb.state.dict_sync``)."""

    url: str  # redis://HOST:PORT/DB or rediss://...
    interval: float = 0.05  # sync_interval=, seconds between two merges
    prefix: str = ""  # sync_prefix=, the Redis key prefix (default: scriptlb:NAME:)
    password_file: str | None = None  # sync_password_file=, read by the sync process


@dataclass(frozen=True, slots=True)
class SharedDictConf:
    """One ``python_shared_dict NAME SIZE;`` zone (``scriptlb.state.shared_dict.SharedDict``)."""

    name: str  # as written; ngx.shared.NAME in hooks (case-sensitive, as lua_shared_dict)
    size: int  # bytes, at least scriptlb.state.shared_dict.MIN_SIZE
    source: Source | None = None
    sync: DictSyncConf | None = None  # cluster-wide through Redis


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One line of a ``map`` block: a source value (or regex) and the template it gives."""

    kind: str  # "exact", "wildcard" (hostnames: *.a.b / .a.b / a.b.*) or "regex"
    key: str  # exact/wildcard: lower-cased text; regex: the pattern without "~"/"~*"
    value: Template
    caseless: bool = False  # regex given as "~*"


@dataclass(frozen=True, slots=True)
class MapConf:
    """A ``map SOURCE $variable { ... }`` block (ngx_http_map_module), checked at load time."""

    variable: str  # without "$", lower-cased
    source: Template
    entries: tuple[MapEntry, ...]  # in file order (regexes are tried in this order)
    default: Template | None = None
    hostnames: bool = False
    volatile: bool = False


@dataclass(frozen=True, slots=True)
class GeoConf:
    """A ``geo [ADDRESS] $variable { ... }`` block (ngx_http_geo_module, ngx_stream_geo_module),
    with its ``delete`` lines applied: what is left to look an address up in."""

    variable: str  # without "$", lower-cased
    source: Template | None  # None: the client's address
    ranges: bool = False
    # CIDR mode: (normalized network, value), the last line for a network winning
    networks: tuple[tuple[str, str], ...] = ()
    # ranges mode: (first, last, value) over IPv4 as integers, sorted, not overlapping
    spans: tuple[tuple[int, int, str], ...] = ()
    default: str = ""
    proxies: tuple[str, ...] = ()  # http: trusted addresses whose X-Forwarded-For is read
    proxy_recursive: bool = False


@dataclass(frozen=True, slots=True)
class HttpConf:
    upstreams: dict[str, UpstreamConf]  # explicit `upstream` blocks and implicit ones (below)
    servers: tuple[ServerConf, ...]
    log_formats: dict[str, LogFormat]
    python: PythonConf = field(default_factory=PythonConf)
    shared_dicts: dict[str, SharedDictConf] = field(default_factory=dict)  # by name, in file order
    matches: dict[str, MatchConf] = field(default_factory=dict)  # `match` blocks by name
    maps: dict[str, MapConf | GeoConf] = field(default_factory=dict)  # `map`, `geo` blocks by variable
    limit_zones: dict[str, LimitZoneConf] = field(default_factory=dict)  # limit_req/conn zones by name

    def hooks(self) -> tuple[HookConf, ...]:
        """Every hook to compile, each once: upstreams' balancer hooks, then the distinct
        log hooks of the locations (an inherited log hook is one HookConf shared by many)."""
        found: dict[HookConf, None] = {}
        for upstream in self.upstreams.values():
            if upstream.hook is not None:
                found[upstream.hook] = None
        for server in self.servers:
            for location in server.locations:
                if location.log_hook is not None:
                    found[location.log_hook] = None
        return tuple(found)


# --------------------------------------------------------------------------- upstreams


@dataclass(frozen=True, slots=True)
class PeerAddr:
    """One resolved address of a ``server`` line."""

    host: str | None  # IP literal without brackets; None for unix sockets
    port: int
    unix_path: str | None = None
    # nginx's peer name as it appears in $upstream_addr: 127.0.0.1:80, [::1]:80, unix:/p (built
    # once: a hook's set_current_peer hands the same cached address to every try)
    name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.unix_path is not None:
            name = f"unix:{self.unix_path}"
        elif self.host is not None and ":" in self.host:
            name = f"[{self.host}]:{self.port}"
        else:
            name = f"{self.host}:{self.port}"
        object.__setattr__(self, "name", name)


@dataclass(frozen=True, slots=True)
class UpstreamServerConf:
    """One ``server`` line of an ``upstream`` block (a name may resolve to several addresses)."""

    name: str  # as written, e.g. "127.0.0.1:9001" or "localhost:9001"
    addrs: tuple[PeerAddr, ...]
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    max_conns: int = 0  # 0 = unlimited
    backup: bool = False
    down: bool = False
    source: Source | None = None
    # nginx Plus's parameters (state files, the API): weight ramp after recovery, and
    # draining (no new requests, those in flight finish)
    slow_start: float = 0.0
    drain: bool = False
    # nginx Plus's `resolve [service=NAME]`: addresses come from DNS at run time (the cluster
    # process, scriptlb.ops.resolver), not from the config loader
    resolve: bool = False
    service: str | None = None


@dataclass(frozen=True, slots=True)
class BalancerMethodConf:
    """The upstream's balancing method. Only round robin exists today; others will add kinds."""

    kind: str = "round_robin"  # round_robin | least_conn | hash | ip_hash | random | ...
    args: tuple[str, ...] = ()
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class MatchConf:
    """``match NAME { ... }`` (nginx Plus): what a health check's response must show."""

    name: str
    # (negated, low, high) status ranges: `status 200-399;`, `status ! 500;`
    statuses: tuple[tuple[bool, int, int], ...] = ()
    # (name lower-cased, operator, value): = != ~ !~, "present", "absent"
    headers: tuple[tuple[str, str, str], ...] = ()
    bodies: tuple[tuple[bool, str], ...] = ()  # (negated, regex)
    send: str | None = None  # type=tcp: bytes to send ("\r\n" escapes resolved)
    expect: str | None = None  # type=tcp: a regex (or text) the reply must match
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class HealthCheckConf:
    """``health_check`` of a location proxying to an upstream (nginx Plus)."""

    interval: float = 5.0
    jitter: float = 0.0
    fails: int = 1
    passes: int = 1
    uri: str = "/"
    port: int = 0  # 0: the peer's own port
    match: MatchConf | None = None  # None: a 2xx or 3xx status passes
    mandatory: bool = False
    persistent: bool = False
    type: str = "http"  # "http" | "tcp"
    host: str = ""  # the Host header sent: the location's $proxy_host
    connect_timeout: float = 60.0  # the location's proxy_connect_timeout
    read_timeout: float = 60.0  # the location's proxy_read_timeout
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class UpstreamConf:
    name: str
    servers: tuple[UpstreamServerConf, ...]
    method: BalancerMethodConf = field(default_factory=BalancerMethodConf)
    hook: HookConf | None = None
    keepalive: int = 0  # max idle connections cached per worker; 0 = no pool
    keepalive_timeout: float = 60.0
    keepalive_requests: int = 1000
    keepalive_time: float = 3600.0  # a pooled connection older than this is closed when released
    # OpenResty's balancer_keepalive: idle connections kept per worker for peers a hook set
    # with enable_keepalive() (one LRU pool per upstream, keyed by address and host)
    balancer_keepalive: int = 32
    implicit: bool = False  # created by `proxy_pass http://IP:PORT`
    source: Source | None = None
    zone: str | None = None  # `zone NAME [SIZE]`: accepted (the statistics are always shared)
    health_checks: tuple[HealthCheckConf, ...] = ()  # from the locations proxying to it
    state_file: str | None = None  # `state FILE`: the servers, kept in step with API changes
    discovery: DiscoveryConf | None = None  # `discovery etcd=...`: servers from etcd
    resolver: ResolverConf | None = None  # the upstream's, else http's `resolver`


# --------------------------------------------------------------------------- servers/locations


@dataclass(frozen=True, slots=True)
class ListenConf:
    host: str | None  # IP literal without brackets ("0.0.0.0" when only a port was given)
    port: int
    unix_path: str | None = None
    default_server: bool = False
    reuseport: bool = False
    backlog: int = 511
    source: Source | None = None
    ssl: bool = False  # `listen ... ssl`: TLS is terminated on this socket
    proxy_protocol: bool = False  # `listen ... proxy_protocol`: connections start with a PROXY header
    sndbuf: int = 0  # `listen ... sndbuf=size`: SO_SNDBUF of the socket (0: the system's)
    rcvbuf: int = 0  # `listen ... rcvbuf=size`: SO_RCVBUF of the socket (0: the system's)
    udp: bool = False  # stream's `listen ... udp`: a datagram socket, a session per client address

    @property
    def key(self) -> ListenKey:
        """Identity of the listening socket; servers with the same key share it."""
        return (self.host, self.port, UDP_KEY if self.udp else self.unix_path)


class NextUpstream(IntFlag):
    """``proxy_next_upstream`` conditions, as nginx's NGX_HTTP_UPSTREAM_FT_* bits."""

    ERROR = 0x02
    TIMEOUT = 0x04
    INVALID_HEADER = 0x08
    HTTP_500 = 0x10
    HTTP_502 = 0x20
    HTTP_503 = 0x40
    HTTP_504 = 0x80
    HTTP_403 = 0x100
    HTTP_404 = 0x200
    HTTP_429 = 0x400
    NON_IDEMPOTENT = 0x2000
    OFF = 0x40000000


@dataclass(frozen=True, slots=True)
class ProxySslConf:
    """ngx_http_proxy_module's proxy_ssl_* settings (TLS to the peers), nginx's defaults."""

    server_name: bool = False  # send SNI
    name: Template | None = None  # None: the host of the proxy_pass URL
    verify: bool = False
    trusted_certificate: str | None = None
    verify_depth: int = 1
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ciphers: str = "DEFAULT"
    # a client certificate for the peers: a path, or a template (evaluated per connection)
    certificate: str | Template | None = None
    certificate_key: str | Template | None = None
    session_reuse: bool = True
    password_file: str | None = None
    crl: str | None = None  # revoked peer certificates (proxy_ssl_crl)
    # proxy_ssl_conf_command NAME VALUE, in order: (name, value, value as a path under the prefix)
    conf_commands: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TextRewrite:
    """One ``proxy_redirect`` / ``proxy_cookie_domain`` / ``proxy_cookie_path`` rule.

    ``kind``: "prefix" (``pattern`` starts the text: it is replaced), "domain" (``pattern``
    equals the domain, a leading dot ignored, case-insensitively), "regex" (``regex`` matches
    the text: the whole text is replaced, ``$1``... are its captures)."""

    kind: str
    replacement: Template
    pattern: Template | None = None
    regex: str = ""
    caseless: bool = False


@dataclass(frozen=True, slots=True)
class CookieFlagsConf:
    """``proxy_cookie_flags cookie|~regex flag ...``: ``cookie`` (a template, compared
    case-insensitively) or ``regex`` (caseless) names the cookie."""

    flags: tuple[Template, ...]
    cookie: Template | None = None
    regex: str = ""


@dataclass(frozen=True, slots=True)
class ProxyConf:
    """Effective proxy_* settings of one location (inheritance already applied)."""

    # (lower-cased name, original-case name, value); an empty static value removes the header.
    # The default list mirrors nginx: Host $proxy_host, Connection close (or "" with keepalive).
    set_headers: tuple[tuple[str, str, Template], ...] = ()
    http_version: str = "1.0"  # "1.0" | "1.1" (nginx's default is 1.0)
    connect_timeout: float = 60.0
    send_timeout: float = 60.0
    read_timeout: float = 60.0
    next_upstream: NextUpstream = NextUpstream.ERROR | NextUpstream.TIMEOUT
    next_upstream_tries: int = 0  # 0 = unlimited
    next_upstream_timeout: float = 0.0  # 0 = unlimited
    request_buffering: bool = True
    buffering: bool = True
    # proxy_buffer_size: the largest response head (nginx: one memory page); proxy_buffers and
    # proxy_busy_buffers_size are accepted and checked as nginx does, the body is streamed
    buffer_size: int = mmap.PAGESIZE
    buffers: tuple[int, int] = (8, mmap.PAGESIZE)  # (number, size)
    busy_buffers_size: int = 2 * mmap.PAGESIZE
    method: Template | None = None  # proxy_method (None: the client's)
    pass_request_headers: bool = True
    pass_request_body: bool = True
    set_body: Template | None = None  # proxy_set_body
    hide_headers: tuple[str, ...] = ()  # proxy_hide_header (lower-cased), all levels' merged
    pass_headers: tuple[str, ...] = ()  # proxy_pass_header (lower-cased)
    ignore_headers: tuple[str, ...] = ()  # proxy_ignore_headers: accepted (no cache, no X-Accel)
    ssl: ProxySslConf = field(default_factory=lambda: ProxySslConf())  # for proxy_pass https://
    # proxy_redirect: rules for Location and Refresh (the implicit "default" included); () = off
    redirects: tuple[TextRewrite, ...] = ()
    cookie_domains: tuple[TextRewrite, ...] = ()  # proxy_cookie_domain; () = off
    cookie_paths: tuple[TextRewrite, ...] = ()  # proxy_cookie_path
    cookie_flags: tuple[CookieFlagsConf, ...] = ()  # proxy_cookie_flags
    bind: Template | None = None  # proxy_bind: the local address of connections to peers


@dataclass(frozen=True, slots=True)
class ProxyPassConf:
    upstream: str  # key into HttpConf.upstreams ("127.0.0.1:9001" for implicit ones)
    uri: str | None  # the URI part of proxy_pass, None when absent (request URI passed as is)
    proxy_host: str  # value of $proxy_host: the upstream name, or host:port when not 80
    source: Source | None = None
    ssl: bool = False  # https://: TLS to the peers (ProxyConf.ssl)
    # proxy_pass with variables: the URL, evaluated per request (``upstream`` is then "");
    # names that are no upstream's are looked up with ``resolver`` (scriptlb.request.dynamic_pass)
    template: Template | None = None
    resolver: ResolverConf | None = None
    proxy_port: str = "80"  # value of $proxy_port: the URL's port, or the scheme's default


@dataclass(frozen=True, slots=True)
class ReturnConf:
    status: int
    text: Template | None  # body text, or the URL for 301/302/303/307/308
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One ``allow``/``deny`` line (ngx_http_access_module), checked in order, first match wins."""

    allow: bool
    network: str  # "all", "unix:", or a normalized CIDR ("10.0.0.0/8", "::1/128")
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class ClientBodyConf:
    """Where a buffered request body is kept: ``buffer_size`` bytes in memory, the rest in a
    file under ``temp_path`` (client_body_buffer_size, client_body_temp_path,
    client_body_in_file_only, client_body_in_single_buffer)."""

    buffer_size: int = 2 * mmap.PAGESIZE  # nginx: two memory pages
    temp_path: str = "client_body_temp"  # absolute once built (under the prefix)
    in_file_only: str = "off"  # "off" | "on" (file kept) | "clean" (file removed)
    in_single_buffer: bool = False


@dataclass(frozen=True, slots=True)
class ProxyStoreConf:
    """``proxy_store on`` (``value`` None: the static handler's path) or ``proxy_store string``."""

    value: Template | None = None
    mode: int = 0o600  # proxy_store_access


@dataclass(frozen=True, slots=True)
class SsiConf:
    """``ssi on`` and its settings (ngx_http_ssi_module): which responses the static handler
    runs the SSI commands of."""

    types: tuple[str, ...] = ("text/html",)  # ssi_types (text/html always); ("*",): every type
    silent_errors: bool = False  # ssi_silent_errors: no errmsg for a failed command
    last_modified: bool = False  # ssi_last_modified: keep the file's Last-Modified
    value_length: int = 256  # ssi_value_length: the longest parameter value


@dataclass(frozen=True, slots=True)
class AddHeaderConf:
    """``add_header name value [always]``."""

    name: str
    value: Template
    always: bool = False


@dataclass(frozen=True, slots=True)
class LimitExceptConf:
    """``limit_except``: requests whose method is not in ``methods`` get these access
    settings (the block's own, else the location's)."""

    methods: frozenset[str]
    access: tuple[AccessRule, ...] = ()
    auth_basic: str | None = None
    auth_basic_user_file: str | None = None
    # a proxy_pass of the block: the location the other methods continue in
    location: LocationConf | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class TryFilesConf:
    """``try_files file ... uri | =code``: ``files`` are (name, test_dir) with the trailing "/"
    of a directory test removed; the last argument is ``fallback`` (a URI or @name) or
    ``code``."""

    files: tuple[tuple[Template, bool], ...]
    fallback: Template | None = None
    code: int = 0


@dataclass(frozen=True, slots=True)
class ExpiresConf:
    """``expires [modified] time | epoch | max | off``: ``kind`` is "off", "epoch", "max",
    "access" (now + seconds), "modified" (Last-Modified + seconds) or "daily" (``@time``);
    ``value`` is set instead when the argument has variables (parsed per response)."""

    kind: str
    seconds: int = 0
    value: Template | None = None


@dataclass(frozen=True, slots=True)
class RewriteOp:
    """One directive of the rewrite module, run in order in the rewrite phase:
    ``set`` (name, value), ``if`` (operator, value, pattern, body), ``rewrite`` (pattern,
    value = the replacement, flag), ``break``, ``return`` (ret)."""

    kind: str  # "set" | "if" | "rewrite" | "break" | "return"
    name: str = ""
    value: Template | None = None
    operator: str = ""  # if: "" (the value is true: neither "" nor "0"), "=", "!=", "~", "~*", "!~", "!~*"
    pattern: str = ""  # a regex (rewrite, if ~) or the string compared (if =)
    flag: str = ""  # rewrite: "" | "last" | "break" | "redirect" | "permanent"
    body: tuple[RewriteOp, ...] = ()
    ret: ReturnConf | None = None
    # if in a location with directives of its own (proxy_pass, add_header...): the location the
    # request continues in once the condition holds (nginx's if-block pseudo-location)
    location: LocationConf | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ErrorPageConf:
    """``error_page code ... [=[response]] uri``: response None keeps the code, 0 (a bare
    "=") takes the redirect's own status."""

    codes: tuple[int, ...]
    response: int | None
    uri: Template


@dataclass(frozen=True, slots=True)
class LocationConf:
    modifier: str  # "=" | "" (prefix) | "^~" | "~" | "~*"
    pattern: str
    proxy_pass: ProxyPassConf | None = None
    return_: ReturnConf | None = None
    proxy: ProxyConf = field(default_factory=ProxyConf)
    client_max_body_size: int = 1024 * 1024  # 0 = unlimited
    client_body_timeout: float = 60.0
    keepalive_timeout: float = 75.0  # 0 disables client keep-alive
    keepalive_requests: int = 1000
    send_timeout: float = 60.0  # send_timeout: how long the client may leave our writes unread
    keepalive_header: int | None = None  # keepalive_timeout's second value: "Keep-Alive: timeout=N"
    keepalive_time: float | None = None  # keepalive_time: no keep-alive after this age (None: 1h)
    keepalive_disable: tuple[str, ...] = ("msie6",)  # browsers whose connections are not kept
    limit_rate: int = 0  # limit_rate: bytes/s of a response (0: none)
    limit_rate_after: int = 0  # limit_rate_after: bytes sent before limit_rate applies
    proxy_limit_rate: int = 0  # proxy_limit_rate: bytes/s read from the peer (0: none)
    proxy_store: ProxyStoreConf | None = None  # proxy_store: 200 responses also written to a file
    client_body: ClientBodyConf = field(default_factory=ClientBodyConf)
    access_log: tuple[AccessLogConf, ...] = ()  # empty = off
    source: Source | None = None
    # log_by_python_file/_block: the innermost level's, else inherited (http -> server ->
    # location); runs after the response is finished. None: no log hook.
    log_hook: HookConf | None = None
    # allow/deny: the innermost level that has rules (nginx's merge); () = everyone allowed
    access: tuple[AccessRule, ...] = ()
    auth_basic: str | None = None  # the realm; None = off (or no auth_basic_user_file)
    auth_basic_user_file: str | None = None  # absolute path, read per request as nginx does
    # a content handler instead of proxy_pass/return: "stub_status" | "api" | "prometheus"
    handler: str | None = None
    api_write: bool = False  # api write=on
    status_zone: str | None = None  # the server's `status_zone`: responses counted by class
    add_headers: tuple[AddHeaderConf, ...] = ()  # add_header: the innermost level's list
    add_trailers: tuple[AddHeaderConf, ...] = ()  # add_trailer: the same, for chunked trailers
    expires: ExpiresConf | None = None  # None: off
    rewrite: tuple[RewriteOp, ...] = ()  # the server's rewrite-module directives, then the location's
    error_pages: tuple[ErrorPageConf, ...] = ()  # error_page: the innermost level's list
    intercept_errors: bool = False  # proxy_intercept_errors
    root: str = "html"  # the static handler's directory (absolute once built)
    alias: str | None = None  # alias: replaces the location's prefix instead of root
    alias_prefix: int = -1  # the length of the prefix it replaces; -1: a regex location's file
    try_files: TryFilesConf | None = None
    limit_except: LimitExceptConf | None = None
    index: tuple[str, ...] = ("index.html",)
    ssi: SsiConf | None = None  # ssi on: the static handler runs the file's SSI commands
    # balancer_trace_header / balancer_trace_allow: the trace header, for these clients only
    trace_header: bool = False
    trace_allow: tuple[str, ...] = ()  # normalized CIDRs, "unix:" or "all"; () = nobody
    # set_real_ip_from & co (None without set_real_ip_from): the server's settings apply before
    # the rewrite phase (nginx's post-read phase), the location's after it (preaccess)
    realip: RealIpConf | None = None
    realip_server: RealIpConf | None = None
    limits: LimitsConf | None = None  # limit_req / limit_conn; None when neither applies
    # how a relative Location nginx makes itself becomes absolute (ngx_http_header_filter)
    absolute_redirect: bool = True
    server_name_in_redirect: bool = False
    port_in_redirect: bool = True
    # nested locations: the ones directly inside this one (ServerConf.locations lists every
    # location, nested ones after their parent; matching starts from the non-nested ones)
    inner: tuple[LocationConf, ...] = ()
    nested: bool = False


@dataclass(frozen=True, slots=True)
class LimitZoneConf:
    """``limit_req_zone`` / ``limit_conn_zone``: a key and a zone shared by every worker."""

    kind: str  # "limit_req" | "limit_conn"
    name: str
    size: int  # bytes
    key: Template
    rate: int = 0  # limit_req: requests per 1000 s (nginx's rate * 1000, per second)
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class LimitReqConf:
    """One ``limit_req zone=NAME [burst=N] [nodelay | delay=N]`` (burst, delay: x1000)."""

    zone: str
    burst: int = 0
    delay: int = 0
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class LimitConnConf:
    """One ``limit_conn ZONE NUMBER``."""

    zone: str
    conn: int
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class LimitsConf:
    """A location's limit_req and limit_conn settings (each list the innermost level's)."""

    reqs: tuple[LimitReqConf, ...] = ()
    req_status: int = 503
    req_log_level: str = "error"
    req_dry_run: bool = False
    conns: tuple[LimitConnConf, ...] = ()
    conn_status: int = 503
    conn_log_level: str = "error"
    conn_dry_run: bool = False


@dataclass(frozen=True, slots=True)
class RealIpConf:
    """ngx_http_realip_module: ``set_real_ip_from``, ``real_ip_header``, ``real_ip_recursive``."""

    trusted: tuple[str, ...]  # normalized CIDRs or "unix:"
    header: str = "x-real-ip"  # lower-case; "proxy_protocol": the PROXY protocol's address
    recursive: bool = False


@dataclass(frozen=True, slots=True)
class SslCertificate:
    """One ``ssl_certificate`` / ``ssl_certificate_key`` pair (a server may have several:
    RSA and ECDSA)."""

    certificate: str  # absolute paths
    key: str
    source: Source | None = None  # the ssl_certificate line (where load errors point)


@dataclass(frozen=True, slots=True)
class SslConf:
    """ngx_http_ssl_module's settings of one server (http's inherited), nginx's defaults."""

    certificates: tuple[SslCertificate, ...] = ()
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ciphers: str = "HIGH:!aNULL:!MD5"
    prefer_server_ciphers: bool = False
    ecdh_curve: str = "auto"
    session_cache: str = "none"  # off | none | builtin[:size] | shared:NAME:size (kept as written)
    session_timeout: float = 300.0
    session_tickets: bool = True
    # ssl_session_ticket_key: (file, its directive) in order (the first encrypts)
    session_ticket_keys: tuple[tuple[str, Source | None], ...] = ()
    client_certificate: str | None = None
    trusted_certificate: str | None = None  # CAs that verify, their names not sent to clients
    verify_client: str = "off"  # off | on | optional | optional_no_ca
    verify_depth: int = 1
    dhparam: str | None = None
    password_file: str | None = None
    source: Source | None = None  # the server block


@dataclass(frozen=True, slots=True)
class ServerConf:
    listens: tuple[ListenConf, ...]
    server_names: tuple[str, ...]
    locations: tuple[LocationConf, ...]  # in declaration order; matching order is computed at runtime
    client_header_timeout: float = 60.0
    large_client_header_buffers: tuple[int, int] = (4, 8192)  # (number, size)
    max_headers: int = 1000  # max_headers: more request header lines than this is a 400
    client_header_buffer_size: int = 1024  # accepted (the head's limit is the line above)
    underscores_in_headers: bool = False
    ignore_invalid_headers: bool = True
    # the server-level default used when no location matches (nginx: 404)
    source: Source | None = None
    ssl: SslConf | None = None  # TLS settings, for servers on a `listen ... ssl` socket
    # the server's own rewrite directives (each location's list starts with them): what runs
    # for a URI no location matches
    rewrite: tuple[RewriteOp, ...] = ()
    # what serves a URI no location matches: the server's own settings (root, logs...), as
    # nginx's server-level location configuration
    fallback: LocationConf | None = None


# --------------------------------------------------------------------------- stream context


@dataclass(frozen=True, slots=True)
class StreamProxyConf:
    """ngx_stream_proxy_module's settings of one stream server, nginx's defaults."""

    connect_timeout: float = 60.0
    timeout: float = 600.0  # proxy_timeout: idle time between two successive reads or writes
    next_upstream: bool = True
    next_upstream_tries: int = 0  # 0 = unlimited
    next_upstream_timeout: float = 0.0  # 0 = unlimited
    buffer_size: int = 16384
    # bytes per second towards the client / the upstream, 0 = unlimited; a Template (variables)
    # is evaluated once per session when it connects
    download_rate: int | Template = 0
    upload_rate: int | Template = 0
    half_close: bool = False  # proxy_half_close: pass an EOF on and wait for the other side's
    proxy_protocol: bool = False  # send a PROXY protocol (v1) header to the peer first
    ssl: ProxySslConf | None = None  # proxy_ssl on: TLS to the peers (http's proxy_ssl_* settings)
    requests: int = 0  # proxy_requests (udp): client datagrams that end a session's binding, 0 = none
    responses: int | None = None  # proxy_responses (udp): datagrams expected per request, None = any


@dataclass(frozen=True, slots=True)
class StreamProxyPass:
    """``proxy_pass NAME | ADDR | $variable``: an upstream key, or a template evaluated per
    session whose value names an upstream or is an address."""

    upstream: str | None  # key into StreamConf.upstreams
    template: Template | None = None
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class StreamServerConf:
    listens: tuple[ListenConf, ...]
    proxy_pass: StreamProxyPass | None
    proxy: StreamProxyConf
    access_logs: tuple[AccessLogConf, ...] = ()
    source: Source | None = None
    ssl_preread: bool = False  # read the TLS ClientHello for $ssl_preread_* before proxying
    proxy_protocol_listens: tuple[ListenKey, ...] = ()  # keys of `listen ... proxy_protocol`
    ssl: SslConf | None = None  # TLS termination on its `listen ... ssl` sockets (http's settings)
    access: tuple[AccessRule, ...] = ()  # allow / deny (ngx_stream_access_module)
    limits: LimitsConf | None = None  # limit_conn (ngx_stream_limit_conn_module); None: no limit
    tcp_nodelay: bool = True  # TCP_NODELAY on both sides of a session
    proxy_bind: Template | None = None  # the local address of peer connections (empty: none)
    error_log: tuple[ErrorLogConf, ...] = ()  # the server's (or stream's) error_log; (): the main's
    ssl_handshake_timeout: float = 60.0
    return_text: Template | None = None  # `return`: the session's content instead of proxying
    sets: tuple[tuple[str, Template], ...] = ()  # `set $name value` (preaccess phase), in order
    realip: RealIpConf | None = None  # `set_real_ip_from`: trusted senders of PROXY headers
    resolver: ResolverConf | None = None  # names in `proxy_pass $var` values


@dataclass(frozen=True, slots=True)
class StreamSplitConf:
    """``split_clients SOURCE $variable { PERCENT% value; ... * value; }``: MurmurHash2 of the
    source picks a part; ``bounds`` are nginx's cumulative 32-bit limits (0: the rest)."""

    variable: str
    source: Template
    parts: tuple[tuple[int, str], ...]  # (upper bound, value)


@dataclass(frozen=True, slots=True)
class StreamMapConf:
    """``map SOURCE $variable { ... }`` (ngx_stream_map_module): the first match of exact keys
    (case-insensitive), then with ``hostnames`` the wildcard masks, then the regexes in order."""

    variable: str  # the defined name, without "$"
    source: Template
    exact: tuple[tuple[str, Template], ...] = ()  # lower-cased keys
    wildcards: tuple[tuple[str, Template], ...] = ()  # ("*.example.com" / ".example.com" / "www.*")
    regexes: tuple[tuple[str, bool, Template], ...] = ()  # (pattern, caseless, value)
    default: Template | None = None
    hostnames: bool = False


@dataclass(frozen=True, slots=True)
class StreamConf:
    upstreams: dict[str, UpstreamConf]
    servers: tuple[StreamServerConf, ...]
    log_formats: dict[str, LogFormat]
    maps: dict[str, StreamMapConf | GeoConf] = field(default_factory=dict)  # map, geo by variable
    limit_zones: dict[str, LimitZoneConf] = field(default_factory=dict)  # limit_conn_zone by name
    split_clients: dict[str, StreamSplitConf] = field(default_factory=dict)  # by variable name
    stored: frozenset[str] = frozenset()  # `set` targets and named captures: a session's own
    # the block's own access_log lines: nginx creates their files at start, used or not
    access_logs: tuple[AccessLogConf, ...] = ()

    def hooks(self) -> tuple[HookConf, ...]:
        return tuple(u.hook for u in self.upstreams.values() if u.hook is not None)
