"""Addresses in directives: ``listen``, upstream ``server`` lines and ``proxy_pass`` URLs.

Host names are resolved once, at load time, with getaddrinfo (nginx does the same for
``server`` lines without ``resolve``): a name may yield several addresses, each becoming a peer.
Error texts are nginx's (``ngx_parse_url`` / ``ngx_http_upstream_server``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

from scriptlb.config.errors import ConfigError
from scriptlb.config.model import ListenConf, PeerAddr, Source, UpstreamServerConf
from scriptlb.config.parser import Node
from scriptlb.config.units import parse_int, parse_time


@dataclass(frozen=True, slots=True)
class HostPort:
    """``host[:port]``, ``[v6][:port]`` or ``unix:/path`` split, not yet resolved."""

    host: str  # without brackets; "" for unix sockets
    port: int | None  # None when not written
    unix_path: str | None = None


class AddressError(ValueError):
    """``kind`` is nginx's error head: "invalid port", "invalid host", "no host", ..."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def split_host_port(text: str) -> HostPort:
    """Split an address as nginx's ngx_parse_url does; raises AddressError."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise AddressError("no path in the unix domain socket")
        return HostPort("", None, path)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError("invalid host")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError("invalid IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise AddressError("invalid host")
        return HostPort(host, _port(rest[1:]) if rest else None)
    host, colon, port = text.partition(":")
    if not host:
        raise AddressError("no host")
    return HostPort(host, _port(port) if colon else None)


def _port(text: str) -> int:
    port = parse_int(text)
    if port is None or not 1 <= port <= 65535:
        raise AddressError("invalid port")
    return port


def resolve(host: str, port: int) -> tuple[PeerAddr, ...]:
    """All addresses of ``host`` (IP literals are taken as is); empty if it does not resolve."""
    if host == "*":
        host = "0.0.0.0"
    try:
        return (PeerAddr(str(ipaddress.ip_address(host)), port),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return ()
    addrs: list[PeerAddr] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        addr = PeerAddr(str(sockaddr[0]).split("%")[0], port)
        if addr not in addrs:
            addrs.append(addr)
    return tuple(addrs)


# --------------------------------------------------------------------------- listen


def parse_listen(node: Node) -> list[ListenConf]:
    """``listen ADDR [default_server] [reuseport] [backlog=N]`` -> one ListenConf per address."""
    text = node.args[0]
    default_server = reuseport = ssl = proxy_protocol = False
    backlog = 511
    for param in node.args[1:]:
        if param in ("default_server", "default"):
            default_server = True
        elif param == "reuseport":
            reuseport = True
        elif param == "ssl":
            ssl = True
        elif param == "proxy_protocol":
            proxy_protocol = True
        elif param in ("http2", "quic"):
            raise ConfigError(f'the "{param}" parameter of "listen" is not supported by scriptlb '
                              "(HTTP/1.1 only)", node.source)
        elif param.startswith("backlog="):
            value = parse_int(param[len("backlog=") :])
            if not value:
                raise ConfigError(f'invalid backlog "{param}"', node.source)
            backlog = value
        else:
            raise ConfigError(f'invalid parameter "{param}"', node.source)

    if ssl and proxy_protocol:  # (the PROXY header comes before the TLS handshake)
        raise ConfigError('the "proxy_protocol" parameter of "listen" with "ssl" is not supported by '
                          "scriptlb", node.source)

    def listen(host: str | None, port: int, unix_path: str | None = None) -> ListenConf:
        return ListenConf(host, port, unix_path, default_server, reuseport, backlog, node.source, ssl,
                          proxy_protocol)

    ports = _port_range(node, text)
    if ports is not None:  # ADDR:LOW-HIGH (or a bare LOW-HIGH): one socket per port, as nginx
        host_part = text[: text.rfind(":")] if ":" in text.rsplit("]", 1)[-1] else ""
        low = ports[0]
        first = parse_listen_text(node, f"{host_part}:{low}" if host_part else str(low), listen)
        return [dataclasses.replace(conf, port=port) for port in range(ports[0], ports[1] + 1)
                for conf in first]
    return parse_listen_text(node, text, listen)


def _port_range(node: Node, text: str) -> tuple[int, int] | None:
    """The ports of ``...:LOW-HIGH``, None when the port part is no range."""
    tail = text.rsplit("]", 1)[-1].rsplit(":", 1)[-1]
    low_text, dash, high_text = tail.partition("-")
    if not dash or text.startswith("unix:"):
        return None
    low, high = parse_int(low_text), parse_int(high_text)
    if low is None or high is None or not 0 < low <= high < 65536:
        raise ConfigError(f'invalid port range in "{text}" of the "listen" directive', node.source)
    return low, high


def parse_listen_text(node: Node, text: str, listen: Callable[..., ListenConf]) -> list[ListenConf]:
    if parse_int(text) is not None:  # a bare port
        return [listen("0.0.0.0", _listen_port(node, text))]
    try:
        hp = split_host_port(text)
    except AddressError as e:
        raise ConfigError(f'{e.kind} in "{text}" of the "listen" directive', node.source) from None
    if hp.unix_path is not None:
        return [listen(None, 0, hp.unix_path)]
    port = 80 if hp.port is None else hp.port
    addrs = resolve(hp.host, port)
    if not addrs:
        raise ConfigError(f'host not found in "{text}" of the "listen" directive', node.source)
    return [listen(a.host, port) for a in addrs]


def _listen_port(node: Node, text: str) -> int:
    try:
        return _port(text)
    except AddressError:
        raise ConfigError(f'invalid port in "{text}" of the "listen" directive', node.source) from None


# --------------------------------------------------------------------------- upstream server


def parse_upstream_server(node: Node, allowed: frozenset[str] | None = None) -> UpstreamServerConf:
    """``server ADDR [weight=N] [max_fails=N] [fail_timeout=T] [backup] [down] [max_conns=N]``.

    ``allowed``: the parameter names the upstream's balancing method (declared above this
    line) supports, as nginx's NGX_HTTP_UPSTREAM_* flags; None: all of them.
    """
    text = node.args[0]
    params: dict[str, object] = {}
    for param in node.args[1:]:
        if allowed is not None and param.partition("=")[0] not in allowed:
            raise ConfigError(f'balancing method does not support parameter "{param}"', node.source)
        key, value = _server_param(param)
        if key is None:
            raise ConfigError(f'invalid parameter "{param}"', node.source)
        params[key] = value
    if "service" in params and not params.get("resolve"):
        raise ConfigError(f'service parameter requires "resolve" in upstream "{text}"', node.source)
    if params.get("resolve"):
        # resolved at run time by the cluster process (scriptlb.ops.resolver): nothing here
        _check_resolvable(node, text, bool(params.get("service")))
        addrs: tuple[PeerAddr, ...] = ()
    else:
        addrs = resolve_upstream_address(text, node.source)
    # params holds each field's value as _server_param parsed it: a field name -> its type
    return UpstreamServerConf(name=text, addrs=addrs, source=node.source, **params)  # type: ignore[arg-type]


def _check_resolvable(node: Node, text: str, service: bool) -> None:
    try:
        hp = split_host_port(text)
    except AddressError as e:
        raise ConfigError(f'{e.kind} in upstream "{text}"', node.source) from None
    if hp.unix_path is not None:
        raise ConfigError(f'invalid address "{text}" for resolve in upstream', node.source)
    if service and hp.port is not None:
        raise ConfigError(f'service upstream "{text}" may not have port', node.source)


def _server_param(param: str) -> tuple[str | None, object]:
    """(field, value) of one server parameter, or (None, None) if invalid."""
    if param in ("backup", "down", "drain", "resolve"):
        return param, True
    if param.startswith("service="):
        return ("service", param[8:]) if param[8:] else (None, None)
    name, eq, value = param.partition("=")
    if not eq:
        return None, None
    if name == "weight":
        weight = parse_int(value)
        return ("weight", weight) if weight else (None, None)
    if name in ("max_fails", "max_conns"):
        count = parse_int(value)
        return (name, count) if count is not None else (None, None)
    if name in ("fail_timeout", "slow_start"):
        seconds = parse_time(value, seconds_only=True)
        return (name, seconds) if seconds is not None else (None, None)
    return None, None


def resolve_upstream_address(text: str, source: Source | None = None) -> tuple[PeerAddr, ...]:
    """The peers of one upstream ``server`` address (port 80 when none is written); errors
    name ``source`` (None: an address from the API or a state file, not from the config)."""
    try:
        hp = split_host_port(text)
    except AddressError as e:
        raise ConfigError(f'{e.kind} in upstream "{text}"', source) from None
    if hp.unix_path is not None:
        return (PeerAddr(None, 0, hp.unix_path),)
    addrs = resolve(hp.host, 80 if hp.port is None else hp.port)
    if not addrs:
        raise ConfigError(f'host not found in upstream "{text}"', source)
    return addrs


# --------------------------------------------------------------------------- proxy_pass


@dataclass(frozen=True, slots=True)
class ProxyUrl:
    authority: str  # "backend", "127.0.0.1:9001", "unix:/tmp/s.sock"
    target: HostPort
    uri: str | None
    ssl: bool = False  # https://


def proxy_host_port(parsed: ProxyUrl) -> tuple[str, str]:
    """nginx's ``$proxy_host`` and ``$proxy_port`` of a proxy_pass URL (ngx_http_proxy_set_vars):
    the host with the port unless it is the scheme's default, and that port ("80"/"443" when the
    URL names none); a unix socket is "localhost" with an empty port."""
    target = parsed.target
    if target.unix_path is not None:
        return "localhost", ""
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if parsed.ssl else 80
    if target.port in (None, default):
        return host, str(default)
    return f"{host}:{target.port}", str(target.port)


def parse_proxy_url(url: str) -> ProxyUrl:
    """``http[s]://host[:port][/uri]`` or ``http[s]://unix:/path[:/uri]``; raises AddressError."""
    ssl = url[:8].lower() == "https://"
    if url[:7].lower() != "http://" and not ssl:
        raise AddressError("invalid URL prefix")
    rest = url[8:] if ssl else url[7:]
    if rest.lower().startswith("unix:"):
        path, colon, uri = rest[len("unix:") :].partition(":")
        return ProxyUrl(f"unix:{path}", split_host_port(f"unix:{path}"), uri if colon else None, ssl)
    slash = rest.find("/")
    authority, path_uri = (rest, None) if slash < 0 else (rest[:slash], rest[slash:])
    if not authority:
        raise AddressError("no host")
    return ProxyUrl(authority, split_host_port(authority), path_uri, ssl)
